"""Simulator speed: frames per second of the STM and SEM forward models at 256² and 512².

    .venv/bin/python bench/sim_speed.py [--frames 20] [--shapes 256 512]

Each simulator scans whole frames line by line through its own API (``begin_frame`` then
``next_line`` per row, ground truth at the end), as the ``sim:`` drivers do. The baseline in the
same process is the driver's floor: allocating the frame buffer and copying a line into it row
by row, plus the per-chunk frame copies the driver streams. Issue target: STM and SEM 256² at
>= 50 frames/s on 2 cores.

"cpu ms/frame" is the process CPU time per frame (all threads) over the same frames: on a shared
machine it varies much less than frames/s. The STM scans one region with a tip that is free to
change (it degrades and can crash over tens of frames); a crashed-tip frame still renders its
good-tip ground truth, so a long run times a mix of tip states (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from tqdm import tqdm

from bench._common import machine
from drivers.frame import ScanRegion
from simulators.sem import SEMSimulator
from simulators.stm import STMSimulator

LINES_PER_CHUNK = 32


def _scan(sim: object, region: ScanRegion, dwell_s: float) -> Callable[[int], None]:
    def run(n: int) -> None:
        scan = sim.begin_frame(region, (n, n), dwell_s)  # type: ignore[attr-defined]
        while not scan.done:
            scan.next_line()
        scan.truth()

    return run


def _floor(n: int) -> None:
    line = np.ones(n, dtype=np.float32)
    buffer = np.full((n, n), np.nan, dtype=np.float32)
    for row in range(n):
        buffer[row] = line
        if (row + 1) % LINES_PER_CHUNK == 0:
            buffer.copy()


def _fps(name: str, run: Callable[[int], None], n: int, frames: int) -> tuple[float, float]:
    """Frames per second (wall clock) and CPU milliseconds per frame."""
    run(n)  # warm up (imports, caches)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in tqdm(range(frames), desc=f"{name} {n}²", leave=False, unit="frame"):
        run(n)
    return frames / (time.perf_counter() - t0), 1e3 * (time.process_time() - c0) / frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--shapes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    cases: list[tuple[str, Callable[[int], None]]] = [
        ("floor", _floor),
        ("stm", _scan(STMSimulator(seed=args.seed), ScanRegion(0, 0, 16e-9, 16e-9), 1e-3)),
        ("sem", _scan(SEMSimulator(seed=args.seed), ScanRegion(0, 0, 5e-6, 5e-6), 1e-6)),
    ]
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"machine: {machine()}; load average {load}")
    header = f"{'simulator':<10}{'shape':>8}{'frames/s':>12}{'vs floor':>12}{'target':>10}"
    print(f"{header}{'cpu ms/frame':>14}")
    for n in args.shapes:
        floor = None
        for name, run in cases:
            fps, cpu_ms = _fps(name, run, n, args.frames)
            floor = fps if name == "floor" else floor
            ratio = "" if name == "floor" or floor is None else f"{fps / floor:.4f}"
            target = ">= 50" if name in ("stm", "sem") and n == 256 else ""
            print(f"{name:<10}{n:>7}²{fps:>12.1f}{ratio:>12}{target:>10}{cpu_ms:>14.2f}")


if __name__ == "__main__":
    main()
