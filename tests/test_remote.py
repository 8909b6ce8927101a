"""The Pyro5 remote instrument: contract, authentication, control, the server-side envelope,
bad input on the port, and dropped connections (real daemons on free loopback ports)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import socket
import ssl
import struct
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import Pyro5.client
import Pyro5.errors
import Pyro5.serializers
import Pyro5.socketutil
import pytest

from drivers.commands import MoveTo, SetDwell, TipPulse
from drivers.errors import (
    CommandRejected,
    CommunicationError,
    ConfigError,
    DataError,
    LimitViolation,
    NotConnected,
)
from drivers.frame import Frame
from drivers.limits import Limits
from drivers.protocol import Instrument
from drivers.registry import open_instrument
from drivers.remote import InstrumentServer, RemoteInstrument
from drivers.remote.channel import FRAME, REPLY
from drivers.remote.daemon import FRAME_CHANNEL_MAGIC, TICKET_BYTES, _send_parts
from drivers.remote.server import SERVICE_NAME
from drivers.sim import SimulatedSTM
from tests.contract.instrument import InstrumentContract
from tests.remote_support import CuttingRelay, wait_until

TOKEN = "test-token-0123"
MSGPACK_ID = Pyro5.serializers.serializers["msgpack"].serializer_id


def small_stm(seed: int = 3, **options: Any) -> SimulatedSTM:
    return SimulatedSTM(
        seed=seed, shape_px=(32, 32), lines_per_chunk=8, **{"dwell_s": 1e-4, **options}
    )


class SpyInstrument:
    """Passes calls through to a simulated STM and counts them (what a request reached)."""

    def __init__(self, inner: SimulatedSTM) -> None:
        self.inner = inner
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name in ("state", "acquire", "stream", "execute", "close"):
            self.calls.append(name)
        return attr


@pytest.fixture
def served() -> Iterator[tuple[InstrumentServer, SpyInstrument]]:
    spy = SpyInstrument(small_stm())
    server = InstrumentServer(spy, token=TOKEN, handshake_timeout_s=0.5).start()
    try:
        yield server, spy
    finally:
        server.close()


class TestRemoteInstrumentContract(InstrumentContract):
    """The remote instrument passes the same contract as the local one."""

    @pytest.fixture(autouse=True)
    def _servers(self) -> Iterator[None]:
        self.servers: list[InstrumentServer] = []
        yield
        for server in self.servers:
            server.close()

    def make_instrument(self) -> Instrument:
        server = InstrumentServer(small_stm(), token=TOKEN).start()
        self.servers.append(server)
        return open_instrument(server.uri, token=TOKEN)


# -- frames ---------------------------------------------------------------------------------


def test_remote_frames_equal_local_frames_bit_for_bit() -> None:
    local = small_stm(seed=11)
    with InstrumentServer(small_stm(seed=11), token=TOKEN) as server:
        remote = RemoteInstrument("127.0.0.1", server.port, token=TOKEN)
        try:
            for a, b in ((local.acquire(), remote.acquire()), (local.acquire(), remote.acquire())):
                np.testing.assert_array_equal(a.data, b.data)
                assert a.header() == b.header()
                assert a.truth is not None and b.truth is not None
                assert b.truth.tip_state == a.truth.tip_state
                assert len(b.truth.defects) == len(a.truth.defects)
            # partial frames carry only their new lines but reassemble to the same pictures
            for a, b in zip(local.stream(), remote.stream(), strict=True):
                np.testing.assert_array_equal(a.data, b.data)
                assert a.lines_done == b.lines_done
        finally:
            remote.close()


def test_token_from_file_and_environment(
    served: tuple[InstrumentServer, SpyInstrument],
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, _ = served
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with RemoteInstrument("127.0.0.1", server.port, token_file=token_file) as r:
        assert r.state().shape_px == (32, 32)
    monkeypatch.setenv("SCOPEPILOT_TOKEN", TOKEN)
    with open_instrument(server.uri) as r:  # type: ignore[attr-defined]
        assert r.state().shape_px == (32, 32)
    monkeypatch.delenv("SCOPEPILOT_TOKEN")
    monkeypatch.setenv("SCOPEPILOT_TOKEN_FILE", str(token_file))
    with open_instrument(server.uri) as r:  # type: ignore[attr-defined]
        assert r.info().kind == "stm"
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        RemoteInstrument("127.0.0.1", server.port, token_file=empty)


@pytest.mark.parametrize("rest", ["127.0.0.1", "127.0.0.1:", "host:port", ":9090", "h:70000"])
def test_malformed_pyro_uri_is_a_config_error(rest: str) -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        open_instrument(f"pyro:{rest}")


def test_nothing_listening_is_a_communication_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CommunicationError, match="is `scopepilot serve` running"):
        RemoteInstrument("127.0.0.1", port, token=TOKEN, timeout_s=2)


# -- authentication ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "reason"), [(None, "missing token"), ("wrong-token-1", "wrong token")]
)
def test_missing_or_wrong_token_is_rejected_before_any_method_and_logged(
    served: tuple[InstrumentServer, SpyInstrument],
    caplog: pytest.LogCaptureFixture,
    token: str | None,
    reason: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SCOPEPILOT_TOKEN", raising=False)
    monkeypatch.delenv("SCOPEPILOT_TOKEN_FILE", raising=False)
    server, spy = served
    with (
        caplog.at_level(logging.WARNING, logger="drivers.remote.server"),
        pytest.raises(NotConnected, match="refused the connection"),
    ):
        RemoteInstrument("127.0.0.1", server.port, token=token)
    assert spy.calls == []
    assert [r for _, r in server.daemon.rejected] == [reason]
    assert any(reason in rec.getMessage() for rec in caplog.records)
    # the server still serves a client with the right token
    with RemoteInstrument("127.0.0.1", server.port, token=TOKEN) as good:
        assert good.acquire().complete


@pytest.mark.parametrize("serializer", ["marshal", "serpent", "json"])
def test_only_msgpack_messages_are_read(
    served: tuple[InstrumentServer, SpyInstrument], serializer: str
) -> None:
    server, spy = served
    proxy = Pyro5.client.Proxy(f"PYRO:{SERVICE_NAME}@127.0.0.1:{server.port}")
    proxy._pyroSerializer = serializer
    proxy._pyroHandshake = {"token": TOKEN, "client_id": "x", "role": "control"}
    with pytest.raises(Pyro5.errors.CommunicationError):
        proxy._pyroBind()
    proxy._pyroRelease()
    assert wait_until(lambda: len(server.daemon.rejected) == 1)
    assert "serializer id" in server.daemon.rejected[0][1]
    assert spy.calls == []


def test_non_loopback_bind_without_token_is_refused() -> None:
    with pytest.raises(ConfigError, match="without a token"):
        InstrumentServer(small_stm(), host="0.0.0.0")
    with pytest.raises(ConfigError, match="at least 8"):
        InstrumentServer(small_stm(), token="short")


def test_loopback_server_without_token_accepts_clients() -> None:
    with (
        InstrumentServer(small_stm()) as server,
        RemoteInstrument("127.0.0.1", server.port) as client,
    ):
        assert client.acquire().complete


# -- bad input on the port --------------------------------------------------------------------


def _raw(port: int, data: bytes, timeout_s: float = 5.0) -> bytes:
    """Send ``data`` on a raw socket and return everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(data)
        with contextlib.suppress(OSError):  # the server may have closed it already
            s.shutdown(socket.SHUT_WR)
        received = b""
        with contextlib.suppress(ConnectionResetError):  # closed with our bytes unread
            while chunk := s.recv(65536):
                received += chunk
        return received


