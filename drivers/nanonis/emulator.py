"""An emulator of a Nanonis SPM controller's TCP interface, backed by the STM simulator.

No Nanonis controller is reachable here, so ``scopepilot serve-nanonis`` serves the subset of
the documented protocol that :class:`drivers.nanonis.driver.NanonisSTM` uses (see
:data:`COMMANDS`), over :class:`drivers.sim.SimulatedSTM`. The official ``nanonis_spm`` client
talks to it unchanged.

How it maps onto the simulator (where it simplifies a real controller, it says so):

- ``Scan.Action`` start scans one frame in a background thread, line by line, pausing
  ``line_delay_s`` of wall time per line so that clients can watch partial frames;
  ``Scan.FrameDataGrab`` returns the frame being scanned (NaN where not scanned yet), rows in
  scan order; stop aborts it. Pause/resume/freeze are not emulated (an error reply).
- ``Scan.BufferSet`` pixels are coerced to the closest multiple of 16, as the controller does;
  the dwell is ``Scan.SpeedSet``'s forward time per line divided by the pixels.
- ``Bias.Pulse`` and ``TipShaper.Start`` pulse and dip the simulated tip (the dip depth is the
  negated tip lift); ``ZCtrl.Withdraw`` retracts; ``ZCtrl.OnOffSet`` 1 approaches again.
- ``FolMe.XYPosSet`` moves the tip, and the simulator scans around the tip, so the scan frame
  centre follows it.

Commands go through the simulated instrument's own limits; a violation is an error reply and
changes nothing. Malformed input (garbage, unknown commands, wrong body sizes, oversized or
truncated messages, clients that stall mid-message) gets a clear error or a closed connection,
is logged, executes nothing, and the other clients are served on.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from drivers.commands import (
    AbortScan,
    Approach,
    Command,
    MoveTo,
    Retract,
    Scan,
    SetDwell,
    TipDip,
    TipPulse,
)
from drivers.errors import DataError, ScopePilotError
from drivers.frame import ScanRegion
from drivers.nanonis import wire
from drivers.sim import SimulatedSTM

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CommandSpec:
    """Argument and return types of one emulated command (``nanonis_spm`` notation)."""

    args: tuple[str, ...]
    returns: tuple[str, ...]


COMMANDS: dict[str, CommandSpec] = {
    "Bias.Set": CommandSpec(("f",), ()),
    "Bias.Get": CommandSpec((), ("f",)),
    "Bias.Pulse": CommandSpec(("I", "f", "f", "H", "H"), ()),
    "Scan.Action": CommandSpec(("H", "I"), ()),
    "Scan.StatusGet": CommandSpec((), ("I",)),
    "Scan.WaitEndOfScan": CommandSpec(("i",), ("I", "I", "*-c")),
    "Scan.FrameSet": CommandSpec(("f",) * 5, ()),
    "Scan.FrameGet": CommandSpec((), ("f",) * 5),
    "Scan.BufferSet": CommandSpec(("+*i", "i", "i"), ()),
    "Scan.BufferGet": CommandSpec((), ("i", "*i", "i", "i")),
    "Scan.SpeedSet": CommandSpec(("f", "f", "f", "f", "H", "f"), ()),
    "Scan.SpeedGet": CommandSpec((), ("f", "f", "f", "f", "H", "f")),
    "Scan.FrameDataGrab": CommandSpec(("I", "I"), ("i", "*-c", "i", "i", "2f", "I")),
    "FolMe.XYPosSet": CommandSpec(("d", "d", "I"), ()),
    "FolMe.XYPosGet": CommandSpec(("I",), ("d", "d")),
    "TipShaper.PropsSet": CommandSpec(("f", "I", "f", "f", "f", "f", "f", "f", "f", "f", "I"), ()),
    "TipShaper.PropsGet": CommandSpec((), ("f", "I", "f", "f", "f", "f", "f", "f", "f", "f", "I")),
    "TipShaper.Start": CommandSpec(("I", "i"), ()),
    "ZCtrl.OnOffSet": CommandSpec(("I",), ()),
    "ZCtrl.OnOffGet": CommandSpec((), ("I",)),
    "ZCtrl.Withdraw": CommandSpec(("I", "i"), ()),
}

CHANNEL_NAME = "Z (m)"
MAX_BODY_BYTES = 64 * 1024  # the largest request the emulated subset can need


class _RefusedError(Exception):
    """A request that is answered with an error reply and executes nothing."""


class NanonisEmulator:
    """Serves the Nanonis TCP protocol on ``host:port`` (port 0 picks a free one).

    ``stm_options`` are :class:`SimulatedSTM` keywords (``seed``, ``shape_px``, ``dwell_s``,
    ``region``, simulator options). ``message_timeout_s`` is how long a client may take to
    finish a message it has begun.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        line_delay_s: float = 0.0,
        message_timeout_s: float = 5.0,
        sleep: Callable[[float], None] = time.sleep,
        **stm_options: Any,
    ) -> None:
        self.stm = SimulatedSTM(**{**stm_options, "lines_per_chunk": 1})
        self.line_delay_s = line_delay_s
        self.message_timeout_s = message_timeout_s
        self._sleep = sleep
        self._lock = threading.RLock()  # guards the scan buffer and the settings below
        state = self.stm.state()
        self._bias_V = float(self.stm.simulator.bias_V)
        self._time_per_line_s = state.dwell_s * state.shape_px[1]
        self._channels = [0]
        self._z_on = True
        self._shaper = [0.05, 1, 0.0, -1e-9, 0.1, 0.0, 0.05, 2e-9, 0.1, 0.05, 1]
        self._buffer = np.full(state.shape_px, np.nan, dtype=np.float32)
        self._scan_thread: threading.Thread | None = None
        self._scan_done = threading.Event()
        self._scan_done.set()
        self.executed: list[str] = []  # names of the commands executed successfully
        self.refused: list[tuple[str, str]] = []  # (peer, reason) of refused requests
        self._listener = socket.create_server((host, port))
        self.host = host
        self.port = int(self._listener.getsockname()[1])
        self._closed = threading.Event()
        self._clients: set[socket.socket] = set()
        self._thread: threading.Thread | None = None
        self._handlers: dict[str, Callable[[list[Any]], list[Any]]] = {
            "Bias.Set": self._bias_set,
            "Bias.Get": lambda a: [self._bias_V],
            "Bias.Pulse": self._bias_pulse,
            "Scan.Action": self._scan_action,
            "Scan.StatusGet": lambda a: [int(not self._scan_done.is_set())],
            "Scan.WaitEndOfScan": self._wait_end_of_scan,
            "Scan.FrameSet": self._frame_set,
            "Scan.FrameGet": self._frame_get,
            "Scan.BufferSet": self._buffer_set,
            "Scan.BufferGet": self._buffer_get,
            "Scan.SpeedSet": self._speed_set,
            "Scan.SpeedGet": lambda a: [
                0.0,
                0.0,
                self._time_per_line_s,
                self._time_per_line_s,
                1,
                1.0,
            ],
            "Scan.FrameDataGrab": self._frame_data_grab,
            "FolMe.XYPosSet": self._xy_set,
            "FolMe.XYPosGet": lambda a: list(self.stm.state().position_m),
            "TipShaper.PropsSet": self._shaper_set,
            "TipShaper.PropsGet": lambda a: list(self._shaper),
            "TipShaper.Start": self._shaper_start,
            "ZCtrl.OnOffSet": self._z_on_off,
            "ZCtrl.OnOffGet": lambda a: [int(self._z_on and not self.stm.simulator.tip_retracted)],
            "ZCtrl.Withdraw": self._withdraw,
        }

    @property
    def address(self) -> str:
        """The scopepilot URI of this emulator (``nanonis:HOST:PORT``)."""
        return f"nanonis:{self.host}:{self.port}"

    # -- serving ------------------------------------------------------------------------------

    def start(self) -> NanonisEmulator:
        self._thread = threading.Thread(
            target=self.serve_forever, name="nanonis-emulator", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        while not self._closed.is_set():
            try:
                conn, addr = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._clients.add(conn)
            threading.Thread(
                target=self._serve_client, args=(conn, f"{addr[0]}:{addr[1]}"), daemon=True
            ).start()

    def close(self) -> None:
        self._closed.set()
        self.stm.execute(AbortScan(source="emulator", reason="shutting down"))
        with contextlib.suppress(OSError):  # shutdown wakes the thread blocked in accept()
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            clients = list(self._clients)
        for conn in clients:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._scan_thread is not None:
            self._scan_thread.join(timeout=10)
        self.stm.close()

    def __enter__(self) -> NanonisEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _refuse(self, peer: str, reason: str) -> None:
        self.refused.append((peer, reason))
        log.warning("nanonis emulator: refused a request from %s: %s", peer, reason)

    def _recv_exact(self, conn: socket.socket, size: int) -> bytes | None:
        data = bytearray()
        while len(data) < size:
            chunk = conn.recv(min(size - len(data), 1 << 16))
            if not chunk:
                return None
            data += chunk
        return bytes(data)

    def _serve_client(self, conn: socket.socket, peer: str) -> None:
        try:
            while not self._closed.is_set():
                conn.settimeout(None)
                first = conn.recv(1)  # idle clients may wait as long as they like
                if not first:
                    return
                conn.settimeout(self.message_timeout_s)  # but must finish what they begin
                rest = self._recv_exact(conn, wire.HEADER_SIZE - 1)
                if rest is None:
                    self._refuse(peer, "connection closed inside a message header")
                    return
                try:
                    name, body_size, send_response = wire.unpack_header(first + rest)
                except DataError as exc:
                    self._refuse(peer, f"garbage instead of a message header ({exc})")
                    return  # the stream cannot be re-synchronised: close it
                if body_size > MAX_BODY_BYTES:
                    self._refuse(
                        peer, f"{name}: body of {body_size} bytes is over {MAX_BODY_BYTES}"
                    )
                    conn.sendall(
                        wire.response(
                            name,
                            wire.error_part(
                                f"request body of {body_size} bytes exceeds the "
                                f"{MAX_BODY_BYTES}-byte limit"
                            ),
                        )
                    )
                    return
                body = self._recv_exact(conn, body_size)
                if body is None:
                    self._refuse(peer, f"{name}: connection closed inside the body (truncated)")
                    return
                reply = self._handle(name, body, peer)
                if send_response:
                    conn.sendall(reply)
        except TimeoutError:
            self._refuse(peer, f"client stalled for {self.message_timeout_s} s inside a message")
        except OSError as exc:
            log.info("nanonis emulator: client %s went away: %s", peer, exc)
        except Exception:  # a bug here must not pass silently, nor stop the other clients
            log.exception("nanonis emulator: serving %s failed", peer)
        finally:
            with self._lock:
                self._clients.discard(conn)
            conn.close()

    def _handle(self, name: str, body: bytes, peer: str) -> bytes:
        spec = COMMANDS.get(name)
        if spec is None:
            self._refuse(peer, f"unknown command {name!r}")
            return wire.response(
                name,
                wire.error_part(
                    f"unknown command {name!r}; this emulator serves {', '.join(COMMANDS)}"
                ),
            )
        try:
            args = wire.decode_args(body, spec.args)
            values = self._handlers[name](args)
        except (DataError, _RefusedError, ScopePilotError) as exc:
            self._refuse(peer, f"{name}: {exc}")
            return wire.response(
                name,
                wire.encode_values(wire.zero_values(spec.returns), spec.returns)
                + wire.error_part(f"{name}: {exc}"),
            )
        self.executed.append(name)
        return wire.response(name, wire.encode_values(values, spec.returns) + wire.error_part())

    # -- scanning -----------------------------------------------------------------------------

    def _scan_loop(self) -> None:
        try:
            for part in self.stm.stream():
                with self._lock:
                    self._buffer = part.data
                if self.line_delay_s > 0:
                    self._sleep(self.line_delay_s)
        except ScopePilotError as exc:
            log.warning("nanonis emulator: scan failed: %s", exc)
        finally:
            self._scan_done.set()

    def _scan_action(self, args: list[Any]) -> list[Any]:
        action, _direction = args
        if action == 0:  # start
            if not self._scan_done.is_set():
                raise _RefusedError("a scan is already running")
            rows, cols = self.stm.state().shape_px
            with self._lock:
                self._buffer = np.full((rows, cols), np.nan, dtype=np.float32)
            self._scan_done.clear()
            self._scan_thread = threading.Thread(
                target=self._scan_loop, name="nanonis-scan", daemon=True
            )
            self._scan_thread.start()
        elif action == 1:  # stop
            self.stm.execute(AbortScan(source="nanonis", reason="Scan.Action stop"))
            self._scan_done.wait(timeout=10)
        else:
            raise _RefusedError(
                f"scan action {action} (pause/resume/freeze/go to centre) is not emulated"
            )
        return []

    def _wait_end_of_scan(self, args: list[Any]) -> list[Any]:
        (timeout_ms,) = args
        timeout_s = None if timeout_ms < 0 else timeout_ms / 1000
        finished = self._scan_done.wait(timeout=timeout_s)
        return [int(not finished), 0, ""]

    def _frame_data_grab(self, args: list[Any]) -> list[Any]:
        channel, _direction = args
        if channel not in self._channels:
            raise _RefusedError(
                f"channel index {channel} is not acquired; acquired: {self._channels}"
            )
        with self._lock:
            data = self._buffer.copy()
        return [len(CHANNEL_NAME), CHANNEL_NAME, data.shape[0], data.shape[1], data, 0]

    # -- settings -----------------------------------------------------------------------------

    def _execute(self, command: Command) -> Any:
        return self.stm.execute(command.with_meta(source="nanonis"))

    def _not_scanning(self, what: str) -> None:
        if not self._scan_done.is_set():
            raise _RefusedError(f"cannot change {what} while scanning; stop the scan first")

    def _frame_set(self, args: list[Any]) -> list[Any]:
        self._not_scanning("the scan frame")
        cx, cy, width, height, angle = (float(v) for v in args)
        self._execute(Scan(ScanRegion(cx, cy, width, height, -angle)))
        return []

    def _frame_get(self, args: list[Any]) -> list[Any]:
        r = self.stm.state().scan_region
        return [r.center_x_m, r.center_y_m, r.width_m, r.height_m, -r.rotation_deg]

    def _buffer_set(self, args: list[Any]) -> list[Any]:
        self._not_scanning("the scan buffer")
        channels, pixels, lines = args
        if not channels or any(not 0 <= c <= 23 for c in channels):
            raise _RefusedError(f"channel indexes must be 0..23, got {channels}")
        if pixels < 1 or lines < 1:
            raise _RefusedError(f"pixels and lines must be positive, got {pixels} and {lines}")
        pixels = max(16, round(pixels / 16) * 16)  # the controller's coercion
        self._execute(Scan(shape_px=(int(lines), pixels), dwell_s=self._time_per_line_s / pixels))
        self._channels = list(channels)
        return []

    def _buffer_get(self, args: list[Any]) -> list[Any]:
        rows, cols = self.stm.state().shape_px
        return [len(self._channels), self._channels, cols, rows]

    def _speed_set(self, args: list[Any]) -> list[Any]:
        _fwd_speed, _bwd_speed, fwd_time_s, _bwd_time_s, keep, _ratio = args
        if keep != 2:
            raise _RefusedError("only 'keep time per line constant' (2) is emulated")
        cols = self.stm.state().shape_px[1]
        self._execute(SetDwell(float(fwd_time_s) / cols))
        self._time_per_line_s = float(fwd_time_s)
        return []

    def _bias_set(self, args: list[Any]) -> list[Any]:
        (bias_V,) = args
        low, high = self.stm.info().limits.bias_V
        if not low <= bias_V <= high:
            raise _RefusedError(f"bias {bias_V} V is outside {low}..{high} V")
        self.stm.simulator.set_bias(float(bias_V))
        self._bias_V = float(bias_V)
        return []

    def _bias_pulse(self, args: list[Any]) -> list[Any]:
        _wait, width_s, bias_V, _z_hold, absolute = args
        value = float(bias_V) + (self._bias_V if absolute == 1 else 0.0)
        self._execute(TipPulse(value, float(width_s)))
        return []

    def _xy_set(self, args: list[Any]) -> list[Any]:
        self._not_scanning("the tip position")
        x_m, y_m, _wait = args
        self._execute(MoveTo(float(x_m), float(y_m)))
        return []

    def _shaper_set(self, args: list[Any]) -> list[Any]:
        self._shaper = [float(v) if isinstance(v, float) else int(v) for v in args]
        return []

    def _shaper_start(self, args: list[Any]) -> list[Any]:
        change_bias, bias_V, tip_lift_m = self._shaper[1], self._shaper[2], self._shaper[3]
        self._execute(
            TipDip(-float(tip_lift_m), float(bias_V) if change_bias == 1 else self._bias_V)
        )
        return []

    def _z_on_off(self, args: list[Any]) -> list[Any]:
        (status,) = args
        if status == 1 and self.stm.simulator.tip_retracted:
            self._execute(Approach())
        self._z_on = status == 1
        return []

    def _withdraw(self, args: list[Any]) -> list[Any]:
        self._execute(Retract())
        self._z_on = False
        return []
