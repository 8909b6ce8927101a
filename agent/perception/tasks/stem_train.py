"""The training loop shared by the sr and defects networks: seeded, step-counted, with a
progress bar, a held-out validation loss and a loss-curve PNG; and what their training commands
share around it: the simulated training and validation frames, the model card's architecture
and fit fields, saving and the printed report.

Training is reproducible by seed: the data set, the crop order and the initial weights all
derive from ``seed``, the number of steps is fixed, and torch runs on a fixed thread count.
``max_minutes`` is a safety stop only (a loaded machine); when it cuts training short, the
result says so and the model card records it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from agent.perception.pixel_unet import PixelUNet
from agent.perception.registry import WEIGHTS_DIR, ModelCard, save_model
from drivers.errors import ConfigError
from drivers.registry import open_instrument

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, ...]
Sample = TypeVar("Sample")


@dataclass
class FitResult:
    """Losses per step, validation losses at ``val_steps``, the wall time and whether the
    ``max_minutes`` safety stop ended training early."""

    steps_done: int
    train_loss: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False


HELD_OUT_SPECIMENS = ("mos2", "ws2")
"""The specimens of the held-out evaluations whose figures the STEM model cards record (and of
the sr model's training frames)."""


def add_specimens_argument(
    parser: argparse.ArgumentParser, default: tuple[str, ...] = HELD_OUT_SPECIMENS
) -> None:
    """``--specimens`` of ``scopepilot train sr|defects`` (``default``: the committed recipe's)."""
    parser.add_argument(
        "--specimens",
        default=",".join(default),
        help="comma-separated sim:stem specimens of the training frames, cycled instrument by "
        "instrument; a name given twice is drawn twice as often (default "
        f"{','.join(default)}, the recipe of the committed model; sim:stem has mos2, ws2, "
        "graphene and srtio3)",
    )


def add_evaluate_specimens_argument(parser: argparse.ArgumentParser) -> None:
    """``--specimens`` of ``scopepilot evaluate sr|defects``."""
    parser.add_argument(
        "--specimens",
        default=",".join(HELD_OUT_SPECIMENS),
        help="comma-separated sim:stem specimens the held-out instruments cycle through "
        f"(default {','.join(HELD_OUT_SPECIMENS)}; graphene and srtio3 test other specimens)",
    )


def parse_specimens(text: str) -> tuple[str, ...]:
    """``"mos2,srtio3"`` -> ``("mos2", "srtio3")``, each checked by opening a ``sim:stem`` with
    it: :class:`ConfigError` (the simulator's, naming the known ones) for an unknown one."""
    names = tuple(t.strip() for t in str(text).split(",") if t.strip())
    if not names:
        raise ConfigError(f"--specimens needs one or more sim:stem specimens, got {text!r}")
    for name in dict.fromkeys(names):
        if name not in HELD_OUT_SPECIMENS:
            open_instrument("sim:stem", seed=0, specimen=name).close()
    return names


def evaluation_specimens(args: argparse.Namespace) -> tuple[str, ...]:
    """The ``--specimens`` of an evaluate command; :class:`ConfigError` with ``--update-card``
    unless they are :data:`HELD_OUT_SPECIMENS` (the card records those figures only)."""
    specimens = parse_specimens(getattr(args, "specimens", ",".join(HELD_OUT_SPECIMENS)))
    if getattr(args, "update_card", False) and specimens != HELD_OUT_SPECIMENS:
        raise ConfigError(
            "--update-card writes the card's held-out metrics, which are on "
            f"{','.join(HELD_OUT_SPECIMENS)}: leave --specimens out"
        )
    return specimens


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``scopepilot train sr`` and ``scopepilot train defects``."""
    parser.add_argument("--seed", type=int, default=0, help="seeds data, crops and weights")
    parser.add_argument("--frames", type=int, default=240, help="simulated training frames")
    parser.add_argument("--val-frames", type=int, default=24, help="validation frames")
    parser.add_argument("--steps", type=int, default=2500, help="optimiser steps")
    parser.add_argument("--batch", type=int, default=8, help="crops per step")
    parser.add_argument("--crop", type=int, default=128, help="crop size in pixels")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--max-minutes", type=float, default=28.0, help="safety stop")
    parser.add_argument("--out", default=str(WEIGHTS_DIR), help="weights directory")
    parser.add_argument(
        "--plots", default="bench/out/perception", help="directory of the loss-curve PNG"
    )


def parameter_count(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def recipe_json(recipe: Any) -> dict[str, Any]:
    """A data-recipe dataclass as plain JSON (tuples become lists), for the model card."""
    return dict(json.loads(json.dumps(asdict(recipe))))


def pixel_unet_architecture(
    model: PixelUNet,
    *,
    in_channels: int,
    out_channels: int,
    widths: Sequence[int],
    classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The model card's ``architecture`` of a :class:`PixelUNet` built with these arguments
    (``classes``, the names of the output channels, only for the segmentation models)."""
    arch: dict[str, Any] = {
        "kind": "PixelUNet",
        "in_channels": in_channels,
        "out_channels": out_channels,
        "factor": model.factor,
        "widths": list(widths),
    }
    if classes is not None:
        arch["classes"] = list(classes)
    arch["parameters"] = parameter_count(model)
    return arch


def fit_summary(result: FitResult, t0: float, cpu0: float | None = None) -> dict[str, Any]:
    """The model card's training fields of a finished :func:`fit`: steps done, whether the
    safety stop ended it, the seconds since ``t0`` (``time.monotonic()`` at the start of the
    command; the CPU seconds since ``cpu0``, ``time.process_time()``, when given) and the last
    validation loss."""
    summary: dict[str, Any] = {
        "steps_done": result.steps_done,
        "stopped_early": result.stopped_early,
        "train_seconds": round(time.monotonic() - t0, 1),
    }
    if cpu0 is not None:
        summary["train_cpu_seconds"] = round(time.process_time() - cpu0, 1)
    summary["final_val_loss"] = result.val_loss[-1] if result.val_loss else None
    return summary


def simulate_train_val(
    simulate: Callable[..., list[Sample]],
    recipe: Callable[[int, int], Any],
    args: argparse.Namespace,
) -> tuple[list[Sample], list[Sample]]:
    """The training frames, ``recipe(seed, frames)`` of the command's options, and the
    validation frames (``--val-frames`` of the seed 1,000,003 higher), with progress bars."""
    train = simulate(recipe(args.seed, args.frames), desc="simulating training frames")
    val = simulate(
        recipe(args.seed + 1_000_003, args.val_frames), desc="simulating validation frames"
    )
    return train, val


def save_and_report(
    model: nn.Module,
    card: ModelCard,
    result: FitResult,
    args: argparse.Namespace,
    *,
    loss_name: str,
    report: dict[str, Any],
) -> None:
    """Save ``model`` with ``card`` into ``--out`` and the loss curve ``<name>_loss.png``
    (titled ``<name>: <loss_name>``) into ``--plots``, then print the training report as JSON:
    the two paths, ``report`` (the calibration), the steps done and the seconds (and the CPU
    seconds when the card records them)."""
    out = Path(args.out)
    saved = save_model(model, card, out)
    plot = Path(args.plots) / f"{card.name}_loss.png"
    save_loss_curve(result, plot, f"{card.name}: {loss_name}")
    timing = {"seconds": saved.training["train_seconds"]}
    if "train_cpu_seconds" in saved.training:
        timing["cpu_seconds"] = saved.training["train_cpu_seconds"]
    weights = {"weights": str(out / f"{card.name}.pt"), "loss_curve": str(plot)}
    print(json.dumps({**weights, **report, "steps": result.steps_done, **timing}, indent=2))


def seed_everything(seed: int, threads: int) -> None:
    """Seed torch and fix its thread count (the numpy generators are passed explicitly)."""
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, int(threads)))


