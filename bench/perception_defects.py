"""The ``defects`` network against classical peak finding and AtomAI's default U-Net.

    /tmp/venv/bin/python bench/perception_defects.py --frames 16 --threads 1 --parts quality,speed
    /tmp/venv/bin/python bench/perception_defects.py --parts budget --frames 12 --threads 1 \
        --reference-steps 150 --ours-steps 1000 --reference-frames 40

1. Quality of the committed model on held-out ``sim:stem`` frames (new seeds, default defect
   density; conditions ``heldout`` 2 µs, ``shifted`` simulator parameters, ``low_dose`` 0.5 µs;
   see ``agent/perception/tasks/defects_eval.py``): detection F1 (match within 1 Å) and per-class
   F1, against peak finding + intensity classification tuned in the same run. Target F1 >= 0.95.
2. Speed on a 512² frame, batch 1, ``--threads`` CPU threads: our network against a
   re-implementation of AtomAI's default U-Net (``bench/_atomai_unet.py``, ~0.6 M parameters).
   Targets: ours <= 60 ms and >= 3x faster.
3. Accuracy after training from scratch in this command: both architectures on the same frames
   (same batch, crops, loss, learning rate, calibration and threshold tuning) for
   ``--reference-steps`` steps, ours for ``--ours-steps`` (default the same: equal steps; more
   steps in about the same CPU time: equal training time), scored on the same held-out frames.
   This is the "at equal or better F1" half of item 2's speed ratio.

Output: ``bench/out/perception_defects_<parts>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from torch import nn

from agent.perception.pixel_unet import PixelUNet
from agent.perception.registry import WEIGHTS_DIR, tiled_inference
from agent.perception.tasks import defects
from agent.perception.tasks.defects_eval import (
    CONDITIONS,
    evaluate_defects,
    heldout_recipe,
    write_report,
)
from agent.perception.tasks.stem_data import DEFECT_CLASSES, simulate
from agent.perception.tasks.stem_train import fit
from bench._atomai_unet import AtomAIUnet
from bench._common import machine
from bench._timing import network_timing, timing


def speed(model: nn.Module, threads: int, repeats: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    reference = AtomAIUnet().eval()
    x = torch.from_numpy(np.random.default_rng(0).random((1, 1, 512, 512), np.float32))
    model = model.to("cpu")
    ours = network_timing(model, x, repeats)
    ref = network_timing(reference, x, max(3, repeats // 4))
    out: dict[str, Any] = {
        "threads": threads,
        "ours": ours,
        "atomai_unet": ref,
        "speedup_min_wall": float(ref["min_ms"]) / float(ours["min_ms"]),
        "speedup_cpu": float(ref["cpu_ms"]) / float(ours["cpu_ms"]),
        "ours_parameters": sum(p.numel() for p in model.parameters()),
        "atomai_unet_parameters": sum(p.numel() for p in reference.parameters()),
    }
    if torch.cuda.is_available():
        for name, net in (("ours", model), ("atomai_unet", reference)):
            gpu = net.to("cuda")
            for batch in (1, 8):
                xb = x.repeat(batch, 1, 1, 1).to("cuda")

                def run(xb: torch.Tensor = xb, gpu: nn.Module = gpu) -> None:
                    with torch.inference_mode():
                        gpu(xb)
                    torch.cuda.synchronize()

                out[f"gpu_{name}_ms_512_batch{batch}"] = timing(run, repeats)["median_ms"]
            net.to("cpu")
    return out


def equal_budget(args: argparse.Namespace) -> dict[str, Any]:
    """Train both architectures with the same recipe and steps; F1 on the same held-out
    frames."""
    torch.set_num_threads(args.threads)
    train = simulate(defects.train_recipe(1, args.reference_frames), desc="reference training")
    val = simulate(defects.train_recipe(1_000_004, 12), desc="reference validation")
    dwell, options = CONDITIONS["heldout"]
    test = simulate(
        heldout_recipe(args.seed + 9_999, args.frames, dwell, options), desc="reference held-out"
    )
    x, y = defects.stack_samples(train)
    vx, vy = defects.stack_samples(val)
    result: dict[str, Any] = {
        "steps": args.reference_steps,
        "training_frames": args.reference_frames,
    }
    builders: dict[str, Callable[[], nn.Module]] = {
        "ours": lambda: PixelUNet(1, len(DEFECT_CLASSES), widths=defects.WIDTHS),
        "atomai_unet": AtomAIUnet,
    }
    for name, make in builders.items():
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        model = make()
        steps = args.ours_steps if name == "ours" and args.ours_steps else args.reference_steps

        def next_batch(step: int, rng: np.random.Generator = rng) -> tuple[torch.Tensor, ...]:
            return defects.crop_batch(x, y, rng, 8, 128)

        t0 = time.monotonic()
        fit(
            model,
            steps=steps,
            lr=2e-3,
            next_batch=next_batch,
            loss_fn=defects.weighted_ce,
            val_batches=[],
            val_every=10**9,
            max_minutes=1e9,
            desc=f"training {name}",
        )
        seconds = time.monotonic() - t0
        logits = [
            tiled_inference(model, vx[i], tile=vx.shape[-1], overlap=0, batch_size=1)
            for i in range(len(val))
        ]
        temperature = defects.fit_temperature(logits, list(vy))
        probs = [torch.softmax(torch.from_numpy(z) / temperature, 0).numpy() for z in logits]
        threshold = defects.tune_threshold(probs, val, defects.DetectionSettings())
        settings = defects.DetectionSettings(threshold=threshold)
        test_probs = [
            defects.class_probabilities(model, defects.model_input(s.image), temperature)
            for s in test
        ]
        score = defects.score_frames(test_probs, test, settings).to_json()
        result[name] = {
            "steps": steps,
            "train_seconds": seconds,
            "temperature": temperature,
            "threshold": threshold,
            "score": score,
        }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--seed", type=int, default=600_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--reference-steps",
        type=int,
        default=400,
        help="equal-budget training steps of item 3",
    )
    parser.add_argument("--reference-frames", type=int, default=60)
    parser.add_argument(
        "--ours-steps",
        type=int,
        default=None,
        help="steps for our network in item 3 (default: --reference-steps; more steps at about "
        "the same CPU time compares at equal training time)",
    )
    parser.add_argument("--weights", default=str(WEIGHTS_DIR))
    parser.add_argument(
        "--parts",
        default="quality,speed,budget",
        help="comma-separated subset of quality (item 1), speed (2), budget (3)",
    )
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if not parts <= {"quality", "speed", "budget"}:
        parser.error(f"--parts takes quality, speed and budget, got {args.parts!r}")
    torch.set_num_threads(args.threads)
    model, card = defects.load(args.weights)
    out = Path("bench/out")
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}; defects {card.version} sha256 {card.sha256[:12]}")
    body: dict[str, Any] = {"machine": machine()}
    if "quality" in parts:
        metrics = evaluate_defects(model, card, seed=args.seed, frames=args.frames)
        write_report(metrics, out / "perception", card)
        print_quality(metrics)
        body.update({k: v for k, v in metrics.items() if k != "example"})
    if "speed" in parts:
        timing = speed(model, args.threads, args.repeats)
        print_speed(timing)
        body["speed"] = timing
    if args.reference_steps > 0 and "budget" in parts:
        ref = equal_budget(args)
        body["equal_budget"] = ref
        ours = ref["ours"]["score"]["detection"]["f1"]
        atom = ref["atomai_unet"]["score"]["detection"]["f1"]
        print(
            f"\ntraining from scratch on the same {args.reference_frames} frames (same recipe): "
            f"ours {ref['ours']['steps']} steps in {ref['ours']['train_seconds']:.0f} s, "
            f"AtomAI U-Net {ref['atomai_unet']['steps']} steps in "
            f"{ref['atomai_unet']['train_seconds']:.0f} s; held-out F1 ours {ours:.3f}, AtomAI "
            f"U-Net {atom:.3f} (ratio {ours / atom if atom else float('inf'):.2f}x)"
        )
    name = f"perception_defects_{'_'.join(sorted(parts))}.json"
    (out / name).write_text(json.dumps(body, indent=2) + "\n")
    return 0


def print_quality(metrics: dict[str, Any]) -> None:
    print(f"classical baseline (tuned here): {metrics['summary']['baseline']}")
    for condition, r in metrics["conditions"].items():
        net, cls = r["network"], r["classical"]
        f_net, f_cls = net["detection"]["f1"], cls["detection"]["f1"]
        ratio = f"{f_net / f_cls:.2f}x" if f_cls > 0 else "inf"
        print(
            f"\n[{condition}] {r['frames']} frames, dwell {r['dwell_s'] * 1e6:.1f} µs, "
            f"{r['true_defects']} true defects, options {r['options']}"
        )
        print(
            f"  detection F1 {f_net:.3f} (P {net['detection']['precision']:.3f}, "
            f"R {net['detection']['recall']:.3f}) vs classical {f_cls:.3f}: ratio {ratio}"
        )
        for klass in DEFECT_CLASSES[1:]:
            n, c = net["per_class"][klass], cls["per_class"][klass]
            print(
                f"  {klass:>12}: F1 {n['f1']:.3f} (tp {n['tp']}, fp {n['fp']}, fn {n['fn']}) "
                f"vs classical {c['f1']:.3f}"
            )
        print(
            f"  calibration: detection-confidence ECE {net['confidence_ece']:.3f}, "
            f"pixel ECE {r['pixel_ece']:.4f}; rejected frames {100 * r['reject_rate']:.0f} %"
        )


def print_speed(timing: dict[str, Any]) -> None:
    ours_t, ref_t = timing["ours"], timing["atomai_unet"]
    print(
        f"\nspeed, 512² batch 1, {timing['threads']} threads (wall min / median, CPU per call): "
        f"ours {ours_t['min_ms']:.1f} / {ours_t['median_ms']:.1f} ms, {ours_t['cpu_ms']:.1f} ms "
        f"CPU ({timing['ours_parameters']} parameters, {ours_t['layout']}; target <= 60 ms); "
        f"AtomAI default U-Net {ref_t['min_ms']:.1f} / {ref_t['median_ms']:.1f} ms, "
        f"{ref_t['cpu_ms']:.1f} ms CPU ({timing['atomai_unet_parameters']} parameters, "
        f"{ref_t['layout']}): ours {timing['speedup_min_wall']:.1f}x faster by wall time, "
        f"{timing['speedup_cpu']:.1f}x by CPU time (target >= 3x)"
    )
    for key, value in timing.items():
        if key.startswith("gpu_"):
            print(f"  {key}: {value:.2f} ms")


if __name__ == "__main__":
    raise SystemExit(main())
