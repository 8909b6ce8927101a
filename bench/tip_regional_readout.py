"""The tip net's trained head on regions of its own feature map: does a double tip show locally?

    /tmp/venv/bin/python bench/tip_regional_readout.py [--held-cache F.npz --shifted-cache G.npz]

The tip net pools its last feature map (mean and max) over the whole frame before its linear
head. This diagnostic applies the same trained head, without retraining, to the pooled features
of each quadrant (2 x 2) or ninth (3 x 3) of the map, and reads the frame as the mean of those
logits or as the region least likely to be a good tip. It reports good-vs-bad accuracy, double
tips read as good and good tips read as bad on ``--frames`` held-out and shifted frames (the
tip bench's recipes; the caches, as ``scopepilot train tip --cache`` writes them, skip the
simulation). Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from agent.perception.registry import WEIGHTS_DIR  # noqa: E402
from agent.perception.tasks import tip as tip_task  # noqa: E402
from agent.perception.tip_data import STATES  # noqa: E402
from agent.perception.tip_net import TipModel, TipNet, softmax  # noqa: E402
from drivers.frame import TipState  # noqa: E402

GOOD = STATES.index(TipState.GOOD)
DOUBLE = STATES.index(TipState.MULTIPLE)


def region_logits(net: TipNet, fmap: torch.Tensor, k: int) -> np.ndarray:
    """``(k * k, classes)`` calibrated logits of the ``k x k`` regions of ``fmap``."""
    h, w = fmap.shape[2:]
    rows, cols = np.linspace(0, h, k + 1).astype(int), np.linspace(0, w, k + 1).astype(int)
    out = []
    for i in range(k):
        for j in range(k):
            part = fmap[:, :, rows[i] : rows[i + 1], cols[j] : cols[j + 1]]
            pooled = torch.cat([part.mean(dim=(2, 3)), part.amax(dim=(2, 3))], dim=1)
            out.append(net.head(pooled)[0].numpy() / float(net.temperature[0]))
    return np.array(out)


def readouts(model: TipModel, samples: list[Any]) -> dict[str, np.ndarray]:
    """Predicted state per frame for each read-out."""
    net = model.net.eval()
    preds: dict[str, list[int]] = {
        "whole frame (shipped)": [],
        "mean of the 4 quadrants' logits": [],
        "mean of the 9 ninths' logits": [],
        "the quadrant with the lowest P(good)": [],
    }
    with torch.inference_mode():
        for s in samples:
            x = torch.from_numpy(np.ascontiguousarray(model.prepare(s.data, s.pixel_size_nm)))
            fmap = net.features(x[None])
            whole = net.pooled_logits(fmap)[0].numpy() / float(net.temperature[0])
            quads, ninths = region_logits(net, fmap, 2), region_logits(net, fmap, 3)
            quad_probs = softmax(quads)
            worst = quad_probs[np.argmin(quad_probs[:, GOOD])]
            for key, logits in zip(
                preds, (whole, quads.mean(axis=0), ninths.mean(axis=0), worst), strict=True
            ):
                preds[key].append(int(np.argmax(logits)))
    return {k: np.array(v) for k, v in preds.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1000, help="frames per set (1000)")
    parser.add_argument("--held-cache", help="held-out frames .npz (read or written)")
    parser.add_argument("--shifted-cache", help="shifted frames .npz (read or written)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = TipModel.load(WEIGHTS_DIR)
    print("set       read-out                                good-vs-bad  doubles->good  good->bad")
    for name, recipe, cache in (
        ("held-out", tip_task.heldout_recipe(args.frames), args.held_cache),
        ("shifted", tip_task.shifted_recipe(args.frames), args.shifted_cache),
    ):
        samples = tip_task._simulate_cached(recipe, cache, f"{name} frames", True, 2)
        y = np.array([s.label for s in samples])
        for key, pred in readouts(model, samples).items():
            gvb = float(np.mean((pred == GOOD) == (y == GOOD)))
            doubles = int(np.sum((y == DOUBLE) & (pred == GOOD)))
            false_bad = int(np.sum((y == GOOD) & (pred != GOOD)))
            print(f"{name:<10}{key:<40}{gvb:11.3f}{doubles:15d}{false_bad:11d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
