"""``rl-scan``: the trained scan-planning network behind the :class:`~policies.base.Policy`
protocol.

It keeps the same :class:`~policies.scan_map.ScanMap` its training environment kept
(:mod:`policies.env_scan`): each frame the agent hands it is ingested (a survey frame updates
the tile's bright-pixel count and hotspot, a zoom frame its dopant detections), the network picks
the next tile and magnification among the valid actions, and the decision is one ``Scan`` of that
frame. The map is centred on the first frame's scan centre, with the grid, tile size and dose
budget of the training run (the weights' ``meta``); tiles off the stage are masked. When the
budget is spent the decision asks the agent to stop. It needs torch and scipy only (no
gymnasium, no stable-baselines3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from drivers.commands import Scan
from drivers.errors import ConfigError
from drivers.observation import Decision, Observation
from policies.base import named_decision
from policies.rl_net import WEIGHTS_DIR, PolicyNet, load_policy
from policies.scan_map import SURVEY, ScanMap, scan_n_actions, scan_obs_dim

SCAN_WEIGHTS = WEIGHTS_DIR / "rl_scan.pt"


class RLScanPolicy:
    """Scan planning by the trained network (see the module doc)."""

    name = "rl-scan"

    def __init__(self, weights: str | Path = SCAN_WEIGHTS, *, budget: int | None = None) -> None:
        path = Path(weights)
        meta_grid = _peek_grid(path)
        self.grid = meta_grid
        self.net: PolicyNet
        self.net, self.meta = load_policy(
            path, kind="scan", obs_dim=scan_obs_dim(self.grid), n_actions=scan_n_actions(self.grid)
        )
        self.version = f"1+{str(self.meta['sha256'])[:10]}"
        self.tile_m = float(self.meta.get("tile_m", 64e-9))
        self.time_scale_s = float(self.meta.get("time_scale_s", 2.0))
        self.budget = int(budget if budget is not None else self.meta.get("budget", 64))
        if self.budget < 2:
            raise ConfigError(f"budget must be >= 2 zoom frames of dose, got {self.budget!r}")
        self.reset()

    def reset(self) -> None:
        self._map: ScanMap | None = None
        self._t0: float | None = None

    @property
    def scan_map(self) -> ScanMap | None:
        return self._map

    def decide(self, observation: Observation) -> Decision:
        if observation.problems:
            return named_decision(
                self.name, f"frame not acted on ({'; '.join(observation.problems)}): rescan", 0.0
            )
        frame = observation.frame
        limits = observation.info.limits
        if self._map is None:
            region = frame.scan_region
            self._map = ScanMap(
                (region.center_x_m, region.center_y_m),
                grid=self.grid,
                tile_m=self.tile_m,
                stage_x_m=limits.stage_x_m,
                stage_y_m=limits.stage_y_m,
                budget=self.budget,
            )
            self._t0 = float(observation.state.time_s)
        scan_map = self._map
        kind, tile, detections = scan_map.ingest(frame)
        seen = f"{kind} frame" + (f" of tile {tile}" if tile is not None else "")
        if kind == "zoom":
            seen += f": {detections.shape[0]} dopant columns detected"
        elif kind == "survey" and tile is not None:
            seen += f": {scan_map.tiles[tile].bright} bright pixels"
        mask = scan_map.action_masks()
        if not mask.any():
            return named_decision(
                self.name,
                f"{seen}; dose budget of {self.budget} zoom frames spent "
                f"({scan_map.detected} dopants detected): survey done",
                1.0,
                stop=True,
            )
        t0 = self._t0 if self._t0 is not None else float(observation.state.time_s)
        obs = scan_map.observation(
            time_fraction=(float(observation.state.time_s) - t0) / self.time_scale_s
        )
        action, probs = self.net.act(obs, mask)
        confidence = float(probs[action])
        mag, target = scan_map.decode(action)
        region, shape, dwell = scan_map.region_for(action)
        what = "survey" if mag == SURVEY else "zoom into"
        why = (
            f"{seen}; {what} tile {target} at ({region.center_x_m * 1e9:.1f}, "
            f"{region.center_y_m * 1e9:.1f}) nm, {region.width_m * 1e9:.3g} nm field "
            f"(network p={confidence:.2f} over {int(mask.sum())} valid actions; dose "
            f"{scan_map.spent}/{self.budget})"
        )
        return named_decision(
            self.name,
            why,
            confidence,
            commands=(Scan(region, shape, dwell, source=self.name, reason=why),),
        )


def _peek_grid(path: Path) -> int:
    """The tile grid a scan policy file was trained on (``meta["grid"]``; 6 when absent).

    The file is read again (and fully checked) by :func:`load_policy`."""
    import torch

    if not path.is_file():
        return 6
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        grid = payload["meta"]["grid"]
    except Exception:  # load_policy reports what is wrong with the file
        return 6
    return int(grid) if isinstance(grid, int) and 1 <= grid <= 32 else 6


def make_rl_scan(**options: Any) -> RLScanPolicy:
    """``rl-scan``: options ``weights`` and ``budget`` (dose in zoom frames; default: the
    training budget)."""
    opts = dict(options)
    opts.pop("target_snr", None)
    unknown = set(opts) - {"weights", "budget"}
    if unknown:
        raise ConfigError(f"policy 'rl-scan' has no options {sorted(unknown)}")
    return RLScanPolicy(**opts)
