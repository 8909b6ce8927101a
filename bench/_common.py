"""Shared helpers for the benchmark scripts (not part of the package or the test suite)."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Iterator
from typing import Any

from drivers.commands import Command
from drivers.frame import Frame
from drivers.protocol import CommandResult, Instrument, InstrumentInfo, InstrumentState


def machine() -> str:
    """The machine in words; names the cores this process may run on when it is pinned to fewer
    (``taskset -c 2,3 ...`` gives "16 cores, pinned to 2")."""
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    pinned = f", pinned to {usable}" if usable != cores else ""
    return f"{platform.machine()}, {cores} cores{pinned}, Python {platform.python_version()}"


class TimedInstrument:
    """Wraps an instrument and adds up the wall time spent inside it (the simulator's share)."""

    def __init__(self, inner: Instrument) -> None:
        self.inner = inner
        self.seconds = 0.0

    def _timed(self, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds += time.perf_counter() - t0

    def info(self) -> InstrumentInfo:
        return self._timed(self.inner.info)

    def state(self) -> InstrumentState:
        return self._timed(self.inner.state)

    def acquire(self) -> Frame:
        return self._timed(self.inner.acquire)

    def stream(self) -> Iterator[Frame]:
        iterator = iter(self.inner.stream())
        while True:
            t0 = time.perf_counter()
            try:
                part = next(iterator)
            except StopIteration:
                self.seconds += time.perf_counter() - t0
                return
            self.seconds += time.perf_counter() - t0
            yield part

    def execute(self, command: Command) -> CommandResult:
        return self._timed(self.inner.execute, command)

    def close(self) -> None:
        self.inner.close()
