"""The client's end of the frame channel: reading one frame reply from its socket.

A reply is a fixed part (:data:`~drivers.remote.channel.REPLY`), a block and the pixels
(:mod:`drivers.remote.channel`). :class:`FrameReader` reads the pixels straight into the
frame's array, and when the reply is the one a remembered block announces
(:attr:`~drivers.remote.channel.ReplyDecoder.whole`), head and pixels arrive in one scatter read
into an array made while the server works. Every reply is still checked by the decoder; a reply
other than the expected one is read on from what has arrived.

Errors: :class:`OSError`/:class:`ConnectionError` when the connection breaks,
:class:`~drivers.errors.DataError` when a reply's framing is wrong (the channel can no longer be
trusted), :class:`ReportedError` for an error the server reported (read whole: the channel stays
in step). The owner (:class:`~drivers.remote.client.RemoteInstrument`) maps them.
"""

from __future__ import annotations

import socket
import ssl
import sys
from typing import Any

import msgpack
import numpy as np

from drivers.errors import DataError
from drivers.frame import Frame
from drivers.remote.channel import ERROR, FRAME, NO_FRAME, REPLY, ReplyDecoder, WholeReply
from drivers.remote.wire import FrameLayout

_BIG_ENDIAN = sys.byteorder == "big"
#: The first read of a reply not read whole: its fixed part, a usual block (a few hundred bytes)
#: and the first pixels, which are copied once more; the rest is read into the frame's array.
_FIRST_READ_BYTES = 4096
_REPLY_BYTES = REPLY.size
_SCRATCH_BYTES = 1 << 16  # the largest fixed part + block a reply may have

FrameReply = tuple[Frame, bool, np.ndarray]
"""A frame, whether it ends its scan, and the array its pixels were read into."""


class ReportedError(Exception):
    """The server answered with an error (``error``: its mapping, for
    :func:`~drivers.remote.client.raise_remote_error`)."""

    def __init__(self, error: Any) -> None:
        super().__init__("the server reported an error")
        self.error = error


