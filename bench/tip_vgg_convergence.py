"""The DeepSPM-sized VGG trained until its validation accuracy stops rising, against the tip net.

    python bench/tip_vgg_convergence.py --steps 1500 --cache <frames.npz>   # ~1 h of one CPU core

Issue 8 asks for the tip net to be >= 10x faster than a DeepSPM-sized VGG classifier (about 42 M
parameters, 64² input) *at equal or better accuracy*. ``bench/perception_tip.py`` times both and
trains the VGG briefly (300 steps); this script trains it for ``--steps`` Adam steps (batch 16,
``--lr``) on random 64² crops of all the tip model's training frames (the first ``--frames`` of
the training seeds, the levelled channel, random flips) and records its accuracy on the next 150
training-seed frames (validation; the mean logits of 4 crops per frame) every ``--eval-every``
steps, so the curve shows whether it has converged. Then the final VGG is scored on held-out
frames (``--test-frames`` per set, the tip bench's seeds and shifted parameters): its logits
averaged over all 16 disjoint 64² tiles of the 256² frame (it sees the whole frame, as the tip
net does, at 16 times the cost the speed bench times), and from one 64² tile (the timed cost),
next to the tip net on the same frames. ``--resume`` continues a saved run (with ``--lr-final``:
a cosine decay of the learning rate over the new steps); ``--score-only`` scores a saved VGG.

Writes ``results.json`` and ``vgg_curve.png`` under ``--out-dir`` (default bench/out/tip_vgg).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from agent.perception.registry import WEIGHTS_DIR, resample_to_pixel_size  # noqa: E402
from agent.perception.tasks import tip as tip_task  # noqa: E402
from agent.perception.tip_data import STATES  # noqa: E402
from agent.perception.tip_eval import classification_metrics  # noqa: E402
from agent.perception.tip_net import TipModel, normalise  # noqa: E402
from bench._common import machine  # noqa: E402
from bench.perception_tip import VGG_INPUT, DeepSPMVGG, crops64  # noqa: E402
from drivers.frame import TipState  # noqa: E402

VAL_FRAMES = 150


def tiles(image: np.ndarray, n: int) -> np.ndarray:
    """``(k, 64, 64)``: the levelled channel of disjoint 64² tiles on an even grid (``n`` per
    side at most, as many as fit)."""
    h, w = image.shape
    per_y, per_x = min(n, h // VGG_INPUT), min(n, w // VGG_INPUT)
    tops = np.linspace(0, h - VGG_INPUT, per_y).astype(int)
    lefts = np.linspace(0, w - VGG_INPUT, per_x).astype(int)
    return np.stack(
        [
            normalise(image[t : t + VGG_INPUT, left : left + VGG_INPUT])[0]
            for t in tops
            for left in lefts
        ]
    )


def vgg_predict(vgg: nn.Module, images: list[np.ndarray], per_side: int) -> np.ndarray:
    """Most likely state per image from the mean logits over its tiles."""
    out = []
    with torch.inference_mode():
        for img in images:
            x = torch.from_numpy(tiles(img, per_side))[:, None]
            out.append(int(vgg(x).mean(dim=0).argmax()))
    return np.array(out)


def tipnet_predict(model: TipModel, samples: list[Any]) -> np.ndarray:
    """The tip net's most likely state per whole frame."""
    return np.array(
        [
            int(np.argmax(model.probabilities(model.prepare(s.data, s.pixel_size_nm))[0]))
            for s in samples
        ]
    )


def resampled(samples: list[Any], card: Any) -> list[np.ndarray]:
    return [resample_to_pixel_size(s.data, s.pixel_size_nm, card) for s in samples]


