"""The ``sr`` model: clean HAADF-STEM images from low-dose frames and partial scans, with a
per-pixel uncertainty.

The network (:class:`~agent.perception.pixel_unet.PixelUNet`) sees two channels: the frame
divided by its mean (0 at unvisited pixels) and the sampling mask (1 where the beam dwelt); it
returns the mean and the log-variance of a Gaussian for every pixel of the noise-free image,
trained with the β-NLL loss (Seitzer et al. 2022, β = 0.5) so the variance is learnt without
starving the mean (β = 1, squared-error gradients for the mean, with 1/20 scans weighted up,
scored 1 dB worse at a quarter dose in the same held-out evaluation). After training one
temperature ``T`` rescales σ so that the normalised errors of validation frames have unit
variance (calibration); a frame whose median σ exceeds
``reject_relative_sigma`` of its intensity range is marked ``reject`` (the agent does not act on
it blindly). From sr 4 on (card ``align_lines``) the output's scan lines are then shifted onto
the frame's own lines (:mod:`agent.perception.tasks.sr_lines`): the network returns nearly
straight lines, the truth carries each line's jitter. With the card's ``align_sparse_lines``
(docs/decisions/0017) the sparsely measured lines of random and spiral partial scans are aligned
too, each shift shrunk towards 0 by a prior estimated from the frame.

Training data are ``sim:stem`` frames (MoS2 and WS2, 0.23–0.27 Å pixels, 0.25–8 µs dwell, full
rasters and random / line / spiral partial scans at 1/30 to 1/10 coverage); evaluation uses other
seeds and shifted beam current, drift and source size (:mod:`agent.perception.tasks.sr_eval`).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from agent.perception.pixel_unet import PixelUNet
from agent.perception.registry import (
    WEIGHTS_DIR,
    ModelCard,
    check_image,
    load_model,
    resample_to_pixel_size,
    run_batches,
    tiled_inference,
)
from agent.perception.tasks.sr_lines import align_lines
from agent.perception.tasks.sr_quantiles import median, percentiles
from agent.perception.tasks.stem_data import (
    PIXEL_SIZE_M,
    StemRecipe,
    StemSample,
    image_scale,
    shuffled_crops,
    simulate,
)
from agent.perception.tasks.stem_train import (
    HELD_OUT_SPECIMENS,
    add_evaluate_specimens_argument,
    add_specimens_argument,
    evaluation_specimens,
    fit,
    fit_summary,
    parse_specimens,
    pixel_unet_architecture,
    recipe_json,
    save_and_report,
    seed_everything,
    simulate_train_val,
)
from agent.perception.tasks.stem_train import (
    add_train_arguments as add_stem_train_arguments,
)
from drivers.errors import ConfigError, DataError

log = logging.getLogger(__name__)

NAME = "sr"
VERSION = "4"
CHANNELS = ("haadf_over_mean", "sampled")
WIDTHS = (32, 48, 64, 96)
PIXEL_SIZE_RANGE_NM = (0.0125, 0.05)
TILE_PX = 512
LOGVAR_RANGE = (-12.0, 6.0)
BETA = 0.5
TRAIN_PATTERNS: tuple[tuple[str, float], ...] = (
    ("raster", 1.0),
    ("raster", 1.0),
    ("raster", 1.0),
    ("random", 0.05),
    ("random", 1 / 30),
    ("random", 0.1),
    ("lines", 0.05),
    ("lines", 0.1),
    ("spiral", 0.05),
    ("spiral", 0.1),
)
"""(pattern, fraction) of training frames, drawn uniformly (full rasters three times as often)."""
TRAIN_DWELL_S = (0.25e-6, 8e-6)
TRAIN_DEFAULTS: dict[str, Any] = {"frames": 720, "steps": 10_000, "threads": 1}
"""Where the defaults of ``scopepilot train sr`` differ from the shared STEM training options
(the recipe of sr 2): 720 training frames (with 240 the validation loss stopped falling long
before the training loss), 10,000 steps, one torch thread (a second thread only spin-waits on a
shared 2-core machine). Simulating the 744 frames costs ~45 s of CPU and a step 70-110 ms (more
on a busier machine): 13-19 minutes of CPU in all (docs/benchmarks.md). The committed sr 4 is sr
2 fine-tuned twice on new frames: sr 3 (``--seed 1 --steps 2000 --lr 0.0003 --init`` a directory
holding sr 2), then sr 4 (``--seed 3 --steps 2000 --lr 0.0003 --extra-rasters 3 --init`` sr 3);
its card records the chain of commands and SHA-256s (``init``, ``init.init``)."""


# ---------------------------------------------------------------------- model and inputs


def build(card: ModelCard) -> PixelUNet:
    """The untrained network described by ``card.architecture``."""
    arch = card.architecture
    return PixelUNet(
        int(arch.get("in_channels", 2)),
        int(arch.get("out_channels", 2)),
        factor=int(arch.get("factor", 4)),
        widths=tuple(int(w) for w in arch.get("widths", WIDTHS)),
    )


def model_inputs(image: np.ndarray) -> tuple[np.ndarray, float]:
    """``(2, H, W) float32`` network input of an ``(H, W)`` frame (NaN = not visited) and the
    scale it was divided by."""
    scale = image_scale(image)
    sampled = np.isfinite(image)
    x = np.zeros((2, *image.shape), np.float32)
    np.divide(image, scale, out=x[0], where=sampled)
    x[1] = sampled
    return x, scale


def split_output(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Network output ``(N, 2, H, W)`` -> (mean, log-variance), the latter clamped."""
    return out[:, 0], out[:, 1].clamp(*LOGVAR_RANGE)


