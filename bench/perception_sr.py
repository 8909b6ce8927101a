"""The ``sr`` network against the raw frames and classical interpolation, and its speed.

    /tmp/venv/bin/python bench/perception_sr.py --areas 16

Quality (held-out ``sim:stem`` areas, new seeds; ``heldout`` default parameters and ``shifted``
beam current, drift, source size and thermal blur; see ``agent/perception/tasks/sr_eval.py``):

- dose: the network on a quarter-dose frame (0.5 µs) against the raw full-dose frame (2 µs) of
  the same area, PSNR and SSIM against the noise-free truth (target: both at least equal);
- partial scans at 1/20 coverage (random pixels, every 20th line, spiral): RMS error as a
  fraction of the intensity range (target <= 2.6 %, Ede & Beanland 2020) against linear
  (Delaunay) interpolation and biharmonic inpainting run in the same command.

Speed: one 512² frame, batch 1, on ``--threads`` CPU threads (target <= 60 ms), against
``scipy.interpolate.griddata`` filling the same 1/20 partial scan; the CPU time of the scan-line
alignment alone on 512² 1/20 random and spiral scans, with and without its sparse lines
(docs/decisions/0017), calls alternated; GPU latency (batch 1 and 8) when CUDA is present.
Output: ``bench/out/perception_sr.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from tqdm import tqdm

from agent.perception.registry import WEIGHTS_DIR
from agent.perception.tasks import sr
from agent.perception.tasks.sr_eval import (
    CONDITIONS,
    PATTERNS,
    area_frames,
    evaluate_sr,
    scaled_truth,
    write_report,
)
from agent.perception.tasks.sr_lines import align_lines, line_shifts, shift_lines
from agent.perception.tasks.stem_baselines import interpolate_sparse
from agent.perception.tasks.stem_data import StemRecipe, simulate
from bench._common import machine
from bench._timing import network_timing, timing


def _scan_512(pattern: str) -> np.ndarray:
    """A 512² 1/20 ``pattern`` scan at 2 µs (seed 77)."""
    return simulate(
        StemRecipe(
            seed=77,
            frames=1,
            shape_px=(512, 512),
            dwell_s=(2e-6, 2e-6),
            pixel_size_m=(0.25e-10, 0.25e-10),
            patterns=((pattern, 0.05),),
        ),
        progress=False,
    )[0].image


def alignment_cpu(model: torch.nn.Module, card: Any, repeats: int) -> dict[str, float]:
    """Median thread CPU ms of :func:`align_lines` on the network output of 512² 1/20 random and
    spiral scans, with (``sparse``) and without (``plain``) the sparse lines, alternated."""
    out: dict[str, float] = {}
    for pattern in ("random", "spiral"):
        image = _scan_512(pattern)
        rec = sr.recover(image, 0.025, model=model, card=card, align=False)
        cpu: dict[str, list[float]] = {"plain": [], "sparse": []}
        for _ in range(repeats + 2):
            for name in cpu:
                t0 = time.thread_time()
                align_lines(rec.image, rec.sigma, image, sparse=name == "sparse")
                cpu[name].append(time.thread_time() - t0)
        for name, values in cpu.items():
            out[f"{pattern}_{name}_cpu_ms"] = 1e3 * float(np.median(values[2:]))
    return out


def _diagnose_frame(model: torch.nn.Module, card: Any, plain: Any, frame: Any) -> dict[str, float]:
    """:func:`diagnose_partial`'s figures for one partial-scan frame."""
    from scipy import ndimage

    truth, epp = scaled_truth(frame)
    if frame.truth is None:  # scaled_truth has checked it; this tells mypy
        raise RuntimeError("sim:stem frame without ground truth")
    span = float(truth.max() - truth.min())
    clean = (truth * epp).astype(np.float32)

    def rms(image: np.ndarray) -> float:
        return 100 * float(np.sqrt(np.mean((image / epp - truth) ** 2))) / span

    def oracle(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shift = line_shifts(image, clean)  # the truth as a fully measured frame
        return shift_lines(image, shift), shift

    near = ndimage.binary_dilation(frame.truth.extra["class_mask"] > 0, iterations=2)
    est = sr.recover(frame.data, 0.025, model=model, card=card).image
    aligned, shift = oracle(est)
    before = sr.recover(frame.data, 0.025, model=model, card=plain).image
    before_aligned, before_shift = oracle(before)
    err2_before = (before / epp - truth) ** 2
    noise_free = sr.recover(
        np.where(np.isfinite(frame.data), clean, np.nan), 0.025, model=model, card=card
    ).image
    err2 = (est / epp - truth) ** 2
    return {
        "rms": rms(est),
        "rms_no_sparse": rms(before),
        "jitter_share_no_sparse": 1
        - float(np.mean((before_aligned / epp - truth) ** 2)) / float(np.mean(err2_before)),
        "oracle_shift_px_no_sparse": float(np.sqrt(np.mean(before_shift**2))),
        "defect_share_no_sparse": float(err2_before[near].sum() / err2_before.sum()),
        "rms_oracle": rms(aligned),
        "jitter_share": 1 - float(np.mean((aligned / epp - truth) ** 2)) / float(np.mean(err2)),
        "oracle_shift_px": float(np.sqrt(np.mean(shift**2))),
        "defect_share": float(err2[near].sum() / err2.sum()),
        "defect_pixels": float(near.mean()),
        "rms_noise_free": rms(noise_free),
        "rms_noise_free_oracle": rms(oracle(noise_free)[0]),
    }


def diagnose_partial(model: torch.nn.Module, card: Any, seed: int, areas: int) -> dict[str, Any]:
    """Where the 1/20 partial-scan error of the evaluation's own frames comes from (means over
    areas, RMS in % of range; shares of the squared error):

    ``rms`` as shipped; ``rms_no_sparse`` without aligning the sparse lines (ADR 0017), and the
    ``*_no_sparse`` figures below for that output;
    ``rms_oracle`` with every output line shifted onto the *truth* (an oracle, 2 Gauss-Newton
    steps), ``jitter_share`` = 1 - its MSE / the MSE and ``oracle_shift_px`` the RMS of those
    shifts; ``defect_share`` of the squared error within 2 px of a defect (class mask) and
    ``defect_pixels`` their fraction of the frame; ``rms_noise_free`` recovering the noise-free
    truth at the same sampled pixels, ``rms_noise_free_oracle`` that plus oracle shifts.
    """
    plain = dataclasses.replace(card, training={**card.training, "align_sparse_lines": False})
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for condition, options in CONDITIONS.items():
        rows: dict[str, list[dict[str, float]]] = {p: [] for p in PATTERNS}
        for area in tqdm(range(areas), desc=f"diagnosis {condition}"):
            frames = area_frames(rng, area, options)
            for pattern in PATTERNS:
                rows[pattern].append(_diagnose_frame(model, card, plain, frames[pattern]))
        out[condition] = {
            p: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]} for p, rs in rows.items()
        }
    return out


