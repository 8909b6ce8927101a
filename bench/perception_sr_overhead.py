"""CPU of ``sr.recover()`` against the straightforward implementation it replaced, alternated in
one process (so a shared machine's load drifts equally over both).

    /tmp/venv/bin/python bench/perception_sr_overhead.py --threads 1 --repeats 30

The reference runs the network through blended tiles even when the frame is one tile, computes σ
in numpy and the reject rule's 0.1/99.9 percentiles and median with ``np.percentile`` /
``np.median`` over the whole frame (session 5's code; ``tests/test_sr_recover.py`` pins that both
give the same outputs up to float rounding). Two measurements per 512² frame (full raster and a
1/20 random scan, 0.025 nm pixels): the whole call, and the part around the network alone (the
network replaced by a stub that returns its recorded output in the same memory layout, so the
network's own time, identical in both, does not drown the difference). Median process CPU per
call (all threads together). Output: ``bench/out/perception_sr_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from torch import nn

from agent.perception.registry import (
    ModelCard,
    check_image,
    resample_to_pixel_size,
    tiled_inference,
)
from agent.perception.tasks import sr
from agent.perception.tasks.stem_data import StemRecipe, simulate
from bench._common import machine


def reference_recover(
    image: np.ndarray, pixel_size_nm: float, model: nn.Module, card: ModelCard
) -> sr.Recovery:
    """``sr.recover()`` as it was before the one-pass path and the exact bracketed quantiles."""
    arr = check_image(image, allow_nan=True, min_size=8)
    coverage = float(np.isfinite(arr).mean())
    work = resample_to_pixel_size(arr, pixel_size_nm, card)
    x, scale = sr.model_inputs(work)
    tile = min(sr.TILE_PX, -(-max(x.shape[1:]) // 32) * 32)
    out = tiled_inference(model, x, tile=tile, overlap=64, batch_size=4)
    logvar = np.clip(out[1], *sr.LOGVAR_RANGE)
    mean = out[0] * scale
    sigma = np.exp(0.5 * logvar) * float(card.training.get("temperature", 1.0)) * scale
    span = float(np.percentile(mean, 99.9) - np.percentile(mean, 0.1))
    relative = float(np.median(sigma) / span) if span > 0 else math.inf
    reject = not relative <= float(card.training.get("reject_relative_sigma", 0.05))
    return sr.Recovery(mean, sigma, relative, reject, "", coverage)


class _Recorded(nn.Module):
    """Stands in for the network: returns its recorded output (same layout) for any input."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out.clone(memory_format=torch.preserve_format)


def alternate(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median process CPU ms per call of each function, the functions called in turn."""
    for fn in fns.values():
        fn()
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.process_time()
            fn()
            cpu[name].append(time.process_time() - t0)
    return {name: float(np.median(v)) * 1e3 for name, v in cpu.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=30, help="calls of each, alternated")
    parser.add_argument("--out", default="bench/out/perception_sr_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, card = sr.load()
    model.to("cpu")
    body: dict[str, Any] = {"machine": machine(), "threads": args.threads, "frames": {}}
    for pattern, fraction in (("raster", 1.0), ("random", 0.05)):
        recipe = StemRecipe(
            seed=77,
            frames=1,
            shape_px=(512, 512),
            dwell_s=(2e-6, 2e-6),
            pixel_size_m=(0.25e-10, 0.25e-10),
            patterns=((pattern, fraction),),
        )
        image = simulate(recipe, progress=False)[0].image
        x, _ = sr.model_inputs(image)
        with torch.inference_mode():
            xt = torch.from_numpy(x)[None].contiguous(memory_format=torch.channels_last)
            stub = _Recorded(model(xt))
        row: dict[str, dict[str, float]] = {}
        for part, net in (("whole call", model), ("around the network", stub)):
            ms = alternate(
                {
                    "reference": partial(reference_recover, image, 0.025, net, card),
                    "recover": partial(sr.recover, image, 0.025, model=net, card=card),
                },
                args.repeats,
            )
            row[part] = ms
            print(
                f"{pattern:6s} {part:18s} {args.threads} thread(s), median CPU per call: "
                f"reference {ms['reference']:.1f} ms, recover {ms['recover']:.1f} ms "
                f"({ms['recover'] / ms['reference']:.2f}x)"
            )
        body["frames"][pattern] = row
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(body, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
