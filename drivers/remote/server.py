"""Serve any :class:`~drivers.protocol.Instrument` over Pyro5 (``scopepilot serve``).

The server binds to loopback unless told otherwise and refuses a non-loopback address without
a token; who may connect and what is read from them is :mod:`drivers.remote.daemon`'s job.
Here: one client controls the instrument (commands, scans) and others observe (info, state,
the latest frame); every command passes the server's own
:class:`~drivers.safety.SafetyEnvelope` (the instrument's limits narrowed by the operator's)
before it reaches the instrument, so a client cannot bypass it. Frames travel as a small header
and raw bytes (:mod:`drivers.remote.wire`).
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

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
from drivers.remote.channel import ReplyEncoder
from drivers.remote.daemon import (
    PROTOCOL_VERSION,
    TICKET_BYTES,
    TICKET_LIFETIME_S,
    ClientRecord,
    InstrumentDaemon,
    enable_tls,
    is_loopback,
)
from drivers.remote.wire import encode_frame
from drivers.safety import ForbiddenArea, SafetyEnvelope

log = logging.getLogger(__name__)

SERVICE_NAME = "scopepilot.instrument"


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


T = TypeVar("T")


def _message(frame: Frame, row0: int, last: bool) -> list[Any]:
    header, payload = encode_frame(frame, row0=row0)
    return [header, payload]


def _stream_message(frame: Frame, row0: int, last: bool) -> list[Any]:
    header, payload = encode_frame(frame, row0=row0)
    return [header, payload, last]


@dataclass
class _Stream:
    parts: Iterator[Frame]
    owner: ClientRecord  # the connection that opened it
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
        self._controller: ClientRecord | None = None  # the connection holding control
        self._control_lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._streams_lock = threading.Lock()
        self._latest: Frame | None = None
        self._latest_lock = threading.Lock()
        self._latest_cond = threading.Condition(self._latest_lock)
        self._latest_waiters = 0  # observers waiting in latest_frame (under _latest_lock)
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

    def _require_control(self, what: str, client: ClientRecord | None = None) -> ClientRecord:
        """The calling client (``client`` on a frame channel, else the Pyro5 connection's) if it
        holds control, else :class:`CommandRejected`."""
        if client is None:
            client = self._client()
        with self._control_lock:
            if self._controller is None or self._controller.client_id != client.client_id:
                holder = self._controller.client_id if self._controller else "nobody"
                raise CommandRejected(
                    f"{what} needs control of the instrument; client {client.client_id} is "
                    f"{'observing' if client.role == 'observe' else 'not in control'} and "
                    f"{holder} holds control"
                )
        return client

    def client_gone(self, client: ClientRecord) -> None:
        """A connection closed: close its streams; release control it held."""
        with self._streams_lock:
            # compared by connection, not by client id: a client that has already reconnected
            # keeps what its new connection opened
            gone = [sid for sid, s in self._streams.items() if s.owner is client]
            streams = [self._streams.pop(sid) for sid in gone]
        for stream in streams:
            stream.close()
        with self._control_lock:
            if self._controller is client:
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
                    holder = self._controller
                    if holder is not None and holder.client_id != client.client_id:
                        raise CommandRejected(
                            f"client {holder.client_id} controls the instrument; connect as an "
                            "observer or wait until it disconnects"
                        )
                    self._controller = client  # (a reconnecting controller takes it back)
            holder = self._controller
            return {
                "protocol": PROTOCOL_VERSION,
                "controller": holder.client_id if holder else None,
            }

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
                if self._controller is not None and self._controller.client_id == client.client_id:
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

    # The frame methods: each calls ``encode(frame, row0, last)`` for the frame it hands out,
    # which shapes the reply for its transport (a Pyro5 return value, a frame-channel reply).

    def _acquire(self, client: ClientRecord | None, encode: Callable[[Frame, int, bool], T]) -> T:
        if client is None or client is not self._controller:  # (one read: no lock needed)
            self._require_control("acquire", client)
        frame = self._instrument.acquire()
        self._publish(frame)
        return encode(frame, 0, False)

    def _stream_next(
        self, client: ClientRecord | None, sid: Any, encode: Callable[[Frame, int, bool], T]
    ) -> T | None:
        client = self._require_control("stream", client)
        with self._streams_lock:
            stream = self._streams.get(sid) if isinstance(sid, str) else None
        if stream is None or stream.owner.client_id != client.client_id:
            raise CommandRejected(f"no open stream {sid!r} of client {client.client_id}")
        with stream.lock:
            part = next(stream.parts, None)
        if part is None:
            self._drop_stream(sid)
            return None
        last = part.complete or bool(part.metadata.get("aborted"))
        reply = encode(part, min(stream.sent_rows, part.lines_done), last)
        stream.sent_rows = part.lines_done
        if last:
            self._publish(part)
            self._drop_stream(sid)
        return reply

    def _latest_frame(
        self,
        client: ClientRecord | None,
        after_index: Any,
        timeout_s: Any,
        encode: Callable[[Frame, int, bool], T],
    ) -> T | None:
        if client is None:
            self._client()
        after = after_index if isinstance(after_index, int) else -1
        wait_s = 0.0
        if isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s):
            wait_s = min(max(float(timeout_s), 0.0), 10.0)
        with self._latest_cond:
            self._latest_waiters += 1
            try:
                self._latest_cond.wait_for(
                    lambda: self._latest is not None and self._latest.frame_index > after,
                    timeout=wait_s,
                )
            finally:
                self._latest_waiters -= 1
            frame = self._latest
        if frame is None or frame.frame_index <= after:
            return None
        return encode(frame, 0, False)

    def frame_reply(
        self, client: ClientRecord, method: str, args: list[Any], encoder: ReplyEncoder
    ) -> tuple[bytes, Any]:
        """The frame channel's reply to ``method(*args)`` from ``client``: the reply's head and
        its pixels (see :mod:`drivers.remote.channel`); errors become error replies."""
        encode = encoder.frame
        try:
            if method == "acquire" and not args:
                return self._acquire(client, encode)
            if method == "stream_next" and len(args) == 1:
                reply = self._stream_next(client, args[0], encode)
            elif method == "latest_frame" and len(args) <= 2:
                after_index = args[0] if args else -1
                timeout_s = args[1] if len(args) > 1 else 0.0
                reply = self._latest_frame(client, after_index, timeout_s, encode)
            else:
                raise CommandRejected(f"{method} does not take {len(args)} arguments")
        except ScopePilotError as exc:
            return encoder.error(error_json(exc)), b""
        return (encoder.no_frame(), b"") if reply is None else reply

    # (the same over Pyro5: ``[header, payload]``, ``[header, payload, last]`` for a stream)

    def acquire(self) -> dict[str, Any]:
        return self._reply(lambda: self._acquire(None, _message))

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
                self._streams[sid] = _Stream(iter(parts), client)
            return sid

        return self._reply(run)

    def stream_next(self, sid: Any) -> dict[str, Any]:
        """The next lines of stream ``sid``: ``[header, payload, last]``, or None at its end."""
        return self._reply(lambda: self._stream_next(None, sid, _stream_message))

    def stream_close(self, sid: Any) -> dict[str, Any]:
        def run() -> None:
            client = self._client()
            with self._streams_lock:
                stream = self._streams.get(sid) if isinstance(sid, str) else None
            if stream is not None and stream.owner.client_id == client.client_id:
                self._drop_stream(sid)

        return self._reply(run)

    def latest_frame(self, after_index: Any = -1, timeout_s: Any = 0.0) -> dict[str, Any]:
        """For observers: the last whole frame scanned with a ``frame_index`` above
        ``after_index``, waiting up to ``timeout_s`` (at most 10 s) for one; None if none."""
        return self._reply(lambda: self._latest_frame(None, after_index, timeout_s, _message))

    # -- helpers ------------------------------------------------------------------------------

    def _drop_stream(self, sid: Any) -> None:
        with self._streams_lock:
            stream = self._streams.pop(sid, None) if isinstance(sid, str) else None
        if stream is not None:
            stream.close()

    def _publish(self, frame: Frame) -> None:
        # no lock per frame: an observer counts itself in _latest_waiters (under the lock)
        # before it checks _latest, so it either sees this frame or is counted here and woken
        # (the interpreter orders these plain reads and writes)
        self._latest = frame
        if self._latest_waiters:
            with self._latest_lock:
                self._latest_cond.notify_all()

    def close_streams(self) -> None:
        with self._streams_lock:
            streams = list(self._streams.values())
            self._streams.clear()
        for stream in streams:
            stream.close()


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