def print_diagnosis(diagnosis: dict[str, Any]) -> None:
    keys = list(next(iter(next(iter(diagnosis.values())).values())))
    print("\n1/20 partial scans, where the error is (RMS in % of range, shares of the MSE):")
    print("condition pattern " + " ".join(keys))
    for condition, patterns in diagnosis.items():
        for pattern, m in patterns.items():
            print(f"{condition} {pattern} " + " ".join(f"{m[k]:.3f}" for k in keys))


def speed(threads: int, repeats: int, weights: str) -> dict[str, Any]:
    torch.set_num_threads(threads)
    model, card = sr.load(weights)
    model.to("cpu")  # the CPU figures first; the CUDA part below moves it when a GPU is present
    image = _scan_512("random")
    x, _ = sr.model_inputs(image)
    net = network_timing(model, torch.from_numpy(x)[None], repeats)
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    rec = timing(lambda: sr.recover(image, 0.025, model=model, card=card), repeats)
    grid = timing(lambda: interpolate_sparse(image), max(3, repeats // 4))
    out: dict[str, Any] = {
        "threads": threads,
        "network": net,
        "recover": rec,
        "griddata": grid,
        "griddata_over_recover_min_wall": grid["min_ms"] / rec["min_ms"],
        "alignment": alignment_cpu(model, card, repeats),
    }
    if torch.cuda.is_available():
        gpu = model.to("cuda")
        for batch in (1, 8):
            xb = torch.from_numpy(x)[None].repeat(batch, 1, 1, 1).to("cuda")

            def run(xb: torch.Tensor = xb) -> None:
                with torch.inference_mode():
                    gpu(xb)
                torch.cuda.synchronize()

            out[f"gpu_ms_512_batch{batch}"] = timing(run, repeats)["median_ms"]
        model.to("cpu")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--areas", type=int, default=16)
    parser.add_argument("--seed", type=int, default=500_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--weights", default=str(WEIGHTS_DIR))
    parser.add_argument("--speed-only", action="store_true", help="only the latency measurements")
    parser.add_argument(
        "--diagnose-partial",
        action="store_true",
        help="only the decomposition of the 1/20 partial-scan error (line jitter, defects, "
        "noise) on the evaluation's frames",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, card = sr.load(args.weights)
    out = Path("bench/out")
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}; sr {card.version} sha256 {card.sha256[:12]}")
    body: dict[str, Any] = {"machine": machine()}
    if args.diagnose_partial:
        diagnosis = diagnose_partial(model, card, args.seed, args.areas)
        print_diagnosis(diagnosis)
        body["partial_diagnosis"] = diagnosis
        (out / "perception_sr_partial.json").write_text(json.dumps(body, indent=2) + "\n")
        return 0
    if not args.speed_only:
        metrics = evaluate_sr(model, card, seed=args.seed, areas=args.areas)
        write_report(metrics, out / "perception", card)
        print_quality(metrics)
        body.update({k: v for k, v in metrics.items() if k != "examples"})
    timing = speed(args.threads, args.repeats, args.weights)
    print_speed(timing)
    body["speed"] = timing
    name = "perception_sr_speed.json" if args.speed_only else "perception_sr.json"
    (out / name).write_text(json.dumps(body, indent=2) + "\n")
    return 0


def print_quality(metrics: dict[str, Any]) -> None:
    for condition, res in metrics["conditions"].items():
        m = res["mean"]
        print(f"\n[{condition}] {res['areas']} areas, options {res['options']}")
        print(
            f"  quarter dose: sr PSNR {m['quarter_sr_psnr']:.2f} dB vs raw full dose "
            f"{m['full_raw_psnr']:.2f} dB "
            f"(difference {m['quarter_sr_psnr'] - m['full_raw_psnr']:+.2f} dB); "
            f"raw quarter {m['quarter_raw_psnr']:.2f} dB, Gaussian-filtered quarter "
            f"{m['quarter_gauss_psnr']:.2f} dB"
        )
        print(
            f"  quarter dose: sr SSIM {m['quarter_sr_ssim']:.3f} vs raw full dose "
            f"{m['full_raw_ssim']:.3f} (ratio {m['quarter_sr_ssim'] / m['full_raw_ssim']:.3f}); "
            f"Gaussian-filtered quarter {m['quarter_gauss_ssim']:.3f}"
        )
        for p in PATTERNS:
            line = (
                f"  {p:>6} 1/20: sr RMS {100 * m[f'{p}_sr_rms']:.2f} % of range; griddata "
                f"{100 * m[f'{p}_griddata_rms']:.2f} % (ratio griddata/sr "
                f"{m[f'{p}_griddata_rms'] / m[f'{p}_sr_rms']:.2f}x)"
            )
            if f"{p}_biharmonic_rms" in m:
                line += (
                    f"; biharmonic {100 * m[f'{p}_biharmonic_rms']:.2f} % (ratio "
                    f"{m[f'{p}_biharmonic_rms'] / m[f'{p}_sr_rms']:.2f}x, first areas only)"
                )
            print(line)
        print(
            f"  calibration: |error| <= 1 sigma on {100 * m['coverage_1sigma']:.1f} % of pixels "
            f"(68.3 % ideal), <= 2 sigma on {100 * m['coverage_2sigma']:.1f} % (95.4 %); "
            f"rejected {100 * m['reject_rate']:.0f} % of outputs"
        )


def print_speed(timing: dict[str, Any]) -> None:
    net, rec, grid = timing["network"], timing["recover"], timing["griddata"]
    print(
        f"\nspeed, 512² batch 1, {timing['threads']} threads (wall min / median, CPU per call): "
        f"network {net['min_ms']:.1f} / {net['median_ms']:.1f} ms, {net['cpu_ms']:.1f} ms CPU "
        f"({net['layout']}); recover() {rec['min_ms']:.1f} / {rec['median_ms']:.1f} ms, "
        f"{rec['cpu_ms']:.1f} ms CPU (target <= 60 ms); griddata on the same 1/20 scan "
        f"{grid['min_ms']:.1f} ms (ratio {timing['griddata_over_recover_min_wall']:.1f}x)"
    )
    align = timing["alignment"]
    print(
        "  line alignment alone, 512² 1/20 scans, thread CPU per call (median, alternated): "
        + ", ".join(
            f"{p} {align[f'{p}_plain_cpu_ms']:.1f} ms plain / {align[f'{p}_sparse_cpu_ms']:.1f} ms"
            " with sparse lines"
            for p in ("random", "spiral")
        )
    )
    for key in ("gpu_ms_512_batch1", "gpu_ms_512_batch8"):
        if key in timing:
            print(f"  {key}: {timing[key]:.2f} ms")


if __name__ == "__main__":
    raise SystemExit(main())
