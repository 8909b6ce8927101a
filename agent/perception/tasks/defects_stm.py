"""The ``defects_stm`` model: point defects in STM topographs (Au(111): vacancy, adatom;
H:Si(100): dangling bond, vacancy, adatom), as a per-pixel class map and a defect list
(position, class, confidence).

It is the STM sibling of :mod:`agent.perception.tasks.defects` (HAADF-STEM) and shares its
machinery: a :class:`~agent.perception.pixel_unet.PixelUNet` (smaller), class-weighted
cross-entropy on random crops, one temperature fitted on validation frames, a detection
threshold on ``1 - p(background)`` tuned on validation frames for the best F1, and the same
region rule (position = probability-weighted centroid, class = the most probability mass,
confidence = the peak temperature-scaled probability of that class). The input is the levelled
topograph in Å (:func:`~agent.perception.tasks.defects_stm_data.model_input`) at 0.06 nm pixels
(other pixel sizes are resampled). Reached with ``scopepilot train|evaluate|infer defects
--sample stm``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import threading
import time
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
    tiled_inference,
)
from agent.perception.tasks.defects import (
    DefectResult,
    DetectionSettings,
    calibration_fields,
    defect_result,
    defects_json,
    fit_on_crops,
    fit_temperature,
    regions,
    save_defects_model,
    settings_of,
)
from agent.perception.tasks.defects import (
    add_shared_evaluate_arguments as add_stem_evaluate_arguments,
)
from agent.perception.tasks.defects import (
    class_probabilities as stem_class_probabilities,
)
from agent.perception.tasks.defects_stm_data import (
    CLASSES,
    MASK_RADIUS_M,
    PIXEL_SIZE_M,
    StmDefectRecipe,
    StmDefectSample,
    class_of,
    model_input,
    simulate,
)
from agent.perception.tasks.stem_metrics import DetectionScore, PredictedDefect
from agent.perception.tasks.stem_train import (
    add_train_arguments as add_stem_train_arguments,
)
from agent.perception.tasks.stem_train import (
    fit_summary,
    pixel_unet_architecture,
    seed_everything,
    simulate_train_val,
)
from drivers.errors import DataError

NAME = "defects_stm"
VERSION = "2"
CHANNELS = ("levelled_height_A",)
WIDTHS = (16, 24, 32, 48)
PIXEL_SIZE_RANGE_NM = (0.03, 0.12)
CLASS_WEIGHTS = (1.0, 3.0, 3.0, 3.0)
MATCH_DISTANCE_M = 1e-10
"""A detection matches a true defect within 1 Å (the issue's criterion; version 1 used 0.3 nm).
The detection threshold is tuned on validation frames at this distance."""
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def build(card: ModelCard) -> PixelUNet:
    arch = card.architecture
    return PixelUNet(
        int(arch.get("in_channels", 1)),
        int(arch.get("out_channels", len(CLASSES))),
        factor=int(arch.get("factor", 4)),
        widths=tuple(int(w) for w in arch.get("widths", WIDTHS)),
    )


@functools.lru_cache(maxsize=4)
def _cached_model(directory: str) -> tuple[nn.Module, ModelCard]:
    return load_model(NAME, build, directory, version=VERSION)


def load(directory: str | Path = WEIGHTS_DIR) -> tuple[nn.Module, ModelCard]:
    """The trained model and its card (cached per directory); :class:`ModelError` when the
    weights cannot be loaded."""
    return _cached_model(str(Path(directory).resolve()))


def class_probabilities(model: nn.Module, x: np.ndarray, temperature: float) -> np.ndarray:
    """``(C, H, W)`` class probabilities of input ``x`` ``(1, H, W)`` (the STEM model's tiling,
    with 32-pixel overlaps)."""
    return stem_class_probabilities(model, x, temperature, overlap=32)


_LAST_MAP: dict[str, Any] = {}
_LAST_MAP_LOCK = threading.Lock()


def probability_map(
    image: Any, pixel_size_nm: float, model: nn.Module, card: ModelCard
) -> tuple[np.ndarray, tuple[int, ...], np.ndarray]:
    """``(image checked, its shape at the model's pixel size, class probabilities (C, h, w))``
    of a full ``(H, W)`` STM topograph at ``pixel_size_nm``.

    The last map is kept (one entry, keyed by the image's bytes, its pixel size and the model):
    in a session the tip assessor's double-tip cue (:mod:`agent.perception.tip_pairs`) and the
    ``defects`` stage judge the same complete frame one after the other, so the network runs
    once. The kept map is read-only."""
    arr = check_image(image, min_size=8)
    digest = hashlib.blake2b(arr.tobytes(), digest_size=16).digest()
    key = (digest, arr.shape, arr.dtype.str, float(pixel_size_nm), id(model), card.sha256)
    with _LAST_MAP_LOCK:
        if _LAST_MAP.get("key") == key:
            return arr, _LAST_MAP["work_shape"], _LAST_MAP["prob"]
    work = resample_to_pixel_size(arr, pixel_size_nm, card)
    prob = class_probabilities(model, model_input(work), float(card.training.get("temperature", 1)))
    prob.flags.writeable = False
    with _LAST_MAP_LOCK:
        _LAST_MAP.update(key=key, work_shape=work.shape, prob=prob)
    return arr, work.shape, prob


def detect(prob: np.ndarray, settings: DetectionSettings) -> list[PredictedDefect]:
    """Defects (pixel coordinates) of a probability map ``(C, H, W)``: the connected regions
    where ``1 - p(background)`` exceeds the threshold, each with its peak class probability as
    confidence."""
    return [
        PredictedDefect(row, col, kind, peak)
        for row, col, kind, peak, _, _ in regions(prob, settings.threshold, CLASSES)
    ]


def find_defects(
    image: Any,
    pixel_size_nm: float,
    *,
    model: nn.Module | None = None,
    card: ModelCard | None = None,
) -> DefectResult:
    """Point defects of a full ``(H, W)`` STM topograph (heights in metres) at
    ``pixel_size_nm``.

    Raises :class:`DataError` for bad input (wrong shape, NaN or infinite pixels, pixel size out
    of range, heights not in metres) and :class:`ModelError` when the weights cannot be loaded.
    """
    if model is None or card is None:
        model, card = load()
    arr, work_shape, prob = probability_map(image, pixel_size_nm, model, card)
    settings = settings_of(card)
    found = detect(prob, settings)
    return defect_result(arr.shape, work_shape, prob, found, settings)


def infer(image: np.ndarray, pixel_size_nm: float) -> dict[str, Any]:
    """JSON-able result of :func:`find_defects` (positions in pixels and nm)."""
    _, card = load()
    return defects_json(NAME, card, find_defects(image, pixel_size_nm), pixel_size_nm, CLASSES[1:])


# ---------------------------------------------------------------------- training


def train_recipe(seed: int, frames: int) -> StmDefectRecipe:
    return StmDefectRecipe(seed=seed, frames=frames)


TRAIN_DEFAULTS: dict[str, Any] = {
    "frames": 160,
    "val_frames": 16,
    "batch": 16,
    "crop": 96,
    "threads": 1,
    "max_minutes": 15.0,
}
"""Where ``scopepilot train defects --sample stm`` differs from the shared STEM training
options (:func:`agent.perception.tasks.stem_train.add_train_arguments`): 160 frames of 160²,
16 validation frames, 16 crops of 96² per step, one torch thread, a 15-minute safety stop."""


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``scopepilot train defects --sample stm``: the shared training options
    with :data:`TRAIN_DEFAULTS`."""
    add_stem_train_arguments(parser)
    parser.set_defaults(**TRAIN_DEFAULTS)


def stack_samples(samples: list[StmDefectSample]) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``(N, 1, H, W)`` and class masks ``(N, H, W) int64``."""
    x = np.stack([model_input(s.image) for s in samples])
    y = np.stack([s.class_mask for s in samples]).astype(np.int64)
    return x, y


def weighted_ce(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, weight=torch.tensor(CLASS_WEIGHTS))


def score_frames(
    found: list[list[PredictedDefect]], samples: list[StmDefectSample]
) -> DetectionScore:
    """Detection and per-class counts of ``found`` (pixel coordinates of each sample) matched
    within :data:`MATCH_DISTANCE_M`."""
    score = DetectionScore(CLASSES[1:])
    for f, s in zip(found, samples, strict=True):
        score.add(
            f, s.defects, [class_of(d.kind) for d in s.defects], MATCH_DISTANCE_M / s.pixel_size_m
        )
    return score


def calibrate(
    model: nn.Module, val: list[StmDefectSample]
) -> tuple[float, DetectionSettings, dict[str, Any]]:
    """The temperature (pixel NLL on validation frames), then the threshold with the best
    validation F1. Returns ``(temperature, settings, validation scores)``."""
    vx, vy = stack_samples(val)
    multiple = model.multiple() if isinstance(model, PixelUNet) else 32
    tile = -(-vx.shape[-1] // multiple) * multiple
    logits = [
        tiled_inference(model, vx[i], tile=tile, overlap=0, batch_size=1) for i in range(len(val))
    ]
    temperature = fit_temperature(logits, list(vy))
    probs = [torch.softmax(torch.from_numpy(z) / temperature, 0).numpy() for z in logits]
    best, best_f1 = DetectionSettings(), -1.0
    for threshold in THRESHOLDS:
        s = dataclasses.replace(DetectionSettings(), threshold=threshold)
        f1 = score_frames([detect(p, s) for p in probs], val).detection.f1()
        if f1 > best_f1:
            best, best_f1 = s, f1
    score = score_frames([detect(p, best) for p in probs], val)
    return temperature, best, score.to_json()


def train(args: argparse.Namespace) -> int:
    """``scopepilot train defects --sample stm``: simulate, train, calibrate, save."""
    seed_everything(args.seed, args.threads)
    t0 = time.monotonic()
    cpu0 = time.process_time()
    samples, val = simulate_train_val(simulate, train_recipe, args)
    x, y = stack_samples(samples)
    crop = int(args.crop)
    model = PixelUNet(1, len(CLASSES), widths=WIDTHS)
    if crop % model.multiple() or crop > x.shape[-1]:
        raise DataError(
            f"--crop must be a multiple of {model.multiple()} and at most {x.shape[-1]}, got {crop}"
        )
    result = fit_on_crops(
        model, (x, y), stack_samples(val), args, loss_fn=weighted_ce, desc="training defects_stm"
    )
    temperature, settings, val_score = calibrate(model, val)
    card = ModelCard(
        name=NAME,
        version=VERSION,
        task="segment point defects (vacancy, adatom, dangling bond) in STM topographs",
        pixel_size_range_nm=PIXEL_SIZE_RANGE_NM,
        trained_pixel_size_nm=PIXEL_SIZE_M * 1e9,
        channels=CHANNELS,
        input_size=(crop, crop),
        architecture=pixel_unet_architecture(
            model, in_channels=1, out_channels=len(CLASSES), widths=WIDTHS, classes=CLASSES
        ),
        training={
            "command": f"scopepilot train defects --sample stm --seed {args.seed} "
            f"--frames {args.frames} --val-frames {args.val_frames} --steps {args.steps} "
            f"--batch {args.batch} --crop {crop} --lr {args.lr} --threads {args.threads}",
            "seed": args.seed,
            "val_frames": args.val_frames,
            "steps": args.steps,
            "batch": args.batch,
            "crop": crop,
            "lr": args.lr,
            "threads": args.threads,
            "recipe": train_recipe(args.seed, args.frames).to_json(),
            "input": "plane + line-median levelled heights in Å, clipped to ±5",
            "loss": f"cross-entropy with class weights {list(CLASS_WEIGHTS)}, Adam, "
            "warm-up + cosine lr",
            **fit_summary(result, t0, cpu0),
            **calibration_fields(temperature, settings),
            "match_distance_nm": MATCH_DISTANCE_M * 1e9,
            "mask_radius_nm": MASK_RADIUS_M * 1e9,
            "validation": val_score,
        },
    )
    save_defects_model(model, card, result, args)
    _cached_model.cache_clear()
    return 0


# ---------------------------------------------------------------------- evaluation


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``scopepilot evaluate defects --sample stm`` (its own held-out seed)."""
    add_stem_evaluate_arguments(parser, seed=700_000, frames=16, threads=1)


def evaluate(args: argparse.Namespace) -> int:
    """``scopepilot evaluate defects --sample stm``: held-out metrics against a classical
    baseline."""
    from agent.perception.tasks.defects_stm_eval import evaluate_defects_stm, write_report

    torch.set_num_threads(max(1, args.threads))
    model, card = load(args.weights)
    metrics = evaluate_defects_stm(model, card, seed=args.seed, frames=args.frames)
    write_report(
        metrics, Path(args.out), card, weights_dir=Path(args.weights) if args.update_card else None
    )
    print(json.dumps(metrics["summary"], indent=2))
    return 0
