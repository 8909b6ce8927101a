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
``scipy.interpolate.griddata`` filling the same 1/20 partial scan; GPU latency (batch 1 and 8)
when CUDA is present. Output: ``bench/out/perception_sr.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from agent.perception.registry import WEIGHTS_DIR
from agent.perception.tasks import sr
from agent.perception.tasks.sr_eval import PATTERNS, evaluate_sr, write_report
from agent.perception.tasks.stem_baselines import interpolate_sparse
from agent.perception.tasks.stem_data import StemRecipe, simulate
from bench._common import machine
from bench._timing import network_timing, timing


def speed(threads: int, repeats: int, weights: str) -> dict[str, Any]:
    torch.set_num_threads(threads)
    model, card = sr.load(weights)
    model.to("cpu")  # the CPU figures first; the CUDA part below moves it when a GPU is present
    frame = simulate(
        StemRecipe(
            seed=77,
            frames=1,
            shape_px=(512, 512),
            dwell_s=(2e-6, 2e-6),
            pixel_size_m=(0.25e-10, 0.25e-10),
            patterns=(("random", 0.05),),
        ),
        progress=False,
    )[0]
    x, _ = sr.model_inputs(frame.image)
    net = network_timing(model, torch.from_numpy(x)[None], repeats)
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    rec = timing(lambda: sr.recover(frame.image, 0.025, model=model, card=card), repeats)
    grid = timing(lambda: interpolate_sparse(frame.image), max(3, repeats // 4))
    out: dict[str, Any] = {
        "threads": threads,
        "network": net,
        "recover": rec,
        "griddata": grid,
        "griddata_over_recover_min_wall": grid["min_ms"] / rec["min_ms"],
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, card = sr.load(args.weights)
    out = Path("bench/out")
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}; sr {card.version} sha256 {card.sha256[:12]}")
    body: dict[str, Any] = {"machine": machine()}
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
    for key in ("gpu_ms_512_batch1", "gpu_ms_512_batch8"):
        if key in timing:
            print(f"  {key}: {timing[key]:.2f} ms")


if __name__ == "__main__":
    raise SystemExit(main())
