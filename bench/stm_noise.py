"""CPU time of one STM frame's noise: the generators before and after session 5, alternately.

    /tmp/venv/bin/python bench/stm_noise.py [--shape 256] [--frames 100] [--rounds 5]

Times what ``FrameScan`` draws per frame (``shape²`` white normals and the 1/f series of
``2 * shape²`` samples, trace and retrace) three ways, in the same process, round by round:

- ``before``: numpy's float32 ziggurat, and the 1/f series as white noise filtered in the
  frequency domain (forward and inverse real FFT), as until session 5;
- ``now``: numpy's normals drawn straight into the frequency bins (no forward FFT), through
  ``simulators.noise.flicker_series`` as ``FrameScan`` calls it;
- ``torch normals``: the same with torch's normal sampler (tried in session 5 and not kept:
  docs/decisions/0012-stm-noise-sampling.md).

Prints the median CPU milliseconds per frame (``time.process_time``) of each round and the
median ratio before / now. The whole-frame effect is ``bench/stm_paired_cpu.py``'s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import scipy.fft

from bench._common import machine
from simulators.noise import flicker_series

DWELL_S = 1e-3
RMS_M = 1e-12


def _before(rng: np.random.Generator, shape: int) -> None:
    rng.standard_normal((shape, shape), dtype=np.float32)
    n = 2 * shape * shape
    white = rng.standard_normal(n, dtype=np.float32)
    freq = _freq(n)
    spec = scipy.fft.rfft(white)
    spec *= freq
    series = scipy.fft.irfft(spec, n, overwrite_x=True)
    series *= np.float32(RMS_M)


def _now(rng: np.random.Generator, shape: int) -> None:
    rng.standard_normal((shape, shape), dtype=np.float32)
    flicker_series(rng, 2 * shape * shape, DWELL_S, RMS_M)


def _torch_normals(rng: np.random.Generator, shape: int) -> None:
    import torch

    def normals(n: int) -> np.ndarray:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(rng.integers(2**63)))
        return torch.randn(n, generator=gen, dtype=torch.float32).numpy()

    normals(shape * shape)
    n = 2 * shape * shape
    spec = normals(2 * (n // 2 + 1)).view(np.complex64)
    spec *= _freq(n)
    series = scipy.fft.irfft(spec, n, overwrite_x=True)
    series *= np.float32(RMS_M)


_SHAPES: dict[int, np.ndarray] = {}


def _freq(n: int) -> np.ndarray:
    """A 1/sqrt(f) amplitude (float32) of the right length: the cost, not the values, counts."""
    if n not in _SHAPES:
        f = scipy.fft.rfftfreq(n, DWELL_S)
        shape = np.zeros_like(f)
        shape[1:] = 1.0 / np.sqrt(f[1:])
        _SHAPES[n] = shape.astype(np.float32)
    return _SHAPES[n]


def _cpu_ms(fn: Callable[[np.random.Generator, int], None], shape: int, frames: int) -> float:
    rng = np.random.default_rng(1)
    times = []
    for _ in range(frames):
        t0 = time.process_time()
        fn(rng, shape)
        times.append(time.process_time() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, default=256)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cases = {"before": _before, "now": _now, "torch normals": _torch_normals}
    for fn in cases.values():  # warm up: imports (torch), plans, caches
        fn(np.random.default_rng(0), args.shape)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"machine: {machine()}; load average {load}; {args.shape}² frame noise, CPU ms")
    ratios = []
    for r in range(args.rounds):
        ms = {name: _cpu_ms(fn, args.shape, args.frames) for name, fn in cases.items()}
        ratios.append(ms["before"] / ms["now"])
        cells = ", ".join(f"{name} {v:.3f}" for name, v in ms.items())
        print(f"round {r + 1}: {cells}; before / now {ratios[-1]:.2f}")
    print(f"median before / now: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
