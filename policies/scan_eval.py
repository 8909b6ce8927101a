"""Held-out evaluation of the scan-planning policy against baselines, episode by episode.

Every policy runs on the same samples (seeds ``seed0 + episode``) with the same dose budget, so
the comparison is paired:

- ``raster``: the conventional survey at the magnification that resolves the defects: zoom
  frames on a regular ``k x k`` grid over the whole sample (``k = ceil(sqrt(budget))``),
  scanned in serpentine order until the budget is spent;
- ``random``: uniform over the valid actions;
- ``rule``: survey the tiles in serpentine order; as soon as a surveyed tile shows
  ``bright_min`` bright pixels, zoom there (around its hotspot) until ``misses`` zooms in a row
  detect nothing, then go on surveying; when nothing is left to survey, zoom the brightest tile;
- ``rl``: the exported network, greedy over the valid actions.

Found = ground-truth W substitutions matched by the detector (:class:`ScanPlanningEnv`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from drivers.errors import ConfigError
from drivers.frame import ScanRegion
from policies.env_scan import ScanPlanningEnv
from policies.evaluation import distribution
from policies.rl_net import PolicyNet
from policies.scan_map import SURVEY, ZOOM, ZOOM_DWELL_S, ZOOM_FOV_M, ZOOM_PX

ScanChooser = Callable[[ScanPlanningEnv, np.ndarray, np.ndarray], int]


@dataclass(frozen=True)
class ScanEpisode:
    policy: str
    seed: int
    found: int
    frames: int
    surveys: int
    dose_As: float
    time_s: float
    detections: int
    true_positives: int

    @property
    def found_per_nC(self) -> float:
        return self.found / (self.dose_As * 1e9)

    @property
    def found_per_s(self) -> float:
        return self.found / self.time_s if self.time_s > 0 else 0.0


def random_scan_chooser(seed: int) -> ScanChooser:
    rng = np.random.default_rng(seed)
    return lambda env, obs, mask: int(rng.choice(np.flatnonzero(mask)))


def scan_net_chooser(net: PolicyNet) -> ScanChooser:
    return lambda env, obs, mask: net.act(obs, mask)[0]


def serpentine(grid: int) -> list[int]:
    """Tiles row by row, every other row reversed."""
    order: list[int] = []
    for row in range(grid):
        cols = range(grid) if row % 2 == 0 else range(grid - 1, -1, -1)
        order += [row * grid + c for c in cols]
    return order


def rule_scan_chooser(*, bright_min: int = 3, misses: int = 3) -> ScanChooser:
    """The survey-then-zoom rule of the module doc."""
    state: dict[str, Any] = {"streak": {}, "done": set()}

    def choose(env: ScanPlanningEnv, obs: np.ndarray, mask: np.ndarray) -> int:
        m = env.scan_map
        n = m.grid * m.grid
        if m.frames == 0:
            state["streak"], state["done"] = {}, set()
        streak: dict[int, int] = state["streak"]
        done: set[int] = state["done"]
        if m.current is not None and m.tiles[m.current].zooms:
            tile = m.current
            if m.tiles[tile].last_detections == 0:
                streak[tile] = streak.get(tile, 0) + 1
            else:
                streak[tile] = 0
            if streak[tile] >= misses:
                done.add(tile)
        hot = [
            t
            for t in range(n)
            if m.tiles[t].surveyed
            and m.tiles[t].bright >= bright_min
            and t not in done
            and mask[ZOOM * n + t]
        ]
        if hot:
            return ZOOM * n + max(hot, key=lambda t: m.tiles[t].bright)
        for t in serpentine(m.grid):
            if mask[SURVEY * n + t]:
                return SURVEY * n + t
        zoomable = [t for t in range(n) if mask[ZOOM * n + t]]
        return ZOOM * n + max(zoomable, key=lambda t: (m.tiles[t].bright, -m.tiles[t].zooms))

    return choose


def run_scan_episode(
    env: ScanPlanningEnv, choose: ScanChooser, *, seed: int, policy: str
) -> ScanEpisode:
    obs, _ = env.reset(seed=seed)
    info: dict[str, Any] = {}
    surveys = detections = tp = 0
    while True:
        mask = env.action_masks()
        obs, _, terminated, truncated, info = env.step(choose(env, obs, mask))
        surveys += info["kind"] == "survey"
        detections += info["detections"]
        tp += info["true_positives"]
        if terminated or truncated:
            break
    m = env.scan_map
    return ScanEpisode(
        policy,
        seed,
        int(info["found_total"]),
        m.frames,
        surveys,
        float(info["dose_As"]),
        float(info["time_s"]),
        detections,
        tp,
    )


def run_raster_episode(env: ScanPlanningEnv, *, seed: int) -> ScanEpisode:
    """The ``raster`` baseline: zoom frames on a ``k x k`` grid over the sample."""
    env.reset(seed=seed)
    cfg = env.config
    k = max(math.ceil(math.sqrt(cfg.budget)), 1)
    side = cfg.grid * cfg.tile_m
    pitch = side / k
    info: dict[str, Any] = {}
    detections = tp = 0
    m = env.scan_map
    terminated = False
    for row in range(k):
        if terminated:
            break
        cols = range(k) if row % 2 == 0 else range(k - 1, -1, -1)
        for col in cols:
            x = m.origin_m[0] + (col + 0.5) * pitch
            y = m.origin_m[1] + (row + 0.5) * pitch
            tile = m.tile_of(x, y)
            if tile is None or not m.on_stage[tile]:
                continue
            region = ScanRegion(x, y, ZOOM_FOV_M, ZOOM_FOV_M)
            _, _, terminated, _, info = env.step_region(region, (ZOOM_PX, ZOOM_PX), ZOOM_DWELL_S)
            detections += info["detections"]
            tp += info["true_positives"]
            if terminated:
                break
    if not info:
        raise ConfigError("the raster baseline found no field on the stage")
    return ScanEpisode(
        "raster",
        seed,
        int(info["found_total"]),
        m.frames,
        0,
        float(info["dose_As"]),
        float(info["time_s"]),
        detections,
        tp,
    )


def summarize_scan(episodes: Sequence[ScanEpisode]) -> dict[str, Any]:
    """Totals (found per nC of dose and per second, pooled over episodes), per-episode
    distributions and the detector's precision."""
    if not episodes:
        raise ConfigError("no episodes to summarize")
    found = sum(e.found for e in episodes)
    dose = sum(e.dose_As for e in episodes)
    time_s = sum(e.time_s for e in episodes)
    detections = sum(e.detections for e in episodes)
    return {
        "episodes": len(episodes),
        "found": found,
        "found_per_nC": found / (dose * 1e9),
        "found_per_s": found / time_s,
        "found_dist": distribution([e.found for e in episodes]),
        "found_per_s_dist": distribution([e.found_per_s for e in episodes]),
        "time_s_dist": distribution([e.time_s for e in episodes]),
        "episodes_with_none": sum(e.found == 0 for e in episodes),
        "surveys_mean": float(np.mean([e.surveys for e in episodes])),
        "precision": sum(e.true_positives for e in episodes) / detections if detections else 0.0,
    }


