"""Serve any :class:`~drivers.protocol.Instrument` over Pyro5 (``scopepilot serve``).

Security and control, all enforced here on the instrument's side:

- the server binds to loopback unless told otherwise and refuses a non-loopback address
  without a token;
- every connection must present the shared token in the Pyro5 handshake
  (:meth:`InstrumentDaemon.validateHandshake`); a missing or wrong token is rejected, and
  logged, before any method can run;
- only msgpack messages are read: the serializer id of every message header is checked before
  its body is deserialized (marshal is not safe against maliciously built data, and Pyro5 has no
  pickle-family serializer, which is never added);
- requests larger than ``max_request_bytes`` are refused unread; a client that does not finish
  its handshake within ``handshake_timeout_s`` is dropped; each client has its own thread, so
  a slow or broken client does not hold up the others;
- one client controls the instrument (commands, scans); others observe (info, state, the latest
  frame);
- every command passes the server's own :class:`~drivers.safety.SafetyEnvelope` (the
  instrument's limits narrowed by the operator's) before it reaches the instrument.

Frames travel as a small header and raw bytes (:mod:`drivers.remote.wire`).
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import logging
import os
import secrets
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import Pyro5
import Pyro5.errors
import Pyro5.serializers
import Pyro5.server
from Pyro5.callcontext import current_context

from drivers.commands import AbortScan, command_from_json
from drivers.errors import (
    CommandRejected,
    ConfigError,
    LimitViolation,
    ScopePilotError,
)
from drivers.frame import Frame
from drivers.limits import Limits
from drivers.protocol import Instrument
from drivers.remote.wire import encode_frame
from drivers.safety import ForbiddenArea, SafetyEnvelope

log = logging.getLogger(__name__)

SERVICE_NAME = "scopepilot.instrument"
PROTOCOL_VERSION = 1
#: Serializers whose messages the server reads; everything else is refused before deserializing.
ALLOWED_SERIALIZERS: frozenset[str] = frozenset({"msgpack"})
_PYRO_HEADER = struct.Struct("!4sHBBHHII16sHH")  # Pyro5 protocol.py's message header
#: First bytes of a frame channel: a second connection on the same port that carries frames as
#: raw bytes straight from the array (no serializer copy), opened with a one-time ticket.
FRAME_CHANNEL_MAGIC = b"SPFC"
FRAME_METHODS = ("acquire", "stream_next", "latest_frame")
TICKET_BYTES = 32
TICKET_LIFETIME_S = 30.0
MAX_FRAME_REQUEST_BYTES = 4096


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) resolves to loopback addresses only."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


@dataclass
class ClientRecord:
    """A connected client: its self-chosen id, its role and where it connects from."""

    client_id: str
    role: str
    peer: str


class _ConnectionGate:
    """Wraps a Pyro5 socket connection and checks each message header as it arrives.

    A header naming a serializer outside :data:`ALLOWED_SERIALIZERS`, or announcing a body
    larger than ``max_bytes``, raises :class:`Pyro5.errors.ProtocolError` before the body is
    read, so it is never deserialized.
    """

    def __init__(self, conn: Any, max_bytes: int, allowed_ids: frozenset[int]) -> None:
        self.conn = conn
        self.client: ClientRecord | None = None
        self.reason = ""
        self.reported = False
        self._max = max_bytes
        self._allowed = allowed_ids
        self._header = bytearray()
        self._pending = 0  # body bytes of the current message still to come
        self._pushback = b""

    def push_back(self, data: bytes) -> None:
        """Bytes read ahead of Pyro5 (to tell a frame channel apart); handed out first."""
        self._pushback = bytes(data) + self._pushback

    def recv(self, size: int) -> bytes:
        if self._pushback:
            head, self._pushback = self._pushback[:size], self._pushback[size:]
            data = head + (self.conn.recv(size - len(head)) if size > len(head) else b"")
        else:
            data = self.conn.recv(size)
        self._inspect(memoryview(data))
        return data

    def send(self, data: bytes) -> None:
        self.conn.send(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)

    def _refuse(self, reason: str) -> Pyro5.errors.ProtocolError:
        self.reason = reason
        return Pyro5.errors.ProtocolError(reason)

    def _inspect(self, data: memoryview) -> None:
        pos = 0
        while pos < len(data):
            if self._pending:
                take = min(self._pending, len(data) - pos)
                self._pending -= take
                pos += take
                continue
            take = min(_PYRO_HEADER.size - len(self._header), len(data) - pos)
            self._header += data[pos : pos + take]
            pos += take
            if len(self._header) >= 4 and bytes(self._header[:4]) != b"PYRO":
                raise self._refuse(f"not a Pyro message (starts with {bytes(self._header[:8])!r})")
            if len(self._header) < _PYRO_HEADER.size:
                continue
            fields = _PYRO_HEADER.unpack(bytes(self._header))
            self._header.clear()
            serializer_id, data_size, annotations_size = fields[3], fields[6], fields[7]
            if serializer_id not in self._allowed:
                raise self._refuse(
                    f"serializer id {serializer_id} is not accepted; use "
                    f"{' or '.join(sorted(ALLOWED_SERIALIZERS))}"
                )
            if data_size + annotations_size > self._max:
                raise self._refuse(
                    f"request of {data_size + annotations_size} bytes is over the limit of "
                    f"{self._max} bytes"
                )
            self._pending = data_size + annotations_size


class InstrumentDaemon(Pyro5.server.Daemon):
    """A Pyro5 daemon that authenticates clients by a shared token and guards every message."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        token: str | None,
        max_request_bytes: int = 1 << 20,
        handshake_timeout_s: float = 5.0,
    ) -> None:
        super().__init__(host=host, port=port)
        self._token = token.encode() if token is not None else None
        self._max_request = max_request_bytes
        self._handshake_timeout_s = handshake_timeout_s
        self._allowed_ids = frozenset(
            Pyro5.serializers.serializers[name].serializer_id for name in ALLOWED_SERIALIZERS
        )
        self._gates: dict[Any, _ConnectionGate] = {}
        self._gates_lock = threading.Lock()
        self.rejected: list[tuple[str, str]] = []  # (peer, reason) of refused connections
        self.on_disconnect: Callable[[ClientRecord], None] | None = None
        self.frame_service: InstrumentService | None = None

    def _gate(self, conn: Any) -> _ConnectionGate:
        with self._gates_lock:
            gate = self._gates.get(conn)
            if gate is None:
                gate = _ConnectionGate(conn, self._max_request, self._allowed_ids)
                self._gates[conn] = gate
            return gate

    def _handshake(self, conn: Any, denied_reason: str | None = None) -> bool:
        gate = self._gate(conn)
        conn.sock.settimeout(self._handshake_timeout_s)
        try:
            first = conn.recv(len(FRAME_CHANNEL_MAGIC))
        except Pyro5.errors.CommunicationError as exc:
            self._reject(gate, f"no handshake ({exc})")
            self._forget(conn)
            return False
        if first == FRAME_CHANNEL_MAGIC:
            self._serve_frame_channel(gate)
            self._forget(conn)
            return False  # the transport closes the socket
        gate.push_back(first)
        ok = bool(super()._handshake(gate, denied_reason))
        if ok:
            conn.sock.settimeout(None)
        else:
            if not gate.reported:
                self._reject(
                    gate, gate.reason or denied_reason or "malformed or timed-out handshake"
                )
            self._forget(conn)
        return ok

    def _forget(self, conn: Any) -> None:
        with self._gates_lock:
            self._gates.pop(conn, None)

    def _serve_frame_channel(self, gate: _ConnectionGate) -> None:
        """Serve frames on a connection that opened with :data:`FRAME_CHANNEL_MAGIC`.

        The client first presents a one-time ticket it got over its authenticated Pyro5
        connection; then each request (a 4-byte length and a msgpack ``[method, args]``) gets a
        reply of two 4-byte lengths, a msgpack ``{"ok": {"header", "last"}}`` or
        ``{"error": ...}``, and the frame's raw bytes, sent straight from the array.
        """
        service = self.frame_service
        try:
            ticket = bytes(gate.conn.recv(TICKET_BYTES))
        except Pyro5.errors.CommunicationError as exc:
            self._reject(gate, f"frame channel without a ticket ({exc})")
            return
        client = service.redeem(ticket) if service is not None else None
        if service is None or client is None:
            self._reject(gate, "frame channel with an unknown or expired ticket")
            return
        gate.client = client
        sock = gate.conn.sock
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        log.info("client %s opened a frame channel", client.client_id)
        try:
            while True:
                try:
                    (size,) = struct.unpack("!I", gate.conn.recv(4))
                except Pyro5.errors.ConnectionClosedError:
                    return  # the client closed the channel
                if size > MAX_FRAME_REQUEST_BYTES:
                    log.warning("frame channel of %s: %d-byte request", client.client_id, size)
                    return
                request = msgpack.unpackb(bytes(gate.conn.recv(size)), raw=False)
                if (
                    not isinstance(request, list)
                    or len(request) != 2
                    or request[0] not in FRAME_METHODS
                    or not isinstance(request[1], list)
                    or len(request[1]) > 2
                ):
                    log.warning("frame channel of %s: malformed request", client.client_id)
                    return
                current_context.client = gate
                reply = getattr(service, request[0])(*request[1])
                payload: Any = b""
                ok = reply.get("ok")
                if isinstance(ok, list):
                    reply = {"ok": {"header": ok[0], "last": ok[2] if len(ok) > 2 else None}}
                    payload = ok[1]
                meta = msgpack.packb(reply, use_bin_type=True)
                _send_parts(sock, struct.pack("!II", len(meta), len(payload)) + meta, payload)
        except (
            OSError,
            ValueError,
            msgpack.UnpackException,
            Pyro5.errors.CommunicationError,
        ) as exc:
            log.info("frame channel of %s closed: %s", client.client_id, exc)

    def _reject(self, gate: _ConnectionGate, reason: str) -> Pyro5.errors.SecurityError:
        """Log and record a refused connection (before the client hears of it)."""
        peer = _peer(gate.conn)
        gate.reason, gate.reported = reason, True
        self.rejected.append((peer, reason))
        log.warning("rejected connection from %s: %s", peer, reason)
        return Pyro5.errors.SecurityError(f"authentication failed: {reason}")

    def validateHandshake(self, conn: Any, data: Any) -> Any:
        gate = conn if isinstance(conn, _ConnectionGate) else self._gate(conn)
        if not isinstance(data, Mapping):
            raise self._reject(gate, "handshake carries no scopepilot credentials")
        token = data.get("token")
        if self._token is not None:
            if not isinstance(token, str) or not token:
                raise self._reject(gate, "missing token")
            if not hmac.compare_digest(token.encode(), self._token):
                raise self._reject(gate, "wrong token")
        client_id, role = data.get("client_id"), data.get("role")
        if not isinstance(client_id, str) or not 0 < len(client_id) <= 64:
            raise self._reject(gate, f"bad client id {client_id!r}")
        if role not in ("control", "observe"):
            raise self._reject(gate, f"bad role {role!r}; expected 'control' or 'observe'")
        gate.client = ClientRecord(client_id, role, _peer(conn))
        log.info("client %s (%s) connected from %s", client_id, role, gate.client.peer)
        return {"protocol": PROTOCOL_VERSION}

    def handleRequest(self, conn: Any) -> None:
        super().handleRequest(self._gate(conn))

    def drop_clients(self) -> None:
        """Close every client connection (when the server shuts down)."""
        with self._gates_lock:
            conns = list(self._gates)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)

    def clientDisconnect(self, conn: Any) -> None:
        with self._gates_lock:
            gate = self._gates.pop(conn, None)
        if gate is not None and gate.client is not None:
            log.info("client %s disconnected", gate.client.client_id)
            if self.on_disconnect is not None:
                self.on_disconnect(gate.client)


