"""Does the ``sr`` model let the dose policy reach the target SNR at a shorter dwell? (issue 4)

    /tmp/venv/bin/python bench/dose_sr_snr.py --surveys 4      # held-out seeds 2000000..

The go/no-go measurement for letting the dose policy choose whether to rely on the sr model:
on the dose environment's own frames (:class:`policies.env_dose.DoseControlEnv`: 64² px over
2 nm, 0.031 nm pixels, inside the sr card's 0.0125–0.05 nm range), for each specimen
(MoS2, WS2, SrTiO3), beam current (10, 40, 150 pA) and dwell level (0.25–16 µs), the true SNR
(:func:`policies.dose_features.true_snr`: gain/offset fit of the noise-free image) of the raw
frame and of the sr model's recovered image (the same fit against the same noise-free image),
the sr image of the noise-free frame itself (the model's own ceiling), sr's relative
uncertainty and reject flag, and the image-quality assessor's SNR estimate of the raw frame and
of the sr image. Reports, per specimen and current, the shortest dwell whose mean true SNR
reaches the dose target (5) raw and with sr, and the shortest at which >= 95 % of the frames
reach it (the dose policy's ship rule is per frame); the electrons per pixel at those dwells and
what an oracle that always picked the cheaper of the two would save (an upper bound on what a
raw-or-sr choice can gain; a policy knows neither specimen nor current); and how well what a
policy could observe (the assessor's estimate of the sr image, sr's own relative uncertainty)
separates the frames where sr meets the target from those where it does not (ROC AUC).
Writes ``bench/out/dose_sr_snr/results.json`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from agent.perception.quality import ImageQualityAssessor  # noqa: E402
from agent.perception.tasks import sr  # noqa: E402
from bench._common import machine  # noqa: E402
from drivers.frame import Frame  # noqa: E402
from policies.dose_features import DWELL_LEVELS_S, true_snr  # noqa: E402
from policies.env_dose import DoseControlEnv, DoseEnvConfig  # noqa: E402

SPECIMENS = ("mos2", "ws2", "srtio3")
CURRENTS_A = (10e-12, 40e-12, 150e-12)
RELIABLE = 0.95
"""The fraction of frames that must meet the target (the dose policy's ship rule)."""


def roc_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counted half; NaN
    when either class is empty."""
    pos, neg = score[positive], score[~positive]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (pos.size * neg.size))


def _snr_of(frame: Frame, image: np.ndarray) -> float:
    return true_snr(replace(frame, data=np.asarray(image, dtype=np.float64)))


def measure(
    surveys: int, seed: int, target: float, currents_A: tuple[float, ...] = CURRENTS_A
) -> dict[str, Any]:
    model, card = sr.load()
    assessor = ImageQualityAssessor()
    env = DoseControlEnv(assessor, DoseEnvConfig(target_snr=target))
    cells: dict[str, list[list[float]]] = {}
    t0 = time.process_time()
    for specimen in SPECIMENS:
        for current in currents_A:
            for k in range(surveys):
                env.reset(seed=seed + k, options={"specimen": specimen, "beam_current_A": current})
                for level in range(len(DWELL_LEVELS_S)):
                    env.step_level(level)
                    frame = env.last_frame
                    assert frame.truth is not None and frame.truth.clean is not None
                    pixel_nm = abs(float(frame.pixel_size_m[0])) * 1e9
                    rec = sr.recover(frame.data, pixel_nm, model=model, card=card)
                    ceiling = sr.recover(frame.truth.clean, pixel_nm, model=model, card=card)
                    key = f"{specimen}/{current * 1e12:.0f}pA/{level}"
                    cells.setdefault(key, []).append(
                        [
                            true_snr(frame),
                            _snr_of(frame, rec.image),
                            _snr_of(frame, ceiling.image),
                            rec.relative_uncertainty,
                            float(rec.reject),
                            float(frame.truth.extra["electrons_per_px"]),
                            assessor.assess(frame).snr,
                            assessor.assess(replace(frame, data=rec.image)).snr,
                        ]
                    )
    env.close()
    rows: list[dict[str, Any]] = []
    for key, values in cells.items():
        spec_name, current_name, level_name = key.split("/")
        a = np.asarray(values)
        rows.append(
            {
                "specimen": spec_name,
                "current": current_name,
                "dwell_us": DWELL_LEVELS_S[int(level_name)] * 1e6,
                "raw_snr": float(a[:, 0].mean()),
                "sr_snr": float(a[:, 1].mean()),
                "sr_of_clean_snr": float(a[:, 2].mean()),
                "raw_met": float((a[:, 0] >= target).mean()),
                "sr_met": float((a[:, 1] >= target).mean()),
                "sr_relative_sigma": float(a[:, 3].mean()),
                "sr_reject": float(a[:, 4].mean()),
                "electrons_per_px": float(a[:, 5].mean()),
                "raw_estimate": float(a[:, 6].mean()),
                "sr_estimate": float(a[:, 7].mean()),
            }
        )
    shortest: list[dict[str, Any]] = []
    for specimen in SPECIMENS:
        for current in currents_A:
            name = f"{current * 1e12:.0f}pA"
            sel = [r for r in rows if r["specimen"] == specimen and r["current"] == name]
            first = {
                kind: next((r["dwell_us"] for r in sel if r[f"{kind}_snr"] >= target), None)
                for kind in ("raw", "sr")
            }
            reliable = {
                kind: next((r for r in sel if r[f"{kind}_met"] >= RELIABLE), None)
                for kind in ("raw", "sr")
            }
            best_sr = max(r["sr_snr"] for r in sel)
            shortest.append(
                {
                    "specimen": specimen,
                    "current": name,
                    **first,
                    **{
                        f"{kind}_reliable": None if r is None else r["dwell_us"]
                        for kind, r in reliable.items()
                    },
                    **{
                        f"{kind}_reliable_electrons": None if r is None else r["electrons_per_px"]
                        for kind, r in reliable.items()
                    },
                    "sr_best_snr": best_sr,
                }
            )
    raw_e = [s["raw_reliable_electrons"] for s in shortest]
    if all(e is not None for e in raw_e):
        oracle_e = [
            min(s["raw_reliable_electrons"], s["sr_reliable_electrons"] or math.inf)
            for s in shortest
        ]
        oracle = {
            "raw_mean_electrons": float(np.mean(raw_e)),
            "oracle_mean_electrons": float(np.mean(oracle_e)),
        }
    else:
        oracle = {}
    a = np.asarray([v for values in cells.values() for v in values])
    sr_met = a[:, 1] >= target
    observable = {
        "sr_met_frames": int(sr_met.sum()),
        "auc_assessor_on_sr": roc_auc(np.nan_to_num(a[:, 7], nan=-1.0), sr_met),
        "auc_assessor_on_raw": roc_auc(np.nan_to_num(a[:, 6], nan=-1.0), sr_met),
        "auc_low_sr_sigma": roc_auc(-a[:, 3], sr_met),
    }
    return {
        "surveys": surveys,
        "currents_pA": [c * 1e12 for c in currents_A],
        "seed": seed,
        "target_snr": target,
        "rows": rows,
        "shortest": shortest,
        "oracle": oracle,
        "observable": observable,
        "sr_model": f"{card.version}+{card.sha256[:8]}",
        "frames": len(a),
        "cpu_s": time.process_time() - t0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--surveys", type=int, default=4, help="frames per cell")
    parser.add_argument("--seed", type=int, default=2_000_000)
    parser.add_argument("--target", type=float, default=5.0)
    parser.add_argument(
        "--currents-pA",
        type=float,
        nargs="+",
        default=[c * 1e12 for c in CURRENTS_A],
        help="beam currents (pA)",
    )
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "out" / "dose_sr_snr"))
    args = parser.parse_args()
    currents = tuple(c * 1e-12 for c in args.currents_pA)
    report = measure(args.surveys, args.seed, args.target, currents)
    report["machine"] = machine()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print("specimen current dwell_us raw_snr sr_snr sr(clean) raw_met sr_met rel_sigma reject")
    for r in report["rows"]:
        print(
            f"{r['specimen']:7s} {r['current']:>5s} {r['dwell_us']:6.2f} {r['raw_snr']:6.2f} "
            f"{r['sr_snr']:6.2f} {r['sr_of_clean_snr']:6.2f} {r['raw_met']:5.2f} "
            f"{r['sr_met']:5.2f} {r['sr_relative_sigma']:.3f} {r['sr_reject']:.2f}"
        )
    print(
        f"\nshortest dwell (µs) with mean true SNR >= {args.target} | with >= "
        f"{RELIABLE:.0%} of frames >= {args.target} (electrons/px):"
    )

    def us(value: float | None) -> str:
        return "never" if value is None else f"{value:.3g}"

    def el(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    for s in report["shortest"]:
        print(
            f"{s['specimen']:7s} {s['current']:>5s} mean: raw {us(s['raw'])} sr {us(s['sr'])} | "
            f"{RELIABLE:.0%}: raw {us(s['raw_reliable'])} ({el(s['raw_reliable_electrons'])}) "
            f"sr {us(s['sr_reliable'])} ({el(s['sr_reliable_electrons'])}) "
            f"(sr best mean SNR {s['sr_best_snr']:.2f})"
        )
    oracle = report["oracle"]
    if oracle:
        print(
            f"mean over the {len(report['shortest'])} cells at the {RELIABLE:.0%} dwell: raw "
            f"{oracle['raw_mean_electrons']:.0f} e/px, oracle raw-or-sr "
            f"{oracle['oracle_mean_electrons']:.0f} e/px "
            f"({oracle['raw_mean_electrons'] / oracle['oracle_mean_electrons']:.2f}x less)"
        )
    obs = report["observable"]
    print(
        f"sr met the target in {obs['sr_met_frames']} frames; ROC AUC for telling them apart: "
        f"assessor's SNR estimate of the sr image {obs['auc_assessor_on_sr']:.3f}, of the raw "
        f"frame {obs['auc_assessor_on_raw']:.3f}, low sr sigma {obs['auc_low_sr_sigma']:.3f}"
    )
    print(f"{report['frames']} frames, cpu {report['cpu_s']:.0f} s, {report['machine']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