def test_garbage_bytes_are_refused_and_others_are_still_served(
    served: tuple[InstrumentServer, SpyInstrument],
) -> None:
    server, spy = served
    _raw(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 4)
    assert wait_until(lambda: len(server.daemon.rejected) == 1)
    assert "not a Pyro message" in server.daemon.rejected[0][1]
    assert spy.calls == []
    with RemoteInstrument("127.0.0.1", server.port, token=TOKEN) as good:
        assert good.acquire().complete


def test_oversized_request_is_refused_unread(
    served: tuple[InstrumentServer, SpyInstrument],
) -> None:
    server, spy = served
    # a header announcing a 512 MiB msgpack body; the body never needs to arrive
    header = struct.pack(
        "!4sHBBHHII16sHH", b"PYRO", 502, 4, MSGPACK_ID, 0, 0, 512 << 20, 0, b"\0" * 16, 0, 0x4DC5
    )
    _raw(server.port, header)
    assert wait_until(lambda: len(server.daemon.rejected) == 1)
    assert "over the limit" in server.daemon.rejected[0][1]
    with RemoteInstrument("127.0.0.1", server.port, token=TOKEN) as good:
        huge = SetDwell(1e-4, reason="x" * (2 << 20))  # a 2 MiB command, over the 1 MiB limit
        with pytest.raises(CommunicationError, match="lost during execute"):
            good.execute(huge)
        assert "execute" not in spy.calls
        assert good.execute(SetDwell(2e-4)).ok  # reconnected
        assert good.reconnects == 1


