"""Simulated instruments behind ``sim:`` URIs (``sim:stm``).

A :class:`SimulatedSTM` drives :class:`simulators.stm.STMSimulator` exactly as a controller
drives a microscope: it scans line by line in simulated time, streams partial frames, executes
commands between lines, and enforces its own limits (the instrument side of the envelope).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from drivers.commands import (
    AbortScan,
    Approach,
    Capability,
    Command,
    MoveTo,
    Retract,
    Scan,
    SetDwell,
    TipDip,
    TipPulse,
)
from drivers.errors import CommandRejected, ConfigError, NotConnected
from drivers.frame import Frame, ScanRegion, TipState
from drivers.limits import Limits
from drivers.protocol import CommandResult, InstrumentInfo, InstrumentState
from drivers.safety import SafetyEnvelope
from simulators.stm import STMConfig, STMSimulator

STM_LIMITS = Limits(
    bias_V=(-10.0, 10.0),
    pulse_bias_V=(-10.0, 10.0),
    pulse_duration_s=(0.001, 1.0),
    dip_depth_m=(0.0, 5e-9),
    dip_bias_V=(-1.0, 1.0),
    dwell_s=(1e-5, 1e-2),
    scan_size_m=(1e-9, 500e-9),
    shape_px=(16, 1024),
    stage_x_m=(-1e-6, 1e-6),
    stage_y_m=(-1e-6, 1e-6),
)


class SimulatedSTM:
    """A constant-current STM over the physics simulator (the ``sim:stm`` instrument).

    ``lines_per_chunk`` sets how often :meth:`stream` yields a partial frame. All timing is
    simulated: a 256 x 256 frame at 1 ms dwell takes about two minutes of instrument time and
    a few tens of milliseconds of CPU.
    """

    kind = "stm"

    def __init__(
        self,
        *,
        seed: int | None = None,
        config: STMConfig | None = None,
        limits: Limits = STM_LIMITS,
        region: ScanRegion | None = None,
        shape_px: tuple[int, int] = (256, 256),
        dwell_s: float = 1e-3,
        lines_per_chunk: int = 32,
        instrument_id: str = "sim:stm",
        **config_overrides: Any,
    ) -> None:
        if config is None:
            try:
                config = STMConfig(**config_overrides)
            except TypeError as exc:
                names = sorted(f.name for f in dataclasses.fields(STMConfig))
                raise ConfigError(f"sim:stm: {exc}; simulator options are {names}") from None
        elif config_overrides:
            config = dataclasses.replace(config, **config_overrides)
        if lines_per_chunk < 1:
            raise ConfigError(f"lines_per_chunk must be >= 1, got {lines_per_chunk!r}")
        self._sim = STMSimulator(config, seed=seed)
        self._limits = limits
        self._envelope = SafetyEnvelope(limits)
        self._region = region if region is not None else ScanRegion()
        self._shape_px = (int(shape_px[0]), int(shape_px[1]))
        self._dwell_s = float(dwell_s)
        self._chunk = int(lines_per_chunk)
        self._id = instrument_id
        self._lock = threading.RLock()
        self._abort = threading.Event()
        self._scanning = False
        self._closed = False
        self._frames_done = 0
        self._envelope.check(Scan(self._region, self._shape_px, self._dwell_s, source="init"))
        self._sim.move_to(self._region.center_x_m, self._region.center_y_m)

    # -- protocol -----------------------------------------------------------------------------

    def info(self) -> InstrumentInfo:
        self._require_open()
        return InstrumentInfo(
            kind=self.kind,
            id=self._id,
            channels=("topography",),
            capabilities=frozenset(
                {
                    Capability.SCAN,
                    Capability.STAGE,
                    Capability.TIP_CONDITIONING,
                    Capability.Z_CONTROL,
                }
            ),
            limits=self._limits,
            details={"simulated": True, "surface": self._sim.config.surface},
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
                extra={"retracted": self._sim.tip_retracted},
            )

    def acquire(self) -> Frame:
        last: Frame | None = None
        for part in self.stream():
            last = part
        if last is None:  # a zero-line scan cannot happen: shapes are >= 16 rows
            raise CommandRejected("scan produced no lines")
        return last

    def stream(self) -> Iterator[Frame]:
        with self._lock:
            self._require_open()
            if self._scanning:
                raise CommandRejected("a scan is already streaming; finish or abort it first")
            self._abort.clear()
            self._scanning = True
            region, shape, dwell = self._region, self._shape_px, self._dwell_s
            scan = self._sim.begin_frame(region, shape, dwell)
            index = self._frames_done
        buffer = np.full(shape, np.nan, dtype=np.float32)
        try:
            while True:
                with self._lock:
                    self._require_open()
                    aborted = self._abort.is_set()
                    if not aborted:
                        row = scan.lines_done
                        buffer[row] = scan.next_line()
                    lines_done, done, now_s = scan.lines_done, scan.done, self._sim.time_s
                    if done or aborted:
                        self._frames_done += 1
                        self._scanning = False
                        truth = scan.truth()
                if done or aborted:
                    yield self._frame(
                        buffer, region, dwell, index, now_s, lines_done, truth, aborted
                    )
                    return
                if lines_done % self._chunk == 0:
                    yield self._frame(buffer, region, dwell, index, now_s, lines_done, None, False)
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
            now_s = self._sim.time_s
            self._envelope.check(command, position_m=self._sim.position_m, now_s=now_s)
            detail = self._apply(command)
            self._envelope.record_executed(command, now_s=now_s)
            return CommandResult(command.id, True, self._sim.time_s, detail)

    def close(self) -> None:
        with self._lock:
            self._closed = True

    # -- internals ----------------------------------------------------------------------------

    def _apply(self, command: Command) -> dict[str, Any]:
        handlers: dict[type[Command], Callable[[Any], dict[str, Any]]] = {
            Scan: self._apply_scan,
            SetDwell: self._apply_dwell,
            MoveTo: self._apply_move,
            TipPulse: lambda c: dict(self._sim.pulse(c.bias_V, c.duration_s)),
            TipDip: lambda c: dict(self._sim.dip(c.depth_m, c.bias_V)),
            Retract: lambda c: self._apply_z(retract=True),
            Approach: lambda c: self._apply_z(retract=False),
        }
        handler = handlers.get(type(command))
        if handler is None:
            raise CommandRejected(f"{self._id} has no handler for {command.kind}")
        return handler(command)

    def _apply_scan(self, command: Scan) -> dict[str, Any]:
        if command.region is not None:
            self._region = command.region
            self._sim.move_to(command.region.center_x_m, command.region.center_y_m)
        if command.shape_px is not None:
            self._shape_px = command.shape_px
        if command.dwell_s is not None:
            self._dwell_s = command.dwell_s
        return {"region": self._region.to_json(), "shape_px": list(self._shape_px)}

    def _apply_dwell(self, command: SetDwell) -> dict[str, Any]:
        self._dwell_s = command.dwell_s
        return {"dwell_s": self._dwell_s}

    def _apply_move(self, command: MoveTo) -> dict[str, Any]:
        self._sim.move_to(command.x_m, command.y_m)
        self._region = self._region.moved_to(command.x_m, command.y_m)
        return {"position_m": list(self._sim.position_m)}

    def _apply_z(self, *, retract: bool) -> dict[str, Any]:
        if retract:
            self._sim.retract()
        else:
            self._sim.approach()
        return {"retracted": self._sim.tip_retracted}

    def _frame(
        self,
        buffer: np.ndarray,
        region: ScanRegion,
        dwell_s: float,
        index: int,
        now_s: float,
        lines_done: int,
        truth: Any,
        aborted: bool,
    ) -> Frame:
        rows, cols = buffer.shape
        return Frame(
            data=buffer.copy(),
            channel="topography",
            pixel_size_m=(region.height_m / rows, region.width_m / cols),
            dwell_s=dwell_s,
            scan_region=region,
            frame_index=index,
            timestamp_s=now_s,
            lines_done=lines_done,
            instrument=self._id,
            metadata={"aborted": True} if aborted else {},
            truth=truth,
        )

    def _require_open(self) -> None:
        if self._closed:
            raise NotConnected(f"{self._id} is closed; open a new instrument with open_instrument")

    @property
    def simulator(self) -> STMSimulator:
        """The underlying simulator (tests and benchmarks only)."""
        return self._sim

    @property
    def tip_state(self) -> TipState:
        return self._sim.tip_state


def _open_sem(**options: Any) -> Any:
    from drivers.sim_sem import SimulatedSEM

    return SimulatedSEM(**options)


def _open_stem(**options: Any) -> Any:
    from drivers.sim_stem import SimulatedSTEM

    return SimulatedSTEM(**options)


_SIMULATED: dict[str, Callable[..., Any]] = {
    "stm": SimulatedSTM,
    "stem": _open_stem,
    "sem": _open_sem,
}


def open_simulated(name: str, **options: Any) -> Any:
    """Open ``sim:NAME``; unknown names raise :class:`ConfigError` listing the known ones."""
    factory = _SIMULATED.get(name)
    if factory is None:
        raise ConfigError(
            f"unknown simulated instrument 'sim:{name}'; known: "
            + ", ".join(f"sim:{k}" for k in sorted(_SIMULATED))
        )
    return factory(**options)
