"""The Nanonis TCP protocol's message format (as the official ``nanonis_spm`` client speaks it).

Every message is a 40-byte header and a body, all big-endian:

- header: command name (32 bytes, ASCII, NUL-padded), body size (uint32), send-response flag
  (uint16), 2 zero bytes;
- request body: the arguments in order;
- response body: the return values in order, then the error status (uint32, 0 = none), the
  error description size (int32) and the description (bytes).

Argument types use the client's notation: ``f`` float32, ``d`` float64, ``i`` int32,
``I`` uint32, ``h`` int16, ``H`` uint16, ``+*i`` an int32 count then that many int32,
``+*c`` an int32 byte count then a string; in responses also ``*i`` (an int32 array whose
count is the first value), ``*-c`` (a string whose size is the previous value) and ``2f`` (a
float32 matrix whose rows and columns are the two previous values).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from drivers.errors import DataError

HEADER = struct.Struct(">32sIHH")
HEADER_SIZE = HEADER.size  # 40
_SCALARS = {"f": 4, "d": 8, "i": 4, "I": 4, "h": 2, "H": 2}


def pack_header(command: str, body_size: int, *, send_response: bool = True) -> bytes:
    return HEADER.pack(command.encode("ascii"), body_size, int(send_response), 0)


def unpack_header(header: bytes) -> tuple[str, int, bool]:
    """``(command, body_size, send_response)``; :class:`DataError` for a malformed header."""
    if len(header) != HEADER_SIZE:
        raise DataError(f"Nanonis header must be {HEADER_SIZE} bytes, got {len(header)}")
    raw_name, body_size, send_response, _zero = HEADER.unpack(header)
    name_bytes = raw_name.rstrip(b"\0")
    if not name_bytes or b"\0" in name_bytes or not all(32 < b < 127 for b in name_bytes):
        raise DataError(f"Nanonis header has no valid command name: {raw_name!r}")
    return name_bytes.decode("ascii"), int(body_size), bool(send_response)


def decode_args(body: bytes, types: Sequence[str]) -> list[Any]:
    """The arguments of a request body; the body must be exactly as long as the types say."""
    values: list[Any] = []
    pos = 0
    for kind in types:
        if kind in _SCALARS:
            size = _SCALARS[kind]
            if pos + size > len(body):
                raise DataError(f"body of {len(body)} bytes is too short for argument {kind!r}")
            values.append(struct.unpack_from(">" + kind, body, pos)[0])
            pos += size
        elif kind in ("+*i", "+*c"):
            if pos + 4 > len(body):
                raise DataError(f"body of {len(body)} bytes is too short for a count ({kind!r})")
            (count,) = struct.unpack_from(">i", body, pos)
            pos += 4
            size = count * (4 if kind == "+*i" else 1)
            if count < 0 or pos + size > len(body):
                raise DataError(f"array count {count} does not fit a body of {len(body)} bytes")
            if kind == "+*i":
                values.append(list(struct.unpack_from(f">{count}i", body, pos)))
            else:
                try:
                    values.append(body[pos : pos + size].decode("utf-8"))
                except UnicodeDecodeError:
                    raise DataError("string argument is not UTF-8") from None
            pos += size
        else:
            raise DataError(f"unknown argument type {kind!r}")
    if pos != len(body):
        raise DataError(f"body is {len(body)} bytes; the arguments ({', '.join(types)}) use {pos}")
    return values


def encode_values(values: Sequence[Any], types: Sequence[str]) -> bytes:
    """A response body's return values (without the error part)."""
    out = bytearray()
    for value, kind in zip(values, types, strict=True):
        if kind in _SCALARS:
            out += struct.pack(">" + kind, value)
        elif kind == "*i":
            out += np.asarray(value, dtype=">i4").tobytes()
        elif kind in ("*-c", "+*c"):
            data = str(value).encode("utf-8")
            out += (struct.pack(">i", len(data)) if kind == "+*c" else b"") + data
        elif kind == "2f":
            out += np.ascontiguousarray(value, dtype=">f4").tobytes()
        else:
            raise DataError(f"unknown return type {kind!r}")
    return bytes(out)


def zero_values(types: Sequence[str]) -> list[Any]:
    """Placeholder return values for an error response (empty arrays and strings)."""
    out: list[Any] = []
    for kind in types:
        if kind in _SCALARS:
            out.append(0)
        elif kind == "2f":
            out.append(np.zeros((0, 0), dtype=np.float32))
        elif kind == "*i":
            out.append([])
        else:
            out.append("")
    return out


def error_part(message: str = "") -> bytes:
    """The error status, size and description that end every response body."""
    data = message.encode("utf-8")
    return struct.pack(">Ii", 1 if message else 0, len(data)) + data


def response(command: str, body: bytes) -> bytes:
    return pack_header(command, len(body), send_response=False) + body


def decode_frame_grab(body: bytes) -> tuple[str, np.ndarray, int, str]:
    """``Scan.FrameDataGrab``'s response body: channel name, ``(rows, cols) float32`` data,
    scan direction (1 up, 0 down) and the error description (empty when none), decoded with
    numpy in one step."""
    try:
        (name_size,) = struct.unpack_from(">i", body, 0)
        if not 0 <= name_size <= len(body):
            raise DataError(f"channel name size {name_size} does not fit the reply")
        name = body[4 : 4 + name_size].decode("utf-8", "replace")
        pos = 4 + name_size
        rows, cols = struct.unpack_from(">ii", body, pos)
        pos += 8
        if rows < 0 or cols < 0 or pos + rows * cols * 4 + 12 > len(body):
            raise DataError(f"a {rows} x {cols} frame does not fit a {len(body)}-byte reply")
        data = np.frombuffer(body, dtype=">f4", count=rows * cols, offset=pos)
        pos += rows * cols * 4
        direction, status, size = struct.unpack_from(">IIi", body, pos)
        pos += 12
        error = body[pos : pos + max(size, 0)].decode("utf-8", "replace") if status else ""
    except struct.error as exc:
        raise DataError(f"truncated Scan.FrameDataGrab reply: {exc}") from None
    return name, data.reshape(rows, cols).astype(np.float32), int(direction), error