def test_a_slow_client_neither_blocks_others_nor_stays_forever(
    served: tuple[InstrumentServer, SpyInstrument],
) -> None:
    server, _ = served
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as slow:
        slow.sendall(b"PYRO")  # starts a message, then stalls
        with RemoteInstrument("127.0.0.1", server.port, token=TOKEN) as good:
            assert good.acquire().complete
        while slow.recv(65536):  # the server gives up on it after handshake_timeout_s
            pass
    assert wait_until(lambda: len(server.daemon.rejected) == 1)


def test_unknown_method_and_malformed_commands_execute_nothing(
    served: tuple[InstrumentServer, SpyInstrument],
) -> None:
    server, spy = served
    proxy = Pyro5.client.Proxy(f"PYRO:{SERVICE_NAME}@127.0.0.1:{server.port}")
    proxy._pyroSerializer = "msgpack"
    proxy._pyroHandshake = {"token": TOKEN, "client_id": "raw", "role": "control"}
    try:
        assert "ok" in proxy.hello()
        with pytest.raises(AttributeError):
            proxy.format_disk()
        for bad in ({"type": "Detonate"}, {"type": "SetDwell"}, "SetDwell", [1, 2]):
            reply = proxy.execute(bad)
            assert reply["error"]["type"] in ("DataError", "CommandRejected")
        assert "execute" not in spy.calls
        reply = proxy.stream_next("no-such-stream")
        assert reply["error"]["type"] == "CommandRejected"
    finally:
        proxy._pyroRelease()


# -- control and the envelope ------------------------------------------------------------------


def test_one_controller_others_observe(served: tuple[InstrumentServer, SpyInstrument]) -> None:
    server, _ = served
    controller = RemoteInstrument("127.0.0.1", server.port, token=TOKEN)
    with pytest.raises(CommandRejected, match="controls the instrument"):
        RemoteInstrument("127.0.0.1", server.port, token=TOKEN)
    observer = RemoteInstrument("127.0.0.1", server.port, token=TOKEN, role="observe")
    try:
        assert observer.state().shape_px == (32, 32)
        assert observer.latest_frame() is None
        for action in (lambda: observer.execute(SetDwell(2e-4)), observer.acquire):
            with pytest.raises(CommandRejected, match="observing"):
                action()
        with pytest.raises(CommandRejected):
            list(observer.stream())
        frame = controller.acquire()
        seen = observer.latest_frame(timeout_s=5)
        assert seen is not None and seen.frame_index == frame.frame_index
        np.testing.assert_array_equal(seen.data, frame.data)
        assert observer.latest_frame(after_index=frame.frame_index) is None
        controller.close()  # control is free again
        with RemoteInstrument("127.0.0.1", server.port, token=TOKEN) as second:
            assert second.execute(SetDwell(2e-4)).ok
    finally:
        observer.close()
        controller.close()


def test_a_waiting_observer_is_woken_by_the_next_frame(
    served: tuple[InstrumentServer, SpyInstrument],
) -> None:
    server, _ = served
    with (
        RemoteInstrument("127.0.0.1", server.port, token=TOKEN) as controller,
        RemoteInstrument("127.0.0.1", server.port, token=TOKEN, role="observe") as observer,
    ):
        first = controller.acquire()
        seen: list[Any] = []
        waiter = threading.Thread(
            target=lambda: seen.append(observer.latest_frame(first.frame_index, timeout_s=10))
        )
        waiter.start()
        assert wait_until(lambda: server.service._latest_waiters == 1)
        second = controller.acquire()
        waiter.join(timeout=5)  # woken by the frame, not by its 10 s timeout
        assert not waiter.is_alive()
        assert seen[0] is not None and seen[0].frame_index == second.frame_index
        assert server.service._latest_waiters == 0


