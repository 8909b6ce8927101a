"""Scan planning: the RL policy against a raster survey of the same sample (issue 4).

    python bench/policy_scan.py --episodes 200        # held-out seeds 1000000..1000199
    python bench/policy_scan.py --detector-only       # only the detector comparison
    python bench/policy_scan.py --weights cand.pt     # a candidate network instead of the shipped

Runs :func:`policies.scan_eval.evaluate_scan` (= ``scopepilot evaluate-policy scan``): raster,
random, the survey-then-zoom rule and the shipped RL network on the same held-out samples, with
the same dose budget. Then:

- the decision latency of the deployed ``rl-scan`` policy (its whole ``decide``: map update with
  the cheap detector on the frame, observation, mask, network, next region), over real frames;
- the cheap dopant detector (:func:`policies.scan_map.detect_dopants`, what the environment and
  the deployed policy use) against the trained ``defects`` model
  (:func:`agent.perception.tasks.defects.find_defects`, substitutions only), both scored
  against the simulator's ground truth (matched within 1 Å) on the same zoom frames: on patches,
  off patches, at the zoom dwell and at half and twice of it.

Writes ``bench/out/policy_scan/results.json`` and ``found.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import machine  # noqa: E402
from drivers.frame import ScanRegion  # noqa: E402
from drivers.observation import Observation  # noqa: E402
from drivers.registry import open_instrument  # noqa: E402
from drivers.sim_stem import SimulatedSTEM  # noqa: E402
from policies.env_scan import ScanEnvConfig  # noqa: E402
from policies.scan_eval import evaluate_scan, plot_scan  # noqa: E402
from policies.scan_map import ZOOM_DWELL_S, ZOOM_FOV_M, ZOOM_PX, detect_dopants  # noqa: E402
from policies.scan_policy import SCAN_WEIGHTS, RLScanPolicy  # noqa: E402


def decision_latency(
    frames: int = 200, seed: int = 7, weights: str | None = None
) -> dict[str, float]:
    """Wall time of ``RLScanPolicy.decide`` on the frames it asks for (ms)."""
    cfg = ScanEnvConfig()
    policy = RLScanPolicy(weights or SCAN_WEIGHTS, budget=10**6)
    inst = open_instrument(
        "sim:stem",
        seed=seed,
        shape_px=(ZOOM_PX, ZOOM_PX),
        region=ScanRegion(0.0, 0.0, ZOOM_FOV_M, ZOOM_FOV_M),
        dwell_s=ZOOM_DWELL_S,
        lines_per_chunk=1024,
        **cfg.sim_options,
    )
    times: list[float] = []
    for _ in range(frames):
        obs = Observation(frame=inst.acquire(), tip=None, state=inst.state(), info=inst.info())
        t0 = time.perf_counter()
        decision = policy.decide(obs)
        times.append((time.perf_counter() - t0) * 1e3)
        if decision.stop or not decision.commands:
            break
        inst.execute(decision.commands[0])
    inst.close()
    times.sort()
    return {
        "decisions": len(times),
        "median_ms": statistics.median(times),
        "p99_ms": times[min(len(times) - 1, int(0.99 * len(times)))],
    }


def _score(pred: np.ndarray, gt: np.ndarray, tol_px: float) -> tuple[int, int, int]:
    """(true positives, predictions, truths), one-to-one greedy by distance."""
    if not pred.shape[0] or not gt.shape[0]:
        return 0, int(pred.shape[0]), int(gt.shape[0])
    d = np.hypot(*(pred[:, None, :] - gt[None, :, :]).transpose(2, 0, 1))
    tp, used_p, used_g = 0, set(), set()
    for flat in np.argsort(d, axis=None):
        i, j = divmod(int(flat), d.shape[1])
        if d[i, j] > tol_px:
            break
        if i in used_p or j in used_g:
            continue
        used_p.add(i)
        used_g.add(j)
        tp += 1
    return tp, int(pred.shape[0]), int(gt.shape[0])


def detector_comparison(frames_per_case: int = 30, seed: int = 11) -> dict[str, Any]:
    """Precision and recall of the cheap detector and of the defects model (substitutions)."""
    from agent.perception.tasks.defects import find_defects, load

    model, card = load()
    cfg = ScanEnvConfig()
    inst = open_instrument(
        "sim:stem",
        seed=seed,
        shape_px=(ZOOM_PX, ZOOM_PX),
        region=ScanRegion(0.0, 0.0, ZOOM_FOV_M, ZOOM_FOV_M),
        dwell_s=ZOOM_DWELL_S,
        lines_per_chunk=1024,
        **cfg.sim_options,
    )
    if not isinstance(inst, SimulatedSTEM):  # open_instrument("sim:stem") always gives one
        raise TypeError(f"sim:stem opened {type(inst).__name__}, not SimulatedSTEM")
    sim = inst.simulator
    centres = sim.patch_centres_m(-0.9e-6, 0.9e-6, -0.9e-6, 0.9e-6)
    rng = np.random.default_rng(seed)
    results: dict[str, Any] = {}
    from drivers.commands import Scan

    for case, dwell in (
        ("patch, dwell 1 us", ZOOM_DWELL_S / 2),
        ("patch, dwell 2 us", ZOOM_DWELL_S),
        ("patch, dwell 4 us", ZOOM_DWELL_S * 2),
        ("off patch, dwell 2 us", ZOOM_DWELL_S),
    ):
        tallies = {"cheap": [0, 0, 0], "defects model": [0, 0, 0]}
        wall = {"cheap": 0.0, "defects model": 0.0}
        for _ in range(frames_per_case):
            if case.startswith("patch"):
                c = centres[int(rng.integers(len(centres)))]
                r = cfg.patch_radius_m * np.sqrt(rng.uniform(0, 0.8))
                a = rng.uniform(0, 2 * np.pi)
                x, y = c[0] + r * np.cos(a), c[1] + r * np.sin(a)
            else:
                while True:
                    x, y = rng.uniform(-0.9e-6, 0.9e-6, 2)
                    if np.min(np.hypot(centres[:, 0] - x, centres[:, 1] - y)) > 40e-9:
                        break
            region = ScanRegion(float(x), float(y), ZOOM_FOV_M, ZOOM_FOV_M)
            inst.execute(Scan(region, (ZOOM_PX, ZOOM_PX), dwell, source="bench"))
            frame = inst.acquire()
            truth = frame.truth
            if truth is None:  # a sim: frame always carries its ground truth
                raise ValueError("sim:stem frame without ground truth")
            gt = np.array(
                [(d.row_px, d.col_px) for d in truth.defects if d.kind.endswith("_substitution")]
            ).reshape(-1, 2)
            tol = 1e-10 / frame.pixel_size_m[0]
            t0 = time.perf_counter()
            cheap = detect_dopants(frame.data)
            wall["cheap"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            found = find_defects(frame.data, frame.pixel_size_m[0] * 1e9, model=model, card=card)
            wall["defects model"] += time.perf_counter() - t0
            net = np.array(
                [(d.row_px, d.col_px) for d in found.defects if d.kind == "substitution"]
            ).reshape(-1, 2)
            for name, pred in (("cheap", cheap), ("defects model", net)):
                tp, n_pred, n_true = _score(pred, gt, tol)
                tallies[name][0] += tp
                tallies[name][1] += n_pred
                tallies[name][2] += n_true
        results[case] = {
            name: {
                "precision": t[0] / t[1] if t[1] else float("nan"),
                "recall": t[0] / t[2] if t[2] else float("nan"),
                "detections": t[1],
                "substitutions": t[2],
                "ms_per_frame": 1e3 * wall[name] / frames_per_case,
            }
            for name, t in tallies.items()
        }
    inst.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1_000_000)
    parser.add_argument("--detector-only", action="store_true")
    parser.add_argument("--weights", help="scan policy file (default: the shipped one)")
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "out" / "policy_scan"))
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    report: dict[str, Any] = {"machine": machine()}
    if not args.detector_only:
        report.update(evaluate_scan(args.episodes, seed=args.seed, weights=args.weights))
        report["latency"] = decision_latency(weights=args.weights)
    report["detectors"] = detector_comparison()
    report["load_average"] = [load_before, os.getloadavg()]
    (out / "results.json").write_text(json.dumps(report, indent=2, default=float))
    if not args.detector_only:
        plot_scan(report, out / "found.png")
        print(report["table"])
        lat = report["latency"]
        print(
            f"rl-scan decide(): median {lat['median_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms "
            f"over {lat['decisions']} decisions"
        )
    print("detector (substitutions, matched within 1 Å): precision / recall, ms per frame")
    for case, by in report["detectors"].items():
        print(
            f"  {case:22} "
            + "; ".join(
                f"{name} {s['precision']:.3f} / {s['recall']:.3f} ({s['substitutions']} true, "
                f"{s['ms_per_frame']:.1f} ms)"
                for name, s in by.items()
            )
        )
    print(
        f"machine: {report['machine']}; load average before {load_before[0]:.1f}, after "
        f"{report['load_average'][1][0]:.1f}; results in {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
