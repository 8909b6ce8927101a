"""Frames per second of the HAADF-STEM simulator at 256² and 512², against a baseline.

    /tmp/venv/bin/python bench/stem_speed.py --frames 40

Three ways of making the same noisy MoS2 frame (0.25 Å pixels, 2 µs dwell, 30 pA):

- ``simulator``: ``STEMSimulator.begin_frame`` + ``next_line`` for every line (the fast model:
  separable Fourier series for the crystal plus local defect kernels, then Poisson noise);
- ``instrument``: ``sim:stem`` ``acquire()`` (adds streaming partial frames every 32 lines);
- ``baseline``: the textbook model, atoms deposited on a 0.1 Å grid and FFT-convolved with
  the same probe, then sampled (``STEMSimulator.render_reference``), plus the same noise.

Both models compute the same image (Pearson r printed). Target: simulator 512² >= 20 frames/s
on 2 CPU cores (faster than a fast real scan, ~25 frames/s at 83 ns dwell). Timings on a shared
machine vary: the ratio to the baseline, measured in the same run, is the steadier number.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from tqdm import tqdm

from bench._common import machine
from drivers.frame import ScanRegion
from drivers.sim_stem import SimulatedSTEM
from simulators.stem import STEMSimulator

PIXEL_M = 0.25e-10
DWELL_S = 2e-6


def _rate(label: str, n: int, make_one: Callable[[], object]) -> float:
    """Frames per second of ``make_one`` over ``n`` calls after one warm-up call."""
    make_one()
    t0 = time.perf_counter()
    for _ in tqdm(range(n), desc=label, leave=False):
        make_one()
    return n / (time.perf_counter() - t0)


def _scan_frame(sim: STEMSimulator, region: ScanRegion, shape: tuple[int, int]) -> None:
    scan = sim.begin_frame(region, shape, DWELL_S)
    while not scan.done:
        scan.next_line()


def _baseline_frame(
    sim: STEMSimulator, region: ScanRegion, shape: tuple[int, int], rng: np.random.Generator
) -> None:
    mean = sim.render_reference(region, shape) * sim.electrons_per_pixel(DWELL_S)
    rng.poisson(np.clip(mean, 0.0, None)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=40, help="frames per measurement")
    parser.add_argument("--baseline-frames", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    print(f"machine: {machine()}")
    header = ("size", "simulator", "instrument", "baseline", "speed-up", "r")
    print(f"{header[0]:>6} {header[1]:>12} {header[2]:>12} {header[3]:>12} {header[4]:>9} "
          f"{header[5]:>9}")  # fmt: skip
    for side in (256, 512):
        region = ScanRegion(0.0, 0.0, side * PIXEL_M, side * PIXEL_M)
        shape = (side, side)
        sim = STEMSimulator(seed=args.seed)
        inst = SimulatedSTEM(seed=args.seed, region=region, shape_px=shape, dwell_s=DWELL_S)
        rng = np.random.default_rng(0)
        fast = _rate(
            f"simulator {side}²", args.frames, functools.partial(_scan_frame, sim, region, shape)
        )
        inst_rate = _rate(f"instrument {side}²", args.frames, inst.acquire)
        base = _rate(
            f"baseline {side}²",
            args.baseline_frames,
            functools.partial(_baseline_frame, sim, region, shape, rng),
        )
        a = sim.scattered_fraction(region, shape).ravel()
        b = sim.render_reference(region, shape).ravel()
        r = float(np.corrcoef(a, b)[0, 1])
        print(
            f"{side:>5}² {fast:>9.1f}/s {inst_rate:>9.1f}/s {base:>9.2f}/s "
            f"{fast / base:>8.1f}x {r:>9.6f}"
        )
        inst.close()


if __name__ == "__main__":
    main()