def test_the_server_envelope_cannot_be_bypassed() -> None:
    inner = small_stm()
    operator = Limits(dwell_s=(1e-5, 5e-4), pulse_bias_V=(-3.0, 3.0))
    with InstrumentServer(inner, token=TOKEN, operator_limits=operator) as server:
        client = RemoteInstrument("127.0.0.1", server.port, token=TOKEN)
        try:
            assert client.info().limits.dwell_s == (1e-5, 5e-4)  # the client sees what is allowed
            with pytest.raises(LimitViolation) as err:
                client.execute(SetDwell(1e-3))  # fine for the instrument, not for the operator
            assert err.value.value == pytest.approx(1e-3)
            assert err.value.limit == [1e-5, 5e-4]
            assert inner.state().dwell_s == 1e-4
        finally:
            client.close()
        # a hand-made client that skips every client-side check
        proxy = Pyro5.client.Proxy(f"PYRO:{SERVICE_NAME}@127.0.0.1:{server.port}")
        proxy._pyroSerializer = "msgpack"
        proxy._pyroHandshake = {"token": TOKEN, "client_id": "rogue", "role": "control"}
        try:
            assert "ok" in proxy.hello()
            before = inner.tip_state
            pulse = TipPulse(8.0, 0.5).to_json()  # within the instrument's +-10 V
            reply = proxy.execute(pulse)
            assert reply["error"]["type"] == "LimitViolation"
            assert reply["error"]["field"] == "bias_V"
            far = MoveTo(5e-6, 0.0).to_json()
            assert proxy.execute(far)["error"]["type"] == "LimitViolation"
            assert inner.tip_state is before and inner.simulator.time_s == 0.0
        finally:
            proxy._pyroRelease()


# -- dropped connections -------------------------------------------------------------------------


def test_drop_mid_frame_raises_then_reconnects_without_losing_or_repeating_frames() -> None:
    inner = SimulatedSTM(seed=5, shape_px=(64, 64), lines_per_chunk=8, dwell_s=1e-4)
    sleeps: list[float] = []
    with InstrumentServer(inner, token=TOKEN) as server:
        relay = CuttingRelay(server.port)
        client = RemoteInstrument("127.0.0.1", relay.port, token=TOKEN, sleep=sleeps.append)
        try:
            first = client.acquire()
            parts = []
            with pytest.raises(CommunicationError, match="lost during stream_next"):
                for part in client.stream():
                    parts.append(part)
                    if len(parts) == 1:
                        relay.cut_after(3000)  # inside the next 2 KiB line chunk or the one after
            assert relay.cuts == 1 and 1 <= len(parts) < 8
            assert not parts[-1].complete
            assert wait_until(lambda: not inner.state().scanning)  # the server ended that scan
            second = client.acquire()  # reconnects
            assert client.reconnects == 1
            assert relay.connections == 4  # (a Pyro5 connection and a frame channel) x 2
            # the lost scan was never completed, so no frame index is skipped or repeated
            assert second.frame_index == first.frame_index + 1
            assert second.complete
        finally:
            client.close()
            relay.close()


def test_reconnect_retries_with_backoff_then_gives_up() -> None:
    sleeps: list[float] = []
    server = InstrumentServer(small_stm(), token=TOKEN).start()
    port = server.port
    client = RemoteInstrument(
        "127.0.0.1",
        port,
        token=TOKEN,
        reconnect_timeout_s=1.0,
        backoff_s=0.1,
        max_backoff_s=0.4,
        sleep=sleeps.append,
        timeout_s=2,
    )
    try:
        server.close()
        with pytest.raises(CommunicationError):
            client.state()  # the connection is gone
        with pytest.raises(CommunicationError, match="unreachable after"):
            client.state()  # retries, backing off, then gives up
        assert sleeps[:4] == pytest.approx([0.1, 0.2, 0.4, 0.4])
        assert sum(sleeps[:-1]) < 1.0 <= sum(sleeps)
    finally:
        client.close()


def test_closed_client_does_not_reconnect(served: tuple[InstrumentServer, SpyInstrument]) -> None:
    server, _ = served
    client = RemoteInstrument("127.0.0.1", server.port, token=TOKEN)
    client.close()
    with pytest.raises(NotConnected):
        client.state()
    with pytest.raises(NotConnected):
        client.info()


