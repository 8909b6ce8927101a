"""Fault injection: wrap any Instrument so that it drops, delays and corrupts frames on purpose.

:class:`FaultInjector` delegates everything to the instrument it wraps and, per *frame attempt*
(every call of ``stream`` or ``acquire``, counted from 0), injects at most one
:class:`FaultKind`. The fault for an attempt comes from ``schedule`` when the attempt is listed
there, otherwise it is drawn from ``probabilities`` with a generator seeded by ``(seed, attempt)``;
so the same seed gives the same faults, and the same corrupted pixels, whatever happened before.

What each fault does:

- ``DROP_FRAME``: the partial frames arrive, the final frame never does, and the stream raises
  :class:`~drivers.errors.CommunicationError` (what a driver with a frame timeout reports; a
  stream that silently ends early is ``TRUNCATED``).
- ``DELAY``: the final frame arrives late: ``sleep(delay_s)`` is called before it is yielded.
- ``DISCONNECT``: the stream raises CommunicationError half-way through the frame.
- ``STUCK_COMMAND``: every ``execute`` until the next frame attempt raises CommunicationError
  ("timed out") without passing the command on.
- ``DRIVER_EXCEPTION``: the stream raises :class:`~drivers.errors.InstrumentError` at once.
- ``NAN`` / ``INF``: some scanned pixels of the final frame are NaN / +inf.
- ``WRONG_SHAPE``: the final frame has half the requested columns.
- ``WRONG_DTYPE``: the final frame's data is a ``bool`` array (Frame accepts any 2-D array;
  :func:`~drivers.frame.frame_problems` flags it as not numeric).
- ``TRUNCATED``: the final frame has ``lines_done = H // 2`` (later rows NaN) and is *not*
  marked ``aborted``.
- ``SATURATED``: the final frame is clipped at a constant ceiling, so that the brightest
  ``saturated_fraction`` of its pixels all hold the same maximum (a saturated detector or a
  z-piezo at its end stop).

Changed frames are new :class:`~drivers.frame.Frame` objects with
``metadata["injected_fault"]`` set to the fault's value; ground truth is kept. ``log`` lists
``(attempt, kind)`` for every fault actually injected (a stuck command once per command).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from enum import StrEnum

import numpy as np

from drivers.commands import Command
from drivers.errors import CommunicationError, ConfigError, DataError, InstrumentError
from drivers.frame import Frame
from drivers.protocol import CommandResult, Instrument, InstrumentInfo, InstrumentState


class FaultKind(StrEnum):
    DROP_FRAME = "drop_frame"
    DELAY = "delay"
    DISCONNECT = "disconnect"
    STUCK_COMMAND = "stuck_command"
    DRIVER_EXCEPTION = "driver_exception"
    NAN = "nan"
    INF = "inf"
    WRONG_SHAPE = "wrong_shape"
    WRONG_DTYPE = "wrong_dtype"
    TRUNCATED = "truncated"
    SATURATED = "saturated"


#: Faults that change the data of the final frame (the agent must never act on these).
CORRUPTIONS: frozenset[FaultKind] = frozenset(
    {
        FaultKind.NAN,
        FaultKind.INF,
        FaultKind.WRONG_SHAPE,
        FaultKind.WRONG_DTYPE,
        FaultKind.TRUNCATED,
        FaultKind.SATURATED,
    }
)
#: Faults that make ``stream`` raise instead of delivering a final frame.
STREAM_ERRORS: frozenset[FaultKind] = frozenset(
    {FaultKind.DROP_FRAME, FaultKind.DISCONNECT, FaultKind.DRIVER_EXCEPTION}
)

_BAD_PIXEL_FRACTION = 0.05  # of the scanned pixels, for NAN and INF


class FaultInjector:
    """An :class:`~drivers.protocol.Instrument` that injects faults into ``inner``.

    ``schedule`` maps frame attempt -> fault (exact, for tests); ``probabilities`` maps fault ->
    probability per attempt (sum at most 1) for attempts not in the schedule. ``delay_s`` and
    ``sleep`` serve ``DELAY`` (inject a fake sleep in tests). Thread-safe like ``inner``:
    ``execute`` may be called while ``stream`` is iterated. Closing the injector closes
    ``inner``.
    """

    def __init__(
        self,
        inner: Instrument,
        *,
        seed: int,
        schedule: Mapping[int, FaultKind] | None = None,
        probabilities: Mapping[FaultKind, float] | None = None,
        delay_s: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
        saturated_fraction: float = 0.5,
    ) -> None:
        self.inner = inner
        self.seed = int(seed)
        self.schedule = {int(k): FaultKind(v) for k, v in (schedule or {}).items()}
        if any(k < 0 for k in self.schedule):
            raise ConfigError(f"schedule attempts must be >= 0, got {sorted(self.schedule)}")
        self.probabilities = {FaultKind(k): float(p) for k, p in (probabilities or {}).items()}
        for kind, p in self.probabilities.items():
            if not (math.isfinite(p) and 0.0 <= p <= 1.0):
                raise ConfigError(f"probability of {kind} must be in [0, 1], got {p!r}")
        total = sum(self.probabilities.values())
        if total > 1.0 + 1e-9:
            raise ConfigError(f"fault probabilities sum to {total:g}; they must sum to <= 1")
        if not (math.isfinite(delay_s) and delay_s >= 0):
            raise ConfigError(f"delay_s must be a finite number >= 0, got {delay_s!r}")
        if not 0.0 < saturated_fraction < 1.0:
            raise ConfigError(f"saturated_fraction must be in (0, 1), got {saturated_fraction!r}")
        self.delay_s = float(delay_s)
        self.saturated_fraction = float(saturated_fraction)
        self._sleep = sleep
        self.log: list[tuple[int, FaultKind]] = []
        self.attempts = 0
        self._stuck_attempt: int | None = None
        self._lock = threading.Lock()

    # -- choosing faults ---------------------------------------------------------------------

    def _rng(self, attempt: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, attempt))

    def fault_for(self, attempt: int) -> FaultKind | None:
        """The fault injected on frame attempt ``attempt`` (None for a clean attempt)."""
        if attempt in self.schedule:
            return self.schedule[attempt]
        if not self.probabilities:
            return None
        u = float(self._rng(attempt).random())
        cumulative = 0.0
        for kind in FaultKind:  # fixed order: the draw depends on the seed only
            cumulative += self.probabilities.get(kind, 0.0)
            if u < cumulative:
                return kind
        return None

    def _record(self, attempt: int, kind: FaultKind) -> None:
        with self._lock:
            self.log.append((attempt, kind))

    # -- Instrument protocol -------------------------------------------------------------------

    def info(self) -> InstrumentInfo:
        return self.inner.info()

    def state(self) -> InstrumentState:
        return self.inner.state()

    def acquire(self) -> Frame:
        last: Frame | None = None
        for part in self.stream():
            last = part
        if last is None:
            raise CommunicationError(f"{self.inner.info().id}: the scan produced no frame")
        return last

    def stream(self) -> Iterator[Frame]:
        with self._lock:
            attempt = self.attempts
            self.attempts += 1
            self._stuck_attempt = None
        kind = self.fault_for(attempt)
        if kind is FaultKind.STUCK_COMMAND:
            with self._lock:
                self._stuck_attempt = attempt
        if kind is FaultKind.DRIVER_EXCEPTION:
            self._record(attempt, kind)
            raise InstrumentError(
                f"injected driver exception on frame attempt {attempt}: the driver failed "
                "before scanning; retry the scan"
            )
        if kind is None or kind is FaultKind.STUCK_COMMAND:
            return self._passthrough()
        return self._faulty(attempt, kind)

    def _passthrough(self) -> Iterator[Frame]:
        yield from self.inner.stream()

    def _faulty(self, attempt: int, kind: FaultKind) -> Iterator[Frame]:
        parts = iter(self.inner.stream())
        try:
            if kind is FaultKind.DISCONNECT:
                for part in parts:
                    if part.complete or 2 * part.lines_done > part.shape[0]:
                        break
                    yield part
                self._record(attempt, kind)
                raise CommunicationError(
                    f"injected disconnect mid-frame on frame attempt {attempt}: the connection "
                    "to the instrument dropped; reconnect and rescan"
                )
            # hold one frame back so that the final one can be recognised
            held: Frame | None = None
            for part in parts:
                if held is not None:
                    yield held
                held = part
            if held is None:
                return
            if kind is FaultKind.DROP_FRAME:
                self._record(attempt, kind)
                raise CommunicationError(
                    f"injected dropped frame on frame attempt {attempt}: the final frame "
                    f"{held.frame_index} never arrived (timed out); rescan"
                )
            if kind is FaultKind.DELAY:
                self._sleep(self.delay_s)
                final = _tagged(held, held.data, held.lines_done, kind)
            else:
                final = self._corrupt(held, kind, self._rng(attempt))
            self._record(attempt, kind)
            yield final
        finally:
            close = getattr(parts, "close", None)
            if close is not None:
                close()

    def _corrupt(self, frame: Frame, kind: FaultKind, rng: np.random.Generator) -> Frame:
        data = np.array(frame.data, copy=True)
        rows, cols = frame.shape
        lines = frame.lines_done
        if kind in (FaultKind.NAN, FaultKind.INF):
            n_done = lines * cols
            if n_done == 0:
                return _tagged(frame, data, lines, kind)
            n_bad = max(1, int(_BAD_PIXEL_FRACTION * n_done))
            flat = rng.choice(n_done, size=n_bad, replace=False)
            value = np.nan if kind is FaultKind.NAN else np.inf
            data = data.astype(np.result_type(data.dtype, np.float32))
            data[flat // cols, flat % cols] = value
            return _tagged(frame, data, lines, kind)
        if kind is FaultKind.WRONG_SHAPE:
            return _tagged(frame, data[:, : max(1, cols // 2)].copy(), lines, kind)
        if kind is FaultKind.WRONG_DTYPE:
            done = data[:lines]
            threshold = float(np.nanmedian(done)) if np.isfinite(done).any() else 0.0
            return _tagged(frame, np.asarray(data > threshold, dtype=bool), lines, kind)
        if kind is FaultKind.TRUNCATED:
            keep = min(lines, rows // 2)
            data = data.astype(np.result_type(data.dtype, np.float32))
            data[keep:] = np.nan
            return _tagged(frame, data, keep, kind)
        if kind is FaultKind.SATURATED:
            done = data[:lines]
            finite = done[np.isfinite(done)]
            if finite.size:
                ceiling = np.quantile(finite, 1.0 - self.saturated_fraction)
                data[:lines] = np.minimum(done, ceiling)
            return _tagged(frame, data, lines, kind)
        raise DataError(f"{kind} does not corrupt frame data")  # pragma: no cover

    def execute(self, command: Command) -> CommandResult:
        with self._lock:
            stuck = self._stuck_attempt
        if stuck is not None:
            self._record(stuck, FaultKind.STUCK_COMMAND)
            kind = getattr(command, "kind", type(command).__name__)
            raise CommunicationError(
                f"injected stuck command on frame attempt {stuck}: {kind} timed out and was not "
                "applied; check the controller and resend"
            )
        return self.inner.execute(command)

    def close(self) -> None:
        self.inner.close()


def _tagged(frame: Frame, data: np.ndarray, lines_done: int, kind: FaultKind) -> Frame:
    return dataclasses.replace(
        frame,
        data=data,
        lines_done=lines_done,
        metadata={**frame.metadata, "injected_fault": kind.value},
    )
