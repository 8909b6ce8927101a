"""What every simulated scanning instrument shares: line streaming, commands, limits, lifecycle.

A subclass supplies the simulator, its capabilities and details, how a frame begins, and any
extra command handlers; :class:`SimulatedScanInstrument` does the rest exactly as a scan
controller would: it scans line by line in simulated time, streams partial frames, executes
commands between lines (thread-safe), and enforces its own limits (the instrument side of the
envelope).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import numpy as np

from drivers.commands import AbortScan, Capability, Command, MoveTo, Scan, SetDwell
from drivers.errors import CommandRejected, ConfigError, NotConnected
from drivers.frame import Frame, GroundTruth, ScanRegion
from drivers.limits import Limits
from drivers.protocol import CommandResult, InstrumentInfo, InstrumentState
from drivers.safety import SafetyEnvelope

Handler = Callable[[Any], dict[str, Any]]


class LineScan(Protocol):
    """One frame being scanned by a simulator (``FrameScan`` of each simulator module)."""

    lines_done: int

    @property
    def done(self) -> bool: ...

    def next_line(self) -> np.ndarray: ...

    def truth(self) -> GroundTruth: ...


class Simulator(Protocol):
    """The part of a simulator the drivers use."""

    @property
    def time_s(self) -> float: ...

    @property
    def position_m(self) -> tuple[float, float]: ...

    def move_to(self, x_m: float, y_m: float) -> None: ...


def build_config(
    config_cls: Any, config: Any, overrides: Mapping[str, Any], uri: str, extra_names: str
) -> Any:
    """``config`` with ``overrides`` applied; unknown option names raise :class:`ConfigError`
    listing the simulator's options and the driver's own keywords (``extra_names``)."""
    names = sorted(f.name for f in dataclasses.fields(config_cls))
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ConfigError(
            f"{uri}: unknown options {unknown}; simulator options are {names} (and {extra_names})"
        )
    base = config_cls() if config is None else config
    return dataclasses.replace(base, **overrides) if overrides else base


class SimulatedScanInstrument:
    """Base of the ``sim:`` instruments. Subclasses set ``kind``, ``channel`` and
    ``capabilities`` and may override the ``_details``, ``_state_extra``, ``_begin_frame``,
    ``_frame_metadata`` and ``_handlers`` hooks."""

    kind = "?"
    channel = "?"
    capabilities: frozenset[Capability] = frozenset({Capability.SCAN, Capability.STAGE})

    def __init__(
        self,
        sim: Any,
        *,
        limits: Limits,
        region: ScanRegion,
        shape_px: tuple[int, int],
        dwell_s: float,
        lines_per_chunk: int,
        instrument_id: str,
    ) -> None:
        if isinstance(lines_per_chunk, bool) or not isinstance(lines_per_chunk, int):
            raise ConfigError(f"lines_per_chunk must be an int >= 1, got {lines_per_chunk!r}")
        if lines_per_chunk < 1:
            raise ConfigError(f"lines_per_chunk must be >= 1, got {lines_per_chunk!r}")
        if not isinstance(limits, Limits):
            raise ConfigError(f"limits must be a drivers.limits.Limits, got {limits!r}")
        if isinstance(dwell_s, bool) or not isinstance(dwell_s, (int, float, np.number)):
            raise ConfigError(f"dwell_s must be a number of seconds, got {dwell_s!r}")
        self._sim = sim
        self._limits = limits
        self._envelope = SafetyEnvelope(limits)
        self._region = region
        self._shape_px = _shape(shape_px)
        self._dwell_s = float(dwell_s)
        self._chunk = lines_per_chunk
        self._id = instrument_id
        self._lock = threading.RLock()
        self._abort = threading.Event()
        self._scanning = False
        self._closed = False
        self._frames_done = 0
        self._envelope.check(Scan(self._region, self._shape_px, self._dwell_s, source="init"))
        self._sim.move_to(self._region.center_x_m, self._region.center_y_m)

    # -- hooks --------------------------------------------------------------------------------

    def _details(self) -> dict[str, Any]:
        return {"simulated": True}

    def _state_extra(self) -> dict[str, Any]:
        return {}

    def _begin_frame(self, region: ScanRegion, shape: tuple[int, int], dwell_s: float) -> Any:
        return self._sim.begin_frame(region, shape, dwell_s)

    def _frame_metadata(self) -> dict[str, Any]:
        return {}

    def _handlers(self) -> dict[type[Command], Handler]:
        return {Scan: self._apply_scan, SetDwell: self._apply_dwell, MoveTo: self._apply_move}

    # -- protocol -----------------------------------------------------------------------------

    def info(self) -> InstrumentInfo:
        self._require_open()
        return InstrumentInfo(
            kind=self.kind,
            id=self._id,
            channels=(self.channel,),
            capabilities=self.capabilities,
            limits=self._limits,
            details=self._details(),
        )

    def state(self) -> InstrumentState:
        with self._lock:
            self._require_open()
            return InstrumentState(
                position_m=self._sim.position_m,
                scan_region=self._region,
                shape_px=self._shape_px,
                dwell_s=self._dwell_s,
                scanning=self._scanning,
                time_s=self._sim.time_s,
                frames_done=self._frames_done,
                extra=self._state_extra(),
            )

    def acquire(self) -> Frame:
        last: Frame | None = None
        for part in self.stream():
            last = part
        if last is None:  # cannot happen: a scan always ends with a frame
            raise CommandRejected("scan produced no lines")
        return last

    def stream(self) -> Iterator[Frame]:
        with self._lock:
            self._require_open()
            if self._scanning:
                raise CommandRejected("a scan is already streaming; finish or abort it first")
            self._abort.clear()
            region, shape, dwell = self._region, self._shape_px, self._dwell_s
            scan = self._begin_frame(region, shape, dwell)
            self._scanning = True
            meta = self._frame_metadata()
            index = self._frames_done
        buffer = np.full(shape, np.nan, dtype=np.float32)
        try:
            while True:
                with self._lock:
                    self._require_open()
                    aborted = self._abort.is_set()
                    if not aborted:
                        row = scan.lines_done  # read before next_line() advances it
                        buffer[row] = scan.next_line()
                    lines_done, done, now_s = scan.lines_done, scan.done, self._sim.time_s
                    truth: GroundTruth | None = None
                    if done or aborted:
                        self._frames_done += 1
                        self._scanning = False
                        truth = scan.truth()
                if done or aborted:
                    if aborted:
                        meta = {**meta, "aborted": True}
                    yield self._frame(buffer, region, dwell, index, now_s, lines_done, truth, meta)
                    return
                if lines_done % self._chunk == 0:
                    yield self._frame(buffer, region, dwell, index, now_s, lines_done, None, meta)
        finally:
            with self._lock:
                self._scanning = False

    def execute(self, command: Command) -> CommandResult:
        if not isinstance(command, Command):
            raise CommandRejected(f"not a command: {command!r}")
        info = self.info()
        if not info.supports(command):
            raise CommandRejected(
                f"{self._id} cannot execute {command.kind} (needs capability "
                f"{command.requires!s}; has {sorted(str(c) for c in info.capabilities)})"
            )
        if isinstance(command, AbortScan):
            self._abort.set()
            return CommandResult(command.id, True, self._sim.time_s, {"scanning": self._scanning})
        with self._lock:
            self._require_open()
            handler = self._handlers().get(type(command))
            if handler is None:
                raise CommandRejected(f"{self._id} has no handler for {command.kind}")
            now_s = self._sim.time_s
            self._envelope.check(command, position_m=self._sim.position_m, now_s=now_s)
            detail = handler(command)
            self._envelope.record_executed(command, now_s=now_s)
            return CommandResult(command.id, True, self._sim.time_s, detail)

    def close(self) -> None:
        with self._lock:
            self._closed = True

    # -- shared handlers ----------------------------------------------------------------------

    def _apply_scan(self, command: Scan) -> dict[str, Any]:
        if command.region is not None:
            self._sim.move_to(command.region.center_x_m, command.region.center_y_m)
            self._region = command.region
        if command.shape_px is not None:
            self._shape_px = command.shape_px
        if command.dwell_s is not None:
            self._dwell_s = command.dwell_s
        return {
            "region": self._region.to_json(),
            "shape_px": list(self._shape_px),
            "dwell_s": self._dwell_s,
        }

    def _apply_dwell(self, command: SetDwell) -> dict[str, Any]:
        self._dwell_s = command.dwell_s
        return {"dwell_s": self._dwell_s}

    def _apply_move(self, command: MoveTo) -> dict[str, Any]:
        self._sim.move_to(command.x_m, command.y_m)
        self._region = self._region.moved_to(command.x_m, command.y_m)
        return {"position_m": list(self._sim.position_m)}

    # -- internals ----------------------------------------------------------------------------

    def _frame(
        self,
        buffer: np.ndarray,
        region: ScanRegion,
        dwell_s: float,
        index: int,
        now_s: float,
        lines_done: int,
        truth: GroundTruth | None,
        meta: Mapping[str, Any],
    ) -> Frame:
        rows, cols = buffer.shape
        return Frame(
            data=buffer.copy(),
            channel=self.channel,
            pixel_size_m=(region.height_m / rows, region.width_m / cols),
            dwell_s=dwell_s,
            scan_region=region,
            frame_index=index,
            timestamp_s=now_s,
            lines_done=lines_done,
            instrument=self._id,
            metadata=dict(meta),
            truth=truth,
        )

    def _require_open(self) -> None:
        if self._closed:
            raise NotConnected(f"{self._id} is closed; open a new instrument with open_instrument")

    @property
    def simulator(self) -> Any:
        """The underlying simulator (tests and benchmarks only)."""
        return self._sim


def _shape(shape_px: Any) -> tuple[int, int]:
    """``shape_px`` as (rows, columns) of positive ints, or a ConfigError naming the value."""
    try:
        rows, cols = shape_px
    except (TypeError, ValueError):
        rows = cols = None
    if _positive_whole(rows) and _positive_whole(cols):
        return int(rows), int(cols)
    raise ConfigError(f"shape_px must be two positive integers (rows, columns), got {shape_px!r}")


def _positive_whole(n: Any) -> bool:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer, float, np.floating)):
        return False
    return bool(n >= 1) and float(n).is_integer()
