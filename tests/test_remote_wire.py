"""Property tests for the two wire formats: the remote frame header + bytes, and the Nanonis
message codec. Round trips are exact; arbitrary input gives a value or a DataError, never
another exception."""

from __future__ import annotations

import contextlib
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.errors import DataError
from drivers.frame import Frame, ScanRegion
from drivers.nanonis import wire as nanonis_wire
from drivers.remote.wire import DTYPES, decode_frame, encode_frame, frame_layout


@st.composite
def frames(draw: st.DrawFn) -> Frame:
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    rows, cols = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    lines = draw(st.integers(0, rows))
    raw = draw(
        st.binary(min_size=rows * cols * dtype.itemsize, max_size=rows * cols * dtype.itemsize)
    )
    data = np.frombuffer(raw, dtype=dtype).reshape(rows, cols).copy()
    if dtype.kind == "f":
        data[lines:] = np.nan
    return Frame(data, "ch", (1e-9, 1e-9), 1e-4, ScanRegion(), 3, 1.5, lines, "test")


@settings(max_examples=80, deadline=None)
@given(frames(), st.data())
def test_frames_round_trip_whole_and_in_pieces(frame: Frame, data: st.DataObject) -> None:
    header, payload = encode_frame(frame)
    whole = decode_frame(header, bytes(payload))
    np.testing.assert_array_equal(whole.done_data, frame.done_data)
    assert whole.header() == frame.header()
    # the same frame sent as two messages into a streamed buffer
    split = data.draw(st.integers(0, frame.lines_done))
    first = Frame(frame.data, "ch", (1e-9, 1e-9), 1e-4, ScanRegion(), 3, 1.5, split, "test")
    buffer = frame_layout(encode_frame(first)[0]).empty()
    h1, p1 = encode_frame(first)
    decode_frame(h1, bytes(p1), into=buffer)
    h2, p2 = encode_frame(frame, row0=split)
    again = decode_frame(h2, bytes(p2), into=buffer)
    np.testing.assert_array_equal(again.done_data, frame.done_data)


@settings(max_examples=40, deadline=None)
@given(frames())
def test_the_wire_header_carries_every_field_of_the_frame_header(frame: Frame) -> None:
    header, _ = encode_frame(frame)
    assert {k: header[k] for k in frame.header()} == frame.header()
    assert header["rows"] == frame.lines_done and header["row0"] == 0


_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_arbitrary_headers_and_payloads_give_a_frame_or_a_data_error(data: st.DataObject) -> None:
    header, payload = encode_frame(data.draw(frames()))
    header = dict(header)
    for key in data.draw(st.lists(st.sampled_from(sorted(header)), max_size=3)):
        header[key] = data.draw(_VALUES)
    if data.draw(st.booleans()):
        payload = memoryview(data.draw(st.binary(max_size=64)))
    with contextlib.suppress(DataError):
        decode_frame(header, bytes(payload), max_bytes=10_000)


@settings(max_examples=150, deadline=None)
@given(
    st.binary(max_size=80),
    st.lists(st.sampled_from(["f", "d", "i", "I", "h", "H", "+*i", "+*c"]), max_size=5),
)
def test_nanonis_arguments_decode_or_raise_data_error(body: bytes, types: list[str]) -> None:
    try:
        values = nanonis_wire.decode_args(body, types)
    except DataError:
        return
    assert len(values) == len(types)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("dwell_s", 10**400),
        ("timestamp_s", float("nan")),
        ("pixel_size_m", ["a", 1]),
        ("shape", [10**9, 10**9]),
        ("rows", -1),
        ("truth", {"tip_state": "wobbly"}),
    ],
)
def test_hostile_header_values_are_data_errors(key: str, value: Any) -> None:
    frame = Frame(
        np.zeros((2, 2), np.float32), "ch", (1e-9, 1e-9), 1e-4, ScanRegion(), 0, 0.0, 2, "t"
    )
    header, payload = encode_frame(frame)
    with pytest.raises(DataError):
        decode_frame({**header, key: value}, bytes(payload))


def test_a_reused_scan_region_is_checked_like_a_new_one() -> None:
    """Consecutive frames reuse the decoded scan region; a region that only compares equal
    (a bool where a float was) is still checked, and a changed region is decoded anew."""
    region = ScanRegion(1.0, 2.0, 3e-9, 4e-9, 1.0)
    frame = Frame(np.zeros((2, 2), np.uint16), "ch", (1e-9, 1e-9), 1e-4, region, 0, 0.0, 2, "t")
    header, payload = encode_frame(frame)
    assert decode_frame(header, bytes(payload)).scan_region == region
    assert decode_frame(header, bytes(payload)).scan_region == region
    sneaky = {**header, "scan_region": {**header["scan_region"], "rotation_deg": True}}
    with pytest.raises(DataError, match="rotation_deg"):
        decode_frame(sneaky, bytes(payload))
    moved = {**header, "scan_region": {**header["scan_region"], "center_x_m": 5.0}}
    assert decode_frame(moved, bytes(payload)).scan_region == region.moved_to(5.0, 2.0)


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=40, max_size=40))
def test_nanonis_headers_decode_or_raise_data_error(header: bytes) -> None:
    try:
        name, size, _ = nanonis_wire.unpack_header(header)
    except DataError:
        return
    assert name.isascii() and 0 <= size < 2**32


@pytest.mark.parametrize(
    ("values", "types"),
    [
        ([1.5, -2, 7], ["f", "i", "I"]),
        ([[3, 4, 5], 64, 32], ["+*i", "i", "i"]),
        (["hello", 2], ["+*c", "H"]),
    ],
)
def test_nanonis_arguments_round_trip(values: list[Any], types: list[str]) -> None:
    body = b""
    for value, kind in zip(values, types, strict=True):
        if kind == "+*i":
            body += struct.pack(f">i{len(value)}i", len(value), *value)
        elif kind == "+*c":
            body += struct.pack(">i", len(value)) + value.encode()
        else:
            body += struct.pack(">" + kind, value)
    assert nanonis_wire.decode_args(body, types) == values
    with pytest.raises(DataError):
        nanonis_wire.decode_args(body + b"\0", types)
