"""The client side of a remote instrument: ``pyro:HOST:PORT`` URIs.

:class:`RemoteInstrument` is an :class:`~drivers.protocol.Instrument` whose calls go to an
:class:`~drivers.remote.server.InstrumentServer` over Pyro5 (msgpack serializer, frames as raw
bytes). The token comes from the ``token`` option, a ``token_file``, or the environment
(``SCOPEPILOT_TOKEN``, ``SCOPEPILOT_TOKEN_FILE``). With ``tls_ca`` (or ``SCOPEPILOT_TLS_CA``), a
PEM file of the certificate authority that signed the server's certificate, every connection
uses TLS and checks the server's certificate against ``host``.

When the connection drops, the call in progress raises
:class:`~drivers.errors.CommunicationError` (a scan streaming at the time is lost, never
delivered twice) and the next call reconnects, retrying with exponential backoff for up to
``reconnect_timeout_s``. A controlling client gets control back on reconnection.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

import msgpack
import numpy as np
import Pyro5.client
import Pyro5.errors

from drivers.commands import Command
from drivers.errors import (
    CommandRejected,
    CommunicationError,
    ConfigError,
    DataError,
    InstrumentError,
    LimitViolation,
    ModelError,
    NotConnected,
    ScopePilotError,
)
from drivers.frame import Frame, ScanRegion
from drivers.protocol import CommandResult, InstrumentInfo, InstrumentState
from drivers.remote.daemon import (
    FRAME_CHANNEL_MAGIC,
    PROTOCOL_VERSION,
    TICKET_BYTES,
    enable_tls,
)
from drivers.remote.reader import FrameReader, FrameReply, ReportedError
from drivers.remote.server import SERVICE_NAME
from drivers.remote.wire import MAX_FRAME_BYTES

log = logging.getLogger(__name__)

TOKEN_ENV = "SCOPEPILOT_TOKEN"
TOKEN_FILE_ENV = "SCOPEPILOT_TOKEN_FILE"
TLS_CA_ENV = "SCOPEPILOT_TLS_CA"
#: Frame-channel requests without arguments, ready to send (a 4-byte length, then msgpack).
_REQUESTS = {
    method: struct.pack("!I", len(body)) + body
    for method in ("acquire",)
    for body in [msgpack.packb([method, []], use_bin_type=True)]
}

_ERRORS: dict[str, type[ScopePilotError]] = {
    cls.__name__: cls
    for cls in (
        ScopePilotError,
        InstrumentError,
        NotConnected,
        CommunicationError,
        CommandRejected,
        ModelError,
        ConfigError,
        DataError,
    )
}


def read_token(
    token: str | None = None, token_file: str | os.PathLike[str] | None = None
) -> str | None:
    """The token given, else read from ``token_file``, else from the environment; None if none.

    A token file holds the token on its first line; an empty or unreadable file is a
    :class:`ConfigError`.
    """
    if token is not None:
        return token
    path = token_file if token_file is not None else os.environ.get(TOKEN_FILE_ENV)
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the token file {str(path)!r}: {exc}") from None
        if not text:
            raise ConfigError(f"the token file {str(path)!r} is empty")
        return text.splitlines()[0].strip()
    return os.environ.get(TOKEN_ENV) or None


def parse_address(rest: str, scheme: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6ADDR]:PORT`` for IPv6) from the part of a URI after the scheme."""
    host, sep, port_text = rest.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(
            f"{scheme}: URI needs HOST:PORT (e.g. {scheme}:127.0.0.1:9090), got {rest!r}"
        )
    return host, int(port_text)


def raise_remote_error(error: Any) -> NoReturn:
    """Raise the scopepilot error a server reported."""
    if not isinstance(error, Mapping):
        raise CommunicationError(f"malformed error reply from the server: {error!r}")
    kind, message = str(error.get("type")), str(error.get("message"))
    if kind == "LimitViolation":
        raise LimitViolation(
            message,
            value=error.get("value"),
            limit=error.get("limit"),
            command_id=error.get("command_id"),
            field=error.get("field"),
        )
    raise _ERRORS.get(kind, InstrumentError)(message)