def evaluate_scan(
    episodes: int,
    *,
    seed: int,
    weights: str | None = None,
    progress: bool = True,
    config: Any = None,
) -> dict[str, Any]:
    """Raster, random, rule and RL on the same ``episodes`` held-out samples (see the module
    doc); returns the summary, the ratios against the raster survey, per-episode results and a
    printable table."""
    import time

    from tqdm import tqdm

    from policies.env_scan import ScanEnvConfig
    from policies.rl_net import load_policy
    from policies.scan_map import scan_n_actions, scan_obs_dim
    from policies.scan_policy import SCAN_WEIGHTS

    if episodes < 1:
        raise ConfigError(f"episodes must be >= 1, got {episodes}")
    cfg = config or ScanEnvConfig()
    net, meta = load_policy(
        weights or SCAN_WEIGHTS,
        kind="scan",
        obs_dim=scan_obs_dim(cfg.grid),
        n_actions=scan_n_actions(cfg.grid),
    )
    env = ScanPlanningEnv(cfg)
    choosers: dict[str, ScanChooser] = {
        "random": random_scan_chooser(seed),
        "rule": rule_scan_chooser(),
        "rl": scan_net_chooser(net),
    }
    runs: dict[str, list[ScanEpisode]] = {"raster": [], **{name: [] for name in choosers}}
    start = time.perf_counter()
    with tqdm(total=episodes * len(runs), unit="episode", disable=not progress) as bar:
        for i in range(episodes):
            runs["raster"].append(run_raster_episode(env, seed=seed + i))
            bar.update(1)
            for name, choose in choosers.items():
                runs[name].append(run_scan_episode(env, choose, seed=seed + i, policy=name))
                bar.update(1)
    env.close()
    summary = {name: summarize_scan(eps) for name, eps in runs.items()}
    raster = summary["raster"]
    ratios: dict[str, float] = {}
    for name in ("rl", "rule", "random"):
        for key in ("found_per_nC", "found_per_s"):
            base = raster[key]
            ratios[f"{name}_over_raster_{key}"] = summary[name][key] / base if base else math.inf
    ratios["rl_over_rule_found"] = summary["rl"]["found"] / max(summary["rule"]["found"], 1)
    paired = [
        (r.found_per_nC, b.found_per_nC) for r, b in zip(runs["rl"], runs["raster"], strict=True)
    ]
    seeds = f"seeds {seed}..{seed + episodes - 1}"
    lines = [
        f"scan planning, {episodes} held-out samples per policy ({seeds}), "
        f"{cfg.grid}x{cfg.grid} tiles of {cfg.tile_m * 1e9:g} nm, dose budget {cfg.budget} "
        "zoom frames",
        f"{'policy':8} {'found':>7} {'per nC':>8} {'per s':>7} {'found/episode median':>21} "
        f"{'p25-p75':>9} {'p90':>5} {'none':>5} {'surveys':>8} {'precision':>9} {'time s med':>10}",
    ]
    for name, s in summary.items():
        f = s["found_dist"]
        lines.append(
            f"{name:8} {s['found']:7d} {s['found_per_nC']:8.2f} {s['found_per_s']:7.2f} "
            f"{f['median']:21.1f} {f['p25']:4.0f}-{f['p75']:<4.0f} {f['p90']:5.0f} "
            f"{s['episodes_with_none']:5d} {s['surveys_mean']:8.1f} {s['precision']:9.3f} "
            f"{s['time_s_dist']['median']:10.2f}"
        )
    r = ratios
    lines.append(
        f"ratios vs raster: rl found per dose = {r['rl_over_raster_found_per_nC']:.1f}x, per time "
        f"= {r['rl_over_raster_found_per_s']:.1f}x (target >= 2); rule "
        f"{r['rule_over_raster_found_per_nC']:.1f}x / {r['rule_over_raster_found_per_s']:.1f}x; "
        f"random {r['random_over_raster_found_per_nC']:.1f}x / "
        f"{r['random_over_raster_found_per_s']:.1f}x; rl found / rule found = "
        f"{r['rl_over_rule_found']:.2f}"
    )
    lines.append(
        f"episodes where rl found more per dose than raster: "
        f"{sum(r > b for r, b in paired)}/{episodes}, as many: {sum(r == b for r, b in paired)}"
    )
    return {
        "kind": "scan",
        "episodes": episodes,
        "seed": seed,
        "weights_sha256": meta["sha256"],
        "wall_s": time.perf_counter() - start,
        "config": dict(cfg.__dict__),
        "summary": summary,
        "ratios": ratios,
        "per_episode": {name: [dict(e.__dict__) for e in eps] for name, eps in runs.items()},
        "table": "\n".join(lines),
    }


def plot_scan(report: dict[str, Any], path: Any) -> None:
    """Defects found per episode (box plot) and found per nC / per second (bars), per policy."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["summary"])
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 3.8))
    ax1.boxplot([[e["found"] for e in report["per_episode"][n]] for n in names], tick_labels=names)
    ax1.set_ylabel("defects of interest found per episode")
    ax2.bar(names, [report["summary"][n]["found_per_nC"] for n in names])
    ax2.set_ylabel("found per nC of beam charge")
    ax2.set_yscale("log")
    ax3.bar(names, [report["summary"][n]["found_per_s"] for n in names])
    ax3.set_ylabel("found per second of instrument time")
    ax3.set_yscale("log")
    fig.suptitle(f"scan planning, {report['episodes']} held-out samples per policy")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
