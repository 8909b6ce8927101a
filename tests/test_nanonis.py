"""The Nanonis driver and the protocol emulator: the official ``nanonis_spm`` client and our
driver against the emulator, equal to ``sim:stm``; bad input on the port; dropped connections."""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from nanonis_spm import Nanonis

from drivers.commands import Approach, Retract, Scan, SetBias, SetDwell, TipDip, TipPulse
from drivers.errors import CommandRejected, CommunicationError, ConfigError, LimitViolation
from drivers.frame import ScanRegion
from drivers.nanonis import wire
from drivers.nanonis.driver import NanonisSTM
from drivers.nanonis.emulator import MAX_BODY_BYTES, NanonisEmulator
from drivers.protocol import Instrument
from drivers.registry import open_instrument
from drivers.sim import SimulatedSTM
from tests.contract.instrument import InstrumentContract
from tests.remote_support import CuttingRelay, wait_until

SHAPE = (32, 32)
# float32-exact values: the Nanonis protocol carries float32, so the sim:stm reference gets the
# very same numbers
PULSE = TipPulse(4.0, 0.125, source="test")
DIP = TipDip(2.0**-30, 0.25, source="test")


@pytest.fixture
def emulator() -> Iterator[NanonisEmulator]:
    emu = NanonisEmulator(seed=7, shape_px=SHAPE, line_delay_s=0.002, message_timeout_s=0.5)
    with emu:
        yield emu


@pytest.fixture
def official(emulator: NanonisEmulator) -> Iterator[Nanonis]:
    sock = socket.create_connection(("127.0.0.1", emulator.port), timeout=10)
    client = Nanonis(sock)
    yield client
    sock.close()


class TestNanonisContract(InstrumentContract):
    """The Nanonis driver (over the emulator) passes the same contract as sim:stm."""

    @pytest.fixture(autouse=True)
    def _emulators(self) -> Iterator[None]:
        self.emulators: list[NanonisEmulator] = []
        yield
        for emu in self.emulators:
            emu.close()

    def make_instrument(self) -> Instrument:
        emu = NanonisEmulator(seed=3, shape_px=SHAPE, line_delay_s=0.003).start()
        self.emulators.append(emu)
        return open_instrument(emu.address)


# -- the official client ------------------------------------------------------------------------


def test_official_client_scans_and_grabs_what_sim_stm_scans(official: Nanonis) -> None:
    reference = SimulatedSTM(seed=7, shape_px=SHAPE)
    error, _, (pixels_lines) = official.Scan_BufferGet()
    assert error == "" and pixels_lines[2:] == [32, 32]
    official.Scan_Action(0, 0)
    error, _, (timed_out, _size, _path) = official.Scan_WaitEndOfScan(10_000)
    assert error == "" and timed_out == 0
    error, _, (_n, name, rows, cols, data, _direction) = official.Scan_FrameDataGrab(0, 1)
    assert (error, name, rows, cols) == ("", "Z (m)", 32, 32)
    np.testing.assert_array_equal(data.astype(np.float32), reference.acquire().data)


def test_official_client_pulse_and_tip_shaper_change_the_tip_as_sim_stm(
    official: Nanonis, emulator: NanonisEmulator
) -> None:
    reference = SimulatedSTM(seed=7, shape_px=SHAPE)
    states = []
    for _ in range(3):
        error, *_ = official.Bias_Pulse(1, PULSE.duration_s, PULSE.bias_V, 1, 2)
        assert error == ""
        reference.execute(PULSE)
        error, *_ = official.TipShaper_PropsSet(
            0.05, 1, DIP.bias_V, -DIP.depth_m, 0.1, 0.5, 0.05, 2e-9, 0.1, 0.05, 1
        )
        assert error == ""
        assert official.TipShaper_Start(1, 5000)[0] == ""
        reference.execute(DIP)
        states.append((emulator.stm.tip_state, reference.tip_state))
        assert emulator.stm.simulator.tip_config == reference.simulator.tip_config
    assert all(a == b for a, b in states)
    official.Scan_Action(0, 0)
    official.Scan_WaitEndOfScan(10_000)
    grabbed = official.Scan_FrameDataGrab(0, 1)[2][4].astype(np.float32)
    np.testing.assert_array_equal(grabbed, reference.acquire().data)


