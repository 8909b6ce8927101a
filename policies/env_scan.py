"""A gymnasium environment for scan planning on a large simulated STEM sample.

Each episode opens ``sim:stem`` with a new seed on a MoS2 sample that is nearly clean
(``defect_density_scale``) except for sparse dopant-rich patches (``patch_density_per_um2``
discs of ``patch_radius_m`` where W substitutes ``patch_substitution_scale`` times more often;
:mod:`simulators.stem_patches`): the defects of interest are those W substitutions. The sample
is the ``grid x grid`` tile map of :class:`policies.scan_map.ScanMap` (default 6 x 6 tiles of
64 nm, 384 nm across, with patches of 15 nm radius: a high-magnification field is 1.6 nm).
Each step the policy surveys a tile at low magnification or zooms into one at atomic resolution
(see :mod:`policies.scan_map` for the actions, the mask and the observation); the instrument
really scans that frame (line by line, in simulated time, with stage moves, drift and shot
noise).

- Reward per step: ``+1`` for every ground-truth W substitution the cheap detector
  (:func:`policies.scan_map.detect_dopants`) finds for the first time (a detection within
  ``match_tolerance_m`` of a substitution in the frame's ground truth; each counted once per
  episode), minus ``time_cost_per_s`` x the simulated time the step took (stage move, scan,
  flyback).
- The episode ends when the dose budget (``budget`` zoom-frame units; a survey costs
  :data:`~policies.scan_map.SURVEY_COST`) is spent: every policy delivers the same dose, so
  more defects found is more defects per dose.
- ``info``: ``found`` (new this step), ``found_total``, ``detections``, ``true_positives``,
  ``substitutions_in_frame``, ``dose_units``, ``dose_As`` (beam current x pixel dwell summed),
  ``time_s`` (since reset), ``kind`` (``survey`` or ``zoom``).

:meth:`ScanPlanningEnv.step_region` scans any zoom-sized or tile-sized region (the raster
baseline uses it). Masked actions raise :class:`~drivers.errors.CommandRejected` and change
nothing; ``action_space.sample()`` draws among the valid ones (:class:`MaskedDiscrete`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from drivers.commands import Scan
from drivers.errors import CommandRejected, ConfigError, DataError
from drivers.frame import Frame, ScanRegion
from drivers.registry import open_instrument
from policies.base import require_positive
from policies.scan_map import (
    SURVEY_COST,
    ZOOM_DWELL_S,
    ZOOM_FOV_M,
    ZOOM_PX,
    ScanMap,
    scan_n_actions,
    scan_obs_dim,
)


@dataclass(frozen=True)
class ScanEnvConfig:
    """Settings of :class:`ScanPlanningEnv` (sample, budget and costs)."""

    grid: int = 6
    tile_m: float = 64e-9
    budget: int = 64
    defect_density_scale: float = 0.005
    patch_density_per_um2: float = 20.0
    patch_radius_m: float = 15e-9
    patch_substitution_scale: float = 15.0
    beam_current_A: float = 30e-12
    time_cost_per_s: float = 1.0
    match_tolerance_m: float = 1e-10
    time_scale_s: float = 2.0
    stage_half_range_m: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.grid, int) and 1 <= self.grid <= 32):
            raise ConfigError(f"ScanEnvConfig.grid must be an int in 1..32, got {self.grid!r}")
        if not (isinstance(self.budget, int) and self.budget >= SURVEY_COST):
            raise ConfigError(
                f"ScanEnvConfig.budget must be an int >= {SURVEY_COST}, got {self.budget!r}"
            )
        require_positive(
            self,
            ("tile_m", "patch_radius_m", "beam_current_A", "match_tolerance_m", "time_scale_s"),
        )
        for name in ("defect_density_scale", "patch_density_per_um2", "time_cost_per_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"ScanEnvConfig.{name} must be >= 0, got {value!r}")
        if self.tile_m <= 2 * ZOOM_FOV_M:
            raise ConfigError(f"ScanEnvConfig.tile_m must exceed {2 * ZOOM_FOV_M} m")

    @property
    def sim_options(self) -> dict[str, Any]:
        """The ``sim:stem`` options of the sample."""
        return {
            "specimen": "mos2",
            "defect_density_scale": self.defect_density_scale,
            "patch_density_per_um2": self.patch_density_per_um2,
            "patch_radius_m": self.patch_radius_m,
            "patch_substitution_scale": self.patch_substitution_scale,
            "beam_current_A": self.beam_current_A,
        }


class MaskedDiscrete(gym.spaces.Discrete):
    """A ``Discrete`` space whose ``sample()`` without a mask draws among the actions valid now
    (``masks()``; all of them before the first reset), so that random agents and gymnasium's
    checker only take actions the environment accepts."""

    def __init__(self, n: int, masks: Any) -> None:
        super().__init__(n)
        self._masks = masks

    def sample(self, mask: Any = None, probability: Any = None) -> np.int64:
        if mask is None and probability is None:
            valid = self._masks()
            if valid is not None and valid.any():
                mask = valid.astype(np.int8)
        return np.int64(super().sample(mask=mask, probability=probability))


class ScanPlanningEnv(gym.Env[np.ndarray, np.int64]):
    """Choose the next tile and magnification (see the module doc)."""

    metadata = {"render_modes": []}  # noqa: RUF012 (gymnasium declares it on Env)

    def __init__(self, config: ScanEnvConfig | None = None) -> None:
        self.config = config or ScanEnvConfig()
        grid = self.config.grid
        self.observation_space = gym.spaces.Box(
            -10.0, 10.0, shape=(scan_obs_dim(grid),), dtype=np.float32
        )
        self.action_space = MaskedDiscrete(
            scan_n_actions(grid), lambda: self._map.action_masks() if self._map else None
        )
        self._instrument: Any = None
        self._map: ScanMap | None = None
        self._found: set[tuple[int, int]] = set()
        self._t0 = 0.0
        self._dose_As = 0.0
        self._last_frame: Frame | None = None

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        if options:
            raise ConfigError(f"unknown reset options {sorted(options)}")
        cfg = self.config
        self.close()
        self._instrument = open_instrument(
            "sim:stem",
            seed=int(self.np_random.integers(0, 2**31 - 1)),
            shape_px=(ZOOM_PX, ZOOM_PX),
            region=ScanRegion(0.0, 0.0, ZOOM_FOV_M, ZOOM_FOV_M),
            dwell_s=ZOOM_DWELL_S,
            lines_per_chunk=1024,
            **cfg.sim_options,
        )
        limits = self._instrument.info().limits
        sx, sy = limits.stage_x_m, limits.stage_y_m
        if cfg.stage_half_range_m is not None:
            h = cfg.stage_half_range_m
            sx, sy = (max(sx[0], -h), min(sx[1], h)), (max(sy[0], -h), min(sy[1], h))
        self._map = ScanMap(
            (0.0, 0.0),
            grid=cfg.grid,
            tile_m=cfg.tile_m,
            stage_x_m=sx,
            stage_y_m=sy,
            budget=cfg.budget,
        )
        self._found = set()
        self._t0 = float(self._instrument.state().time_s)
        self._dose_As = 0.0
        self._last_frame = None
        return self._observation(), {"tiles_on_stage": int(self._map.on_stage.sum())}

    @property
    def scan_map(self) -> ScanMap:
        if self._map is None:
            raise CommandRejected("ScanPlanningEnv used before reset()")
        return self._map

    @property
    def instrument(self) -> Any:
        return self._instrument

    @property
    def last_frame(self) -> Frame:
        if self._last_frame is None:
            raise CommandRejected("no frame before the first step()")
        return self._last_frame

    def action_masks(self) -> np.ndarray:
        return self.scan_map.action_masks()

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Scan the frame ``action`` asks for (a masked action raises CommandRejected)."""
        scan_map = self.scan_map
        try:
            index = int(action)
        except (TypeError, ValueError):
            index = -1
        n = scan_n_actions(self.config.grid)
        if index != action or not 0 <= index < n:
            raise CommandRejected(f"action must be an integer 0..{n - 1}, got {action!r}")
        if not scan_map.action_masks()[index]:
            raise CommandRejected(
                f"action {index} is masked (covered, off the stage or over budget)"
            )
        obs, reward, terminated, truncated, info = self.step_region(*scan_map.region_for(index))
        # a policy with nothing left to choose is done too (a raster baseline is not)
        return obs, reward, terminated or not scan_map.action_masks().any(), truncated, info

    def step_region(
        self, region: ScanRegion, shape_px: tuple[int, int], dwell_s: float
    ) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Scan ``region`` and account for it (baselines use this directly)."""
        scan_map = self.scan_map
        if scan_map.budget is not None and scan_map.spent >= scan_map.budget:
            raise CommandRejected("the episode's dose budget is spent: reset()")
        before = float(self._instrument.state().time_s)
        self._instrument.execute(
            Scan(region, shape_px, dwell_s, source="env", reason="scan planning")
        )
        frame = self._instrument.acquire()
        self._last_frame = frame
        kind, tile, detections = scan_map.ingest(frame)
        if kind == "other":
            raise DataError(f"region {region} is neither a survey tile nor a zoom field of the map")
        new, tp, truth_n = 0, 0, 0
        if kind == "zoom" and tile is not None:
            new, tp, truth_n = self._match(frame, detections)
        now = float(self._instrument.state().time_s)
        dt = now - before
        self._dose_As += self.config.beam_current_A * dwell_s * shape_px[0] * shape_px[1]
        reward = float(new) - self.config.time_cost_per_s * dt
        terminated = scan_map.budget is not None and scan_map.spent >= scan_map.budget
        info = {
            "kind": kind,
            "tile": tile,
            "found": new,
            "found_total": len(self._found),
            "detections": int(detections.shape[0]),
            "true_positives": tp,
            "substitutions_in_frame": truth_n,
            "dose_units": scan_map.spent,
            "dose_As": self._dose_As,
            "time_s": now - self._t0,
        }
        return self._observation(), reward, bool(terminated), False, info

    def _match(self, frame: Frame, detections: np.ndarray) -> tuple[int, int, int]:
        """(new defects found, detections matching a substitution, substitutions in view)."""
        truth = frame.truth
        if truth is None:
            raise DataError("scan planning needs simulated frames with ground truth")
        subs = [d for d in truth.defects if d.kind.endswith("_substitution")]
        if not subs or not detections.shape[0]:
            return 0, 0, len(subs)
        tol_px = self.config.match_tolerance_m / frame.pixel_size_m[0]
        gt = np.array([(d.row_px, d.col_px) for d in subs])
        d2 = ((detections[:, None, :] - gt[None, :, :]) ** 2).sum(axis=2)
        used: set[int] = set()
        tp = new = 0
        for i in np.argsort(d2.min(axis=1)):
            j = int(np.argmin(np.where([k in used for k in range(len(subs))], np.inf, d2[i])))
            if j in used or d2[i, j] > tol_px**2:
                continue
            used.add(j)
            tp += 1
            key = (round(subs[j].x_m * 1e11), round(subs[j].y_m * 1e11))
            if key not in self._found:
                self._found.add(key)
                new += 1
        return new, tp, len(subs)

    def close(self) -> None:
        if self._instrument is not None:
            self._instrument.close()
            self._instrument = None

    def _observation(self) -> np.ndarray:
        scan_map = self.scan_map
        elapsed = 0.0
        if self._instrument is not None:
            elapsed = float(self._instrument.state().time_s) - self._t0
        return scan_map.observation(time_fraction=elapsed / self.config.time_scale_s)
