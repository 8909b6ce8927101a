"""Small deterministic test doubles for the agent tests (no simulator, no disk)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from drivers.commands import AbortScan, Capability, Command, MoveTo, Scan, SetDwell
from drivers.errors import CommandRejected, InstrumentError, NotConnected
from drivers.frame import Frame, GroundTruth, ScanRegion, TipState
from drivers.limits import Limits
from drivers.observation import Decision, Observation, TipEstimate
from drivers.protocol import CommandResult, InstrumentInfo, InstrumentState
from drivers.safety import SafetyEnvelope

Corruptor = Callable[[int, np.ndarray], Any]


class FakeInstrument:
    """Frames of seeded noise; a scripted tip-state sequence as ground truth.

    ``corrupt(index, data)`` may return a replacement array (NaN, wrong shape) or raise an
    InstrumentError to simulate a fault for that frame.
    """

    def __init__(
        self,
        *,
        shape_px: tuple[int, int] = (32, 32),
        states: Callable[[int], TipState] = lambda i: TipState.GOOD,
        corrupt: Corruptor | None = None,
        capabilities: frozenset[Capability] | None = None,
        limits: Limits | None = None,
        seed: int = 0,
        lines_per_chunk: int = 8,
        on_line: Callable[[int, int], None] | None = None,
    ) -> None:
        self.shape_px = shape_px
        self.states = states
        self.corrupt = corrupt
        self.capabilities = capabilities or frozenset(
            {Capability.SCAN, Capability.STAGE, Capability.TIP_CONDITIONING, Capability.Z_CONTROL}
        )
        self.limits = limits or Limits()
        self.envelope = SafetyEnvelope(self.limits)
        self.rng = np.random.default_rng(seed)
        self.chunk = lines_per_chunk
        self.on_line = on_line
        self.executed: list[Command] = []
        self.executed_at_time: list[float] = []
        self.position = (0.0, 0.0)
        self.dwell_s = 1e-3
        self.time_s = 0.0
        self.frames_done = 0
        self.scanning = False
        self.closed = False
        self._abort = threading.Event()
        self._lock = threading.RLock()

    def info(self) -> InstrumentInfo:
        if self.closed:
            raise NotConnected("fake is closed")
        return InstrumentInfo("stm", "fake:stm", ("topography",), self.capabilities, self.limits)

    def state(self) -> InstrumentState:
        if self.closed:
            raise NotConnected("fake is closed")
        return InstrumentState(
            position_m=self.position,
            scan_region=ScanRegion(*self.position),
            shape_px=self.shape_px,
            dwell_s=self.dwell_s,
            scanning=self.scanning,
            time_s=self.time_s,
            frames_done=self.frames_done,
        )

    def acquire(self) -> Frame:
        return list(self.stream())[-1]

    def stream(self) -> Iterator[Frame]:
        if self.closed:
            raise NotConnected("fake is closed")
        self._abort.clear()
        index = self.frames_done
        rows, cols = self.shape_px
        data = np.full(self.shape_px, np.nan, dtype=np.float32)
        full = self.rng.normal(size=self.shape_px).astype(np.float32)
        self.scanning = True
        try:
            for row in range(rows):
                if self._abort.is_set():
                    break
                if self.on_line is not None:
                    self.on_line(index, row)
                with self._lock:
                    data[row] = full[row]
                    self.time_s += cols * self.dwell_s
                if (row + 1) % self.chunk == 0 and row + 1 < rows:
                    yield self._frame(data.copy(), index, row + 1)
            lines = rows if not self._abort.is_set() else row
            out = data.copy()
            if self.corrupt is not None:
                replaced = self.corrupt(index, out)
                if replaced is not None:
                    out = replaced
        finally:
            self.scanning = False
            self.frames_done += 1
        yield self._frame(out, index, min(lines, out.shape[0]) if out.ndim == 2 else lines)

    def _frame(self, data: np.ndarray, index: int, lines: int) -> Frame:
        state = self.states(index)
        return Frame(
            data=data,
            channel="topography",
            pixel_size_m=(1e-10, 1e-10),
            dwell_s=self.dwell_s,
            scan_region=ScanRegion(*self.position),
            frame_index=index,
            timestamp_s=self.time_s,
            lines_done=lines,
            instrument="fake:stm",
            truth=GroundTruth(tip_state=state, tip_states=(state,)),
        )

    def execute(self, command: Command) -> CommandResult:
        if self.closed:
            raise NotConnected("fake is closed")
        if not isinstance(command, Command) or command.requires not in self.capabilities:
            raise CommandRejected(f"fake cannot execute {command!r}")
        if isinstance(command, AbortScan):
            self._abort.set()
        with self._lock:
            self.envelope.check(command, position_m=self.position, now_s=self.time_s)
            if isinstance(command, MoveTo):
                self.position = (command.x_m, command.y_m)
            if isinstance(command, SetDwell):
                self.dwell_s = command.dwell_s
            if isinstance(command, Scan) and command.shape_px is not None:
                self.shape_px = command.shape_px
            self.executed.append(command)
            self.executed_at_time.append(self.time_s)
            self.time_s += 0.01
            return CommandResult(command.id, True, self.time_s)

    def close(self) -> None:
        self.closed = True


class FlakyInstrument(FakeInstrument):
    """Raises ``error`` from ``stream`` for the frame attempts listed in ``fail_attempts``."""

    def __init__(self, fail_attempts: set[int], error: InstrumentError, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fail_attempts = fail_attempts
        self.error = error
        self.attempts = 0

    def stream(self) -> Iterator[Frame]:
        attempt = self.attempts
        self.attempts += 1
        if attempt in self.fail_attempts:
            raise self.error
        yield from super().stream()


class ScriptedAssessor:
    """Reads the ground truth (a perfect assessor) or a fixed answer."""

    name = "scripted"
    version = "1"

    def __init__(self, uncertainty: float = 0.05) -> None:
        self.uncertainty = uncertainty
        self.calls = 0

    def assess(self, frame: Frame) -> TipEstimate:
        self.calls += 1
        state = frame.truth.tip_state if frame.truth else TipState.GOOD
        probs = {s: (0.96 if s is state else 0.01) for s in TipState}
        return TipEstimate(state, probs, self.uncertainty, self.name)


@dataclass
class ScriptedPolicy:
    """Returns ``commands_for(observation)``; records every observation it saw."""

    commands_for: Callable[[Observation], tuple[Command, ...]] = lambda obs: ()
    stop_at: int | None = None
    raise_at: set[int] = field(default_factory=set)
    name: str = "scripted"
    version: str = "1"
    seen: list[Observation] = field(default_factory=list)

    def decide(self, observation: Observation) -> Decision:
        self.seen.append(observation)
        n = len(self.seen) - 1
        if n in self.raise_at:
            raise RuntimeError(f"policy bug at call {n}")
        stop = self.stop_at is not None and n >= self.stop_at
        return Decision(
            self.commands_for(observation), reason=f"call {n}", stop=stop, policy=self.name
        )

    def reset(self) -> None:
        self.seen.clear()


class MemoryRecorder:
    """Keeps frames and events in lists, like SessionRecorder but in memory."""

    def __init__(self) -> None:
        self.frames: list[tuple[Frame, list[str], Mapping[str, Any]]] = []
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def append_frame(self, frame: Frame, *, problems: Any = (), extra: Any = None) -> int:
        with self._lock:
            self.frames.append((frame, list(problems), dict(extra or {})))
            return len(self.frames) - 1

    def append_event(
        self,
        kind: str,
        payload: Mapping[str, Any],
        *,
        t_wall: float | None = None,
        t_instrument: float | None = None,
    ) -> int:
        with self._lock:
            self.events.append(
                {
                    "seq": len(self.events),
                    "kind": kind,
                    "payload": dict(payload),
                    "t_wall": t_wall,
                    "t_instrument": t_instrument,
                }
            )
            return len(self.events) - 1

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        return [e["payload"] for e in self.events if e["kind"] == kind]