def test_official_client_sees_limits_as_errors_and_nothing_changes(
    official: Nanonis, emulator: NanonisEmulator
) -> None:
    before = emulator.stm.simulator.tip_config
    error, *_ = official.Bias_Pulse(1, 0.1, 25.0, 1, 2)  # beyond the instrument's 10 V
    assert "bias_V" in error
    assert emulator.stm.simulator.tip_config == before
    error, *_ = official.Scan_BufferSet([0], 64, 5)  # 5 lines: below the 16 minimum
    assert "shape_px" in error
    assert official.Scan_BufferGet()[2][2:] == [32, 32]


# -- our driver -----------------------------------------------------------------------------------


def test_driver_frames_and_conditioning_equal_sim_stm(emulator: NanonisEmulator) -> None:
    reference = SimulatedSTM(seed=7, shape_px=SHAPE)
    driver = NanonisSTM("127.0.0.1", emulator.port)
    try:
        for command in (None, PULSE, DIP, PULSE, None):
            if command is not None:
                driver.execute(command)
                reference.execute(command)
            ours, theirs = driver.acquire(), reference.acquire()
            np.testing.assert_array_equal(ours.data, theirs.data)
            assert ours.frame_index == theirs.frame_index
            assert emulator.stm.tip_state == reference.tip_state
        assert emulator.executed.count("Bias.Pulse") == 2
        assert emulator.executed.count("TipShaper.Start") == 1
    finally:
        driver.close()


def test_driver_streams_partial_frames_line_by_line(emulator: NanonisEmulator) -> None:
    with NanonisSTM("127.0.0.1", emulator.port) as driver:
        parts = list(driver.stream())
    assert len(parts) >= 3 and parts[-1].complete
    assert [p.lines_done for p in parts] == sorted(p.lines_done for p in parts)
    for part in parts[:-1]:
        assert np.isnan(part.data[part.lines_done :]).all()
        np.testing.assert_array_equal(part.done_data, parts[-1].data[: part.lines_done])


def test_driver_scan_settings_bias_and_z_controller(emulator: NanonisEmulator) -> None:
    with NanonisSTM("127.0.0.1", emulator.port) as driver:
        region = ScanRegion(10e-9, -5e-9, 8e-9, 8e-9)
        driver.execute(Scan(region=region, shape_px=(16, 48), dwell_s=2e-4))
        state = driver.state()
        assert state.shape_px == (16, 48)
        assert state.dwell_s == pytest.approx(2e-4, rel=1e-6)
        assert state.scan_region.center_x_m == pytest.approx(10e-9, rel=1e-6)
        assert emulator.stm.state().shape_px == (16, 48)
        frame = driver.acquire()
        assert frame.shape == (16, 48) and frame.complete
        with pytest.raises(CommandRejected, match="multiples of 16"):
            driver.execute(Scan(shape_px=(16, 40)))
        driver.execute(SetBias(-1.5))
        assert driver.state().extra["bias_V"] == -1.5
        with pytest.raises(CommandRejected, match=r"refused Bias\.Set"):
            driver.execute(SetBias(0.0))  # the simulated controller cannot tunnel at 0 V
        driver.execute(Retract())
        assert emulator.stm.simulator.tip_retracted and driver.state().extra["retracted"]
        with pytest.raises(CommandRejected, match="retracted"):
            driver.execute(PULSE)
        driver.execute(Approach())
        assert not emulator.stm.simulator.tip_retracted
        driver.execute(SetDwell(1e-4))
        assert driver.state().dwell_s == pytest.approx(1e-4, rel=1e-6)


def test_driver_envelope_rejects_before_anything_is_sent(emulator: NanonisEmulator) -> None:
    with NanonisSTM("127.0.0.1", emulator.port) as driver:
        sent = len(emulator.executed)
        for command in (TipPulse(12.0, 0.1), TipDip(9e-9), SetDwell(1.0), SetBias(-20.0)):
            with pytest.raises(LimitViolation):
                driver.execute(command)
        assert emulator.executed[sent:] == ["FolMe.XYPosGet"] * 4  # position for the check only


def test_driver_reconnects_after_a_drop_mid_reply(emulator: NanonisEmulator) -> None:
    relay = CuttingRelay(emulator.port)
    driver = NanonisSTM("127.0.0.1", relay.port, sleep=lambda s: None)
    try:
        first = driver.acquire()
        with pytest.raises(CommunicationError, match="failed"):
            for part in driver.stream():
                if part.lines_done >= 4:
                    relay.cut_after(1000)  # inside the next 4 KiB frame grab
        assert relay.cuts == 1
        second = driver.acquire()  # reconnects; stops the orphaned scan, scans anew
        assert driver.reconnects == 1 and second.complete
        assert second.frame_index == first.frame_index + 1  # the lost scan is not counted
    finally:
        driver.close()
        relay.close()