def plot_curve(curve: dict[str, list[float]], tipnet_val: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    ax[0].plot(curve["loss_step"], curve["loss"], lw=0.6)
    ax[0].set(xlabel="step", ylabel="training loss (mean of 50 steps)", title="DeepSPM-sized VGG")
    ax[1].plot(curve["eval_step"], curve["val_accuracy"], "o-", label="VGG (4 crops / frame)")
    ax[1].axhline(tipnet_val, color="k", ls="--", label="tip net 1.2 (whole frame)")
    ax[1].set(xlabel="step", ylabel=f"accuracy, {VAL_FRAMES} validation frames", ylim=(0, 1))
    ax[1].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--frames", type=int, default=900, help="training frames (900)")
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (1e-4)")
    parser.add_argument(
        "--lr-final",
        type=float,
        default=None,
        help="decay the learning rate from --lr to this over this run's steps (cosine); "
        "default: constant",
    )
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--test-frames", type=int, default=200, help="per held-out set (200)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cache", help="the tip training frames' .npz (as scopepilot train tip --cache writes)"
    )
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "out" / "tip_vgg"))
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the VGG saved in --out-dir (vgg.pt, optimiser state and curve) for "
        "--steps more steps",
    )
    parser.add_argument(
        "--score-only",
        action="store_true",
        help="no training: score the VGG saved in --out-dir (vgg.pt) on the held-out frames",
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    progress = not args.quiet
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = TipModel.load(WEIGHTS_DIR)
    card = model.card
    samples = tip_task._simulate_cached(
        tip_task.train_recipe(args.frames + VAL_FRAMES), args.cache, "training frames", progress, 2
    )
    train, val = samples[: args.frames], samples[args.frames :]
    train_img, val_img = resampled(train, card), resampled(val, card)
    y_train = np.array([s.label for s in train])
    y_val = np.array([s.label for s in val])
    tipnet_val = float(np.mean(tipnet_predict(model, val) == y_val))
    vgg = DeepSPMVGG()
    opt = torch.optim.Adam(vgg.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    curve: dict[str, list[float]] = {
        "loss_step": [],
        "loss": [],
        "eval_step": [],
        "val_accuracy": [],
    }
    first = 1
    if args.score_only:
        args.resume, args.steps = True, 0
    if args.resume:
        vgg.load_state_dict(torch.load(out / "vgg.pt", weights_only=True))
        if (out / "vgg_opt.pt").is_file():  # runs before the optimiser state was kept: fresh
            opt.load_state_dict(torch.load(out / "vgg_opt.pt", weights_only=True))
        curve = json.loads((out / "curve.json").read_text())
        first = int(curve["eval_step"][-1]) + 1
        rng = np.random.default_rng([args.seed, first])
    last = first + args.steps - 1
    schedule = None
    if args.lr_final is not None and args.steps > 0:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] = args.lr
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=args.steps, eta_min=args.lr_final
        )
    losses: list[float] = []
    t0, c0 = time.perf_counter(), time.process_time()
    bar = tqdm(range(first, last + 1), desc="training VGG", unit="step", disable=not progress)
    for step in bar:
        vgg.train()
        idx = rng.integers(0, len(train_img), 16)
        crops = []
        for i in idx:
            c = crops64(train_img[i], rng)
            crops.append(c[:, ::-1] if rng.random() < 0.5 else c)
        x = torch.from_numpy(np.ascontiguousarray(np.stack(crops))[:, None])
        loss = loss_fn(vgg(x), torch.from_numpy(y_train[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if schedule is not None:
            schedule.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            curve["loss_step"].append(step)
            curve["loss"].append(float(np.mean(losses[-50:])))
            bar.set_postfix(loss=f"{curve['loss'][-1]:.3f}")
        if step % args.eval_every == 0 or step == last:
            vgg.eval()
            acc = float(np.mean(vgg_predict(vgg, val_img, 2) == y_val))
            curve["eval_step"].append(step)
            curve["val_accuracy"].append(acc)
            print(f"step {step}: validation accuracy {acc:.3f} (tip net {tipnet_val:.3f})")
            (out / "curve.json").write_text(json.dumps(curve))
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    vgg.eval()
    if args.steps > 0:
        torch.save(vgg.state_dict(), out / "vgg.pt")
        torch.save(opt.state_dict(), out / "vgg_opt.pt")
    results: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "machine": machine(),
        "steps": last,
        "lr": args.lr,
        "lr_final": args.lr_final,
        "train_frames": args.frames,
        "train_s": train_s,
        "train_cpu_s": train_cpu,
        "curve": curve,
        "tipnet_val_accuracy": tipnet_val,
    }
    good = STATES.index(TipState.GOOD)
    for name, recipe in (
        ("heldout", tip_task.heldout_recipe(args.test_frames)),
        ("shifted", tip_task.shifted_recipe(args.test_frames)),
    ):
        test = tip_task._simulate_cached(recipe, None, f"{name} frames", progress, 2)
        y = np.array([s.label for s in test])
        test_img = resampled(test, card)
        pv = vgg_predict(vgg, test_img, 4)
        pv1 = vgg_predict(vgg, test_img, 1)  # one 64² tile, one pass: the cost the bench times
        pn = tipnet_predict(model, test)
        row = {}
        for who, pred in (("vgg", pv), ("vgg_one_tile", pv1), ("tipnet", pn)):
            met = classification_metrics(y, pred)
            row[who] = {
                "accuracy": met["accuracy"],
                "macro_f1": met["macro_f1"],
                "good_vs_bad_accuracy": float(np.mean((pred == good) == (y == good))),
                "confusion": met["confusion"],
            }
        results[name] = row
        print(
            f"{name} ({len(test)} frames): accuracy VGG 16 tiles {row['vgg']['accuracy']:.3f} / "
            f"one tile {row['vgg_one_tile']['accuracy']:.3f} / tip net "
            f"{row['tipnet']['accuracy']:.3f}; good-vs-bad "
            f"{row['vgg']['good_vs_bad_accuracy']:.3f} / "
            f"{row['vgg_one_tile']['good_vs_bad_accuracy']:.3f} / "
            f"{row['tipnet']['good_vs_bad_accuracy']:.3f}"
        )
    plot_curve(curve, tipnet_val, out / "vgg_curve.png")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out / 'results.json'} and {out / 'vgg_curve.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