def fit(
    model: nn.Module,
    *,
    steps: int,
    lr: float,
    next_batch: Callable[[int], Batch],
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor],
    val_batches: Sequence[Batch],
    val_every: int = 100,
    max_minutes: float = 28.0,
    desc: str = "training",
) -> FitResult:
    """Train ``model`` for ``steps`` Adam steps (linear warm-up, cosine learning-rate decay).

    ``next_batch(step)`` returns the inputs of one step, ``loss_fn(model, batch)`` its scalar
    loss; the mean loss over ``val_batches`` (no gradients, eval mode) is logged every
    ``val_every`` steps and at the end.
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:  # linear warm-up, then cosine decay to 2 % of lr
        if step < warmup:
            return (step + 1) / warmup
        done = (step - warmup) / max(1, steps - warmup)
        return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    result = FitResult(steps_done=0)
    start = time.monotonic()
    bar = tqdm(range(steps), desc=desc, unit="step")
    for step in bar:
        model.train()
        loss = loss_fn(model, next_batch(step))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        result.train_loss.append(float(loss.item()))
        result.steps_done = step + 1
        last = step + 1 == steps
        if (step + 1) % val_every == 0 or last:
            result.val_steps.append(step + 1)
            result.val_loss.append(validation_loss(model, loss_fn, val_batches))
            bar.set_postfix(
                loss=f"{np.mean(result.train_loss[-val_every:]):.4f}",
                val=f"{result.val_loss[-1]:.4f}",
            )
        if time.monotonic() - start > max_minutes * 60 and not last:
            log.warning(
                "training stopped by the %.0f-minute safety limit at step %d of %d",
                max_minutes,
                step + 1,
                steps,
            )
            result.stopped_early = True
            result.val_steps.append(step + 1)
            result.val_loss.append(validation_loss(model, loss_fn, val_batches))
            break
    bar.close()
    result.seconds = time.monotonic() - start
    model.eval()
    return result


def validation_loss(
    model: nn.Module, loss_fn: Callable[[nn.Module, Batch], torch.Tensor], batches: Sequence[Batch]
) -> float:
    model.eval()
    with torch.no_grad():
        values = [float(loss_fn(model, b).item()) for b in batches]
    return float(np.mean(values)) if values else math.nan


def save_loss_curve(result: FitResult, path: Path, title: str) -> Path:
    """Training loss (smoothed over 25 steps) and validation loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    loss = np.asarray(result.train_loss)
    if loss.size:
        k = min(25, loss.size)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(k, loss.size + 1), smooth, label="training (25-step mean)")
    if result.val_loss:
        ax.plot(result.val_steps, result.val_loss, "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
