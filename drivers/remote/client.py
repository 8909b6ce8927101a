"""The client side of a remote instrument: ``pyro:HOST:PORT`` URIs.

:class:`RemoteInstrument` is an :class:`~drivers.protocol.Instrument` whose calls go to an
:class:`~drivers.remote.server.InstrumentServer` over Pyro5 (msgpack serializer, frames as raw
bytes). The token comes from the ``token`` option, a ``token_file``, or the environment
(``SCOPEPILOT_TOKEN``, ``SCOPEPILOT_TOKEN_FILE``).

When the connection drops, the call in progress raises
:class:`~drivers.errors.CommunicationError` (a scan streaming at the time is lost, never
delivered twice) and the next call reconnects, retrying with exponential backoff for up to
``reconnect_timeout_s``. A controlling client gets control back on reconnection.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import Pyro5.client
import Pyro5.errors

from drivers.commands import Capability, Command
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
from drivers.limits import Limits
from drivers.protocol import CommandResult, InstrumentInfo, InstrumentState
from drivers.remote.server import SERVICE_NAME
from drivers.remote.wire import DTYPES, MAX_FRAME_BYTES, decode_frame

log = logging.getLogger(__name__)

TOKEN_ENV = "SCOPEPILOT_TOKEN"
TOKEN_FILE_ENV = "SCOPEPILOT_TOKEN_FILE"

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


def raise_remote_error(error: Any) -> None:
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
        self._lock = threading.RLock()
        self._proxy: Pyro5.client.Proxy | None = None
        self._closed = False
        self.reconnects = 0
        self._connect()
        self._info = self._parse_info(self._call("info"))

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
        if "error" in reply:
            proxy._pyroRelease()
            raise_remote_error(reply["error"])
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

    def _drop(self) -> None:
        if self._proxy is not None:
            try:
                self._proxy._pyroRelease()
            except Exception:
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
            except Exception as exc:
                raise InstrumentError(
                    f"{self.uri} failed in {method}: {type(exc).__name__}: {exc}"
                ) from None
        if not isinstance(reply, Mapping) or not ({"ok", "error"} & set(reply)):
            raise CommunicationError(f"malformed reply from {self.uri} to {method}: {reply!r}")
        if "error" in reply:
            raise_remote_error(reply["error"])
        return reply["ok"]

    # -- protocol ---------------------------------------------------------------------------

    @staticmethod
    def _parse_info(obj: Any) -> InstrumentInfo:
        try:
            return InstrumentInfo(
                kind=str(obj["kind"]),
                id=str(obj["id"]),
                channels=tuple(str(c) for c in obj["channels"]),
                capabilities=frozenset(Capability(c) for c in obj["capabilities"]),
                limits=Limits.from_json(obj["limits"]),
                details=dict(obj.get("details", {})),
            )
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise DataError(f"malformed instrument info from the server: {exc!r}") from None

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

    def _frame(self, message: Any, into: np.ndarray | None = None) -> Frame:
        if not isinstance(message, list) or len(message) < 2:
            raise DataError(f"malformed frame message from {self.uri}")
        return decode_frame(message[0], message[1], into=into, max_bytes=self._max_frame_bytes)

    def acquire(self) -> Frame:
        return self._frame(self._call("acquire"))

    def stream(self) -> Iterator[Frame]:
        sid = self._call("stream_open")
        buffer: np.ndarray | None = None
        finished = False
        try:
            while True:
                message = self._call("stream_next", sid)
                if message is None:
                    finished = True
                    return
                if buffer is None:
                    buffer = _empty_buffer(message, self._max_frame_bytes)
                frame = self._frame(message, buffer)
                finished = bool(message[2]) if len(message) > 2 else False
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
        message = self._call("latest_frame", after_index, timeout_s)
        return None if message is None else self._frame(message)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._proxy is not None:
                try:
                    self._proxy._pyroClaimOwnership()
                    self._proxy.release_control()
                except Exception:
                    log.debug("release_control failed while closing", exc_info=True)
            self._drop()

    def __enter__(self) -> RemoteInstrument:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _empty_buffer(message: Any, max_bytes: int) -> np.ndarray:
    """The NaN-filled (zero for integers) buffer a stream's lines are written into."""
    header = message[0] if isinstance(message, list) and message else None
    if not isinstance(header, Mapping):
        raise DataError("malformed frame message: no header")
    shape, dtype = header.get("shape"), header.get("dtype")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(n, int) and n > 0 for n in shape)
        or dtype not in DTYPES
    ):
        raise DataError(f"malformed frame header: shape {shape!r}, dtype {dtype!r}")
    np_dtype = np.dtype(dtype)
    if shape[0] * shape[1] * np_dtype.itemsize > max_bytes:
        raise DataError(
            f"frame of shape {shape[0]}x{shape[1]} {dtype} is over the limit of {max_bytes} bytes"
        )
    return np.full(shape, np.nan if np_dtype.kind == "f" else 0, dtype=np_dtype)


def open_remote(rest: str, **options: Any) -> RemoteInstrument:
    """``pyro:HOST:PORT`` -> :class:`RemoteInstrument` (options are its keyword arguments)."""
    host, port = parse_address(rest, "pyro")
    return RemoteInstrument(host, port, **options)
