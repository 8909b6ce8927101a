"""Frames: what an instrument produces, complete or line by line.

Coordinates: sample (stage) coordinates in metres, x to the right, y up the slow-scan axis.
Image arrays are indexed ``[row, col]`` = ``[y, x]``; row 0 is the first line scanned.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from drivers.errors import DataError


def _is_finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large to be a float
        return False


class TipState(StrEnum):
    """Tip apex condition of a scanning probe (ground truth in simulation, a class for models)."""

    GOOD = "good"
    MULTIPLE = "multiple"  # double or multiple apex: features repeat at the apex offsets
    BLUNT = "blunt"  # broad apex: atomic corrugation lost
    UNSTABLE = "unstable"  # apex changes during the scan: streaks, jumps between lines
    CRASHED = "crashed"  # flat or saturated image


@dataclass(frozen=True)
class ScanRegion:
    """A rectangular scan area: centre and size in metres, rotation in degrees (anticlockwise)."""

    center_x_m: float = 0.0
    center_y_m: float = 0.0
    width_m: float = 16e-9
    height_m: float = 16e-9
    rotation_deg: float = 0.0

    def __post_init__(self) -> None:
        for name in ("center_x_m", "center_y_m", "width_m", "height_m", "rotation_deg"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DataError(f"ScanRegion.{name} must be a number, got {value!r}")
            if not _is_finite(value):
                raise DataError(f"ScanRegion.{name} must be finite, got {value!r}")
        if self.width_m <= 0 or self.height_m <= 0:
            raise DataError(
                f"ScanRegion size must be positive, got width_m={self.width_m!r}, "
                f"height_m={self.height_m!r}"
            )

    def moved_to(self, x_m: float, y_m: float) -> ScanRegion:
        return ScanRegion(x_m, y_m, self.width_m, self.height_m, self.rotation_deg)

    def to_json(self) -> dict[str, float]:
        return {
            "center_x_m": float(self.center_x_m),
            "center_y_m": float(self.center_y_m),
            "width_m": float(self.width_m),
            "height_m": float(self.height_m),
            "rotation_deg": float(self.rotation_deg),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ScanRegion:
        if not isinstance(obj, Mapping):
            raise DataError(f"ScanRegion JSON must be an object, got {obj!r}")
        unknown = set(obj) - {"center_x_m", "center_y_m", "width_m", "height_m", "rotation_deg"}
        if unknown:
            raise DataError(f"ScanRegion JSON has unknown keys {sorted(unknown, key=str)}")
        return cls(**obj)


@dataclass(frozen=True)
class Defect:
    """A ground-truth point defect: position in sample metres, class name, and image pixel."""

    x_m: float
    y_m: float
    kind: str
    row_px: float = math.nan
    col_px: float = math.nan

    def to_json(self) -> dict[str, Any]:
        return {
            "x_m": self.x_m,
            "y_m": self.y_m,
            "kind": self.kind,
            "row_px": None if math.isnan(self.row_px) else self.row_px,
            "col_px": None if math.isnan(self.col_px) else self.col_px,
        }


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """What a simulator knows about a frame that a real instrument never tells.

    ``clean`` is the noise-free, distortion-free image ``(H, W) float32`` (or None);
    ``tip_states`` lists every tip state seen during the scan (several if the tip changed);
    ``damaged_fraction`` is the fraction of the frame lying on surface damaged by conditioning.
    """

    tip_state: TipState
    tip_states: tuple[TipState, ...] = ()
    clean: np.ndarray | None = None
    defects: tuple[Defect, ...] = ()
    damaged_fraction: float = 0.0
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        """A frame a microscopist would keep: good tip throughout and no damaged area in view."""
        states = (self.tip_state, *self.tip_states)
        return all(s is TipState.GOOD for s in states) and self.damaged_fraction < 0.05

    def to_json(self) -> dict[str, Any]:
        """Small JSON form (no clean image)."""
        return {
            "tip_state": str(self.tip_state),
            "tip_states": [str(s) for s in self.tip_states],
            "defects": [d.to_json() for d in self.defects],
            "damaged_fraction": float(self.damaged_fraction),
            "usable": self.usable,
            "extra": {k: _small_json(v) for k, v in self.extra.items()},
        }


@dataclass(frozen=True, eq=False)
class Frame:
    """One image from an instrument, complete or partial.

    ``data`` is ``(H, W)`` (float32 for topography in metres, counts for electron images).
    A partial frame has ``lines_done < H``; rows at and after ``lines_done`` hold NaN.
    ``pixel_size_m`` is ``(y, x)``; ``dwell_s`` is per pixel; ``timestamp_s`` is instrument time
    (simulated time for simulators) at the end of the last completed line.
    """

    data: np.ndarray
    channel: str
    pixel_size_m: tuple[float, float]
    dwell_s: float
    scan_region: ScanRegion
    frame_index: int
    timestamp_s: float
    lines_done: int
    instrument: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    truth: GroundTruth | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.data, np.ndarray):
            raise DataError(f"Frame.data must be a numpy array, got {type(self.data).__name__}")
        if self.data.ndim != 2:
            raise DataError(f"Frame.data must be 2-D (H, W), got shape {self.data.shape}")
        if isinstance(self.lines_done, bool) or not isinstance(self.lines_done, (int, np.integer)):
            raise DataError(f"Frame.lines_done must be an int, got {self.lines_done!r}")
        object.__setattr__(self, "lines_done", int(self.lines_done))
        if not 0 <= self.lines_done <= self.data.shape[0]:
            raise DataError(
                f"Frame.lines_done={self.lines_done} outside 0..{self.data.shape[0]} "
                f"for data of shape {self.data.shape}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.data.shape[0]), int(self.data.shape[1]))

    @property
    def complete(self) -> bool:
        return self.lines_done == self.data.shape[0]

    @property
    def done_data(self) -> np.ndarray:
        """The scanned part ``(lines_done, W)``."""
        return self.data[: self.lines_done]

    def header(self) -> dict[str, Any]:
        """Everything but the pixels, as JSON-able values."""
        return {
            "channel": self.channel,
            "shape": list(self.shape),
            "dtype": str(self.data.dtype),
            "pixel_size_m": [float(self.pixel_size_m[0]), float(self.pixel_size_m[1])],
            "dwell_s": float(self.dwell_s),
            "scan_region": self.scan_region.to_json(),
            "frame_index": int(self.frame_index),
            "timestamp_s": float(self.timestamp_s),
            "lines_done": int(self.lines_done),
            "instrument": self.instrument,
            "metadata": dict(self.metadata),
        }


def frame_problems(frame: Frame, *, expected_shape: tuple[int, int] | None = None) -> list[str]:
    """Reasons not to act on ``frame`` (empty when it is fine).

    Checks numeric dtype, finite values in the scanned lines and the expected shape (for a
    sparse scan, ``metadata["pattern"]`` not ``"raster"``, unvisited NaN pixels are expected:
    only infinities and a visited fraction far below ``metadata["fraction"]`` count). A flat
    image is *not* a problem here: it is what a crashed tip looks like, and the assessor must
    see it.
    """
    problems: list[str] = []
    if expected_shape is not None and frame.shape != tuple(expected_shape):
        problems.append(f"shape {frame.shape} differs from the requested {tuple(expected_shape)}")
    if not (np.issubdtype(frame.data.dtype, np.number) and frame.data.dtype != np.bool_):
        problems.append(f"dtype {frame.data.dtype} is not numeric")
        return problems
    done = frame.done_data
    if done.size == 0:
        problems.append("no completed lines")
        return problems
    pattern = frame.metadata.get("pattern", "raster")
    if pattern != "raster":  # a sparse scan leaves unvisited pixels NaN by design
        n_inf = int(np.count_nonzero(np.isinf(done)))
        if n_inf:
            problems.append(f"{n_inf} of {done.size} pixels are infinite")
        fraction = frame.metadata.get("fraction", 1.0)
        visited = int(np.count_nonzero(np.isfinite(done)))
        if isinstance(fraction, (int, float)) and visited < 0.5 * fraction * done.size:
            problems.append(
                f"only {visited} of {done.size} pixels hold values; a {pattern!r} scan at "
                f"fraction {fraction:g} should fill about {fraction * done.size:.0f}"
            )
        return problems
    n_bad = int(np.count_nonzero(~np.isfinite(done)))
    if n_bad:
        problems.append(f"{n_bad} of {done.size} pixels are NaN or infinite")
    return problems


def _small_json(value: Any) -> Any:
    """A JSON-able stand-in for a ground-truth extra: arrays become their shape and dtype
    (masks and maps are kept as arrays by whoever needs them, not in small JSON records)."""
    if isinstance(value, np.ndarray):
        return {"array": {"shape": list(value.shape), "dtype": str(value.dtype)}}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _small_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_small_json(v) for v in value]
    return value