def test_malformed_frame_message_is_a_data_error(
    served: tuple[InstrumentServer, SpyInstrument],
) -> None:
    server, _ = served
    with RemoteInstrument("127.0.0.1", server.port, token=TOKEN, max_frame_bytes=1000) as r:
        with pytest.raises(DataError, match="over the limit"):
            r.acquire()  # a 32 x 32 float32 frame is 4096 bytes
        with pytest.raises(DataError, match="over the limit"):
            list(r.stream())
    with RemoteInstrument("127.0.0.1", server.port, token=TOKEN) as other:
        assert other.acquire().complete


# -- the frame channel and TLS --------------------------------------------------------------------


def test_frame_channel_needs_a_fresh_ticket(served: tuple[InstrumentServer, SpyInstrument]) -> None:
    server, spy = served
    _raw(server.port, FRAME_CHANNEL_MAGIC + b"\x01" * TICKET_BYTES + b"\0\0\0\x10junk")
    assert wait_until(lambda: len(server.daemon.rejected) == 1)
    assert "unknown or expired ticket" in server.daemon.rejected[0][1]
    with RemoteInstrument("127.0.0.1", server.port, token=TOKEN) as client:
        ticket = client._call("frame_ticket")
        assert client.acquire().complete
        calls = len(spy.calls)
        request = msgpack.packb(["acquire", []])
        reuse = FRAME_CHANNEL_MAGIC + ticket + struct.pack("!I", len(request)) + request
        _raw(server.port, reuse)  # first use: served
        _raw(server.port, reuse)  # second use: refused
        assert wait_until(lambda: len(server.daemon.rejected) == 2)
        assert "unknown or expired ticket" in server.daemon.rejected[1][1]
        assert spy.calls[calls:].count("acquire") == 1  # the first use only


def _frame_replies(data: bytes) -> list[tuple[tuple[Any, ...], Any, bytes]]:
    """The ``(fixed part, block, pixels)`` replies in the bytes a frame channel sent."""
    replies = []
    while data:
        fixed = REPLY.unpack_from(data)
        end = REPLY.size + fixed[3]
        block = msgpack.unpackb(data[REPLY.size : end], raw=False)
        replies.append((fixed, block, data[end : end + fixed[4]]))
        data = data[end + fixed[4] :]
    return replies


def test_frame_channel_reads_requests_however_they_are_cut(
    served: tuple[InstrumentServer, SpyInstrument],
) -> None:
    """Two requests in one packet, and one request sent a byte at a time, are each served once;
    an oversized request closes the channel with nothing executed."""
    server, spy = served
    request = msgpack.packb(["acquire", []])
    framed = struct.pack("!I", len(request)) + request
    with RemoteInstrument("127.0.0.1", server.port, token=TOKEN) as client:
        for pieces in ([framed + framed], [framed[i : i + 1] for i in range(len(framed))]):
            calls = spy.calls.count("acquire")
            ticket = client._call("frame_ticket")
            with socket.create_connection(("127.0.0.1", server.port), timeout=5.0) as s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.sendall(FRAME_CHANNEL_MAGIC + ticket)
                for piece in pieces:
                    s.sendall(piece)
                s.shutdown(socket.SHUT_WR)
                received = b""
                while chunk := s.recv(65536):
                    received += chunk
            replies = _frame_replies(received)
            assert len(replies) == len(b"".join(pieces)) // len(framed)
            for fixed, block, pixels in replies:
                assert fixed[0] == FRAME and fixed[7:] == (32, 0, 32)  # lines_done, row0, rows
                assert block["shape"] == [32, 32] and len(pixels) == 32 * 32 * 4
            assert spy.calls.count("acquire") == calls + len(replies)
        calls = spy.calls.count("acquire")
        ticket = client._call("frame_ticket")
        oversized = struct.pack("!I", 1 << 20) + request
        assert _raw(server.port, FRAME_CHANNEL_MAGIC + ticket + oversized + framed) == b""
        assert spy.calls.count("acquire") == calls


class BigHeaderSTM(SimulatedSTM):
    """Frames whose metadata is larger than the first read of a frame reply."""

    def acquire(self) -> Frame:
        frame = super().acquire()
        return dataclasses.replace(frame, metadata={**frame.metadata, "notes": "n" * 20_000})


