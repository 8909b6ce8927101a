"""``nanonis:HOST:PORT``: a Nanonis SPM controller through the official ``nanonis_spm`` client.

:class:`NanonisSTM` maps scopepilot commands onto the controller's TCP interface:

=============  ==============================================================================
Scan           ``Scan.FrameSet`` (region), ``Scan.BufferSet`` (pixels, lines),
               ``Scan.SpeedSet`` (time per line = dwell x pixels)
SetDwell       ``Scan.SpeedSet``
MoveTo         ``FolMe.XYPosSet`` (Follow Me), then ``Scan.FrameSet`` centred there
TipPulse       ``Bias.Pulse`` (absolute bias, Z controller on hold)
TipDip         ``TipShaper.PropsSet`` (tip lift = -depth, bias) then ``TipShaper.Start``
SetBias        ``Bias.Set``
Retract        ``ZCtrl.Withdraw``;  Approach: ``ZCtrl.OnOffSet`` 1
AbortScan      ``Scan.Action`` stop
=============  ==============================================================================

Frames: ``Scan.Action`` start, then ``Scan.FrameDataGrab`` is polled; lines appear as the
controller scans them (unscanned rows are NaN) and stream as partial frames. The grab's body is
read with the official client's transport and decoded with numpy in one step (the client's own
parser makes one ``struct`` call per pixel). Every command first passes this driver's
:class:`~drivers.safety.SafetyEnvelope` (``limits``, narrowed by ``operator_limits``); the
controller's own limits apply after that.

The official client is given a socket wrapper that sends whole messages, keeps this driver's
timeout (the client sets 1000 s after every call) and turns a connection closed mid-reply into
an error (the client would otherwise spin on empty reads). Socket failures raise
:class:`~drivers.errors.CommunicationError`; the next call reconnects with backoff.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from nanonis_spm import Nanonis

from drivers.commands import (
    AbortScan,
    Approach,
    Capability,
    Command,
    MoveTo,
    Retract,
    Scan,
    SetBias,
    SetDwell,
    TipDip,
    TipPulse,
)
from drivers.errors import (
    CommandRejected,
    CommunicationError,
    DataError,
    NotConnected,
    ScopePilotError,
)
from drivers.frame import Frame, ScanRegion
from drivers.limits import STM_LIMITS, Limits
from drivers.nanonis.wire import decode_frame_grab
from drivers.protocol import CommandResult, InstrumentInfo, InstrumentState
from drivers.remote.client import parse_address
from drivers.safety import SafetyEnvelope

log = logging.getLogger(__name__)

#: A low-temperature STM's envelope; pass ``limits=`` for your instrument.
NANONIS_LIMITS = STM_LIMITS


class _GuardedSocket:
    """The socket handed to the official client (see the module docstring for why)."""

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        self._sock = sock
        self._timeout_s = timeout_s
        sock.settimeout(timeout_s)

    def send(self, data: bytes) -> int:
        self._sock.sendall(data)
        return len(data)

    def recv(self, size: int) -> bytes:
        if size <= 0:
            return b""
        data = self._sock.recv(size)
        if not data:
            raise ConnectionError("the controller closed the connection in the middle of a reply")
        return data

    def settimeout(self, _timeout: float | None) -> None:
        self._sock.settimeout(self._timeout_s)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


class NanonisSTM:
    """An STM driven by a Nanonis controller at ``host:port`` (its TCP programming interface).

    ``channel_index`` is the scan buffer slot of the topography (Z) signal; ``poll_s`` the wait
    between frame grabs while scanning. Time (``state().time_s``, frame timestamps) is seconds
    since this driver connected.
    """

    kind = "stm"
    channel = "topography"
    capabilities = frozenset(
        {
            Capability.SCAN,
            Capability.STAGE,
            Capability.TIP_CONDITIONING,
            Capability.Z_CONTROL,
            Capability.BIAS,
        }
    )

    def __init__(
        self,
        host: str,
        port: int,
        *,
        limits: Limits = NANONIS_LIMITS,
        operator_limits: Limits | None = None,
        channel_index: int = 0,
        timeout_s: float = 30.0,
        poll_s: float = 0.005,
        reconnect_timeout_s: float = 10.0,
        backoff_s: float = 0.05,
        max_backoff_s: float = 1.0,
        instrument_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.host, self.port = host, port
        self._limits = limits
        self._envelope = SafetyEnvelope(limits, operator_limits=operator_limits)
        self._channel = channel_index
        self._timeout_s = timeout_s
        self._poll_s = poll_s
        self._reconnect_timeout_s = reconnect_timeout_s
        self._backoff_s, self._max_backoff_s = backoff_s, max_backoff_s
        self._id = instrument_id or f"nanonis:{host}:{port}"
        self._clock, self._sleep = clock, sleep
        self._t0 = clock()
        self._lock = threading.RLock()
        self._client: Nanonis | None = None
        self._closed = False
        self._scanning = False
        self._frames_done = 0
        self.reconnects = 0
        self._connect()

    # -- transport ------------------------------------------------------------------------------

    def _connect(self) -> None:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self._timeout_s)
        except OSError as exc:
            raise CommunicationError(
                f"cannot connect to the Nanonis controller at {self.host}:{self.port}: {exc}; "
                "is the TCP programming interface enabled on that port?"
            ) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._client = Nanonis(_GuardedSocket(sock, self._timeout_s))

    def _reconnect(self) -> None:
        delay, waited = self._backoff_s, 0.0
        while True:
            try:
                self._connect()
            except CommunicationError:
                if waited >= self._reconnect_timeout_s:
                    raise
                self._sleep(delay)
                waited += delay
                delay = min(2 * delay, self._max_backoff_s)
                continue
            self.reconnects += 1
            return

    def _drop(self) -> None:
        if self._client is not None:
            with contextlib.suppress(OSError):
                self._client.close()
            self._client = None

    def _nanonis(self) -> Nanonis:
        if self._closed:
            raise NotConnected(f"{self._id} is closed; open a new instrument with open_instrument")
        if self._client is None:
            self._reconnect()
        if self._client is None:  # _reconnect sets it or raises
            raise NotConnected(f"{self._id}: no connection")
        return self._client

    def _call(self, method: str, *args: Any) -> list[Any]:
        """Call the official client's ``method`` and return the reply's values."""
        name = method.replace("_", ".", 1)
        with self._lock:
            client = self._nanonis()
            try:
                reply = getattr(client, method)(*args)
            except (OSError, struct.error, IndexError, ValueError, UnicodeDecodeError) as exc:
                self._drop()
                raise CommunicationError(
                    f"{self._id}: {name} failed ({type(exc).__name__}: {exc}); the next call "
                    "reconnects"
                ) from None
        if not reply:  # the client got a reply to another command
            with self._lock:
                self._drop()
            raise CommunicationError(f"{self._id}: {name} got a reply to another command")
        error, _raw, values = reply
        if error:
            raise CommandRejected(f"{self._id}: the controller refused {name}: {error}")
        return list(values)

    def _grab(self) -> np.ndarray:
        """The current scan frame of the topography channel, ``(lines, pixels) float32``."""
        with self._lock:
            client = self._nanonis()
            try:
                body = client.send("Scan.FrameDataGrab", [self._channel, 1], ["I", "I"])
            except (OSError, struct.error, IndexError, ValueError) as exc:
                self._drop()
                raise CommunicationError(f"{self._id}: Scan.FrameDataGrab failed: {exc}") from None
        if not body:
            with self._lock:
                self._drop()
            raise CommunicationError(f"{self._id}: Scan.FrameDataGrab got another command's reply")
        _name, data, _direction, error = decode_frame_grab(bytes(body))
        if error:
            raise CommandRejected(f"{self._id}: the controller refused Scan.FrameDataGrab: {error}")
        return data

    # -- protocol -------------------------------------------------------------------------------

    def info(self) -> InstrumentInfo:
        if self._closed:
            raise NotConnected(f"{self._id} is closed; open a new instrument with open_instrument")
        return InstrumentInfo(
            kind=self.kind,
            id=self._id,
            channels=(self.channel,),
            capabilities=self.capabilities,
            limits=self._envelope.limits,
            details={"controller": "nanonis", "host": self.host, "port": self.port},
        )

    def _settings(self) -> tuple[ScanRegion, tuple[int, int], float]:
        cx, cy, width, height, angle = self._call("Scan_FrameGet")
        _n, _channels, pixels, lines = self._call("Scan_BufferGet")
        time_per_line_s = self._call("Scan_SpeedGet")[2]
        try:
            region = ScanRegion(float(cx), float(cy), float(width), float(height), -float(angle))
        except DataError as exc:
            raise CommunicationError(
                f"{self._id}: the controller reported a bad frame: {exc}"
            ) from None
        if pixels < 1 or lines < 1:
            raise CommunicationError(f"{self._id}: the controller reported {pixels}x{lines} pixels")
        return region, (int(lines), int(pixels)), float(time_per_line_s) / int(pixels)

    def state(self) -> InstrumentState:
        with self._lock:
            region, shape, dwell_s = self._settings()
            x_m, y_m = self._call("FolMe_XYPosGet", 0)
            scanning = bool(self._call("Scan_StatusGet")[0]) or self._scanning
            bias_V = float(self._call("Bias_Get")[0])
            z_on = bool(self._call("ZCtrl_OnOffGet")[0])
            return InstrumentState(
                position_m=(float(x_m), float(y_m)),
                scan_region=region,
                shape_px=shape,
                dwell_s=dwell_s,
                scanning=scanning,
                time_s=self._clock() - self._t0,
                frames_done=self._frames_done,
                extra={"bias_V": bias_V, "z_controller_on": z_on, "retracted": not z_on},
            )

    def acquire(self) -> Frame:
        last: Frame | None = None
        for part in self.stream():
            last = part
        if last is None:
            raise CommunicationError(f"{self._id}: the scan produced no frame")
        return last

    def stream(self) -> Iterator[Frame]:
        with self._lock:
            if self._scanning:
                raise CommandRejected("a scan is already streaming; finish or abort it first")
            region, shape, dwell_s = self._settings()
            if self._call("Scan_StatusGet")[0]:  # left running by a connection that dropped
                self._call("Scan_Action", 1, 0)
            self._call("Scan_Action", 0, 0)  # start, scanning down: row 0 is the first line
            self._scanning = True
            index = self._frames_done
        finished = False
        try:
            shown = 0
            while True:
                running = bool(self._call("Scan_StatusGet")[0])
                data = self._grab()
                if data.shape != shape:
                    raise DataError(
                        f"{self._id}: the controller returned a {data.shape} frame, "
                        f"expected {shape}"
                    )
                lines = _lines_done(data)
                if not running:
                    finished = True
                    with self._lock:
                        self._frames_done += 1
                        self._scanning = False
                    aborted = lines < shape[0]
                    yield self._frame(data, lines, region, dwell_s, index, aborted)
                    return
                if shown < lines < shape[0]:  # a full buffer is delivered once the scan ends
                    shown = lines
                    yield self._frame(data, lines, region, dwell_s, index, False)
                self._sleep(self._poll_s)
        finally:
            with self._lock:
                self._scanning = False
            if not finished and self._client is not None and not self._closed:
                try:  # the consumer stopped early or an error struck: stop the scan
                    self._call("Scan_Action", 1, 0)
                except ScopePilotError:
                    log.debug("stopping the scan failed", exc_info=True)

    def _frame(
        self,
        data: np.ndarray,
        lines: int,
        region: ScanRegion,
        dwell_s: float,
        index: int,
        aborted: bool,
    ) -> Frame:
        rows, cols = data.shape
        out = data.copy()
        out[lines:] = np.nan
        return Frame(
            data=out,
            channel=self.channel,
            pixel_size_m=(region.height_m / rows, region.width_m / cols),
            dwell_s=dwell_s,
            scan_region=region,
            frame_index=index,
            timestamp_s=self._clock() - self._t0,
            lines_done=lines,
            instrument=self._id,
            metadata={"aborted": True} if aborted else {},
        )

    def execute(self, command: Command) -> CommandResult:
        if not isinstance(command, Command):
            raise CommandRejected(f"not a command: {command!r}")
        if command.requires not in self.capabilities:
            raise CommandRejected(
                f"{self._id} cannot execute {command.kind} (needs capability {command.requires!s})"
            )
        if isinstance(command, AbortScan):
            self._call("Scan_Action", 1, 0)
            return CommandResult(command.id, True, self._clock() - self._t0, {})
        with self._lock:
            now_s = self._clock() - self._t0
            x_m, y_m = self._call("FolMe_XYPosGet", 0)
            self._envelope.check(command, position_m=(float(x_m), float(y_m)), now_s=now_s)
            detail = self._apply(command)
            self._envelope.record_executed(command, now_s=now_s)
            return CommandResult(command.id, True, self._clock() - self._t0, detail)

    def _apply(self, command: Command) -> dict[str, Any]:
        timeout_ms = int(self._timeout_s * 1000)
        if isinstance(command, Scan):
            region, shape, dwell_s = self._settings()
            if command.shape_px is not None:
                lines, pixels = command.shape_px
                if pixels % 16:
                    raise CommandRejected(
                        f"Scan #{command.id}: Nanonis scans multiples of 16 pixels per line; "
                        f"got {pixels} (use {max(16, round(pixels / 16) * 16)})"
                    )
                self._call("Scan_BufferSet", [self._channel], pixels, lines)
                shape = (lines, pixels)
            if command.region is not None:
                region = command.region
                self._call(
                    "Scan_FrameSet",
                    region.center_x_m,
                    region.center_y_m,
                    region.width_m,
                    region.height_m,
                    -region.rotation_deg,
                )
            dwell_s = command.dwell_s if command.dwell_s is not None else dwell_s
            self._set_dwell(dwell_s, shape[1])
            return {"region": region.to_json(), "shape_px": list(shape), "dwell_s": dwell_s}
        if isinstance(command, SetDwell):
            _region, shape, _dwell = self._settings()
            self._set_dwell(command.dwell_s, shape[1])
            return {"dwell_s": command.dwell_s}
        if isinstance(command, MoveTo):
            self._call("FolMe_XYPosSet", command.x_m, command.y_m, 1)
            region, _shape, _dwell = self._settings()
            moved = region.moved_to(command.x_m, command.y_m)
            self._call(
                "Scan_FrameSet",
                moved.center_x_m,
                moved.center_y_m,
                moved.width_m,
                moved.height_m,
                -moved.rotation_deg,
            )
            return {"position_m": [command.x_m, command.y_m]}
        if isinstance(command, TipPulse):
            self._call("Bias_Pulse", 1, command.duration_s, command.bias_V, 1, 2)
            return {"bias_V": command.bias_V, "duration_s": command.duration_s}
        if isinstance(command, TipDip):
            bias_V = float(self._call("Bias_Get")[0])
            self._call(
                "TipShaper_PropsSet",
                0.05,  # switch-off delay (s)
                1,  # change bias: yes
                command.bias_V,
                -command.depth_m,  # tip lift: down into the surface
                0.1,  # lift time 1 (s)
                bias_V,  # bias lift: back to the imaging bias
                0.05,  # bias settling time (s)
                command.depth_m,  # lift height: back up
                0.1,  # lift time 2 (s)
                0.05,  # end wait time (s)
                1,  # restore feedback
            )
            self._call("TipShaper_Start", 1, timeout_ms)
            return {"depth_m": command.depth_m, "bias_V": command.bias_V}
        if isinstance(command, SetBias):
            self._call("Bias_Set", command.bias_V)
            return {"bias_V": command.bias_V}
        if isinstance(command, Retract):
            self._call("ZCtrl_Withdraw", 1, timeout_ms)
            return {"retracted": True}
        if isinstance(command, Approach):
            self._call("ZCtrl_OnOffSet", 1)
            return {"retracted": False}
        raise CommandRejected(f"{self._id} has no mapping for {command.kind}")

    def _set_dwell(self, dwell_s: float, pixels: int) -> None:
        time_per_line_s = dwell_s * pixels
        self._call("Scan_SpeedSet", 0.0, 0.0, time_per_line_s, time_per_line_s, 2, 1.0)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop()

    def __enter__(self) -> NanonisSTM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _lines_done(data: np.ndarray) -> int:
    """How many leading rows are fully scanned (finite)."""
    finite_rows = np.isfinite(data).all(axis=1)
    if finite_rows.all():
        return int(data.shape[0])
    return int(np.argmin(finite_rows))


def open_nanonis(rest: str, **options: Any) -> NanonisSTM:
    """``nanonis:HOST:PORT`` -> :class:`NanonisSTM` (options are its keyword arguments)."""
    host, port = parse_address(rest, "nanonis")
    return NanonisSTM(host, port, **options)
