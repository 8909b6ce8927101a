"""Frame-channel replies (drivers.remote.channel): the fields that stay the same from frame to
frame are packed, sent and checked in full only when they change; whatever arrives gives the
same frame as a full decode, or a DataError."""

from __future__ import annotations

import contextlib
import dataclasses
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.commands import MoveTo, SetDwell
from drivers.errors import (
    CommandRejected,
    CommunicationError,
    DataError,
    InstrumentError,
    NotConnected,
)
from drivers.frame import Frame, ScanRegion
from drivers.remote import InstrumentServer, RemoteInstrument, channel, reader
from drivers.remote.channel import ERROR, FRAME, NO_FRAME, REPLY, ReplyDecoder, ReplyEncoder
from drivers.remote.wire import decode_frame, encode_frame
from drivers.sim import SimulatedSTM
from tests.remote_support import CuttingRelay

TOKEN = "test-token-0123"


def _frame(index: int = 0, **changes: Any) -> Frame:
    frame = Frame(
        np.arange(12, dtype=np.uint16).reshape(3, 4),
        "topography",
        (1e-10, 2e-10),
        1e-4,
        ScanRegion(1e-9, 2e-9, 8e-9, 8e-9, 0.0),
        index,
        0.5 * index,
        3,
        "sim:stm",
        {"bias_V": 0.1},
    )
    return dataclasses.replace(frame, **changes)


def _send(encoder: ReplyEncoder, decoder: ReplyDecoder, frame: Frame, row0: int = 0) -> Frame:
    """One reply through the encoder and the decoder, as the channel's two ends do."""
    head, payload = encoder.frame(frame, row0)
    pixels = np.asarray(payload).tobytes()  # (an array or a byte view: what sendmsg takes)
    fields = REPLY.unpack_from(head)
    assert fields[0] == FRAME and fields[4] == len(pixels)
    layout = decoder.layout(bytes(head[REPLY.size :]), *fields[5:])
    buffer = layout.empty()
    layout.target(buffer)[...] = np.frombuffer(pixels, dtype=layout.dtype).reshape(
        layout.rows, layout.shape[1]
    )
    return decoder.build(buffer, layout)


def _block(head: bytes) -> bytes:
    return head[REPLY.size : REPLY.size + REPLY.unpack_from(head)[3]]


def test_frames_that_repeat_their_fields_arrive_as_a_full_decode_gives_them() -> None:
    encoder, decoder = ReplyEncoder(), ReplyDecoder()
    frames = [
        _frame(0),
        _frame(1),  # only the per-frame fields change
        _frame(2, dwell_s=2e-4),
        _frame(3, scan_region=ScanRegion(5e-9, 2e-9, 8e-9, 8e-9, 0.0)),
        _frame(4, metadata={"bias_V": 0.2}),
        _frame(5, metadata={"bias_V": 1}),
        _frame(6, metadata={"bias_V": 1.0}),  # equal to 1, but a float: sent as one
        _frame(7, metadata={"bias_V": True}),
        _frame(8, channel="current"),
        _frame(9, data=np.ones((3, 4), np.float32)),
        _frame(10, data=np.ones((3, 4), np.float32)),
    ]
    for frame in frames:
        expected = decode_frame(*encode_frame(frame))
        got = _send(encoder, decoder, frame)
        assert got.header() == expected.header()
        assert [type(v) for v in got.metadata.values()] == [
            type(v) for v in expected.metadata.values()
        ]
        assert got.scan_region == expected.scan_region
        np.testing.assert_array_equal(got.data, frame.data)
        assert vars(got).keys() == vars(expected).keys()


