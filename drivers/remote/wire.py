"""Frames on the wire: a small header mapping plus the raw pixel bytes (never ``tolist()``).

A message is ``(header, payload)``. The header is a mapping of plain values that any safe
serializer carries (the remote instrument uses msgpack); the payload is the C-ordered,
little-endian bytes of rows ``row0 .. row0 + rows - 1`` of the frame. A partial frame sends only
the lines scanned since the previous message, so a stream moves every line once.

>>> import numpy as np
>>> from drivers.frame import Frame, ScanRegion
>>> frame = Frame(np.arange(6, dtype=np.float32).reshape(2, 3), "topography", (1e-9, 1e-9),
...               1e-3, ScanRegion(), 0, 0.5, 2, "sim:stm")
>>> header, payload = encode_frame(frame)
>>> len(payload)
24
>>> decode_frame(header, payload).data.tolist()
[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any, NamedTuple, TypeGuard

import numpy as np

from drivers.errors import DataError
from drivers.frame import Defect, Frame, GroundTruth, ScanRegion, TipState

WIRE_VERSION = 1

#: Pixel types a frame may travel as (little-endian on the wire).
DTYPES: tuple[str, ...] = (
    "float32",
    "float64",
    "float16",
    "uint8",
    "uint16",
    "uint32",
    "int8",
    "int16",
    "int32",
)

# (name, little-endian, native) per pixel type, and the name of each native type: numpy's
# dtype.name is slow enough to show in a 1,000-frames-per-second loop
_WIRE_TYPES = {n: (np.dtype(n).newbyteorder("<"), np.dtype(n)) for n in DTYPES}
_NAMES = {np.dtype(n): n for n in DTYPES}

_LITTLE_ENDIAN = sys.byteorder == "little"  # native arrays are already as on the wire

#: The largest frame payload a receiver accepts unless told otherwise (a 4096 x 4096 float64).
MAX_FRAME_BYTES = 4096 * 4096 * 8

_HEADER_KEYS = frozenset(
    {
        "v",
        "channel",
        "shape",
        "dtype",
        "pixel_size_m",
        "dwell_s",
        "scan_region",
        "frame_index",
        "timestamp_s",
        "lines_done",
        "instrument",
        "metadata",
        "row0",
        "rows",
        "truth",
    }
)


#: The header fields that change with every frame; the frame channel sends them in binary
#: (:mod:`drivers.remote.channel`), every other field only when it changed.
PER_FRAME_FIELDS = frozenset({"frame_index", "timestamp_s", "lines_done", "row0", "rows"})


def _payload(frame: Frame, row0: int) -> tuple[str, memoryview]:
    """The wire name of ``frame``'s pixel type and the raw bytes of rows ``row0 ..
    frame.lines_done - 1``: a view of the frame's own array where it is already little-endian
    and C-ordered (the usual native frames), else of a converted copy."""
    if not 0 <= row0 <= frame.lines_done:
        raise DataError(f"row0={row0} outside 0..{frame.lines_done} (lines_done)")
    data = frame.data
    name = _NAMES.get(data.dtype)
    if name is None:
        raise DataError(f"frame dtype {data.dtype} cannot travel; allowed: {', '.join(DTYPES)}")
    if _LITTLE_ENDIAN and row0 == 0 and frame.lines_done == data.shape[0]:
        rows = data if data.flags.c_contiguous else np.ascontiguousarray(data)  # no copy, usually
    else:
        rows = np.ascontiguousarray(data[row0 : frame.lines_done], dtype=_WIRE_TYPES[name][0])
    return name, rows.data.cast("B") if rows.size else memoryview(b"")


def _fixed_fields(frame: Frame, dtype_name: str) -> dict[str, Any]:
    """The header fields that stay the same from frame to frame while nothing is changed
    (everything but :data:`PER_FRAME_FIELDS`)."""
    height, width = frame.data.shape
    pixel = frame.pixel_size_m
    return {
        "v": WIRE_VERSION,
        "channel": frame.channel,
        "shape": [height, width],
        "dtype": dtype_name,
        "pixel_size_m": [float(pixel[0]), float(pixel[1])],
        "dwell_s": float(frame.dwell_s),
        "scan_region": frame.scan_region.to_json(),
        "instrument": frame.instrument,
        "metadata": dict(frame.metadata),
        "truth": frame.truth.to_json() if frame.truth is not None else None,
    }


def encode_frame(frame: Frame, *, row0: int = 0) -> tuple[dict[str, Any], memoryview]:
    """The header and the raw bytes of rows ``row0 .. frame.lines_done - 1`` of ``frame``.

    The payload is a view of a little-endian C-ordered copy only where the frame's own array is
    not already one (no copy for the usual native little-endian frames).
    """
    name, payload = _payload(frame, row0)
    # Frame.header()'s fields, built here: its str(dtype) alone cost more than the rest of the
    # header in the per-frame profile (tests/test_remote_wire.py holds the two to the same keys)
    header = _fixed_fields(frame, name)
    header["frame_index"] = int(frame.frame_index)
    header["timestamp_s"] = float(frame.timestamp_s)
    header["lines_done"] = frame.lines_done
    header["row0"] = row0
    header["rows"] = frame.lines_done - row0
    return header, payload


# The checks below run for every frame (thousands a second): exact-type fast paths first (what
# msgpack produces), the general isinstance checks only when those miss.


def _need(header: Mapping[str, Any], key: str, kinds: type | tuple[type, ...]) -> Any:
    value = header.get(key)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise DataError(f"frame header field {key!r} has a bad value {value!r}")
    return value


def _int(header: Mapping[str, Any], key: str, low: int, high: int) -> int:
    value = header.get(key)
    if type(value) is not int:
        value = _need(header, key, int)
    if not low <= value <= high:
        raise DataError(f"frame header field {key!r}={value} is outside {low}..{high}")
    return int(value)


def _float(header: Mapping[str, Any], key: str) -> float:
    value = header.get(key)
    if type(value) is not float:
        try:
            value = float(_need(header, key, (int, float)))
        except OverflowError:  # an int too large for a float
            value = math.inf
    if not math.isfinite(value):
        raise DataError(f"frame header field {key!r}={value!r} is not finite")
    return value


def is_mapping(value: Any) -> TypeGuard[Mapping[str, Any]]:
    """``isinstance(value, Mapping)``, quicker for the dicts that msgpack returns."""
    return type(value) is dict or isinstance(value, Mapping)


# The last scan region decoded and the values it came from: consecutive frames nearly always
# share theirs, and building (and checking) a ScanRegion showed in the per-frame profile.
_last_region: tuple[dict[str, Any], ScanRegion] | None = None
_FIVE_FLOATS = (float,) * 5


def _scan_region(obj: Mapping[str, Any]) -> ScanRegion:
    """``ScanRegion.from_json(obj)``; the last one again when ``obj`` holds the same floats
    (the same keys, equal values, all of them floats: exactly what the last one passed)."""
    global _last_region
    last = _last_region
    if last is not None and obj == last[0] and tuple(map(type, obj.values())) == _FIVE_FLOATS:
        return last[1]
    region = ScanRegion.from_json(obj)
    _last_region = (dict(obj), region)
    return region


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _truth(obj: Any) -> GroundTruth | None:
    if obj is None:
        return None
    if not isinstance(obj, Mapping):
        raise DataError(f"frame header field 'truth' must be a mapping or None, got {obj!r}")
    try:
        defects = tuple(
            Defect(
                float(d["x_m"]),
                float(d["y_m"]),
                str(d["kind"]),
                math.nan if d.get("row_px") is None else float(d["row_px"]),
                math.nan if d.get("col_px") is None else float(d["col_px"]),
            )
            for d in obj.get("defects", ())
        )
        return GroundTruth(
            tip_state=TipState(obj["tip_state"]),
            tip_states=tuple(TipState(s) for s in obj.get("tip_states", ())),
            defects=defects,
            damaged_fraction=float(obj.get("damaged_fraction", 0.0)),
            extra=dict(obj.get("extra", {})),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"frame header field 'truth' is malformed: {exc!r}") from None


class FrameLayout(NamedTuple):
    """Where a frame message's pixels go: ``rows`` rows from ``row0`` of a ``shape`` array.

    (A named tuple rather than a frozen dataclass: one is made per frame, and a frozen
    dataclass's ``__init__`` showed in the per-frame profile.)
    """

    shape: tuple[int, int]
    dtype: np.dtype[Any]  # little-endian, as on the wire
    native: np.dtype[Any]  # the same type in this machine's byte order
    row0: int
    rows: int

    @property
    def lines_done(self) -> int:
        return self.row0 + self.rows

    @property
    def payload_bytes(self) -> int:
        return self.rows * self.shape[1] * self.dtype.itemsize

    def empty(self) -> np.ndarray:
        """A new ``shape`` array (native byte order) holding NaN (0 for integers)."""
        native = self.native
        if self.row0 == 0 and self.rows == self.shape[0]:
            return np.empty(self.shape, dtype=native)
        return np.full(self.shape, np.nan if native.kind == "f" else 0, dtype=native)

    def target(self, buffer: np.ndarray) -> np.ndarray:
        """The rows of ``buffer`` this message fills (contiguous, so a socket can fill them)."""
        if buffer.shape != self.shape or buffer.dtype != self.native:
            raise DataError(
                f"frame message ({self.shape[0]}x{self.shape[1]} {self.dtype.name}) does not "
                f"match the streamed frame ({buffer.shape[0]}x{buffer.shape[1]} {buffer.dtype})"
            )
        return buffer[self.row0 : self.lines_done]


def frame_layout(header: Any, *, max_bytes: int = MAX_FRAME_BYTES) -> FrameLayout:
    """Check a frame header's size fields; :class:`DataError` names what is wrong."""
    if not is_mapping(header):
        raise DataError(f"frame header must be a mapping, got {type(header).__name__}")
    if not _HEADER_KEYS.issuperset(header):
        unknown = set(header) - _HEADER_KEYS
        raise DataError(f"frame header has unknown fields {sorted(map(str, unknown))}")
    if header.get("v") != WIRE_VERSION:
        raise DataError(f"frame wire version {header.get('v')!r} is not {WIRE_VERSION}")
    dtype_name = _need(header, "dtype", str)
    if dtype_name not in _WIRE_TYPES:
        raise DataError(f"frame dtype {dtype_name!r} is not one of {', '.join(DTYPES)}")
    dtype, native = _WIRE_TYPES[dtype_name]
    shape = _need(header, "shape", (list, tuple))
    if (
        len(shape) != 2
        or (type(shape[0]) is not int and not _is_int(shape[0]))
        or (type(shape[1]) is not int and not _is_int(shape[1]))
    ):
        raise DataError(f"frame header field 'shape' must be two ints, got {shape!r}")
    height, width = int(shape[0]), int(shape[1])
    if height < 1 or width < 1:
        raise DataError(f"frame shape {shape!r} must be positive")
    if height * width * dtype.itemsize > max_bytes:
        raise DataError(
            f"frame of shape {height}x{width} {dtype_name} is {height * width * dtype.itemsize} "
            f"bytes, over the limit of {max_bytes} bytes"
        )
    lines_done = _int(header, "lines_done", 0, height)
    row0 = _int(header, "row0", 0, lines_done)
    rows = _int(header, "rows", 0, height)
    if row0 + rows != lines_done:
        raise DataError(f"frame rows {row0}+{rows} do not end at lines_done={lines_done}")
    return FrameLayout((height, width), dtype, native, row0, rows)


def build_frame(header: Mapping[str, Any], data: np.ndarray) -> Frame:
    """The :class:`Frame` a checked header describes, holding ``data`` (not copied)."""
    pixel = _need(header, "pixel_size_m", (list, tuple))
    if len(pixel) != 2:
        raise DataError(f"frame header field 'pixel_size_m' must be (y, x), got {pixel!r}")
    metadata = header.get("metadata")
    if not is_mapping(metadata):
        raise DataError(f"frame header field 'metadata' has a bad value {metadata!r}")
    region = header.get("scan_region")
    if not is_mapping(region):
        raise DataError(f"frame header field 'scan_region' has a bad value {region!r}")
    try:
        return Frame(
            data,
            _need(header, "channel", str),
            (float(pixel[0]), float(pixel[1])),
            _float(header, "dwell_s"),
            _scan_region(region),
            _int(header, "frame_index", 0, 2**62),
            _float(header, "timestamp_s"),
            int(header["lines_done"]),
            _need(header, "instrument", str),
            dict(metadata),
            _truth(header.get("truth")),
        )
    except (TypeError, ValueError) as exc:
        raise DataError(f"frame header is malformed: {exc}") from None


def decode_frame(
    header: Any,
    payload: Any,
    *,
    into: np.ndarray | None = None,
    max_bytes: int = MAX_FRAME_BYTES,
) -> Frame:
    """The frame a ``(header, payload)`` message describes.

    ``into`` is the ``(H, W)`` buffer of the frame being streamed (NaN where not yet scanned):
    the payload's rows are written into it and the returned frame holds a copy. Without
    ``into`` the payload must start at row 0. Every field is checked: a malformed header, a
    payload whose size does not match the header, or a frame larger than ``max_bytes`` raises
    :class:`DataError` naming the problem.
    """
    layout = frame_layout(header, max_bytes=max_bytes)
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise DataError(f"frame payload must be bytes, got {type(payload).__name__}")
    if len(payload) != layout.payload_bytes:
        raise DataError(
            f"frame payload is {len(payload)} bytes; the header ({layout.rows} rows of "
            f"{layout.shape[1]} {layout.dtype.name}) needs {layout.payload_bytes}"
        )
    if into is None and layout.row0 != 0:
        raise DataError(f"a frame message starting at row {layout.row0} needs the streamed buffer")
    buffer = layout.empty() if into is None else into
    layout.target(buffer)[...] = np.frombuffer(payload, dtype=layout.dtype).reshape(
        layout.rows, layout.shape[1]
    )
    return build_frame(header, buffer if into is None else buffer.copy())
