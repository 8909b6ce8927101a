"""Replies on the frame channel (see ``docs/decisions/0006-remote-frame-channel.md``).

A reply is a fixed binary part (:data:`REPLY`, little-endian), a *fixed-fields block* and the
pixels. The binary part holds the kind of reply, the sizes of the block and of the pixels, and
the header fields that change with every frame (:data:`~drivers.remote.wire.PER_FRAME_FIELDS`:
``frame_index``, ``timestamp_s``, ``lines_done``, ``row0``, ``rows``). The block is the msgpack
mapping of every other header field (channel, shape, dtype, pixel size, dwell, scan region,
instrument, metadata, truth), or of the error for an error reply.

While the instrument's settings stay put, consecutive frames carry the same block, byte for byte.
The server packs it again only when one of its fields changed (:class:`ReplyEncoder`); the
client checks a block in full the first time it sees it and, while the same bytes come again,
checks only the per-frame fields (:class:`ReplyDecoder`). A frame with ground truth (simulators)
is packed and checked in full every time. The pixels are the frame's rows ``row0 .. lines_done
- 1``, little-endian, as in :mod:`drivers.remote.wire`.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Mapping
from typing import Any, NamedTuple

import msgpack
import numpy as np

from drivers.errors import DataError
from drivers.frame import Frame
from drivers.remote.wire import (
    MAX_FRAME_BYTES,
    PER_FRAME_FIELDS,
    FrameLayout,
    _fixed_fields,
    _payload,
    build_frame,
    frame_layout,
    is_mapping,
)

#: The fixed part of a reply: kind, flags (bit 0: the part ends its scan), two reserved bytes,
#: the block's size, the pixels' size, frame_index, timestamp_s, lines_done, row0, rows.
REPLY = struct.Struct("<BBHIIqdIII")
FRAME, NO_FRAME, ERROR = 0, 1, 2
_LAST = 1
_MAX_FRAME_INDEX = 2**62
_FLAT = (str, int, float, bool, type(None), bytes)


# Frame's fields, in order; a remembered block's frames are made by filling exactly these.
_FRAME_FIELDS = (
    "data",
    "channel",
    "pixel_size_m",
    "dwell_s",
    "scan_region",
    "frame_index",
    "timestamp_s",
    "lines_done",
    "instrument",
    "metadata",
    "truth",
)
_TRUSTED_CONSTRUCTION = tuple(
    f.name for f in dataclasses.fields(Frame)
) == _FRAME_FIELDS and not hasattr(Frame, "__slots__")


class ReplyEncoder:
    """Builds the replies of one frame channel (server side); not thread-safe (one per channel).

    The fixed-fields block of the last frame is kept with what it was packed from (the frame's
    channel, shape, pixel type, pixel size, dwell, scan region, instrument and packed metadata)
    and packed again when any of them differs, or when the frame carries ground truth.
    """

    def __init__(self) -> None:
        self._packer = msgpack.Packer(use_bin_type=True)
        self._key: tuple[Any, ...] | None = None
        self._block = b""
        # the pixel type of the last whole frame sent from its own array, and its wire name
        self._native: np.dtype[Any] | None = None
        self._name = ""

    def frame(
        self, frame: Frame, row0: int = 0, last: bool = False
    ) -> tuple[bytes, memoryview | np.ndarray]:
        """The reply's head (fixed part and block) and its pixels: the frame's own C-ordered
        array when it can go as it is (a whole frame of a little-endian type already sent so),
        else a byte view of the rows to send (of a converted copy where needed).

        Raises :class:`DataError` for a frame that cannot travel (a pixel type not on the wire,
        metadata msgpack cannot carry, a field out of the fixed part's range)."""
        data = frame.data
        payload: memoryview | np.ndarray
        if (
            row0 == 0
            and data.dtype is self._native
            and frame.lines_done == len(data)
            and data.flags.c_contiguous
        ):
            name, payload, size = self._name, data, data.nbytes  # the usual frame: no view made
        else:
            name, payload = _payload(frame, row0)
            size = len(payload)
            if row0 == 0 and payload.obj is data:  # sent from its own array, unconverted
                self._native, self._name = data.dtype, name
        metadata = frame.metadata
        try:
            packed_metadata = self._packer.pack(
                metadata if type(metadata) is dict else dict(metadata)
            )
        except (TypeError, ValueError, OverflowError) as exc:
            raise DataError(f"frame metadata cannot travel: {exc}") from None
        # every field but the metadata is encoded through float() / to_json(), so values that
        # compare equal encode the same; str fields are compared with their type
        channel, instrument = frame.channel, frame.instrument
        key = (
            channel,
            type(channel),
            instrument,
            type(instrument),
            frame.data.shape,
            name,
            frame.pixel_size_m,
            frame.dwell_s,
            frame.scan_region,
            packed_metadata,
        )
        try:
            same = frame.truth is None and key == self._key
        except (TypeError, ValueError):  # a field that does not compare (and cannot travel)
            same = False
        if not same:
            try:
                self._block = self._packer.pack(_fixed_fields(frame, name))
            except (TypeError, ValueError, OverflowError) as exc:
                raise DataError(f"frame header cannot travel: {exc}") from None
            self._key = key if frame.truth is None else None
        block = self._block
        lines_done = frame.lines_done
        try:
            fixed = REPLY.pack(
                FRAME,
                _LAST if last else 0,
                0,
                len(block),
                size,
                frame.frame_index,
                frame.timestamp_s,
                lines_done,
                row0,
                lines_done - row0,
            )
        except (struct.error, TypeError) as exc:
            raise DataError(f"frame {frame.frame_index!r} cannot travel: {exc}") from None
        return fixed + block, payload

    @staticmethod
    def no_frame() -> bytes:
        """The reply that says there is no frame (a stream's end, no new frame to observe)."""
        return REPLY.pack(NO_FRAME, 0, 0, 0, 0, 0, 0.0, 0, 0, 0)

    def error(self, error: Mapping[str, Any]) -> bytes:
        """An error reply carrying ``error`` (``{"type", "message", ...}``)."""
        block = self._packer.pack(dict(error))
        return REPLY.pack(ERROR, 0, 0, len(block), 0, 0, 0.0, 0, 0, 0) + block


class _Fixed(NamedTuple):
    """What a checked fixed-fields block said (shared by the frames that repeat it)."""

    whole: FrameLayout  # of a whole frame in one message
    metadata: dict[str, Any]
    fields: dict[str, Any]  # a frame's fields in order (its data, metadata, per-frame ones stale)


class WholeReply(NamedTuple):
    """The reply a remembered block announces for a whole frame: its head (fixed part and
    block) is ``head_size`` bytes and its pixels fill a new ``layout.shape`` array, so a client
    can read both in one call (the array made before the reply arrives)."""

    head_size: int
    layout: FrameLayout  # what :meth:`ReplyDecoder.layout` returns for such a reply
    payload_bytes: int


class ReplyDecoder:
    """Checks the frame replies of one channel (client side); not thread-safe.

    :meth:`layout` checks a reply's fixed part and block before its pixels are read;
    :meth:`build` makes the :class:`Frame` once they are in. A block is checked in full by
    :func:`~drivers.remote.wire.frame_layout` and :func:`~drivers.remote.wire.build_frame`
    the first time; while the same bytes come again its checked values are reused and only the
    per-frame fields are checked (against the same bounds). :attr:`whole` says what a whole
    frame's reply with the remembered block looks like (None while no block is remembered); it
    is a guess to read by, never a check: every reply still goes through :meth:`layout`.
    """

    def __init__(self, *, max_bytes: int = MAX_FRAME_BYTES) -> None:
        self._max_bytes = max_bytes
        self._block = b""
        self._fixed: _Fixed | None = None
        self.whole: WholeReply | None = None
        self._header: dict[str, Any] | None = None  # the block being checked in full
        self._pending_block = b""
        self._index, self._timestamp_s, self._lines_done = 0, 0.0, 0

    def layout(
        self, block: bytes, index: int, timestamp_s: float, lines_done: int, row0: int, rows: int
    ) -> FrameLayout:
        """Where the pixels go; :class:`DataError` names a field that is wrong."""
        if index > _MAX_FRAME_INDEX or index < 0:
            raise DataError(f"frame header field 'frame_index'={index} is out of range")
        if not math.isfinite(timestamp_s):
            raise DataError(f"frame header field 'timestamp_s'={timestamp_s!r} is not finite")
        fixed = self._fixed
        if fixed is not None and block == self._block:
            shape = fixed.whole.shape
            height = shape[0]
            if not (lines_done <= height and row0 <= lines_done and row0 + rows == lines_done):
                raise DataError(
                    f"frame rows {row0}+{rows} do not end at lines_done={lines_done} within "
                    f"{height} rows"
                )
            self._header = None
            self._index, self._timestamp_s, self._lines_done = index, timestamp_s, lines_done
            if rows == height:
                return fixed.whole
            return FrameLayout(shape, fixed.whole.dtype, fixed.whole.native, row0, rows)
        try:
            header = msgpack.unpackb(block, raw=False)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise DataError(f"frame reply block is not msgpack: {exc}") from None
        if not is_mapping(header) or not PER_FRAME_FIELDS.isdisjoint(header):
            raise DataError(f"malformed frame reply block: {header!r:.200}")
        header = dict(header)
        header.update(
            frame_index=index,
            timestamp_s=timestamp_s,
            lines_done=lines_done,
            row0=row0,
            rows=rows,
        )
        layout = frame_layout(header, max_bytes=self._max_bytes)
        self._header = header
        self._fixed = None  # a block that failed (or differs) is not trusted again
        self.whole = None
        self._pending_block = block
        return layout

    def repeat(
        self,
        block: bytes,
        index: int,
        timestamp_s: float,
        lines_done: int,
        row0: int,
        rows: int,
        data: np.ndarray,
    ) -> Frame | None:
        """The whole frame of a reply that repeats the remembered block, holding ``data`` (its
        pixels, already read; not copied), or None for any other reply (then :meth:`layout`
        and :meth:`build` handle it, and name what is wrong). The same checks as
        :meth:`layout`'s for a remembered block, in one call: what :attr:`whole` promised."""
        fixed = self._fixed
        if (
            fixed is None
            or not _TRUSTED_CONSTRUCTION
            or block != self._block
            or row0 != 0
            or rows != lines_done
            or lines_done != fixed.whole.shape[0]
            or index < 0
            or index > _MAX_FRAME_INDEX
            or not math.isfinite(timestamp_s)
        ):
            return None
        self._header = None
        frame = object.__new__(Frame)  # (see build: the values are checked already)
        fields = frame.__dict__
        fields.update(fixed.fields)
        fields["data"] = data
        fields["frame_index"] = index
        fields["timestamp_s"] = timestamp_s
        fields["lines_done"] = lines_done
        fields["metadata"] = dict(fixed.metadata)
        return frame

    def build(self, data: np.ndarray, layout: FrameLayout) -> Frame:
        """The frame of the reply :meth:`layout` last checked, holding ``data`` (not copied)."""
        header = self._header
        if header is None:
            fixed = self._fixed
            if fixed is None:  # layout() was not called, or failed
                raise DataError("no checked frame reply to build a frame from")
            fields = fixed.fields.copy()
            fields["data"] = data
            fields["frame_index"] = self._index
            fields["timestamp_s"] = self._timestamp_s
            fields["lines_done"] = self._lines_done
            fields["metadata"] = dict(fixed.metadata)
            if not _TRUSTED_CONSTRUCTION:
                return Frame(**fields)
            # the values have passed Frame.__post_init__'s checks (the block's in full when it
            # first came, the per-frame fields in layout()), so the frozen dataclass's __init__
            # and __post_init__ are skipped: they were the largest Python cost per frame left
            # on the client (about 10 us of some 40 us, warm)
            frame = object.__new__(Frame)
            frame.__dict__.update(fields)
            return frame
        frame = build_frame(header, data)
        self._header = None
        # frames that repeat this block share its checked values; their metadata is copied
        # for each frame, so only flat metadata (no lists or maps inside) is shared this way
        if frame.truth is None and all(type(v) in _FLAT for v in frame.metadata.values()):
            height = layout.shape[0]
            self._fixed = _Fixed(
                FrameLayout(layout.shape, layout.dtype, layout.native, 0, height),
                dict(frame.metadata),
                {name: getattr(frame, name) for name in _FRAME_FIELDS},
            )
            self._block = self._pending_block
            whole = self._fixed.whole
            self.whole = WholeReply(REPLY.size + len(self._block), whole, whole.payload_bytes)
        return frame