def test_the_block_is_packed_again_only_when_a_field_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    packed: list[int] = []
    fixed_fields = channel._fixed_fields

    def counting(frame: Frame, dtype_name: str) -> dict[str, Any]:
        packed.append(frame.frame_index)
        return fixed_fields(frame, dtype_name)

    monkeypatch.setattr(channel, "_fixed_fields", counting)
    encoder = ReplyEncoder()
    frames = [_frame(0), _frame(1), _frame(2, dwell_s=3e-4), _frame(3, dwell_s=3e-4)]
    frames += [_frame(4, metadata={"bias_V": 0.2}), _frame(5, metadata={"bias_V": 0.2})]
    heads = [encoder.frame(f)[0] for f in frames]
    assert packed == [0, 2, 4]
    assert _block(heads[0]) == _block(heads[1]) != _block(heads[2]) == _block(heads[3])
    fixed = [REPLY.unpack_from(h) for h in heads]
    assert [f[5] for f in fixed] == [0, 1, 2, 3, 4, 5]  # frame_index
    assert [f[6] for f in fixed] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]  # timestamp_s


def test_frames_sharing_a_block_do_not_share_their_metadata() -> None:
    encoder, decoder = ReplyEncoder(), ReplyDecoder()
    first = _send(encoder, decoder, _frame(0))
    second = _send(encoder, decoder, _frame(1))
    first.metadata["bias_V"] = 99.0  # type: ignore[index]
    assert second.metadata == {"bias_V": 0.1}
    third = _send(encoder, decoder, _frame(2))
    assert third.metadata == {"bias_V": 0.1}
    nested = [_send(encoder, decoder, _frame(i, metadata={"xy": [1, 2]})) for i in (3, 4)]
    nested[0].metadata["xy"].append(3)
    assert nested[1].metadata == {"xy": [1, 2]}


def test_frames_built_from_a_remembered_block_are_whole_frames() -> None:
    """The decoder fills a Frame's fields itself for a block it has checked; if Frame's fields
    change, this fails (and the decoder falls back to Frame's own constructor)."""
    assert channel._TRUSTED_CONSTRUCTION
    encoder, decoder = ReplyEncoder(), ReplyDecoder()
    _send(encoder, decoder, _frame(0))
    got = _send(encoder, decoder, _frame(1))
    want = _frame(1)
    assert vars(got).keys() == vars(want).keys()
    assert got.header() == want.header() and got.truth is None and got.complete
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.frame_index = 5  # type: ignore[misc]


def test_partial_frames_share_the_block_and_fill_one_buffer() -> None:
    encoder, decoder = ReplyEncoder(), ReplyDecoder()
    full = _frame(0)
    buffer: np.ndarray | None = None
    for done, row0 in ((1, 0), (3, 1)):
        part = dataclasses.replace(full, lines_done=done)
        head, payload = encoder.frame(part, row0)
        fields = REPLY.unpack_from(head)
        layout = decoder.layout(bytes(_block(head)), *fields[5:])
        if buffer is None:
            buffer = layout.empty()
        layout.target(buffer)[...] = np.frombuffer(payload, dtype=layout.dtype).reshape(
            layout.rows, 4
        )
        got = decoder.build(buffer.copy(), layout)
        assert got.lines_done == done
    assert buffer is not None
    np.testing.assert_array_equal(buffer, full.data)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.booleans(),
)
def test_any_per_frame_fields_give_a_checked_layout_or_a_data_error(
    index: int, time_s: float, lines_done: int, row0: int, rows: int, remembered: bool
) -> None:
    encoder, decoder = ReplyEncoder(), ReplyDecoder()
    head, _ = encoder.frame(_frame(0))
    if remembered:
        _send(encoder, decoder, _frame(0))  # the decoder has checked this block before
    try:
        layout = decoder.layout(bytes(_block(head)), index, time_s, lines_done, row0, rows)
    except DataError:
        return
    assert 0 <= index <= 2**62 and np.isfinite(time_s)
    assert layout.lines_done == lines_done <= 3 and layout.row0 == row0
    assert layout.payload_bytes == rows * 4 * 2