def test_nothing_listening_and_bad_uris() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CommunicationError, match="programming interface"):
        open_instrument(f"nanonis:127.0.0.1:{port}")
    with pytest.raises(ConfigError, match="HOST:PORT"):
        open_instrument("nanonis:localhost")


# -- bad input on the port ------------------------------------------------------------------------


def _exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        with contextlib.suppress(OSError):  # the server may have closed it already
            s.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:  # the server closed with our garbage unread
            pass
        return out


def _request(name: str, body: bytes = b"") -> bytes:
    return wire.pack_header(name, len(body)) + body


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff" * 100, "garbage instead of a message header"),
        (b"GET / HTTP/1.1\r\n\r\n" + b"\0" * 30, "garbage instead of a message header"),
        (_request("Bias.Set", struct.pack(">f", 1.0))[:-2], "truncated"),
        (_request("Bias.Set")[:20], "inside a message header"),
    ],
    ids=["binary", "http", "truncated-body", "truncated-header"],
)
def test_garbage_and_truncated_messages_execute_nothing(
    emulator: NanonisEmulator, official: Nanonis, data: bytes, reason: str
) -> None:
    _exchange(emulator.port, data)
    assert wait_until(lambda: any(reason in r for _, r in emulator.refused))
    assert emulator.executed == []
    assert official.Bias_Get()[2] == [0.5]  # others are served on


@pytest.mark.parametrize(
    ("name", "body", "message"),
    [
        ("Bias.Set", struct.pack(">d", 1.0) + b"\0" * 4, "the arguments (f) use 4"),
        ("Bias.Set", b"", "too short"),
        ("Scan.BufferSet", struct.pack(">ii", 1_000_000, 0), "does not fit"),
        ("Motor.Launch", b"", "unknown command 'Motor.Launch'"),
    ],
    ids=["long-body", "empty-body", "bad-count", "unknown"],
)
def test_wrong_body_sizes_and_unknown_commands_get_error_replies(
    emulator: NanonisEmulator, name: str, body: bytes, message: str
) -> None:
    with socket.create_connection(("127.0.0.1", emulator.port), timeout=10) as s:
        s.sendall(_request(name, body))
        reply = s.recv(65536)
        replied, size, _ = wire.unpack_header(reply[: wire.HEADER_SIZE])
        assert replied == name and size == len(reply) - wire.HEADER_SIZE
        assert message in reply.decode("latin-1")
        # the connection stays usable: framing was intact
        s.sendall(_request("Bias.Get"))
        ok = s.recv(65536)
        assert wire.unpack_header(ok[: wire.HEADER_SIZE])[0] == "Bias.Get"
        assert struct.unpack(">fIi", ok[wire.HEADER_SIZE :]) == (0.5, 0, 0)
    assert "Bias.Set" not in emulator.executed and emulator.stm.simulator.bias_V == 0.5


def test_oversized_body_is_refused_unread(emulator: NanonisEmulator, official: Nanonis) -> None:
    reply = _exchange(emulator.port, wire.pack_header("Bias.Set", MAX_BODY_BYTES + 1))
    assert b"exceeds" in reply
    assert official.Bias_Get()[0] == ""
    assert emulator.executed == ["Bias.Get"]


def test_a_stalled_client_is_dropped_and_others_are_served(
    emulator: NanonisEmulator, official: Nanonis
) -> None:
    with socket.create_connection(("127.0.0.1", emulator.port), timeout=10) as slow:
        slow.sendall(_request("Bias.Set", struct.pack(">f", 2.0))[:42])  # stalls mid-body
        assert official.Bias_Get()[2] == [0.5]
        assert slow.recv(100) == b""  # dropped after message_timeout_s
    assert any("stalled" in r for _, r in emulator.refused)
    assert emulator.stm.simulator.bias_V == 0.5


def test_wire_round_trips_and_rejects() -> None:
    header = wire.pack_header("Scan.FrameGet", 12)
    assert wire.unpack_header(header) == ("Scan.FrameGet", 12, True)
    with pytest.raises(Exception, match="no valid command name"):
        wire.unpack_header(b"\0" * 40)
    args: list[Any] = wire.decode_args(struct.pack(">i3iii", 3, 0, 1, 2, 64, 32), ["+*i", "i", "i"])
    assert args == [[0, 1, 2], 64, 32]