def _send_parts(sock: socket.socket, head: bytes, payload: Any) -> None:
    """Send ``head`` then ``payload`` in as few system calls as possible, without joining them
    (``sendmsg`` gathers both buffers; TLS sockets have no ``sendmsg`` and send them in turn)."""
    view = memoryview(payload).cast("B") if len(payload) else memoryview(b"")
    if not hasattr(sock, "sendmsg") or hasattr(sock, "getpeercert"):
        sock.sendall(head)
        if len(view):
            sock.sendall(view)
        return
    parts = [memoryview(head), view]
    while parts:
        sent = sock.sendmsg(parts)
        while parts and sent >= len(parts[0]):
            sent -= len(parts[0])
            parts.pop(0)
        if parts and sent:
            parts[0] = parts[0][sent:]
        while parts and not len(parts[0]):
            parts.pop(0)


def _peer(conn: Any) -> str:
    try:
        host, port = conn.sock.getpeername()[:2]
        return f"{host}:{port}"
    except (OSError, AttributeError):
        return "?"


def _plain(value: Any) -> Any:
    """``value`` as msgpack-able plain data (numbers, strings, lists, string-keyed maps)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value.value if hasattr(value, "value") and isinstance(value, str) else value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        try:
            return _plain(value.item())
        except (TypeError, ValueError):
            pass
    if hasattr(value, "to_json"):
        return _plain(value.to_json())
    return repr(value)


def error_json(exc: ScopePilotError) -> dict[str, Any]:
    out: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, LimitViolation):
        out.update(
            value=_plain(exc.value),
            limit=_plain(exc.limit),
            command_id=exc.command_id,
            field=exc.field,
        )
    return out


@dataclass
class _Stream:
    parts: Iterator[Frame]
    owner: str
    sent_rows: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def close(self) -> None:
        close = getattr(self.parts, "close", None)
        if close is not None:
            with self.lock:
                close()


@Pyro5.server.expose
class InstrumentService:
    """The remote face of one instrument. Every method returns ``{"ok": value}`` or
    ``{"error": {...}}`` so that the client can raise the matching scopepilot error."""

    def __init__(self, instrument: Instrument, envelope: SafetyEnvelope) -> None:
        self._instrument = instrument
        self._envelope = envelope
        self._controller: str | None = None
        self._control_lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._streams_lock = threading.Lock()
        self._latest: Frame | None = None
        self._latest_cond = threading.Condition()
        self._tickets: dict[bytes, tuple[ClientRecord, float]] = {}
        self._tickets_lock = threading.Lock()
        info = instrument.info()
        self._info_json = _plain(
            {**info.to_json(), "limits": envelope.limits.to_json(), "details": info.details}
        )

    # -- clients and control ------------------------------------------------------------------

    @staticmethod
    def _client() -> ClientRecord:
        gate = current_context.client
        client = getattr(gate, "client", None)
        if not isinstance(client, ClientRecord):  # cannot happen past the handshake
            raise CommandRejected("connection has no authenticated client")
        return client

    def _require_control(self, what: str) -> ClientRecord:
        client = self._client()
        with self._control_lock:
            if self._controller != client.client_id:
                holder = self._controller or "nobody"
                raise CommandRejected(
                    f"{what} needs control of the instrument; client {client.client_id} is "
                    f"{'observing' if client.role == 'observe' else 'not in control'} and "
                    f"{holder} holds control"
                )
        return client

    def client_gone(self, client: ClientRecord) -> None:
        """A connection closed: close its streams; release control it held."""
        with self._streams_lock:
            gone = [sid for sid, s in self._streams.items() if s.owner == client.client_id]
            streams = [self._streams.pop(sid) for sid in gone]
        for stream in streams:
            stream.close()
        with self._control_lock:
            if self._controller == client.client_id:
                self._controller = None
                log.info("client %s released control (disconnected)", client.client_id)

    def _reply(self, fn: Callable[[], Any]) -> dict[str, Any]:
        try:
            return {"ok": fn()}
        except ScopePilotError as exc:
            return {"error": error_json(exc)}

    def hello(self) -> dict[str, Any]:
        """Register the caller; a ``control`` client takes control if nobody else holds it."""

        def run() -> dict[str, Any]:
            client = self._client()
            if client.role == "control":
                with self._control_lock:
                    if self._controller not in (None, client.client_id):
                        raise CommandRejected(
                            f"client {self._controller} controls the instrument; connect as an "
                            "observer or wait until it disconnects"
                        )
                    self._controller = client.client_id
            return {"protocol": PROTOCOL_VERSION, "controller": self._controller}

        return self._reply(run)

    def frame_ticket(self) -> dict[str, Any]:
        """A one-time ticket that opens a frame channel for the caller (valid for 30 s)."""

        def run() -> bytes:
            client = self._client()
            ticket = secrets.token_bytes(TICKET_BYTES)
            now = time.monotonic()
            with self._tickets_lock:
                for old in [t for t, (_, expiry) in self._tickets.items() if expiry < now]:
                    del self._tickets[old]
                self._tickets[ticket] = (client, now + TICKET_LIFETIME_S)
            return ticket

        return self._reply(run)

    def redeem(self, ticket: bytes) -> ClientRecord | None:
        """The client a ticket was issued to (once, within its lifetime), else None."""
        with self._tickets_lock:
            entry = self._tickets.pop(ticket, None)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def release_control(self) -> dict[str, Any]:
        def run() -> None:
            client = self._client()
            with self._control_lock:
                if self._controller == client.client_id:
                    self._controller = None

        return self._reply(run)

    # -- instrument ---------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return self._reply(lambda: self._info_json)

    def state(self) -> dict[str, Any]:
        return self._reply(lambda: _plain(self._instrument.state().to_json()))

    def execute(self, command: Any) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            self._require_control("execute")
            if not isinstance(command, Mapping):
                raise CommandRejected(f"not a command: {command!r}")
            parsed = command_from_json(command)
            info = self._instrument.info()
            if not info.supports(parsed):
                raise CommandRejected(
                    f"{info.id} cannot execute {parsed.kind} (needs capability {parsed.requires!s})"
                )
            now_s = 0.0
            if not isinstance(parsed, AbortScan):
                state = self._instrument.state()
                now_s = state.time_s
                self._envelope.check(parsed, position_m=state.position_m, now_s=now_s)
            result = self._instrument.execute(parsed)
            self._envelope.record_executed(parsed, now_s=now_s)
            return {
                "command_id": result.command_id,
                "ok": result.ok,
                "time_s": result.time_s,
                "detail": _plain(result.detail),
            }

        return self._reply(run)

    def acquire(self) -> dict[str, Any]:
        def run() -> list[Any]:
            self._require_control("acquire")
            frame = self._instrument.acquire()
            self._publish(frame)
            header, payload = encode_frame(frame)
            return [header, payload]

        return self._reply(run)

    def stream_open(self) -> dict[str, Any]:
        def run() -> str:
            client = self._require_control("stream")
            with self._streams_lock:
                stale = list(self._streams.values())
                self._streams.clear()
            for stream in stale:  # a client streams one scan at a time (e.g. after a reconnect)
                stream.close()
            sid = uuid.uuid4().hex
            parts = self._instrument.stream()
            with self._streams_lock:
                self._streams[sid] = _Stream(iter(parts), client.client_id)
            return sid

        return self._reply(run)

    def stream_next(self, sid: Any) -> dict[str, Any]:
        """The next lines of stream ``sid``: ``[header, payload, last]``, or None at its end."""

        def run() -> list[Any] | None:
            client = self._require_control("stream")
            with self._streams_lock:
                stream = self._streams.get(sid) if isinstance(sid, str) else None
            if stream is None or stream.owner != client.client_id:
                raise CommandRejected(f"no open stream {sid!r} of client {client.client_id}")
            with stream.lock:
                part = next(stream.parts, None)
            if part is None:
                self._drop_stream(sid)
                return None
            header, payload = encode_frame(part, row0=min(stream.sent_rows, part.lines_done))
            stream.sent_rows = part.lines_done
            last = part.complete or bool(part.metadata.get("aborted"))
            if last:
                self._publish(part)
                self._drop_stream(sid)
            return [header, payload, last]

        return self._reply(run)

    def stream_close(self, sid: Any) -> dict[str, Any]:
        def run() -> None:
            self._client()
            self._drop_stream(sid)

        return self._reply(run)

    def latest_frame(self, after_index: Any = -1, timeout_s: Any = 0.0) -> dict[str, Any]:
        """For observers: the last whole frame scanned with a ``frame_index`` above
        ``after_index``, waiting up to ``timeout_s`` (at most 10 s) for one; None if none."""

        def run() -> list[Any] | None:
            self._client()
            after = after_index if isinstance(after_index, int) else -1
            wait_s = (
                min(max(float(timeout_s), 0.0), 10.0)
                if isinstance(timeout_s, (int, float))
                else 0.0
            )
            with self._latest_cond:
                self._latest_cond.wait_for(
                    lambda: self._latest is not None and self._latest.frame_index > after,
                    timeout=wait_s,
                )
                frame = self._latest
            if frame is None or frame.frame_index <= after:
                return None
            header, payload = encode_frame(frame)
            return [header, payload]

        return self._reply(run)

    # -- helpers ------------------------------------------------------------------------------

    def _drop_stream(self, sid: Any) -> None:
        with self._streams_lock:
            stream = self._streams.pop(sid, None) if isinstance(sid, str) else None
        if stream is not None:
            stream.close()

    def _publish(self, frame: Frame) -> None:
        with self._latest_cond:
            self._latest = frame
            self._latest_cond.notify_all()

    def close_streams(self) -> None:
        with self._streams_lock:
            streams = list(self._streams.values())
            self._streams.clear()
        for stream in streams:
            stream.close()


def enable_tls(
    *, server_cert: str | None = None, server_key: str | None = None, ca: str | None = None
) -> None:
    """Switch on Pyro5's TLS for this process: as a server (certificate and key) or as a client
    that trusts ``ca``. Missing files raise :class:`ConfigError`."""
    for what, path in (("certificate", server_cert), ("key", server_key), ("CA file", ca)):
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"TLS {what} {path!r} does not exist")
    Pyro5.config.SSL = True
    if server_cert is not None:
        Pyro5.config.SSL_SERVERCERT = server_cert
        Pyro5.config.SSL_SERVERKEY = server_key or ""
    if ca is not None:
        Pyro5.config.SSL_CACERTS = ca


class InstrumentServer:
    """Serves ``instrument`` on ``host:port`` (port 0 picks a free one) until :meth:`close`.

    ``token`` is the shared secret every client must present (required unless ``host`` is
    loopback); ``operator_limits`` and ``forbidden`` narrow the instrument's envelope.
    ``tls_cert`` and ``tls_key`` (PEM files) switch on TLS for every connection; Pyro5 keeps
    its TLS settings per process, so this sets them for the whole process.
    The server does not close ``instrument``; whoever opened it does.
    """

    def __init__(
        self,
        instrument: Instrument,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        operator_limits: Limits | None = None,
        forbidden: Iterable[ForbiddenArea] = (),
        max_request_bytes: int = 1 << 20,
        handshake_timeout_s: float = 5.0,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        if tls_cert is not None:
            enable_tls(server_cert=tls_cert, server_key=tls_key)
        elif tls_key is not None:
            raise ConfigError("a TLS key was given without its certificate (--tls-cert)")
        if token is not None and (not isinstance(token, str) or len(token) < 8):
            raise ConfigError("the token must be a string of at least 8 characters")
        if token is None and not is_loopback(host):
            raise ConfigError(
                f"refusing to serve on {host!r} without a token: anyone who can reach that "
                "address could drive the instrument; pass --token-file (or bind 127.0.0.1)"
            )
        info = instrument.info()
        envelope = SafetyEnvelope(info.limits, operator_limits=operator_limits, forbidden=forbidden)
        self.instrument = instrument
        self.service = InstrumentService(instrument, envelope)
        self.daemon = InstrumentDaemon(
            host,
            port,
            token=token,
            max_request_bytes=max_request_bytes,
            handshake_timeout_s=handshake_timeout_s,
        )
        self.daemon.on_disconnect = self.service.client_gone
        self.daemon.frame_service = self.service
        self.daemon.register(self.service, SERVICE_NAME)
        self.host = host
        self.port = int(self.daemon.locationStr.rsplit(":", 1)[1])
        self._thread: threading.Thread | None = None

    @property
    def uri(self) -> str:
        """The scopepilot instrument URI of this server (``pyro:HOST:PORT``)."""
        return f"pyro:{self.host}:{self.port}"

    def start(self) -> InstrumentServer:
        """Serve in a background thread."""
        self._thread = threading.Thread(
            target=self.daemon.requestLoop, name=f"pyro-server-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.daemon.requestLoop()

    def close(self) -> None:
        self.service.close_streams()
        self.daemon.shutdown()
        self.daemon.drop_clients()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.daemon.close()

    def __enter__(self) -> InstrumentServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
