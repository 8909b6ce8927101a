"""The simulated SEM behind ``sim:sem`` (secondary-electron channel ``se``).

A :class:`SimulatedSEM` drives :class:`simulators.sem.SEMSimulator` as a scan controller
drives an SEM: it scans line by line in simulated time, streams partial frames, executes
commands between lines and enforces its own limits (the instrument side of the envelope).
An SEM has a stage and a scan generator but no tip and no z feedback: tip conditioning and
approach/retract commands are rejected, and frames report ``TipState.GOOD``.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from drivers.commands import AbortScan, Capability, Command, MoveTo, Scan, SetDwell
from drivers.errors import CommandRejected, ConfigError, NotConnected
from drivers.frame import Frame, GroundTruth, ScanRegion
from drivers.limits import Limits
from drivers.protocol import CommandResult, InstrumentInfo, InstrumentState
from drivers.safety import SafetyEnvelope
from simulators.sem import SEMConfig, SEMSimulator

SEM_LIMITS = Limits(
    dwell_s=(1e-7, 1e-5),
    scan_size_m=(100e-9, 100e-6),
    shape_px=(16, 4096),
    stage_x_m=(-50e-6, 50e-6),
    stage_y_m=(-50e-6, 50e-6),
)
"""Field-emission SEM with a ±50 µm stage: 0.1–10 µs dwell, 100 nm – 100 µm field of view."""

SEM_CHANNEL = "se"


class SimulatedSEM:
    """A secondary-electron SEM over the physics simulator (the ``sim:sem`` instrument).

    Defaults: 256 x 256 pixels over 5 µm at 1 µs dwell (about 70 ms of instrument time per
    frame). ``lines_per_chunk`` sets how often :meth:`stream` yields a partial frame. Unknown
    keyword options raise :class:`ConfigError` listing the :class:`SEMConfig` options.
    """

    kind = "sem"

    def __init__(
        self,
        *,
        seed: int | None = None,
        config: SEMConfig | None = None,
        limits: Limits = SEM_LIMITS,
        region: ScanRegion | None = None,
        shape_px: tuple[int, int] = (256, 256),
        dwell_s: float = 1e-6,
        lines_per_chunk: int = 32,
        instrument_id: str = "sim:sem",
        **config_overrides: Any,
    ) -> None:
        names = sorted(f.name for f in dataclasses.fields(SEMConfig))
        unknown = sorted(set(config_overrides) - set(names))
        if unknown:
            raise ConfigError(
                f"sim:sem: unknown options {unknown}; simulator options are {names} (and seed, "
                "config, limits, region, shape_px, dwell_s, lines_per_chunk, instrument_id)"
            )
        base = SEMConfig() if config is None else config
        config = dataclasses.replace(base, **config_overrides) if config_overrides else base
        if isinstance(lines_per_chunk, bool) or not isinstance(lines_per_chunk, int):
            raise ConfigError(f"lines_per_chunk must be an int >= 1, got {lines_per_chunk!r}")
        if lines_per_chunk < 1:
            raise ConfigError(f"lines_per_chunk must be >= 1, got {lines_per_chunk!r}")
        self._sim = SEMSimulator(config, seed=seed)
        self._limits = limits
        self._envelope = SafetyEnvelope(limits)
        self._region = region if region is not None else ScanRegion(0.0, 0.0, 5e-6, 5e-6)
        self._shape_px = (int(shape_px[0]), int(shape_px[1]))
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

    # -- protocol -----------------------------------------------------------------------------

    def info(self) -> InstrumentInfo:
        self._require_open()
        cfg = self._sim.config
        return InstrumentInfo(
            kind=self.kind,
            id=self._id,
            channels=(SEM_CHANNEL,),
            capabilities=frozenset({Capability.SCAN, Capability.STAGE}),
            limits=self._limits,
            details={
                "simulated": True,
                "beam_current_A": cfg.beam_current_A,
                "probe_size_m": cfg.probe_size_m,
                "charging": cfg.charging,
            },
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
                extra={"beam_current_A": self._sim.config.beam_current_A},
            )

    def acquire(self) -> Frame:
        last: Frame | None = None
        for part in self.stream():
            last = part
        if last is None:  # cannot happen: shapes are >= 16 rows
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
            try:
                scan = self._sim.begin_frame(region, shape, dwell)
            except BaseException:
                self._scanning = False
                raise
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
                    truth: GroundTruth | None = None
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
        }
        handler = handlers.get(type(command))
        if handler is None:
            raise CommandRejected(f"{self._id} has no handler for {command.kind}")
        return handler(command)

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

    def _frame(
        self,
        buffer: np.ndarray,
        region: ScanRegion,
        dwell_s: float,
        index: int,
        now_s: float,
        lines_done: int,
        truth: GroundTruth | None,
        aborted: bool,
    ) -> Frame:
        rows, cols = buffer.shape
        return Frame(
            data=buffer.copy(),
            channel=SEM_CHANNEL,
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
    def simulator(self) -> SEMSimulator:
        """The underlying simulator (tests and benchmarks only)."""
        return self._sim