class FrameReader:
    """Reads the frame replies of one frame-channel socket; not thread-safe (its owner's lock
    guards it)."""

    def __init__(self, sock: socket.socket, *, max_bytes: int) -> None:
        self.sock = sock
        self.decoder = ReplyDecoder(max_bytes=max_bytes)
        self._scatter = _can_scatter(sock)
        self._scratch = memoryview(bytearray(_SCRATCH_BYTES))  # fixed part, block, first pixels
        self._first_read = self._scratch[:_FIRST_READ_BYTES]
        self._whole_for: WholeReply | None = None  # the expected reply _whole_head is cut for
        self._whole_head = self._first_read

    def read(self, *, streaming: bool, into: np.ndarray | None) -> FrameReply | None:
        """The reply to the request just sent: a frame (its pixels in ``into``, a streamed
        scan's buffer, when given; a streamed frame holds a copy), or None when there is none."""
        whole = None
        if into is None and not streaming and self._scatter:
            whole = self.decoder.whole
        if whole is not None:
            return self._read_expected(whole)
        got = self.sock.recv_into(self._first_read)
        if got < _REPLY_BYTES:
            got = _recv_at_least(self.sock, self._first_read, _REPLY_BYTES, got)
        return self._read_on(self._scratch, got, into=into, streaming=streaming)

    def _read_expected(self, whole: WholeReply) -> FrameReply | None:
        """Read a reply expected to be ``whole``: one call reads the head into the scratch and
        the pixels into a new array; a reply that differs is read on from what arrived."""
        sock = self.sock
        if whole is not self._whole_for:
            self._whole_for, self._whole_head = whole, self._scratch[: whole.head_size]
        head = self._whole_head
        spill = np.empty(whole.layout.shape, whole.layout.native)
        got = sock.recvmsg_into([head, spill.data])[0]
        if got < _REPLY_BYTES:
            got = _recv_at_least(sock, head, _REPLY_BYTES, got)
        kind, flags, _, block_size, payload_size, index, time_s, lines, row0, rows = (
            REPLY.unpack_from(head)
        )
        spilled = max(got - whole.head_size, 0)  # pixel bytes read into spill
        got -= spilled
        end = _REPLY_BYTES + block_size
        if kind != FRAME or end != got or payload_size != whole.payload_bytes:
            # not the reply expected: go on from one buffer of what was read
            read = self._scratch
            if spilled:
                joined = bytearray(max(len(read), got + spilled))
                joined[:got] = head[:got]
                joined[got : got + spilled] = spill.data.cast("B")[:spilled]
                read, got = memoryview(joined), got + spilled
            return self._read_on(read, got, into=None, streaming=False)
        # the reply expected (its sizes say so): all its pixels go into spill, and the frame is
        # made at once if it repeats the remembered block
        if spilled < payload_size:
            _recv_into(sock, spill.data.cast("B")[spilled:])
        block = bytes(head[_REPLY_BYTES:end])
        frame = self.decoder.repeat(block, index, time_s, lines, row0, rows, spill)
        if frame is not None:
            if _BIG_ENDIAN:  # the wire is little-endian
                spill.byteswap(inplace=True)
            return frame, bool(flags & 1), spill
        # a new block of the remembered one's size: its pixels are all in spill
        layout = self._checked_layout(block, payload_size, index, time_s, lines, row0, rows)
        buffer, target = _frame_arrays(layout, None)
        if target.size:
            target.data.cast("B")[:] = spill.data.cast("B")
            if _BIG_ENDIAN:
                target.byteswap(inplace=True)
        return self.decoder.build(buffer, layout), bool(flags & 1), buffer

    def _read_on(
        self, head: memoryview, got: int, *, into: np.ndarray | None, streaming: bool
    ) -> FrameReply | None:
        """Read the rest of a reply whose first ``got`` bytes (at least the fixed part) are in
        ``head``: the block into ``head``, then the pixels into the frame's array."""
        sock = self.sock
        kind, flags, _, block_size, payload_size, index, time_s, lines, row0, rows = (
            REPLY.unpack_from(head)
        )
        end = _REPLY_BYTES + block_size
        if end > len(self._scratch):
            raise DataError(f"frame reply block of {block_size} bytes")
        if got < end:  # a large block: read exactly the rest of it
            got = _recv_at_least(sock, head[:end], end, got)
        early = got - end  # pixel bytes read into head
        if kind != FRAME:
            if payload_size or early:
                raise DataError(f"a frame reply of kind {kind} carries pixels")
            if kind == NO_FRAME:
                return None
            if kind != ERROR:
                raise DataError(f"frame reply of unknown kind {kind}")
            raise ReportedError(_unpack_error(head[_REPLY_BYTES:end]))
        block = bytes(head[_REPLY_BYTES:end])
        layout = self._checked_layout(block, payload_size, index, time_s, lines, row0, rows)
        if early > payload_size:
            raise DataError(f"frame reply is longer than the {payload_size} bytes announced")
        buffer, target = _frame_arrays(layout, into)
        if target.size:
            # the pixels are read before the frame is built: a client that leaves them in the
            # socket stalls the server's send (slower in 5 of 6 interleaved A/B runs)
            view = target.data.cast("B")
            view[:early] = head[end:got]
            _recv_into(sock, view[early:])
            if _BIG_ENDIAN:  # the wire is little-endian
                target.byteswap(inplace=True)
        frame = self.decoder.build(buffer.copy() if streaming else buffer, layout)
        return frame, bool(flags & 1), buffer

    def _checked_layout(
        self,
        block: bytes,
        payload_size: int,
        index: int,
        time_s: float,
        lines: int,
        row0: int,
        rows: int,
    ) -> FrameLayout:
        layout = self.decoder.layout(block, index, time_s, lines, row0, rows)
        if layout.payload_bytes != payload_size:
            raise DataError(
                f"frame reply carries {payload_size} bytes; its header needs {layout.payload_bytes}"
            )
        return layout


def _frame_arrays(layout: FrameLayout, into: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The frame's array (``into``, a streamed scan's buffer, or a new one) and the part of it
    this reply's pixels fill."""
    if into is not None:
        return into, layout.target(into)
    buffer = layout.empty()
    return buffer, buffer if layout.rows == buffer.shape[0] else layout.target(buffer)


def _can_scatter(sock: socket.socket) -> bool:
    """Whether ``sock`` can read into several buffers in one call (TLS sockets cannot)."""
    return hasattr(sock, "recvmsg_into") and not isinstance(sock, ssl.SSLSocket)


def _recv_at_least(sock: socket.socket, buffer: memoryview, needed: int, have: int = 0) -> int:
    """Read into ``buffer`` from ``have`` until it holds at least ``needed`` bytes; return how
    many it holds (it may hold more: whatever arrived in the same reads)."""
    while have < needed:
        n = sock.recv_into(buffer[have:])
        if n == 0:
            raise ConnectionError("the server closed the connection in the middle of a reply")
        have += n
    return have


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock``."""
    _recv_at_least(sock, view, len(view))


def _unpack_error(block: memoryview) -> Any:
    """The error mapping an error reply carries (raise_remote_error checks its shape)."""
    try:
        return msgpack.unpackb(block, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise DataError(f"malformed error reply: {exc}") from None