def test_a_frame_header_larger_than_the_first_read_arrives_whole() -> None:
    local = BigHeaderSTM(seed=5, shape_px=(32, 32), dwell_s=1e-4)
    server = InstrumentServer(BigHeaderSTM(seed=5, shape_px=(32, 32), dwell_s=1e-4)).start()
    try:
        with RemoteInstrument("127.0.0.1", server.port) as remote:
            for _ in range(2):
                a, b = local.acquire(), remote.acquire()
                assert b.metadata["notes"] == "n" * 20_000
                assert a.header() == b.header()
                np.testing.assert_array_equal(a.data, b.data)
    finally:
        server.close()


def test_replies_survive_sockets_that_take_a_few_bytes_at_a_time() -> None:
    class Trickle:
        def __init__(self) -> None:
            self.sent = bytearray()

        def sendmsg(self, buffers: list[Any]) -> int:
            first = next(bytes(b) for b in buffers if len(b))
            self.sent += first[:7]
            return len(first[:7])

    pixels = np.arange(100, dtype=np.uint16)
    for head in (b"", b"header-bytes"):
        for payload in (pixels.data.cast("B"), pixels.reshape(10, 10)):  # a view, an array
            sock = Trickle()
            _send_parts(sock, head, payload, gather=True)  # type: ignore[arg-type]
            assert bytes(sock.sent) == head + pixels.tobytes()


@pytest.fixture
def tls_files(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    # Pyro5 keeps TLS settings and contexts per process: restore them after the test
    for name in ("SSL", "SSL_SERVERCERT", "SSL_SERVERKEY", "SSL_CACERTS"):
        monkeypatch.setattr(Pyro5.config, name, getattr(Pyro5.config, name))
    for name in ("__ssl_client_context", "__ssl_server_context"):
        monkeypatch.setattr(Pyro5.socketutil, name, None)
    return str(cert), str(key)


def test_tls_serves_frames_and_refuses_plain_clients(tls_files: tuple[str, str]) -> None:
    cert, key = tls_files
    local = small_stm(seed=4)
    server = InstrumentServer(small_stm(seed=4), token=TOKEN, tls_cert=cert, tls_key=key).start()
    try:
        with RemoteInstrument("127.0.0.1", server.port, token=TOKEN, tls_ca=cert) as client:
            np.testing.assert_array_equal(client.acquire().data, local.acquire().data)
            parts = list(client.stream())
            np.testing.assert_array_equal(parts[-1].data, local.acquire().data)
        context = ssl.create_default_context(cafile=cert)
        with (
            socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as probe,
        ):
            subject = dict(item[0] for item in probe.getpeercert()["subject"])  # type: ignore[index,misc]
            assert subject["commonName"] == "localhost"
        assert wait_until(lambda: len(server.daemon.rejected) == 1)  # the probe said nothing
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as plain:
            plain.sendall(FRAME_CHANNEL_MAGIC + b"\0" * TICKET_BYTES)  # no TLS hello
            with contextlib.suppress(ConnectionResetError):
                assert plain.recv(100) == b""  # closed by the TLS layer
        assert len(server.daemon.rejected) == 1  # plain bytes never get past the TLS layer
    finally:
        server.close()


def test_a_server_that_stops_answering_is_a_communication_error() -> None:
    release = threading.Event()

    class Stuck(SpyInstrument):
        def acquire(self) -> Any:
            release.wait(timeout=30)
            return self.inner.acquire()

    with InstrumentServer(Stuck(small_stm()), token=TOKEN) as server:
        client = RemoteInstrument("127.0.0.1", server.port, token=TOKEN, timeout_s=0.5)
        try:
            with pytest.raises(CommunicationError, match="lost during acquire"):
                client.acquire()
            release.set()
            assert client.state().shape_px == (32, 32)  # reconnected
        finally:
            release.set()
            client.close()


def test_a_late_disconnect_of_the_old_connection_spares_the_reconnected_client() -> None:
    with InstrumentServer(small_stm(), token=TOKEN) as server:
        client = RemoteInstrument("127.0.0.1", server.port, token=TOKEN)
        try:
            old = server.service._controller
            assert old is not None
            client._drop()  # the connection breaks (client side first)
            parts = iter(client.stream())
            first = next(parts)  # reconnected; the new connection streams
            server.service.client_gone(old)  # the server notices the old one only now
            rest = list(parts)
            assert not first.complete and rest[-1].complete
            assert client.execute(SetDwell(2e-4)).ok  # still in control
            assert client.reconnects == 1
        finally:
            client.close()