@dataclass(frozen=True)
class Recovery:
    """What :func:`recover` returns: ``image`` and ``sigma`` ``(H, W) float32`` in the input's
    units, ``relative_uncertainty`` (median σ over the recovered intensity range), ``reject``
    and its ``reason`` (empty when the result can be used)."""

    image: np.ndarray
    sigma: np.ndarray
    relative_uncertainty: float
    reject: bool
    reason: str
    coverage: float


@functools.lru_cache(maxsize=4)
def _cached_model(directory: str) -> tuple[nn.Module, ModelCard]:
    return load_model(NAME, build, directory, version=VERSION)


def load(directory: str | Path = WEIGHTS_DIR) -> tuple[nn.Module, ModelCard]:
    """The trained model and its card (cached per directory)."""
    return _cached_model(str(Path(directory).resolve()))


def network_output(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """The raw network output ``(2, H, W) float32`` of an input ``x`` ``(2, H, W)``.

    A frame that is exactly one tile (square, a multiple of the network's size step, at most
    :data:`TILE_PX`) runs in one pass; anything else goes through overlapping tiles blended by
    :func:`~agent.perception.registry.tiled_inference`. For a one-tile frame both give the same
    values up to float rounding (the blend multiplies the tile's output by a weight and divides by
    the same weight).
    """
    h, w = x.shape[1:]
    multiple = model.multiple() if isinstance(model, PixelUNet) else 32
    tile = min(TILE_PX, -(-max(h, w) // multiple) * multiple)
    if h == w == tile:
        return run_batches(model, x[None], batch_size=1)[0].numpy()
    return tiled_inference(model, x, tile=tile, overlap=64, batch_size=4)


def run_network(model: nn.Module, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x`` ``(2, H, W)`` -> (mean, log-variance) ``(H, W)`` in normalised units."""
    out = network_output(model, x)
    return out[0], np.clip(out[1], *LOGVAR_RANGE)


def recover(
    image: Any,
    pixel_size_nm: float,
    *,
    model: nn.Module | None = None,
    card: ModelCard | None = None,
    align: bool | None = None,
) -> Recovery:
    """Recover the noise-free image of a HAADF-STEM frame (full, low-dose or partial scan).

    ``image`` is ``(H, W)`` detector counts (NaN marks pixels a partial scan skipped),
    ``pixel_size_nm`` its pixel size. With ``align`` (default: the card's ``align_lines``, true
    from sr 4 on) every well-measured scan line of the network's output is shifted onto the
    frame's own line (:func:`~agent.perception.tasks.sr_lines.align_lines`: the line jitter),
    and with the card's ``align_sparse_lines`` the sparsely measured lines of partial scans too.
    Raises :class:`DataError` for bad input (wrong shape, infinities, no finite pixel, pixel size
    out of range, a non-positive mean) and :class:`ModelError` when the weights cannot be loaded.
    """
    if model is None or card is None:
        model, card = load()
    arr = check_image(image, allow_nan=True, min_size=8)
    coverage = float(np.isfinite(arr).mean())
    work = resample_to_pixel_size(arr, pixel_size_nm, card)
    x, scale = model_inputs(work)
    mean_n, logvar = run_network(model, x)
    temperature = float(card.training.get("temperature", 1.0))
    mean = mean_n * scale
    sigma = np.exp(0.5 * logvar) * temperature * scale
    if work.shape != arr.shape:
        from skimage.transform import resize

        mean = resize(mean, arr.shape, order=1, preserve_range=True)
        sigma = resize(sigma, arr.shape, order=1, preserve_range=True)
    if align is None:
        align = bool(card.training.get("align_lines", False))
    if align:
        sparse = bool(card.training.get("align_sparse_lines", False))
        mean, sigma, _ = align_lines(mean, sigma, arr, sparse=sparse)
    low, high = percentiles(mean, (0.1, 99.9))
    span = float(high - low)
    relative = median(sigma) / span if span > 0 else math.inf
    limit = float(card.training.get("reject_relative_sigma", 0.05))
    reject = not relative <= limit
    reason = (
        f"median uncertainty {relative:.3f} of the intensity range exceeds {limit:.3f}"
        if reject
        else ""
    )
    return Recovery(
        np.asarray(mean, np.float32),
        np.asarray(sigma, np.float32),
        relative,
        reject,
        reason,
        coverage,
    )


def infer(image: np.ndarray, pixel_size_nm: float) -> dict[str, Any]:
    """JSON-able result of :func:`recover` (``image`` and ``sigma`` as nested lists)."""
    _, card = load()
    result = recover(image, pixel_size_nm)
    return {
        "model": NAME,
        "version": card.version,
        "weights_sha256": card.sha256,
        "shape": list(result.image.shape),
        "coverage": result.coverage,
        "relative_uncertainty": result.relative_uncertainty,
        "reject": result.reject,
        "reason": result.reason,
        "image": np.round(result.image, 4).tolist(),
        "sigma": np.round(result.sigma, 4).tolist(),
    }


# ---------------------------------------------------------------------- training


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``scopepilot train sr``: the shared STEM options with the defaults of
    :data:`TRAIN_DEFAULTS` (the recipe of the committed model)."""
    add_stem_train_arguments(parser)
    parser.add_argument(
        "--init",
        default=None,
        help="fine-tune: start from the sr model in this weights directory (its card's SHA-256 "
        "is checked and recorded) instead of random weights",
    )
    parser.add_argument(
        "--beta",
        type=float,
        default=BETA,
        help="β of the β-NLL loss: 0 is the Gaussian NLL, 1 gives the mean squared-error "
        f"gradients (default {BETA}, the recipe of the committed models)",
    )
    parser.add_argument(
        "--extra-rasters",
        type=int,
        default=0,
        help="this many more full rasters in the training draw of scan patterns (3 of the 10 "
        "by default; 0 is the recipe of the committed models)",
    )
    add_specimens_argument(parser)
    parser.set_defaults(**TRAIN_DEFAULTS)


def training_command(args: argparse.Namespace) -> str:
    """The command line that reproduces a training run (recorded in the model card)."""
    specimens = parse_specimens(getattr(args, "specimens", ",".join(HELD_OUT_SPECIMENS)))
    return (
        f"scopepilot train sr --seed {args.seed} --frames {args.frames} "
        f"--val-frames {args.val_frames} --steps {args.steps} --batch {args.batch} "
        f"--crop {args.crop} --lr {args.lr} --threads {args.threads}"
        + (f" --init {args.init}" if getattr(args, "init", None) else "")
        + (f" --beta {args.beta}" if getattr(args, "beta", BETA) != BETA else "")
        + (f" --extra-rasters {args.extra_rasters}" if getattr(args, "extra_rasters", 0) else "")
        + (f" --specimens {','.join(specimens)}" if specimens != HELD_OUT_SPECIMENS else "")
    )


def train_recipe(
    seed: int,
    frames: int,
    extra_rasters: int = 0,
    specimens: tuple[str, ...] = HELD_OUT_SPECIMENS,
) -> StemRecipe:
    """The training data: :data:`TRAIN_PATTERNS` with ``extra_rasters`` more full rasters in the
    draw, on ``specimens`` (0 and MoS2 / WS2: the recipe of the committed models)."""
    patterns = (("raster", 1.0),) * extra_rasters + TRAIN_PATTERNS
    return StemRecipe(
        seed=seed, frames=frames, patterns=patterns, dwell_s=TRAIN_DWELL_S, specimens=specimens
    )


def stack_samples(samples: list[StemSample]) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``(N, 2, H, W)`` and normalised clean targets ``(N, H, W)``."""
    xs, ys = [], []
    for s in samples:
        x, scale = model_inputs(s.image)
        xs.append(x)
        ys.append(s.clean / scale)
    return np.stack(xs), np.stack(ys).astype(np.float32)


def _crop_batch(
    x: np.ndarray,
    y: np.ndarray,
    crops: list[tuple[int, int, int]],
    rng: np.random.Generator,
    crop: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    bx = np.empty((len(crops), 2, crop, crop), np.float32)
    by = np.empty((len(crops), crop, crop), np.float32)
    for i, (k, r, c) in enumerate(crops):
        cx, cy = x[k, :, r : r + crop, c : c + crop], y[k, r : r + crop, c : c + crop]
        if rng.random() < 0.5:  # mirror across the slow-scan axis (keeps the scan direction)
            cx, cy = cx[:, ::-1], cy[::-1]
        bx[i], by[i] = cx, cy
    return torch.from_numpy(bx), torch.from_numpy(by)


def beta_nll(model: nn.Module, batch: tuple[torch.Tensor, ...], beta: float = BETA) -> torch.Tensor:
    """β-NLL of the clean target under the predicted Gaussians (default β = :data:`BETA`)."""
    x, y = batch
    mean, logvar = split_output(model(x))
    var = logvar.exp()
    nll = 0.5 * (logvar + (y - mean) ** 2 / var)
    return (nll * var.detach() ** beta).mean()


def fit_temperature(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """The factor ``T`` that makes ``(y - mean) / (T σ)`` have unit variance on ``x``."""
    z2 = []
    for i in range(x.shape[0]):
        mean, logvar = run_network(model, x[i])
        z2.append(float(np.mean((y[i] - mean) ** 2 / np.exp(logvar))))
    return float(math.sqrt(np.mean(z2)))


def train(args: argparse.Namespace) -> int:
    """``scopepilot train sr``: simulate, train, calibrate, evaluate briefly, save."""
    seed_everything(args.seed, args.threads)
    rng = np.random.default_rng(args.seed)
    t0 = time.monotonic()
    extra_rasters = int(getattr(args, "extra_rasters", 0))
    if extra_rasters < 0:
        raise ConfigError(f"--extra-rasters must be 0 or more, got {extra_rasters}")
    specimens = parse_specimens(getattr(args, "specimens", ",".join(HELD_OUT_SPECIMENS)))
    recipe = functools.partial(train_recipe, extra_rasters=extra_rasters, specimens=specimens)
    samples, val = simulate_train_val(simulate, recipe, args)
    x, y = stack_samples(samples)
    vx, vy = stack_samples(val)
    del samples
    crop = int(args.crop)
    model = PixelUNet(2, 2, widths=WIDTHS)
    init: dict[str, Any] | None = None
    if getattr(args, "init", None):
        start, start_card = load_model(NAME, build, args.init, device="cpu")  # any version
        model.load_state_dict(start.state_dict())  # copied into the contiguous parameters
        init = {
            "weights": str(args.init),
            "sha256": start_card.sha256,
            "command": start_card.training.get("command"),
            "steps_done": start_card.training.get("steps_done"),
            # the start model's own start, when it was fine-tuned too: the whole chain back to
            # a from-scratch command
            **({"init": start_card.training["init"]} if "init" in start_card.training else {}),
        }
    if crop % model.multiple():
        raise DataError(f"--crop must be a multiple of {model.multiple()}, got {crop}")
    val_rng = np.random.default_rng(args.seed + 7)
    val_batches = [
        _crop_batch(vx, vy, shuffled_crops(val, crop, args.batch, val_rng), val_rng, crop)
        for _ in range(4)
    ]

    def next_batch(step: int) -> tuple[torch.Tensor, ...]:
        crops = [
            (
                int(rng.integers(x.shape[0])),
                int(rng.integers(x.shape[2] - crop + 1)),
                int(rng.integers(x.shape[3] - crop + 1)),
            )
            for _ in range(args.batch)
        ]
        return _crop_batch(x, y, crops, rng, crop)

    result = fit(
        model,
        steps=args.steps,
        lr=args.lr,
        next_batch=next_batch,
        loss_fn=functools.partial(beta_nll, beta=float(getattr(args, "beta", BETA))),
        val_batches=val_batches,
        max_minutes=args.max_minutes,
        desc="training sr",
    )
    temperature = fit_temperature(model, vx, vy)
    card = ModelCard(
        name=NAME,
        version=VERSION,
        task="recover the noise-free HAADF-STEM image from low-dose frames and partial scans",
        pixel_size_range_nm=PIXEL_SIZE_RANGE_NM,
        trained_pixel_size_nm=PIXEL_SIZE_M * 1e9,
        channels=CHANNELS,
        input_size=(crop, crop),
        architecture=pixel_unet_architecture(model, in_channels=2, out_channels=2, widths=WIDTHS),
        training={
            "command": training_command(args),
            "seed": args.seed,
            "recipe": recipe_json(recipe(args.seed, args.frames)),
            "loss": f"beta-NLL (beta={getattr(args, 'beta', BETA)}) of the clean image, Adam, "
            "warm-up + cosine lr",
            **fit_summary(result, t0),
            "temperature": temperature,
            "reject_relative_sigma": 0.05,
            "align_lines": True,
            "align_sparse_lines": True,
            **({"init": init} if init else {}),
        },
    )
    save_and_report(
        model,
        card,
        result,
        args,
        loss_name="beta-NLL",
        report={"temperature": temperature},
    )
    _cached_model.cache_clear()
    return 0


# ---------------------------------------------------------------------- evaluation


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=500_000, help="held-out seed")
    parser.add_argument("--areas", type=int, default=16, help="held-out areas per condition")
    parser.add_argument("--weights", default=str(WEIGHTS_DIR), help="weights directory")
    parser.add_argument("--out", default="bench/out/perception", help="metrics JSON and plots")
    parser.add_argument(
        "--update-card", action="store_true", help="write the held-out metrics into the model card"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    add_evaluate_specimens_argument(parser)


def evaluate(args: argparse.Namespace) -> int:
    """``scopepilot evaluate sr``: held-out metrics as JSON plus an example figure."""
    from agent.perception.tasks.sr_eval import evaluate_sr, write_report

    specimens = evaluation_specimens(args)
    torch.set_num_threads(max(1, args.threads))
    model, card = load(args.weights)
    metrics = evaluate_sr(model, card, seed=args.seed, areas=args.areas, specimens=specimens)
    write_report(
        metrics, Path(args.out), card, weights_dir=Path(args.weights) if args.update_card else None
    )
    print(json.dumps(metrics["summary"], indent=2))
    return 0