@settings(max_examples=200, deadline=None)
@given(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(0, 4),
    st.integers(0, 4),
    st.integers(0, 4),
    st.booleans(),
)
def test_a_repeated_block_in_one_call_gives_what_layout_and_build_give(
    index: int, time_s: float, lines_done: int, row0: int, rows: int, same_block: bool
) -> None:
    """``repeat`` (the one-read path) makes a frame only where layout() and build() would make
    the same whole frame; anything else is left to them."""
    encoder, decoder = ReplyEncoder(), ReplyDecoder()
    _send(encoder, decoder, _frame(0))
    block = _block(encoder.frame(_frame(1) if same_block else _frame(1, dwell_s=3e-4))[0])
    data = np.arange(12, dtype=np.uint16).reshape(3, 4)
    fast = decoder.repeat(block, index, time_s, lines_done, row0, rows, data)
    try:
        layout = decoder.layout(block, index, time_s, lines_done, row0, rows)
        full: Frame | None = decoder.build(data, layout) if rows == 3 else None
    except DataError:
        full = None
    if fast is None:
        assert full is None or not same_block  # only a new block or a part is left to them
        return
    assert full is not None and fast.data is data
    assert fast.header() == full.header() and fast.metadata == full.metadata
    assert vars(fast).keys() == vars(full).keys()


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300), st.data())
def test_any_block_gives_a_frame_or_a_data_error(block: bytes, data: st.DataObject) -> None:
    encoder, decoder = ReplyEncoder(), ReplyDecoder(max_bytes=10_000)
    if data.draw(st.booleans()):
        good = _block(encoder.frame(_frame(0))[0])
        cut = data.draw(st.integers(0, len(good)))
        block = good[:cut] + block[: data.draw(st.integers(0, 8))] + good[cut + 1 :]
    with contextlib.suppress(DataError):
        layout = decoder.layout(block, 1, 0.5, 3, 0, 3)
        decoder.build(layout.empty(), layout)


def test_replies_without_a_frame_and_error_replies() -> None:
    encoder = ReplyEncoder()
    none = REPLY.unpack_from(encoder.no_frame())
    assert none[0] == NO_FRAME and none[3] == none[4] == 0
    error = encoder.error({"type": "CommandRejected", "message": "no"})
    assert (
        REPLY.unpack_from(error)[0] == ERROR
        and len(error) == REPLY.size + REPLY.unpack_from(error)[3]
    )


def test_a_frame_that_cannot_travel_is_a_data_error() -> None:
    encoder = ReplyEncoder()
    with pytest.raises(DataError, match="metadata"):
        encoder.frame(_frame(0, metadata={"when": object()}))
    with pytest.raises(DataError, match="cannot travel"):
        encoder.frame(_frame(2**63))
    assert encoder.frame(_frame(1))[1].nbytes == 24  # the encoder goes on


# -- through a server ------------------------------------------------------------------------


class TruthlessSTM(SimulatedSTM):
    """Frames without ground truth, as a real instrument sends them (the block is remembered);
    ``notes`` go into the metadata when set."""

    notes: Any = None

    def acquire(self) -> Frame:
        frame = dataclasses.replace(super().acquire(), truth=None)
        if self.notes is not None:
            frame = dataclasses.replace(frame, metadata={**frame.metadata, "notes": self.notes})
        return frame

    def stream(self) -> Iterator[Frame]:
        for part in super().stream():
            yield dataclasses.replace(part, truth=None)


def test_remote_frames_follow_commands_that_change_the_remembered_fields() -> None:
    local = TruthlessSTM(seed=7, shape_px=(32, 32), dwell_s=1e-4)
    served = TruthlessSTM(seed=7, shape_px=(32, 32), dwell_s=1e-4)
    with (
        InstrumentServer(served, token=TOKEN) as server,
        RemoteInstrument("127.0.0.1", server.port, token=TOKEN) as remote,
    ):
        steps = [None, None, SetDwell(2e-4), None, MoveTo(3e-9, -2e-9), None, None]
        for command in steps:
            if command is not None:
                local.execute(command)
                remote.execute(command)
            a, b = local.acquire(), remote.acquire()
            assert a.header() == b.header()
            np.testing.assert_array_equal(a.data, b.data)
        assert b.dwell_s == 2e-4 and b.scan_region.center_x_m == 3e-9
        served.notes = local.notes = [1, "two"]
        a, b = local.acquire(), remote.acquire()
        assert a.header() == b.header() and b.metadata["notes"] == [1, "two"]


