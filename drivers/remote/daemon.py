"""The Pyro5 daemon behind ``scopepilot serve``: who may connect, and what is read from them.

- Every connection must present the shared token in the Pyro5 handshake
  (:meth:`InstrumentDaemon.validateHandshake`); a missing or wrong token is rejected, and
  logged, before any method can run.
- Only msgpack messages are read: the serializer id of every message header is checked before
  its body is deserialized (marshal is not safe against maliciously built data, and Pyro5 has no
  pickle-family serializer, which is never added). Requests larger than ``max_request_bytes``
  are refused unread; a client that does not finish its handshake within
  ``handshake_timeout_s`` is dropped; each client has its own thread, so a slow or broken
  client does not hold up the others.
- Frames go over a *frame channel*: a second connection to the same port that starts with
  :data:`FRAME_CHANNEL_MAGIC` and a one-time ticket the client got over its authenticated
  connection; the pixels are sent straight from the frame's array (see
  ``docs/decisions/0006-remote-frame-channel.md``).
- TLS, when switched on (:func:`enable_tls`), covers both connections.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack
import Pyro5
import Pyro5.errors
import Pyro5.serializers
import Pyro5.server
from Pyro5.callcontext import current_context

from drivers.errors import ConfigError
from drivers.remote.channel import ReplyEncoder

log = logging.getLogger(__name__)

#: 2: frame-channel replies carry the per-frame header fields in binary (drivers.remote.channel)
PROTOCOL_VERSION = 2
#: Serializers whose messages the server reads; everything else is refused before deserializing.
ALLOWED_SERIALIZERS: frozenset[str] = frozenset({"msgpack"})
_PYRO_HEADER = struct.Struct("!4sHBBHHII16sHH")  # Pyro5 protocol.py's message header
_LENGTH = struct.Struct("!I")  # a frame-channel request's length
#: First bytes of a frame channel: a second connection on the same port that carries frames as
#: raw bytes straight from the array (no serializer copy), opened with a one-time ticket.
FRAME_CHANNEL_MAGIC = b"SPFC"
FRAME_METHODS = ("acquire", "stream_next", "latest_frame")
TICKET_BYTES = 32
TICKET_LIFETIME_S = 30.0
MAX_FRAME_REQUEST_BYTES = 4096
#: The body of a frame-channel ``acquire`` request (msgpack ``["acquire", []]``).
ACQUIRE_REQUEST = msgpack.packb(["acquire", []], use_bin_type=True)


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
        self.frame_service: FrameService | None = None

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
        reply (:mod:`drivers.remote.channel`: a fixed binary part, a msgpack block, the frame's
        raw bytes sent straight from the array) built by the service's ``frame_reply``.
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
        requests = _RequestReader(sock, MAX_FRAME_REQUEST_BYTES)
        encoder = ReplyEncoder()
        gather = _can_gather(sock)
        current_context.client = gate  # (this thread serves this channel only)
        try:
            while True:
                body = requests.next()
                if body is None:
                    if requests.oversized:
                        log.warning(
                            "frame channel of %s: %d-byte request",
                            client.client_id,
                            requests.oversized,
                        )
                    return  # the client closed the channel, or sent too much to read
                if body == ACQUIRE_REQUEST:  # the usual request, known without unpacking it
                    method, args = "acquire", []
                else:
                    request = msgpack.unpackb(body, raw=False)
                    if (
                        not isinstance(request, list)
                        or len(request) != 2
                        or request[0] not in FRAME_METHODS
                        or not isinstance(request[1], list)
                        or len(request[1]) > 2
                    ):
                        log.warning("frame channel of %s: malformed request", client.client_id)
                        return
                    method, args = request
                head, payload = service.frame_reply(client, method, args, encoder)
                _send_parts(sock, head, payload, gather=gather)
        except (
            OSError,
            ValueError,
            msgpack.UnpackException,
            Pyro5.errors.CommunicationError,
        ) as exc:
            log.info("frame channel of %s closed: %s", client.client_id, exc)
        except Exception:  # a server-side bug: logged, the channel closes, the server goes on
            log.exception("frame channel of %s failed", client.client_id)

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


class _RequestReader:
    """Frame-channel requests (a 4-byte length, then that many bytes) read from ``sock`` with
    one system call per request as a rule (Pyro5's reader takes two, and its wrappers showed in
    the per-frame profile). Bytes past a request are kept for the next one."""

    def __init__(self, sock: socket.socket, max_bytes: int) -> None:
        self._sock = sock
        self._max = max_bytes
        self._buffer = bytearray(4 + max_bytes)
        self._view = memoryview(self._buffer)
        self._have = 0
        self.oversized = 0  # the announced size of a refused request, 0 if none

    def next(self) -> bytes | None:
        """The next request's body; None when the client closed the channel between requests
        or announced more than ``max_bytes`` (``oversized`` then says how many)."""
        while True:
            have = self._have
            if have >= 4:
                (size,) = _LENGTH.unpack_from(self._buffer)
                if size > self._max:
                    self.oversized = size
                    return None
                end = 4 + size
                if have >= end:
                    body = bytes(self._view[4:end])
                    self._have = have = have - end
                    if have:
                        self._buffer[:have] = bytes(self._view[end : end + have])
                    return body
            n = self._sock.recv_into(self._view[have:] if have else self._view)
            if n == 0:
                if self._have:
                    raise ConnectionError("the client closed the frame channel mid-request")
                return None
            self._have += n


def _can_gather(sock: socket.socket) -> bool:
    """Whether ``sock`` can send several buffers in one call (TLS sockets have no ``sendmsg``)."""
    return hasattr(sock, "sendmsg") and not hasattr(sock, "getpeercert")


def _byte_view(payload: Any) -> memoryview:
    view = payload if type(payload) is memoryview else memoryview(payload)
    return view.cast("B") if view.itemsize != 1 or view.ndim != 1 else view


def _send_parts(sock: socket.socket, head: bytes, payload: Any, *, gather: bool) -> None:
    """Send ``head`` then ``payload`` (bytes, a memoryview, or a C-ordered array) in as few
    system calls as possible, without joining them (with ``gather``, one ``sendmsg`` takes both
    buffers, the array as it is; else they are sent in turn)."""
    if not gather:
        sock.sendall(head)
        view = _byte_view(payload)
        if len(view):
            sock.sendall(view)
        return
    sent = sock.sendmsg([head, payload])
    if sent == len(head) + (len(payload) if type(payload) is bytes else payload.nbytes):
        return  # the usual case: the kernel took it all at once
    view = _byte_view(payload)
    parts = [memoryview(head)[sent:], view] if sent < len(head) else [view[sent - len(head) :]]
    while parts and not len(parts[0]):
        parts.pop(0)
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


class FrameService(Protocol):
    """What the frame channel needs of :class:`drivers.remote.server.InstrumentService`."""

    def redeem(self, ticket: bytes) -> ClientRecord | None: ...

    def frame_reply(
        self, client: ClientRecord, method: str, args: list[Any], encoder: ReplyEncoder
    ) -> tuple[bytes, Any]: ...