class RemoteInstrument:
    """An instrument served by ``scopepilot serve`` (see :mod:`drivers.remote.server`).

    ``role`` is ``"control"`` (the default: commands and scans) or ``"observe"`` (info, state
    and :meth:`latest_frame` only). ``timeout_s`` bounds each call; a scan's chunks must each
    arrive within it.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        role: str = "control",
        timeout_s: float = 30.0,
        reconnect_timeout_s: float = 30.0,
        backoff_s: float = 0.05,
        max_backoff_s: float = 2.0,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        tls_ca: str | os.PathLike[str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if role not in ("control", "observe"):
            raise ConfigError(f"role must be 'control' or 'observe', got {role!r}")
        self.host, self.port = host, port
        self.role = role
        self.client_id = uuid.uuid4().hex[:16]
        self._token = read_token(token, token_file)
        self._timeout_s = timeout_s
        self._reconnect_timeout_s = reconnect_timeout_s
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._max_frame_bytes = max_frame_bytes
        self._sleep = sleep
        ca = tls_ca if tls_ca is not None else os.environ.get(TLS_CA_ENV) or None
        self._tls: ssl.SSLContext | None = None
        if ca is not None:
            enable_tls(ca=str(ca))
            try:
                self._tls = ssl.create_default_context(cafile=str(ca))
            except (ssl.SSLError, OSError) as exc:
                raise ConfigError(f"cannot use {str(ca)!r} as the TLS CA file: {exc}") from None
        self._lock = threading.RLock()
        self._proxy: Pyro5.client.Proxy | None = None
        self._reader: FrameReader | None = None  # the frame channel, opened on first use
        self._closed = False
        self.reconnects = 0
        self._connect()
        self._info = InstrumentInfo.from_json(self._call("info"), "instrument info from the server")

    @property
    def uri(self) -> str:
        return f"pyro:{self.host}:{self.port}"

    # -- connection -------------------------------------------------------------------------

    def _connect(self) -> None:
        proxy = Pyro5.client.Proxy(f"PYRO:{SERVICE_NAME}@{self.host}:{self.port}")
        proxy._pyroSerializer = "msgpack"
        proxy._pyroTimeout = self._timeout_s
        proxy._pyroHandshake = {
            "token": self._token or "",
            "client_id": self.client_id,
            "role": self.role,
        }
        try:
            proxy._pyroBind()
            reply = proxy.hello()
        except Pyro5.errors.CommunicationError as exc:
            proxy._pyroRelease()
            if "rejected" in str(exc):
                raise NotConnected(
                    f"{self.uri} refused the connection ({exc}); check the token "
                    f"(--token-file, {TOKEN_ENV} or {TOKEN_FILE_ENV})"
                ) from None
            raise CommunicationError(
                f"cannot connect to {self.uri}: {exc}; is `scopepilot serve` running there?"
            ) from None
        if not isinstance(reply, Mapping) or "error" in reply:
            proxy._pyroRelease()
            raise_remote_error(reply.get("error") if isinstance(reply, Mapping) else reply)
        ok = reply.get("ok")
        protocol = ok.get("protocol") if isinstance(ok, Mapping) else None
        if protocol != PROTOCOL_VERSION:
            proxy._pyroRelease()
            raise NotConnected(
                f"{self.uri} speaks protocol {protocol!r}; this client speaks {PROTOCOL_VERSION}: "
                "run the same scopepilot version on both sides"
            )
        self._proxy = proxy

    def _reconnect(self) -> None:
        """Connect again, retrying with exponential backoff for up to ``reconnect_timeout_s``."""
        delay, waited = self._backoff_s, 0.0
        while True:
            try:
                self._connect()
            except CommunicationError as exc:
                if waited >= self._reconnect_timeout_s:
                    raise CommunicationError(
                        f"{self.uri} unreachable after {waited:.1f} s of retries: {exc}"
                    ) from None
                self._sleep(delay)
                waited += delay
                delay = min(delay * 2, self._max_backoff_s)
                continue
            self.reconnects += 1
            log.info("reconnected to %s (reconnect %d)", self.uri, self.reconnects)
            return

    def _drop_channel(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(OSError):
                self._reader.sock.close()
            self._reader = None

    def _drop(self) -> None:
        self._drop_channel()
        if self._proxy is not None:
            try:
                self._proxy._pyroRelease()
            except Exception:  # a broken socket may fail to close; it is gone anyway
                log.debug("closing a broken proxy failed", exc_info=True)
            self._proxy = None

    def _call(self, method: str, *args: Any) -> Any:
        """Call ``method`` remotely and return its value, raising the server's error."""
        with self._lock:
            if self._closed:
                raise NotConnected(
                    f"{self.uri} is closed; open a new instrument with open_instrument"
                )
            if self._proxy is None:
                self._reconnect()
            proxy = self._proxy
            if proxy is None:  # _reconnect either sets it or raises
                raise NotConnected(f"{self.uri}: no connection")
            proxy._pyroClaimOwnership()
            try:
                reply = getattr(proxy, method)(*args)
            except Pyro5.errors.CommunicationError as exc:
                self._drop()
                raise CommunicationError(
                    f"connection to {self.uri} lost during {method}: {exc}; the next call "
                    "reconnects"
                ) from None
            except Exception as exc:  # a server-side bug, reported back by Pyro5
                raise InstrumentError(
                    f"{self.uri} failed in {method}: {type(exc).__name__}: {exc}"
                ) from None
        if not isinstance(reply, Mapping) or not ({"ok", "error"} & set(reply)):
            raise CommunicationError(f"malformed reply from {self.uri} to {method}: {reply!r}")
        if "error" in reply:
            raise_remote_error(reply["error"])
        return reply["ok"]

    # -- protocol ---------------------------------------------------------------------------

    def info(self) -> InstrumentInfo:
        if self._closed:
            raise NotConnected(f"{self.uri} is closed; open a new instrument with open_instrument")
        return self._info

    def state(self) -> InstrumentState:
        obj = self._call("state")
        try:
            return InstrumentState(
                position_m=(float(obj["position_m"][0]), float(obj["position_m"][1])),
                scan_region=ScanRegion.from_json(obj["scan_region"]),
                shape_px=(int(obj["shape_px"][0]), int(obj["shape_px"][1])),
                dwell_s=float(obj["dwell_s"]),
                scanning=bool(obj["scanning"]),
                time_s=float(obj["time_s"]),
                frames_done=int(obj["frames_done"]),
                connected=bool(obj.get("connected", True)),
                extra=dict(obj.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise DataError(f"malformed state from {self.uri}: {exc!r}") from None

    def _open_channel(self) -> socket.socket:
        """Open the frame channel with a one-time ticket from the authenticated connection."""
        ticket = self._call("frame_ticket")
        if not isinstance(ticket, bytes) or len(ticket) != TICKET_BYTES:
            raise CommunicationError(f"malformed frame ticket from {self.uri}")
        sock = socket.create_connection((self.host, self.port), timeout=self._timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._tls is not None:
            sock = self._tls.wrap_socket(sock, server_hostname=self.host)
        _kernel_timeouts(sock, self._timeout_s)
        sock.sendall(FRAME_CHANNEL_MAGIC + ticket)
        return sock

    def _frame_call(
        self, method: str, *args: Any, into: np.ndarray | None = None
    ) -> FrameReply | None:
        """Call a frame method over the frame channel (:class:`FrameReader` reads the reply).
        Returns the frame, whether it ends its scan, and the array its pixels are in, or None
        when there is no frame."""
        with self._lock:
            if self._closed:
                raise NotConnected(
                    f"{self.uri} is closed; open a new instrument with open_instrument"
                )
            try:
                if self._proxy is None:
                    self._reconnect()
                if self._reader is None:
                    self._reader = FrameReader(
                        self._open_channel(), max_bytes=self._max_frame_bytes
                    )
                request = _REQUESTS.get(method) if not args else None
                if request is None:
                    body = msgpack.packb([method, list(args)], use_bin_type=True)
                    request = struct.pack("!I", len(body)) + body
                self._reader.sock.sendall(request)
                return self._reader.read(streaming=method == "stream_next", into=into)
            except ReportedError as exc:  # read whole: the channel stays in step and is kept
                reported = exc.error
            except (OSError, struct.error, ValueError, msgpack.UnpackException) as exc:
                self._drop()
                raise CommunicationError(
                    f"connection to {self.uri} lost during {method}: {exc}; the next call "
                    "reconnects"
                ) from None
            except DataError:
                self._drop_channel()  # its framing can no longer be trusted; Pyro5's can
                raise
        raise_remote_error(reported)

    def acquire(self) -> Frame:
        result = self._frame_call("acquire")
        if result is None:
            raise CommunicationError(f"{self.uri} returned no frame for acquire")
        return result[0]

    def stream(self) -> Iterator[Frame]:
        sid = self._call("stream_open")
        buffer: np.ndarray | None = None
        finished = False
        try:
            while True:
                result = self._frame_call("stream_next", sid, into=buffer)
                if result is None:
                    finished = True
                    return
                frame, finished, buffer = result
                yield frame
                if finished:
                    return
        finally:
            if not finished and self._proxy is not None and not self._closed:
                try:  # the consumer stopped early: end the scan on the server
                    self._call("stream_close", sid)
                except ScopePilotError:
                    log.debug("closing stream %s failed", sid, exc_info=True)

    def execute(self, command: Command) -> CommandResult:
        if not isinstance(command, Command):
            raise CommandRejected(f"not a command: {command!r}")
        if command.requires not in self.info().capabilities:
            raise CommandRejected(
                f"{self._info.id} cannot execute {command.kind} (needs capability "
                f"{command.requires!s})"
            )
        obj = self._call("execute", command.to_json())
        try:
            return CommandResult(
                command_id=str(obj["command_id"]),
                ok=bool(obj["ok"]),
                time_s=float(obj["time_s"]),
                detail=dict(obj.get("detail", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"malformed command result from {self.uri}: {exc!r}") from None

    def latest_frame(self, after_index: int = -1, *, timeout_s: float = 0.0) -> Frame | None:
        """The last complete frame the server scanned with an index above ``after_index``
        (waiting up to ``timeout_s``), or None. Observers watch the controller's scans so."""
        result = self._frame_call("latest_frame", after_index, timeout_s)
        return None if result is None else result[0]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._proxy is not None:
                try:
                    self._proxy._pyroClaimOwnership()
                    self._proxy.release_control()
                except Exception:  # closing: the server may already be gone
                    log.debug("release_control failed while closing", exc_info=True)
            self._drop()

    def __enter__(self) -> RemoteInstrument:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kernel_timeouts(sock: socket.socket, timeout_s: float) -> None:
    """Blocking I/O with the timeout kept by the kernel (``SO_RCVTIMEO``/``SO_SNDTIMEO``): a
    Python socket timeout would poll before every call and read large frames in small pieces.
    A timed-out call raises an :class:`OSError`, as a closed connection does."""
    if not hasattr(socket, "SO_RCVTIMEO"):
        return  # the Python-level timeout stays
    seconds = int(timeout_s)
    timeval = struct.pack("ll", seconds, int((timeout_s - seconds) * 1e6))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    except OSError:
        return
    sock.settimeout(None)


def open_remote(rest: str, **options: Any) -> RemoteInstrument:
    """``pyro:HOST:PORT`` -> :class:`RemoteInstrument` (options are its keyword arguments)."""
    host, port = parse_address(rest, "pyro")
    return RemoteInstrument(host, port, **options)