def test_streamed_parts_with_a_remembered_block_equal_local_ones() -> None:
    local = TruthlessSTM(seed=9, shape_px=(32, 32), lines_per_chunk=8, dwell_s=1e-4)
    served = TruthlessSTM(seed=9, shape_px=(32, 32), lines_per_chunk=8, dwell_s=1e-4)
    with (
        InstrumentServer(served, token=TOKEN) as server,
        RemoteInstrument("127.0.0.1", server.port, token=TOKEN) as remote,
    ):
        for _ in range(2):
            pairs = list(zip(local.stream(), remote.stream(), strict=True))
            assert len(pairs) == 4
            for a, b in pairs:
                assert a.header() == b.header()
                np.testing.assert_array_equal(a.data, b.data)  # NaN where not yet scanned
            assert pairs[0][1].data is not pairs[1][1].data  # each part holds its own copy


class ScriptedSTM(SimulatedSTM):
    """``acquire`` hands out ``script``'s frames in turn, raising the exceptions in it."""

    def __init__(self, script: list[Frame | Exception], **options: Any) -> None:
        super().__init__(**options)
        self.script = list(script)

    def acquire(self) -> Frame:
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        return item


def _reader(remote: RemoteInstrument) -> reader.FrameReader:
    frame_reader = remote._reader
    assert frame_reader is not None  # opened by the first frame call
    return frame_reader


def _channel_socket(remote: RemoteInstrument) -> Any:
    return _reader(remote).sock


