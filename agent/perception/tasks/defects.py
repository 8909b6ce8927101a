"""The ``defects`` model: point defects in atomic-resolution HAADF-STEM images, as a per-pixel
class map and a defect list (position, class, confidence).

The network (:class:`~agent.perception.pixel_unet.PixelUNet`) maps the frame divided by its mean
to logits of the classes ``lattice``, ``vacancy``, ``substitution`` and ``adatom`` (the
simulator's ground-truth class mask: a disc of 0.8 Å around each defect). It is trained with
class-weighted cross-entropy; one temperature fitted on validation frames calibrates the
probabilities. Defects are the connected regions where ``1 - p(lattice)`` exceeds a threshold
(tuned on validation frames for the best F1): position = probability-weighted centroid, class
= the class with the most probability mass in the region, confidence = the peak probability of
that class. A defect below ``uncertain_below`` confidence is flagged ``uncertain``; a frame with
many uncertain defects is marked ``reject`` (the agent does not act on it blindly).

Training data are ``sim:stem`` raster frames (:data:`TRAIN_SPECIMENS`: two thirds MoS2 and WS2,
a sixth each SrTiO3 and graphene; 0.23–0.27 Å pixels, 0.5–8 µs dwell, 3x the default defect
density for more examples); evaluation uses other seeds, the default density and shifted
simulator parameters on MoS2 / WS2 (:mod:`agent.perception.tasks.defects_eval`; ``--specimens``
scores other specimens).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from agent.perception.pixel_unet import PixelUNet
from agent.perception.quality import ImageQualityAssessor
from agent.perception.registry import (
    WEIGHTS_DIR,
    ModelCard,
    check_image,
    load_model,
    resample_to_pixel_size,
    tiled_inference,
)
from agent.perception.tasks.stem_data import (
    DEFECT_CLASSES,
    PIXEL_SIZE_M,
    StemRecipe,
    StemSample,
    defect_class,
    image_scale,
    simulate,
)
from agent.perception.tasks.stem_metrics import DetectionScore, PredictedDefect, match
from agent.perception.tasks.stem_train import (
    Batch,
    FitResult,
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
from drivers.errors import DataError
from drivers.frame import Frame, ScanRegion

log = logging.getLogger(__name__)

NAME = "defects"
VERSION = "2"
"""2 (session 9): trained on four specimens, with the input-range check; 1: MoS2 / WS2 only."""
CHANNELS = ("haadf_over_mean",)
WIDTHS = (24, 32, 48, 64)
PIXEL_SIZE_RANGE_NM = (0.0125, 0.05)
TILE_PX = 512
CLASS_WEIGHTS = (1.0, 3.0, 3.0, 3.0)
MATCH_DISTANCE_M = 1e-10
"""A detection matches a true defect within 1 Å."""
MIN_REGION_PX = 3


def build(card: ModelCard) -> PixelUNet:
    arch = card.architecture
    return PixelUNet(
        int(arch.get("in_channels", 1)),
        int(arch.get("out_channels", len(DEFECT_CLASSES))),
        factor=int(arch.get("factor", 4)),
        widths=tuple(int(w) for w in arch.get("widths", WIDTHS)),
    )


def model_input(image: np.ndarray) -> np.ndarray:
    """``(1, H, W) float32`` network input of a full ``(H, W)`` frame."""
    return (image / image_scale(image)).astype(np.float32)[None]


@functools.lru_cache(maxsize=4)
def _cached_model(directory: str) -> tuple[nn.Module, ModelCard]:
    return load_model(NAME, build, directory, version=VERSION)


def load(directory: str | Path = WEIGHTS_DIR) -> tuple[nn.Module, ModelCard]:
    """The trained model and its card (cached per directory)."""
    return _cached_model(str(Path(directory).resolve()))


def class_probabilities(
    model: nn.Module, x: np.ndarray, temperature: float, *, overlap: int = 64
) -> np.ndarray:
    """``(C, H, W)`` class probabilities of input ``x`` ``(1, H, W)`` (tiles of at most
    :data:`TILE_PX` overlapping by ``overlap`` pixels)."""
    h, w = x.shape[1:]
    multiple = model.multiple() if isinstance(model, PixelUNet) else 32
    tile = min(TILE_PX, -(-max(h, w) // multiple) * multiple)
    logits = tiled_inference(model, x, tile=tile, overlap=overlap, batch_size=4)
    z = torch.from_numpy(logits) / temperature
    return torch.softmax(z, dim=0).numpy()


@dataclass(frozen=True)
class DetectionSettings:
    """``threshold`` on ``1 - p(lattice)``; defects below ``uncertain_below`` confidence are
    uncertain, and a frame with more than ``reject_uncertain_fraction`` of them (and more than
    two) is rejected. ``calibration`` holds the weights of :data:`CONFIDENCE_FEATURES` and a
    bias of the logistic model that turns a region into a confidence (empty: the peak class
    probability is the confidence)."""

    threshold: float = 0.5
    uncertain_below: float = 0.6
    reject_uncertain_fraction: float = 0.25
    calibration: tuple[float, ...] = ()


CONFIDENCE_FEATURES = (
    "logit of the peak class probability",
    "mean defect probability over the region",
    "log region size (pixels)",
    "log image SNR",
)


def image_snr(image: np.ndarray) -> float:
    """Signal-to-noise ratio of a full frame (:class:`ImageQualityAssessor`), >= 0.1."""
    frame = Frame(
        np.asarray(image, np.float32),
        "haadf",
        (1.0, 1.0),
        1.0,
        ScanRegion(),
        0,
        0.0,
        image.shape[0],
        "array",
    )
    snr = ImageQualityAssessor().assess(frame).snr
    return float(np.clip(snr, 0.1, 1e3)) if math.isfinite(snr) else 1e3


def confidence_features(
    peak: np.ndarray, mean_p: np.ndarray, size: np.ndarray, snr: float
) -> np.ndarray:
    """``(N, 4)`` features of :data:`CONFIDENCE_FEATURES` for N regions."""
    p = np.clip(peak, 1e-6, 1 - 1e-6)
    return np.stack(
        [np.log(p / (1 - p)), mean_p, np.log(size), np.full(len(p), math.log(snr))], axis=1
    )


def calibrated_confidence(features: np.ndarray, calibration: tuple[float, ...]) -> np.ndarray:
    w = np.asarray(calibration, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-(features @ w[:-1] + w[-1])))


def fit_confidence(
    features: np.ndarray, correct: np.ndarray, l2: float = 1e-3
) -> tuple[float, ...]:
    """Logistic regression (Newton's method, small L2) of ``correct`` on ``features``: the
    calibration of :class:`DetectionSettings` (Platt scaling with more than one input)."""
    x = np.hstack([features, np.ones((len(features), 1))])
    w = np.zeros(x.shape[1])
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (p - correct) + l2 * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + l2 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return tuple(float(v) for v in w)


def detect(
    prob: np.ndarray, settings: DetectionSettings, *, snr: float = 1e3
) -> list[PredictedDefect]:
    """Defects of a probability map ``(C, H, W)`` (pixel coordinates) of a frame whose
    signal-to-noise ratio is ``snr`` (:func:`image_snr`)."""
    found = regions(prob, settings.threshold)
    if not found:
        return []
    rows, cols, kinds, peak, mean_p, size = (np.asarray(v) for v in zip(*found, strict=True))
    if settings.calibration:
        features = confidence_features(peak, mean_p, size, snr)
        confidence = calibrated_confidence(features, settings.calibration)
    else:
        confidence = peak
    return [
        PredictedDefect(float(r), float(c), str(k), float(q))
        for r, c, k, q in zip(rows, cols, kinds, confidence, strict=True)
    ]


def regions(
    prob: np.ndarray, threshold: float, classes: Sequence[str] = DEFECT_CLASSES
) -> list[tuple[float, float, str, float, float, float]]:
    """(row, col, class, peak class probability, mean defect probability, size) of each
    region where ``1 - p(background) > threshold`` (channel 0 is the background, the others
    ``classes[1:]``); regions under :data:`MIN_REGION_PX` pixels are dropped."""
    defect_p = 1.0 - prob[0]
    labels, n = ndimage.label(defect_p > threshold, structure=np.ones((3, 3)))
    if n == 0:
        return []
    index = np.arange(1, n + 1)
    sizes = ndimage.sum_labels(np.ones_like(defect_p), labels, index)
    rows = ndimage.sum_labels(defect_p * np.arange(prob.shape[1])[:, None], labels, index)
    cols = ndimage.sum_labels(defect_p * np.arange(prob.shape[2])[None, :], labels, index)
    mass = ndimage.sum_labels(defect_p, labels, index)
    per_class = np.stack([ndimage.sum_labels(prob[k], labels, index) for k in range(1, len(prob))])
    peaks = np.stack([ndimage.maximum(prob[k], labels, index) for k in range(1, len(prob))])
    out = []
    for i in range(n):
        if sizes[i] < MIN_REGION_PX:
            continue
        k = int(np.argmax(per_class[:, i]))
        out.append(
            (
                float(rows[i] / mass[i]),
                float(cols[i] / mass[i]),
                classes[k + 1],
                float(peaks[k, i]),
                float(mass[i] / sizes[i]),
                float(sizes[i]),
            )
        )
    return out


@dataclass(frozen=True)
class DefectResult:
    """What :func:`find_defects` returns: the defects (pixel coordinates of the input image),
    the ``(H, W) uint8`` class map, and the reject decision with its reason."""

    defects: list[PredictedDefect]
    uncertain: list[bool]
    class_map: np.ndarray
    reject: bool
    reason: str


INPUT_RANGE_MARGIN = 0.1
"""How far beyond the training frames' range (as a fraction of its width) an input statistic may
go before the frame is rejected as unlike the training frames."""


def input_statistics(x: np.ndarray) -> tuple[float, float]:
    """The 1st and 99th percentiles of a network input (the frame divided by its mean): its
    background and its column peaks, relative to the mean. A frame unlike the training frames
    (a large background, broad or faint columns) falls outside their range."""
    low, high = np.percentile(np.asarray(x, np.float64), (1.0, 99.0))
    return float(low), float(high)


def input_range(inputs: Sequence[np.ndarray]) -> dict[str, list[float]]:
    """The card's ``input_range``: the range of :func:`input_statistics` over training
    ``inputs``, widened by :data:`INPUT_RANGE_MARGIN` of its width on both sides."""
    stats = np.array([input_statistics(x) for x in inputs])
    out = {}
    for name, column in (("background", stats[:, 0]), ("peaks", stats[:, 1])):
        lo, hi = float(column.min()), float(column.max())
        pad = INPUT_RANGE_MARGIN * (hi - lo)
        out[name] = [round(lo - pad, 4), round(hi + pad, 4)]
    return out


def outside_input_range(x: np.ndarray, card: ModelCard) -> str:
    """Why input ``x`` is unlike the training frames of ``card`` (its ``input_range``), or ""."""
    ranges = card.training.get("input_range")
    if not ranges:
        return ""
    values = dict(zip(("background", "peaks"), input_statistics(x), strict=True))
    for name, value in values.items():
        lo, hi = ranges[name]
        if not lo <= value <= hi:
            return (
                f"the frame is unlike the training frames: its {name} is {value:.2f} times "
                f"its mean, the training frames' from {lo:.2f} to {hi:.2f} (a different "
                "specimen, detector offset or optics); its defect list is not reliable"
            )
    return ""


def settings_of(card: ModelCard) -> DetectionSettings:
    t = card.training
    return DetectionSettings(
        threshold=float(t.get("threshold", 0.5)),
        uncertain_below=float(t.get("uncertain_below", 0.6)),
        reject_uncertain_fraction=float(t.get("reject_uncertain_fraction", 0.25)),
        calibration=tuple(float(v) for v in t.get("confidence_calibration", ())),
    )


def find_defects(
    image: Any,
    pixel_size_nm: float,
    *,
    model: nn.Module | None = None,
    card: ModelCard | None = None,
) -> DefectResult:
    """Point defects of a full ``(H, W)`` HAADF-STEM frame at ``pixel_size_nm``.

    The result is marked ``reject`` (with the reason) when too many defects are uncertain, and
    when the frame's background or column peaks, relative to its mean, fall outside the card's
    ``input_range`` (the training frames' range, widened by :data:`INPUT_RANGE_MARGIN`): a frame
    unlike any the model was trained on, where its defect list may be confidently wrong.

    Raises :class:`DataError` for bad input (wrong shape, NaN or infinite pixels, pixel size out
    of range, a non-positive mean) and :class:`ModelError` when the weights cannot be loaded.
    """
    if model is None or card is None:
        model, card = load()
    arr = check_image(image, min_size=8)
    work = resample_to_pixel_size(arr, pixel_size_nm, card)
    x = model_input(work)
    prob = class_probabilities(model, x, float(card.training.get("temperature", 1)))
    settings = settings_of(card)
    found = detect(prob, settings, snr=image_snr(work))
    result = defect_result(arr.shape, work.shape, prob, found, settings)
    unlike = outside_input_range(x, card)
    if unlike:
        reason = f"{result.reason}; {unlike}" if result.reason else unlike
        result = dataclasses.replace(result, reject=True, reason=reason)
    return result


def defect_result(
    shape: tuple[int, ...],
    work_shape: tuple[int, ...],
    prob: np.ndarray,
    found: list[PredictedDefect],
    settings: DetectionSettings,
) -> DefectResult:
    """The :class:`DefectResult` of the defects ``found`` in the probability map ``prob`` of an
    image resampled from ``shape`` to ``work_shape``: positions and the class map back at the
    input's pixels, the uncertain ones marked, and the frame rejected when too many are
    uncertain (shared by the STEM and the STM model)."""
    zoom = (shape[0] / work_shape[0], shape[1] / work_shape[1])
    if zoom != (1.0, 1.0):
        found = [
            PredictedDefect(
                (d.row_px + 0.5) * zoom[0] - 0.5,
                (d.col_px + 0.5) * zoom[1] - 0.5,
                d.kind,
                d.confidence,
            )
            for d in found
        ]
    class_map = np.argmax(prob, axis=0).astype(np.uint8)
    if class_map.shape != tuple(shape[:2]):
        from skimage.transform import resize

        class_map = resize(
            class_map, shape[:2], order=0, preserve_range=True, anti_aliasing=False
        ).astype(np.uint8)
    uncertain = [d.confidence < settings.uncertain_below for d in found]
    n_uncertain = sum(uncertain)
    limit = max(2.0, settings.reject_uncertain_fraction * len(found))
    reject = n_uncertain > limit
    reason = (
        f"{n_uncertain} of {len(found)} defects are uncertain (confidence < "
        f"{settings.uncertain_below:.2f}); more than {limit:.0f} allowed"
        if reject
        else ""
    )
    return DefectResult(found, uncertain, class_map, reject, reason)


def infer(image: np.ndarray, pixel_size_nm: float) -> dict[str, Any]:
    """JSON-able result of :func:`find_defects` (positions in pixels and nm)."""
    _, card = load()
    return defects_json(
        NAME, card, find_defects(image, pixel_size_nm), pixel_size_nm, DEFECT_CLASSES[1:]
    )


def defects_json(
    name: str,
    card: ModelCard,
    result: DefectResult,
    pixel_size_nm: float,
    classes: Sequence[str],
) -> dict[str, Any]:
    """``scopepilot infer``'s JSON of ``result`` (positions in pixels and nm, counts per class of
    ``classes``) from the model ``name`` with ``card``."""
    counts = {c: 0 for c in classes}
    for d in result.defects:
        counts[d.kind] += 1
    return {
        "model": name,
        "version": card.version,
        "weights_sha256": card.sha256,
        "shape": list(result.class_map.shape),
        "pixel_size_nm": float(pixel_size_nm),
        "counts": counts,
        "reject": result.reject,
        "reason": result.reason,
        "defects": [
            {
                "row_px": round(d.row_px, 2),
                "col_px": round(d.col_px, 2),
                "y_nm": round(d.row_px * pixel_size_nm, 4),
                "x_nm": round(d.col_px * pixel_size_nm, 4),
                "class": d.kind,
                "confidence": round(d.confidence, 4),
                "uncertain": u,
            }
            for d, u in zip(result.defects, result.uncertain, strict=True)
        ],
    }


# ---------------------------------------------------------------------- training


TRAIN_SPECIMENS = ("mos2", "ws2", "mos2", "ws2", "srtio3", "graphene")
"""The specimens of the committed model's training frames: two thirds MoS2 / WS2, a sixth each
SrTiO3 and graphene (session 9; before: MoS2 / WS2 only)."""
TRAIN_DEFAULTS: dict[str, Any] = {
    "seed": 1,
    "frames": 360,
    "steps": 3000,
    "threads": 1,
    "specimens": ",".join(TRAIN_SPECIMENS),
}
"""Where the defaults of ``scopepilot train defects`` differ from the shared STEM options: the
recipe of the committed model (about 5 minutes on one quiet core: 360 frames, 3,000 steps)."""


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``scopepilot train defects``: the shared STEM options and ``--specimens``,
    with the defaults of :data:`TRAIN_DEFAULTS`."""
    add_stem_train_arguments(parser)
    add_specimens_argument(parser, TRAIN_SPECIMENS)
    parser.set_defaults(**TRAIN_DEFAULTS)


def training_command(args: argparse.Namespace) -> str:
    """The command line that reproduces a training run (recorded in the model card)."""
    specimens = parse_specimens(getattr(args, "specimens", ",".join(TRAIN_SPECIMENS)))
    return (
        f"scopepilot train defects --seed {args.seed} --frames {args.frames} "
        f"--steps {args.steps} --batch {args.batch} --crop {args.crop} --lr {args.lr} "
        f"--threads {args.threads} --specimens {','.join(specimens)}"
    )


def train_recipe(
    seed: int, frames: int, specimens: tuple[str, ...] = TRAIN_SPECIMENS
) -> StemRecipe:
    return StemRecipe(
        seed=seed,
        frames=frames,
        dwell_s=(0.5e-6, 8e-6),
        sim_options={"defect_density_scale": 3.0},
        specimens=specimens,
    )


def stack_samples(samples: list[StemSample]) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``(N, 1, H, W)`` and class masks ``(N, H, W) int64``."""
    x = np.stack([model_input(s.image) for s in samples])
    y = np.stack([s.class_mask for s in samples]).astype(np.int64)
    return x, y


def crop_batch(
    x: np.ndarray, y: np.ndarray, rng: np.random.Generator, batch: int, crop: int
) -> tuple[torch.Tensor, torch.Tensor]:
    bx = np.empty((batch, 1, crop, crop), np.float32)
    by = np.empty((batch, crop, crop), np.int64)
    for i in range(batch):
        k = int(rng.integers(x.shape[0]))
        r, c = (int(rng.integers(x.shape[d] - crop + 1)) for d in (2, 3))
        cx, cy = x[k, :, r : r + crop, c : c + crop], y[k, r : r + crop, c : c + crop]
        if rng.random() < 0.5:  # mirror across the slow-scan axis
            cx, cy = cx[:, ::-1], cy[::-1]
        bx[i], by[i] = cx, cy
    return torch.from_numpy(bx), torch.from_numpy(by)


def fit_on_crops(
    model: nn.Module,
    data: tuple[np.ndarray, np.ndarray],
    val_data: tuple[np.ndarray, np.ndarray],
    args: argparse.Namespace,
    *,
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor],
    desc: str,
) -> FitResult:
    """:func:`fit` with the options of a training command on random mirrored ``--crop`` crops
    (:func:`crop_batch`, ``--batch`` a step, seed ``--seed``) of ``data``, inputs and class
    masks, validated on four fixed batches of crops of ``val_data`` (seed ``--seed`` + 7)."""
    (x, y), (vx, vy) = data, val_data
    crop = int(args.crop)
    rng = np.random.default_rng(args.seed)
    val_rng = np.random.default_rng(args.seed + 7)
    val_batches = [crop_batch(vx, vy, val_rng, args.batch, crop) for _ in range(4)]
    return fit(
        model,
        steps=args.steps,
        lr=args.lr,
        next_batch=lambda step: crop_batch(x, y, rng, args.batch, crop),
        loss_fn=loss_fn,
        val_batches=val_batches,
        max_minutes=args.max_minutes,
        desc=desc,
    )


def calibration_fields(temperature: float, settings: Any) -> dict[str, Any]:
    """The model card's training fields of a defects model's calibration (:func:`calibrate`'s
    temperature and settings), in the order both defects models' cards keep them."""
    return {
        "temperature": temperature,
        "threshold": settings.threshold,
        "uncertain_below": settings.uncertain_below,
        "reject_uncertain_fraction": settings.reject_uncertain_fraction,
    }


def save_defects_model(
    model: nn.Module, card: ModelCard, result: FitResult, args: argparse.Namespace
) -> None:
    """Save a trained defects model and print its report (:func:`save_and_report`): the
    temperature, threshold and validation F1 its card records."""
    training = card.training
    save_and_report(
        model,
        card,
        result,
        args,
        loss_name="weighted cross-entropy",
        report={
            "temperature": training["temperature"],
            "threshold": training["threshold"],
            "validation_f1": training["validation"]["detection"],
        },
    )


def weighted_ce(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, weight=torch.tensor(CLASS_WEIGHTS))


def fit_temperature(logits: list[np.ndarray], masks: list[np.ndarray]) -> float:
    """The temperature minimising the (unweighted) pixel NLL of validation frames, found on a
    log grid (one scalar: a grid is exact enough and cannot diverge)."""
    z = torch.from_numpy(np.stack(logits))
    y = torch.from_numpy(np.stack(masks).astype(np.int64))
    best, best_nll = 1.0, math.inf
    for t in np.exp(np.linspace(math.log(0.3), math.log(5.0), 60)):
        nll = float(nn.functional.cross_entropy(z / float(t), y))
        if nll < best_nll:
            best, best_nll = float(t), nll
    return best


def tune_threshold(
    probs: list[np.ndarray], samples: list[StemSample], settings: DetectionSettings
) -> float:
    """The defect-probability threshold with the best detection F1 on validation frames."""
    best, best_f1 = settings.threshold, -1.0
    for threshold in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        s = dataclasses.replace(settings, threshold=threshold)
        score = score_frames(probs, samples, s)
        if score.detection.f1() > best_f1:
            best, best_f1 = threshold, score.detection.f1()
    return best


def score_frames(
    probs: list[np.ndarray], samples: list[StemSample], settings: DetectionSettings
) -> DetectionScore:
    score = DetectionScore(DEFECT_CLASSES[1:])
    for prob, s in zip(probs, samples, strict=True):
        score.add(
            detect(prob, settings, snr=image_snr(s.image)),
            s.defects,
            [defect_class(d.kind) for d in s.defects],
            MATCH_DISTANCE_M / s.pixel_size_m,
        )
    return score


def calibrate(
    model: nn.Module, val: list[StemSample]
) -> tuple[float, DetectionSettings, dict[str, Any]]:
    """Fit on validation frames, in order: the temperature of the pixel probabilities, the
    detection threshold (best F1), and the logistic confidence model of the detections (was
    the region a true defect of the predicted class?). Returns ``(temperature, settings,
    validation scores)``."""
    vx, vy = stack_samples(val)
    logits = [
        tiled_inference(model, vx[i], tile=vx.shape[-1], overlap=0, batch_size=1)
        for i in range(len(val))
    ]
    temperature = fit_temperature(logits, list(vy))
    probs = [torch.softmax(torch.from_numpy(z) / temperature, 0).numpy() for z in logits]
    settings = dataclasses.replace(
        DetectionSettings(), threshold=tune_threshold(probs, val, DetectionSettings())
    )
    features, correct = [], []
    for prob, s in zip(probs, val, strict=True):
        found_regions = regions(prob, settings.threshold)
        if not found_regions:
            continue
        rows, cols, kinds, peak, mean_p, size = (
            np.asarray(v) for v in zip(*found_regions, strict=True)
        )
        found = [
            PredictedDefect(float(r), float(c), str(k), 1.0)
            for r, c, k in zip(rows, cols, kinds, strict=True)
        ]
        truth_classes = [defect_class(d.kind) for d in s.defects]
        ok = np.zeros(len(found))
        for i, j in match(found, s.defects, MATCH_DISTANCE_M / s.pixel_size_m):
            ok[i] = float(found[i].kind == truth_classes[j])
        features.append(confidence_features(peak, mean_p, size, image_snr(s.image)))
        correct.append(ok)
    if features:
        settings = dataclasses.replace(
            settings, calibration=fit_confidence(np.concatenate(features), np.concatenate(correct))
        )
    return temperature, settings, score_frames(probs, val, settings).to_json()


def train(args: argparse.Namespace) -> int:
    """``scopepilot train defects``: simulate, train, calibrate, tune the threshold, save."""
    seed_everything(args.seed, args.threads)
    t0 = time.monotonic()
    specimens = parse_specimens(getattr(args, "specimens", ",".join(TRAIN_SPECIMENS)))
    recipe = functools.partial(train_recipe, specimens=specimens)
    samples, val = simulate_train_val(simulate, recipe, args)
    data = stack_samples(samples)
    del samples
    crop = int(args.crop)
    model = PixelUNet(1, len(DEFECT_CLASSES), widths=WIDTHS)
    if crop % model.multiple():
        raise DataError(f"--crop must be a multiple of {model.multiple()}, got {crop}")
    result = fit_on_crops(
        model, data, stack_samples(val), args, loss_fn=weighted_ce, desc="training defects"
    )
    temperature, settings, val_score = calibrate(model, val)
    card = ModelCard(
        name=NAME,
        version=VERSION,
        task="segment point defects (vacancy, substitution, adatom) in HAADF-STEM images",
        pixel_size_range_nm=PIXEL_SIZE_RANGE_NM,
        trained_pixel_size_nm=PIXEL_SIZE_M * 1e9,
        channels=CHANNELS,
        input_size=(crop, crop),
        architecture=pixel_unet_architecture(
            model,
            in_channels=1,
            out_channels=len(DEFECT_CLASSES),
            widths=WIDTHS,
            classes=DEFECT_CLASSES,
        ),
        training={
            "command": training_command(args),
            "seed": args.seed,
            "recipe": recipe_json(recipe(args.seed, args.frames)),
            "loss": f"cross-entropy with class weights {list(CLASS_WEIGHTS)}, Adam, "
            "warm-up + cosine lr",
            **fit_summary(result, t0),
            **calibration_fields(temperature, settings),
            "input_range": input_range(list(data[0])),
            "confidence_features": list(CONFIDENCE_FEATURES),
            "confidence_calibration": list(settings.calibration),
            "validation": val_score,
        },
    )
    save_defects_model(model, card, result, args)
    _cached_model.cache_clear()
    return 0


# ---------------------------------------------------------------------- evaluation


def add_shared_evaluate_arguments(
    parser: argparse.ArgumentParser, *, seed: int = 600_000, frames: int = 24, threads: int = 2
) -> None:
    """The options ``scopepilot evaluate defects`` has for both models (the defaults given are
    the STEM model's; the STM model passes its own)."""
    parser.add_argument("--seed", type=int, default=seed, help="held-out seed")
    parser.add_argument("--frames", type=int, default=frames, help="held-out frames per condition")
    parser.add_argument("--weights", default=str(WEIGHTS_DIR), help="weights directory")
    parser.add_argument("--out", default="bench/out/perception", help="metrics JSON and plots")
    parser.add_argument(
        "--update-card", action="store_true", help="write the held-out metrics into the model card"
    )
    parser.add_argument("--threads", type=int, default=threads, help="torch CPU threads")


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``scopepilot evaluate defects`` for the STEM model: the shared ones and
    ``--specimens``."""
    add_shared_evaluate_arguments(parser)
    add_evaluate_specimens_argument(parser)


def evaluate(args: argparse.Namespace) -> int:
    """``scopepilot evaluate defects``: held-out metrics (network and classical baseline)."""
    from agent.perception.tasks.defects_eval import evaluate_defects, write_report

    specimens = evaluation_specimens(args)
    torch.set_num_threads(max(1, args.threads))
    model, card = load(args.weights)
    metrics = evaluate_defects(model, card, seed=args.seed, frames=args.frames, specimens=specimens)
    write_report(
        metrics, Path(args.out), card, weights_dir=Path(args.weights) if args.update_card else None
    )
    print(json.dumps(metrics["summary"], indent=2))
    return 0
