"""Perception model registry: model cards, weights files and the shared inference machinery.

A trained model is two files in a weights directory (by default :data:`WEIGHTS_DIR`, shipped
with the package):

- ``<name>.pt`` — the ``state_dict`` only, written by :func:`torch.save` and read back with
  ``torch.load(..., weights_only=True)`` (never an unpickled module);
- ``<name>.json`` — its :class:`ModelCard`: what the model does, the input it was trained for
  (pixel size range, channels, tile size), how it was trained (the recipe, enough to rerun the
  training command), its held-out metrics and the SHA-256 of the weights file.

:func:`load_model` rebuilds the module from the card (``build(card)``, the architecture
parameters live in ``card.architecture``) and refuses a weights file whose hash, tensor names,
shapes or format version do not match, raising :class:`~drivers.errors.ModelError` that names
the problem.

Inference helpers: :func:`pick_device` (CUDA when present, CPU otherwise), :func:`check_image`
(rejects bad input with :class:`~drivers.errors.DataError`), :func:`resample_to_pixel_size`
(brings an image to the pixel size the model was trained at), :func:`run_batches` and
:func:`tiled_inference` (channels-last, ``torch.inference_mode``, batches of tiles).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from drivers.errors import DataError, ModelError

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
CARD_FORMAT = 1  # version of the model-card layout; bump when fields change meaning
_RESAMPLE_TOLERANCE = 0.02  # pixel sizes within 2 % of the trained one are used as they are


@dataclass(frozen=True)
class ModelCard:
    """What a trained perception model is, what it expects and how well it did.

    ``pixel_size_range_nm`` is the ``(min, max)`` input pixel size (nm) the model accepts;
    inputs are resampled to ``trained_pixel_size_nm`` first (see
    :func:`resample_to_pixel_size`). ``channels`` names the input channels (e.g.
    ``("topography",)``); ``input_size`` is the ``(H, W)`` tile the network was trained on.
    ``architecture`` holds the constructor parameters ``build(card)`` needs; ``training`` the
    recipe (command, seeds, simulator parameters, epochs, ...); ``metrics`` the held-out
    results. ``sha256`` is the hash of ``<name>.pt`` and ``created`` an ISO-8601 UTC time; both
    are filled in by :func:`save_model`.
    """

    name: str
    version: str
    task: str
    pixel_size_range_nm: tuple[float, float]
    trained_pixel_size_nm: float
    channels: tuple[str, ...]
    input_size: tuple[int, int]
    architecture: Mapping[str, Any] = field(default_factory=dict)
    training: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    sha256: str = ""
    created: str = ""
    card_format: int = CARD_FORMAT

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ModelError(f"ModelCard.name must be an identifier, got {self.name!r}")
        if not isinstance(self.version, str) or not self.version:
            raise ModelError(f"ModelCard.version must be a non-empty string, got {self.version!r}")
        try:
            low, high = (float(v) for v in self.pixel_size_range_nm)
            trained = float(self.trained_pixel_size_nm)
            tile_h, tile_w = (int(v) for v in self.input_size)
        except (TypeError, ValueError):
            raise ModelError(
                f"ModelCard {self.name!r}: pixel_size_range_nm must be (min, max), "
                f"trained_pixel_size_nm a number and input_size (H, W); got "
                f"{self.pixel_size_range_nm!r}, {self.trained_pixel_size_nm!r}, "
                f"{self.input_size!r}"
            ) from None
        if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= trained <= high):
            raise ModelError(
                f"ModelCard {self.name!r}: need 0 < min <= trained <= max pixel size, got "
                f"range ({low}, {high}) nm and trained {trained} nm"
            )
        if tile_h < 1 or tile_w < 1:
            raise ModelError(
                f"ModelCard {self.name!r}: input_size must be positive, got {self.input_size!r}"
            )
        object.__setattr__(self, "pixel_size_range_nm", (low, high))
        object.__setattr__(self, "trained_pixel_size_nm", trained)
        object.__setattr__(self, "input_size", (tile_h, tile_w))
        object.__setattr__(self, "channels", tuple(str(c) for c in self.channels))

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["pixel_size_range_nm"] = list(self.pixel_size_range_nm)
        out["channels"] = list(self.channels)
        out["input_size"] = list(self.input_size)
        return json.loads(json.dumps(out))  # plain JSON types only (fails early otherwise)

    @classmethod
    def from_json(cls, obj: Any) -> ModelCard:
        if not isinstance(obj, Mapping):
            raise ModelError(f"a model card must be a JSON object, got {type(obj).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(obj) - names
        if unknown:
            raise ModelError(f"model card has unknown keys {sorted(unknown)}")
        try:
            return cls(**obj)
        except TypeError as exc:
            raise ModelError(f"model card is incomplete: {exc}") from None


def pick_device() -> torch.device:
    """CUDA when a GPU is present, CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_model(
    module: nn.Module, card: ModelCard, directory: str | Path = WEIGHTS_DIR
) -> ModelCard:
    """Write ``<name>.pt`` (``state_dict``, CPU tensors) and ``<name>.json`` (the card with the
    weights' SHA-256 and creation time) into ``directory``; return the completed card."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / f"{card.name}.pt"
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    torch.save(state, weights)
    done = dataclasses.replace(
        card,
        sha256=file_sha256(weights),
        created=_dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat(),
    )
    (directory / f"{card.name}.json").write_text(json.dumps(done.to_json(), indent=2) + "\n")
    log.info("saved model %s %s to %s", card.name, card.version, weights)
    return done


def read_card(name: str, directory: str | Path = WEIGHTS_DIR) -> ModelCard:
    """The model card ``<directory>/<name>.json``; :class:`ModelError` when missing or bad."""
    path = Path(directory) / f"{name}.json"
    if not path.is_file():
        raise ModelError(
            f"no model card {path}: train the model first (scopepilot train {name}) or pass "
            f"the directory that holds {name}.json and {name}.pt"
        )
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"model card {path} is not readable JSON: {exc}") from None
    card = ModelCard.from_json(obj)
    if card.card_format != CARD_FORMAT:
        raise ModelError(
            f"model card {path} has format {card.card_format}, this scopepilot reads format "
            f"{CARD_FORMAT}; retrain with scopepilot train {name}"
        )
    if card.name != name:
        raise ModelError(f"model card {path} names model {card.name!r}, expected {name!r}")
    return card


def load_model(
    name: str,
    build: Callable[[ModelCard], nn.Module],
    directory: str | Path = WEIGHTS_DIR,
    *,
    version: str | None = None,
    device: torch.device | str | None = None,
) -> tuple[nn.Module, ModelCard]:
    """Load the model ``name`` from ``directory``: ``(module in eval mode on device, card)``.

    ``build(card)`` constructs the untrained module from ``card.architecture``. Raises
    :class:`ModelError` when the card or weights file is missing or unreadable, the weights'
    SHA-256 differs from the card's, the card's version is not ``version`` (when given), or the
    tensors' names or shapes do not match the module.
    """
    directory = Path(directory)
    card = read_card(name, directory)
    if version is not None and card.version != version:
        raise ModelError(
            f"model {name!r} in {directory} is version {card.version!r}, this code needs "
            f"{version!r}; retrain with scopepilot train {name}"
        )
    weights = directory / f"{name}.pt"
    if not weights.is_file():
        raise ModelError(f"weights file {weights} is missing (its card {name}.json is there)")
    digest = file_sha256(weights)
    if card.sha256 and digest != card.sha256:
        raise ModelError(
            f"weights file {weights} is corrupt or replaced: SHA-256 {digest[:12]}… differs "
            f"from the card's {card.sha256[:12]}…"
        )
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise ModelError(f"weights file {weights} cannot be read: {exc}") from None
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ModelError(f"weights file {weights} does not hold a state_dict of tensors")
    try:
        module = build(card)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"cannot build model {name!r} from its card: {exc}") from None
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ModelError(
            f"weights file {weights} does not match model {name!r} {card.version}: missing "
            f"tensors {missing[:5]}, unexpected tensors {extra[:5]}"
        )
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise ModelError(f"weights file {weights} has tensors of the wrong shape: {wrong[:5]}")
    module.load_state_dict(state)
    module.eval()
    target = torch.device(device) if device is not None else pick_device()
    module.to(device=target, memory_format=torch.channels_last)  # type: ignore[call-overload]
    return module, card


# ---------------------------------------------------------------------- input checks


def check_image(image: Any, *, allow_nan: bool = False, min_size: int = 2) -> np.ndarray:
    """``image`` as a ``(H, W) float32`` array, or :class:`DataError` naming what is wrong.

    Rejects non-arrays and non-numeric dtypes, anything but 2-D, fewer than ``min_size`` pixels
    along an axis, infinities and NaN (with ``allow_nan=True`` NaN marks unmeasured pixels, as in
    a sparse scan, but at least one pixel must be finite).
    """
    arr = np.asarray(image)
    if not (np.issubdtype(arr.dtype, np.number) and arr.dtype != np.bool_):
        raise DataError(f"image must hold numbers, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise DataError(
            f"image must be 2-D (H, W), got {arr.ndim}-D with shape {arr.shape}; pass one "
            "channel of one frame"
        )
    if arr.size == 0 or min(arr.shape) < min_size:
        raise DataError(
            f"image is empty or too small: shape {arr.shape}, need >= {min_size} per axis"
        )
    if np.iscomplexobj(arr):
        raise DataError("image must be real, got complex values")
    out = arr.astype(np.float32, copy=False)
    n_inf = int(np.count_nonzero(np.isinf(out)))
    n_nan = int(np.count_nonzero(np.isnan(out)))
    if n_inf:
        raise DataError(f"image has {n_inf} infinite pixels of {out.size}")
    if n_nan and not allow_nan:
        raise DataError(f"image has {n_nan} NaN pixels of {out.size}")
    if n_nan == out.size:
        raise DataError(f"image has no finite pixel (all {out.size} are NaN)")
    return out


def _pixel_pair(pixel_size_nm: float | Sequence[float]) -> tuple[float, float]:
    try:
        if isinstance(pixel_size_nm, (int, float, np.floating, np.integer)):
            py = px = float(pixel_size_nm)
        else:
            py, px = (float(v) for v in pixel_size_nm)
    except (TypeError, ValueError):
        raise DataError(
            f"pixel size must be a number or (y, x) in nm, got {pixel_size_nm!r}"
        ) from None
    if not (math.isfinite(py) and math.isfinite(px) and py > 0 and px > 0):
        raise DataError(f"pixel size must be positive and finite, got {pixel_size_nm!r} nm")
    return py, px


def resample_to_pixel_size(
    image: np.ndarray, pixel_size_nm: float | Sequence[float], card: ModelCard
) -> np.ndarray:
    """``image`` ``(H, W)`` resampled from ``pixel_size_nm`` (a number or ``(y, x)``) to
    ``card.trained_pixel_size_nm`` (bilinear, anti-aliased when shrinking) as float32.

    Raises :class:`DataError` when the pixel size is outside ``card.pixel_size_range_nm``.
    Sizes within 2 % of the trained one are passed through unchanged. NaN pixels (unmeasured)
    stay NaN where they dominate the neighbourhood.
    """
    py, px = _pixel_pair(pixel_size_nm)
    low, high = card.pixel_size_range_nm
    for axis, value in (("y", py), ("x", px)):
        if not low <= value <= high:
            raise DataError(
                f"pixel size {value:g} nm ({axis}) is outside the {card.name} model's range "
                f"{low:g}–{high:g} nm; scan at a pixel size in that range"
            )
    arr = np.asarray(image, dtype=np.float32)
    target = card.trained_pixel_size_nm
    zy, zx = py / target, px / target
    if abs(zy - 1) <= _RESAMPLE_TOLERANCE and abs(zx - 1) <= _RESAMPLE_TOLERANCE:
        return arr
    from skimage.transform import resize

    shape = (max(2, round(arr.shape[0] * zy)), max(2, round(arr.shape[1] * zx)))
    nan = np.isnan(arr)
    if nan.any():
        filled = np.where(nan, 0.0, arr).astype(np.float32)
        weight = resize((~nan).astype(np.float32), shape, order=1, anti_aliasing=zy < 1 or zx < 1)
        value = resize(filled, shape, order=1, anti_aliasing=zy < 1 or zx < 1)
        out = np.where(weight > 0.5, value / np.maximum(weight, 1e-6), np.nan)
        return np.asarray(out, dtype=np.float32)
    out = resize(arr, shape, order=1, anti_aliasing=zy < 1 or zx < 1, preserve_range=True)
    return np.asarray(out, dtype=np.float32)


# ---------------------------------------------------------------------- batched inference


def run_batches(
    module: nn.Module, inputs: np.ndarray | torch.Tensor, *, batch_size: int = 16
) -> torch.Tensor:
    """``module`` applied to ``inputs`` ``(N, C, H, W)`` in batches of ``batch_size`` on the
    module's device (channels-last, ``torch.inference_mode``); the outputs concatenated on CPU.
    """
    if batch_size < 1:
        raise ModelError(f"batch_size must be >= 1, got {batch_size}")
    x = torch.as_tensor(inputs, dtype=torch.float32)
    if x.ndim != 4:
        raise DataError(f"model input must be (N, C, H, W), got shape {tuple(x.shape)}")
    try:
        device = next(module.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    outs: list[torch.Tensor] = []
    with torch.inference_mode():
        for start in range(0, x.shape[0], batch_size):
            chunk = x[start : start + batch_size].to(device, non_blocking=True)
            chunk = chunk.contiguous(memory_format=torch.channels_last)
            outs.append(module(chunk).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)


def tile_positions(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``length`` with at least ``overlap``
    pixels shared between neighbours (the last tile is flush with the end)."""
    if length <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def tiled_inference(
    module: nn.Module,
    image: np.ndarray,
    *,
    tile: int,
    overlap: int = 16,
    batch_size: int = 8,
    prepare: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Run a dense (image-to-image) ``module`` over ``image`` in overlapping square tiles.

    ``image`` is ``(C, H, W)`` or ``(H, W)`` (one channel). An image smaller than ``tile`` is
    reflect-padded. ``prepare`` may map each ``(N, C, tile, tile)`` batch of tiles before the
    module sees it. Outputs ``(N, K, tile, tile)`` are blended with a tapered weight (so tile
    seams do not show) into ``(K, H, W) float32``.
    """
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise DataError(f"tiled inference needs (C, H, W) or (H, W), got shape {arr.shape}")
    _, h, w = arr.shape
    pad_h, pad_w = max(0, tile - h), max(0, tile - w)
    if pad_h or pad_w:
        widths = ((0, 0), (0, pad_h), (0, pad_w))
        if pad_h < h and pad_w < w:
            arr = np.pad(arr, widths, mode="reflect")
        else:
            arr = np.pad(arr, widths, mode="edge")
    hp, wp = arr.shape[1:]
    overlap = min(overlap, tile - 1)
    ys, xs = tile_positions(hp, tile, overlap), tile_positions(wp, tile, overlap)
    corners = [(y, x) for y in ys for x in xs]
    tiles = np.stack([arr[:, y : y + tile, x : x + tile] for y, x in corners])
    if prepare is not None:
        tiles = prepare(tiles)
    out = run_batches(module, tiles, batch_size=batch_size).numpy()
    if out.ndim != 4 or out.shape[-2:] != (tile, tile):
        raise ModelError(f"dense model must return (N, K, {tile}, {tile}), got {out.shape}")
    # a tile's outer overlap/4 pixels (where the network saw padding, not neighbours) get ~0
    # weight, the next overlap/4 ramp up to 1; an image border lies in one tile only and keeps
    # its value (the weights are normalised)
    edge = np.minimum(np.arange(tile), np.arange(tile)[::-1]).astype(np.float32)
    quarter = max(1.0, overlap / 4)
    taper = np.clip((edge + 1 - quarter) / quarter, 1e-4, 1.0)
    weight = np.outer(taper, taper)
    acc = np.zeros((out.shape[1], hp, wp), dtype=np.float32)
    norm = np.zeros((hp, wp), dtype=np.float32)
    for (y, x), piece in zip(corners, out, strict=True):
        acc[:, y : y + tile, x : x + tile] += piece * weight
        norm[y : y + tile, x : x + tile] += weight
    return np.asarray(acc[:, :h, :w] / norm[:h, :w], dtype=np.float32)
