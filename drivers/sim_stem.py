"""The simulated HAADF-STEM behind ``sim:stem``.

A :class:`SimulatedSTEM` drives :class:`simulators.stem.STEMSimulator` as a scan controller
drives a microscope: it scans line by line in simulated time, streams partial frames, executes
commands between lines, and enforces its own limits (the instrument side of the envelope). A
STEM has no tip: it declares no tip-conditioning or z-control capability, so ``TipPulse``,
``TipDip``, ``Approach`` and ``Retract`` are rejected, and its limits allow no conditioning
actions at all.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from drivers.commands import (
    AbortScan,
    Capability,
    Command,
    MoveTo,
    Scan,
    SetDwell,
    SetScanPattern,
)
from drivers.errors import CommandRejected, ConfigError, DataError, NotConnected
from drivers.frame import Frame, GroundTruth, ScanRegion
from drivers.limits import Limits
from drivers.protocol import CommandResult, InstrumentInfo, InstrumentState
from drivers.safety import SafetyEnvelope
from simulators.stem import (
    DEFAULT_DWELL_S,
    DEFAULT_FOV_M,
    DEFAULT_SHAPE_PX,
    STEMConfig,
    STEMSimulator,
)

STEM_LIMITS = Limits(
    dwell_s=(1e-7, 2e-5),
    scan_size_m=(1e-9, 1e-6),
    shape_px=(16, 2048),
    stage_x_m=(-1e-6, 1e-6),
    stage_y_m=(-1e-6, 1e-6),
    max_conditioning_per_window=0,  # no tip: no conditioning, ever
)
"""Dwell 0.1–20 µs, field of view 1 nm – 1 µm, stage ±1 µm, 16–2048 pixels a side."""

CHANNEL = "haadf"


class SimulatedSTEM:
    """An incoherent HAADF-STEM over the physics simulator (the ``sim:stem`` instrument).

    Frames hold detector counts (float32). ``pattern`` / ``fraction`` choose a partial scan
    (``SetScanPattern`` changes them); in a partial scan the pixels the beam skips are NaN by
    design, and ``frame.truth.extra["sampling_mask"]`` says which were visited. Keyword options
    not named here are :class:`simulators.stem.STEMConfig` fields (``specimen="ws2"``,
    ``beam_current_A=50e-12``, ...).
    """

    kind = "stem"

    def __init__(
        self,
        *,
        seed: int | None = None,
        config: STEMConfig | None = None,
        limits: Limits = STEM_LIMITS,
        region: ScanRegion | None = None,
        shape_px: tuple[int, int] = DEFAULT_SHAPE_PX,
        dwell_s: float = DEFAULT_DWELL_S,
        pattern: str = "raster",
        fraction: float = 1.0,
        lines_per_chunk: int = 32,
        instrument_id: str = "sim:stem",
        **config_overrides: Any,
    ) -> None:
        if config is None:
            try:
                config = STEMConfig(**config_overrides)
            except TypeError as exc:
                names = sorted(f.name for f in dataclasses.fields(STEMConfig))
                raise ConfigError(f"sim:stem: {exc}; simulator options are {names}") from None
        elif config_overrides:
            config = dataclasses.replace(config, **config_overrides)
        if isinstance(lines_per_chunk, bool) or not isinstance(lines_per_chunk, int):
            raise ConfigError(f"lines_per_chunk must be an int >= 1, got {lines_per_chunk!r}")
        if lines_per_chunk < 1:
            raise ConfigError(f"lines_per_chunk must be >= 1, got {lines_per_chunk!r}")
        try:
            initial = SetScanPattern(pattern, fraction, source="init")
        except DataError as exc:
            raise ConfigError(str(exc)) from None
        self._sim = STEMSimulator(config, seed=seed)
        self._limits = limits
        self._envelope = SafetyEnvelope(limits)
        self._region = (
            region if region is not None else ScanRegion(0.0, 0.0, DEFAULT_FOV_M, DEFAULT_FOV_M)
        )
        self._shape_px = (int(shape_px[0]), int(shape_px[1]))
        self._dwell_s = float(dwell_s)
        self._pattern, self._fraction = initial.pattern, initial.fraction
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
        cfg = self._sim.config
        return InstrumentInfo(
            kind=self.kind,
            id=self._id,
            channels=(CHANNEL,),
            capabilities=frozenset({Capability.SCAN, Capability.STAGE, Capability.PARTIAL_SCAN}),
            limits=self._limits,
            details={
                "simulated": True,
                "specimen": cfg.specimen,
                "voltage_V": cfg.voltage_V,
                "convergence_rad": cfg.convergence_rad,
                "beam_current_A": cfg.beam_current_A,
                "units": "counts",
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
                extra={
                    "pattern": self._pattern,
                    "fraction": self._fraction,
                    "beam_current_A": self._sim.config.beam_current_A,
                },
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
            meta = {"pattern": self._pattern, "fraction": self._fraction, "units": "counts"}
            scan = self._sim.begin_frame(
                region, shape, dwell, pattern=self._pattern, fraction=self._fraction
            )
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
                        buffer, region, dwell, index, now_s, lines_done, truth, meta, aborted
                    )
                    return
                if lines_done % self._chunk == 0:
                    yield self._frame(
                        buffer, region, dwell, index, now_s, lines_done, None, meta, False
                    )
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
            SetScanPattern: self._apply_pattern,
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

    def _apply_pattern(self, command: SetScanPattern) -> dict[str, Any]:
        self._pattern, self._fraction = command.pattern, command.fraction
        return {"pattern": self._pattern, "fraction": self._fraction}

    def _frame(
        self,
        buffer: np.ndarray,
        region: ScanRegion,
        dwell_s: float,
        index: int,
        now_s: float,
        lines_done: int,
        truth: GroundTruth | None,
        meta: dict[str, Any],
        aborted: bool,
    ) -> Frame:
        rows, cols = buffer.shape
        return Frame(
            data=buffer.copy(),
            channel=CHANNEL,
            pixel_size_m=(region.height_m / rows, region.width_m / cols),
            dwell_s=dwell_s,
            scan_region=region,
            frame_index=index,
            timestamp_s=now_s,
            lines_done=lines_done,
            instrument=self._id,
            metadata={**meta, "aborted": True} if aborted else dict(meta),
            truth=truth,
        )

    def _require_open(self) -> None:
        if self._closed:
            raise NotConnected(f"{self._id} is closed; open a new instrument with open_instrument")

    @property
    def simulator(self) -> STEMSimulator:
        """The underlying simulator (tests and benchmarks only)."""
        return self._sim


def open_simulated_stem(**options: Any) -> SimulatedSTEM:
    """Open ``sim:stem`` with the keyword options of :class:`SimulatedSTEM`."""
    return SimulatedSTEM(**options)