@pytest.mark.parametrize("scatter", [True, False], ids=["one-read", "two-reads"])
def test_replies_that_differ_from_the_expected_one_arrive_whole(
    scatter: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client reads a reply that repeats the remembered block with one call, into an array
    made before it arrives; whatever else comes instead (a new block of the same size, another
    pixel type or shape of the same byte count, a partial frame, a long error, no frame) gives
    the frame a full decode gives, or the error, and the channel goes on. Without scattered
    reads (TLS) the same frames arrive."""
    monkeypatch.setattr(reader, "_can_scatter", lambda sock: scatter)
    repeated = 0
    repeat = ReplyDecoder.repeat

    def counting(self: ReplyDecoder, *args: Any) -> Frame | None:
        nonlocal repeated
        frame = repeat(self, *args)
        repeated += frame is not None
        return frame

    monkeypatch.setattr(ReplyDecoder, "repeat", counting)
    script: list[Frame | Exception] = [
        _frame(0),
        _frame(1),  # expected: read at once
        _frame(2),
        _frame(3, dwell_s=2e-4),  # a new block of the same size, same layout
        _frame(4, dwell_s=2e-4),
        _frame(5, dwell_s=2e-4, data=np.arange(6, dtype=np.uint32).reshape(3, 2) << 20),
        _frame(6, data=np.arange(6, dtype=np.float32).reshape(3, 2)),  # a longer block
        _frame(7, lines_done=2),  # part of a frame: fewer pixels
        InstrumentError("the controller says: " + "x" * 3000),  # an error longer than a head
        _frame(8),
        _frame(9),
    ]
    served = ScriptedSTM(script, seed=1, shape_px=(16, 16))
    frames = [f for f in script if isinstance(f, Frame)]
    with (
        InstrumentServer(served, token=TOKEN) as server,
        RemoteInstrument("127.0.0.1", server.port, token=TOKEN) as remote,
    ):
        channel_socket: Any = None
        for frame in frames:
            if frame.frame_index == 8:
                with pytest.raises(InstrumentError, match=r"x{3000}"):
                    remote.acquire()
                assert remote.latest_frame(after_index=7) is None  # a reply without a frame
            got = remote.acquire()
            channel_socket = channel_socket or _channel_socket(remote)
            expected = decode_frame(*encode_frame(frame))
            assert got.header() == expected.header()
            assert got.metadata == expected.metadata
            np.testing.assert_array_equal(got.done_data, frame.done_data)
            assert got.data.dtype == frame.data.dtype
        assert _channel_socket(remote) is channel_socket  # one channel throughout
    assert repeated == (5 if scatter else 0)  # frames 1, 2, 4, 8 (7's block) and 9


@pytest.mark.parametrize(
    "cut_at", [20, 3000, 12000], ids=["in-head", "early-pixels", "late-pixels"]
)
def test_a_drop_inside_an_expected_reply_raises_and_the_next_call_reconnects(cut_at: int) -> None:
    """A reply read at once into a new array (the remembered block) that breaks off is a
    CommunicationError; the next acquire reconnects and no frame arrives twice or broken."""
    local = TruthlessSTM(seed=4, shape_px=(64, 64), dwell_s=1e-4)
    served = TruthlessSTM(seed=4, shape_px=(64, 64), dwell_s=1e-4)
    with InstrumentServer(served, token=TOKEN) as server:
        relay = CuttingRelay(server.port)
        remote = RemoteInstrument("127.0.0.1", relay.port, token=TOKEN, sleep=lambda s: None)
        try:
            got = [remote.acquire() for _ in range(3)]
            assert _reader(remote).decoder.whole is not None  # the next reply is read at once
            relay.cut_after(cut_at)  # a 64² float32 reply is some 16.6 kB
            with pytest.raises(CommunicationError, match="lost during acquire"):
                remote.acquire()
            got.append(remote.acquire())  # reconnects
            assert remote.reconnects == 1
        finally:
            remote.close()
            relay.close()
    want = [local.acquire() for _ in range(5)]
    del want[3]  # scanned by the server, lost on the way: never delivered
    assert [f.frame_index for f in got] == [f.frame_index for f in want]
    for a, b in zip(want, got, strict=True):
        assert a.header() == b.header()
        np.testing.assert_array_equal(a.data, b.data)


def test_bad_frame_channel_calls_get_error_replies_and_the_channel_goes_on() -> None:
    served = TruthlessSTM(seed=7, shape_px=(32, 32), dwell_s=1e-4)
    with (
        InstrumentServer(served, token=TOKEN) as server,
        RemoteInstrument("127.0.0.1", server.port, token=TOKEN) as remote,
    ):
        assert remote.acquire().complete
        channel_socket = _channel_socket(remote)
        with pytest.raises(CommandRejected, match="does not take 0 arguments"):
            remote._frame_call("stream_next")
        served.notes = object()  # metadata msgpack cannot carry
        with pytest.raises(DataError, match="metadata"):
            remote.acquire()
        served.notes = None
        assert remote.acquire().complete
        assert _channel_socket(remote) is channel_socket  # the same channel served all of them


def test_a_server_speaking_another_protocol_is_refused_clearly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with InstrumentServer(SimulatedSTM(seed=1, shape_px=(16, 16)), token=TOKEN) as server:
        monkeypatch.setattr("drivers.remote.client.PROTOCOL_VERSION", 99)
        with pytest.raises(NotConnected, match="speaks protocol 2; this client speaks 99"):
            RemoteInstrument("127.0.0.1", server.port, token=TOKEN)


def test_the_reply_layout_is_the_documented_one() -> None:
    """ADR 0006 documents the fixed part; a change to it is a protocol change."""
    assert REPLY.format == "<BBHIIqdIII" and REPLY.size == 40
    head, _ = ReplyEncoder().frame(_frame(7), 0, True)
    kind, flags, _, block_size, payload_size, index, time_s, done, row0, rows = struct.unpack_from(
        "<BBHIIqdIII", head
    )
    assert (kind, flags, payload_size, index, time_s, done, row0, rows) == (
        FRAME,
        1,
        24,
        7,
        3.5,
        3,
        0,
        3,
    )
    assert len(head) == 40 + block_size


def test_the_constructor_fallback_builds_the_same_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the decoder may not fill a Frame itself it calls Frame's constructor, same frames."""
    monkeypatch.setattr(channel, "_TRUSTED_CONSTRUCTION", False)
    encoder, decoder = ReplyEncoder(), ReplyDecoder()
    _send(encoder, decoder, _frame(0))
    got = _send(encoder, decoder, _frame(1))
    want = _frame(1)
    assert got.header() == want.header() and got.metadata == want.metadata
    np.testing.assert_array_equal(got.data, want.data)
