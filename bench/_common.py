"""Shared helpers for the benchmark scripts (not part of the package or the test suite)."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
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


def run_facts(script: str, argv: Sequence[str], wall0: float, cpu0: float) -> dict[str, Any]:
    """What a result file records of the run: the command, its wall and CPU seconds since
    ``wall0`` (``time.perf_counter``) and ``cpu0`` (``time.process_time``), the load average."""
    return {
        "command": f"python {script} " + " ".join(argv),
        "wall_s": round(time.perf_counter() - wall0, 1),
        "cpu_s": round(time.process_time() - cpu0, 1),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def write_json(out_dir: str | Path, files: Mapping[str, Any]) -> None:
    """Write each value of ``files`` as JSON to ``out_dir``/its key (the folder is made)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, value in files.items():
        (out / name).write_text(json.dumps(value, indent=1))


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
