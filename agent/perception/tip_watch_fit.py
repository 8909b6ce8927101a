"""Fit the tip-change detector's thresholds (:mod:`agent.perception.tip_watch`) and store them.

    python -m agent.perception.tip_watch_fit                 # the shipped tip_watch.json
    python -m agent.perception.tip_watch_fit --good 340 --budget 0.02 --weights-dir DIR

Calibration scans: the good-tip frames of the calibration seeds (``CALIB_SEED0`` = 15,000,000
and on, every fifth seed is a good tip; the recipe spans the training and the shifted
parameter ranges, see :func:`agent.perception.tasks.tip.calibration_recipe`), complete scans
with no tip change. Each scan's highest score per feature over all line counts from 16 on gives
the thresholds (:func:`tip_watch.fit_thresholds`): at most ``--budget`` of these scans would
ever alarm. The stable bad-tip frames of the first 200 calibration seeds are scored too and
their alarm shares are stored for the record (an unstable tip flips between apexes by itself, so
alarms there are changes the detector is meant to see). No test seed (20,000,000 and on) is read.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import numpy as np

from agent.perception import tip_watch
from agent.perception.registry import WEIGHTS_DIR
from agent.perception.tip_data import STATES, TipSample, sample

log = logging.getLogger(__name__)

FIT_COMMAND = "python -m agent.perception.tip_watch_fit --good 340 --budget 0.02"
DEFAULT_GOOD = 340
DEFAULT_BAD_SEEDS = 200
MIN_LINES = tip_watch.MIN_SCORED_LINES


def scan_maxima(scores: dict[str, np.ndarray]) -> dict[str, float]:
    """Each feature's highest score from line count 16 on (what a scan checked every line
    would see at worst)."""
    return {name: float(np.max(v[MIN_LINES:], initial=0.0)) for name, v in scores.items()}


def calibration_scans(
    good: int, bad_seeds: int, *, progress: bool = True
) -> tuple[list[TipSample], list[TipSample]]:
    """``good`` good-tip frames and the bad-tip frames of the first ``bad_seeds`` calibration
    seeds (simulated here; deterministic by seed)."""
    from tqdm import tqdm

    from agent.perception.tasks import tip as tip_task

    recipe = tip_task.calibration_recipe(5 * max(good, 1) + bad_seeds)
    first = tip_task.CALIB_SEED0
    good_seeds = [first + 5 * j for j in range(good)]
    bad = [s for s in range(first, first + bad_seeds) if s % 5 != 0]
    bars = {"disable": not progress}
    frames = [sample(recipe, s) for s in tqdm(good_seeds, desc="good calibration scans", **bars)]
    others = [sample(recipe, s) for s in tqdm(bad, desc="bad calibration scans", **bars)]
    return frames, others


def fit(good: int = DEFAULT_GOOD, budget: float = 0.02, bad_seeds: int = DEFAULT_BAD_SEEDS) -> Any:
    """Simulate the calibration scans, fit the thresholds; returns the detector."""
    t0 = time.process_time()
    frames, others = calibration_scans(good, bad_seeds)
    good_max = [scan_maxima(tip_watch.feature_scores(s.data)) for s in frames]
    maxima = {n: [m[n] for m in good_max] for n in tip_watch.FEATURES}
    result = fit_result = tip_watch.fit_thresholds(maxima, budget)
    detector = tip_watch.LineChangeDetector(result["thresholds"])
    bad_rates: dict[str, list[bool]] = {}
    for s in others:
        alarmed = any(
            m > detector.thresholds[n]
            for n, m in scan_maxima(tip_watch.feature_scores(s.data)).items()
        )
        bad_rates.setdefault(str(STATES[s.label]), []).append(alarmed)
    fit_info = {
        "command": FIT_COMMAND if (good, budget) == (DEFAULT_GOOD, 0.02) else "",
        "calibration_seeds": f"{frames[0].seed}.. every 5th ({len(frames)} good-tip scans)",
        "false_alarm_budget": budget,
        "good_scans_alarmed": fit_result["alarm_share"],
        "alpha": fit_result["alpha"],
        "stable_bad_scans_alarmed": {k: float(np.mean(v)) for k, v in sorted(bad_rates.items())},
        "cpu_s": round(time.process_time() - t0, 1),
    }
    return tip_watch.LineChangeDetector(result["thresholds"], fit=fit_info)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--good", type=int, default=DEFAULT_GOOD, help="good-tip scans (340)")
    parser.add_argument("--budget", type=float, default=0.02, help="false-alarm share (0.02)")
    parser.add_argument("--bad-seeds", type=int, default=DEFAULT_BAD_SEEDS)
    parser.add_argument("--weights-dir", default=str(WEIGHTS_DIR))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    detector = fit(args.good, args.budget, args.bad_seeds)
    path = tip_watch.save(detector, args.weights_dir)
    print(f"wrote {path}: {detector.thresholds} {detector.fit}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
