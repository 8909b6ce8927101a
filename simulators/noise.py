"""Noise and scan distortions shared by the scanning-probe forward models.

All functions take a ``numpy.random.Generator`` and never touch global random state. Times are
simulated seconds; lengths are metres.

- :func:`white_sigma_m` — white measurement noise: per-pixel variance ``asd**2 / (2 * dwell_s)``
  (the amplitude spectral density integrated over the pixel bandwidth ``1 / (2 * dwell_s)``), so
  halving the dwell doubles the variance.
- :func:`flicker_series` — 1/f ("flicker") noise sampled in scan-time order.
- :class:`DriftModel` — slow thermal drift: constant velocity plus a gentle wobble.
- :class:`CreepModel` — piezo creep after moves: an exponentially decaying lag behind each move.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import scipy.fft


def white_sigma_m(asd_m_per_sqrt_hz: float, dwell_s: float) -> float:
    """Standard deviation of white noise averaged over one pixel of ``dwell_s``."""
    return float(asd_m_per_sqrt_hz / math.sqrt(2.0 * dwell_s))


def flicker_series(
    rng: np.random.Generator, n_samples: int, dt_s: float, rms_per_decade_m: float
) -> np.ndarray:
    """``(n_samples,)`` float32 1/f noise sampled every ``dt_s``.

    The power spectral density is ``S(f) ∝ 1/f`` between ``1 / (n_samples * dt_s)`` and the
    Nyquist frequency, scaled so that each decade of frequency holds a variance of
    ``rms_per_decade_m**2`` (in expectation). The spectrum is drawn directly: each frequency
    bin gets a complex normal coefficient (``2 * (n_samples // 2 + 1)`` single-precision
    normals from ``rng``), shaped by ``1 / sqrt(f)``, then one inverse real FFT. That is the
    same Gaussian process as filtering white noise in the frequency domain (the FFT of white
    noise has independent normal bins), without the forward transform.
    """
    n_bins = n_samples // 2 + 1
    spec = rng.standard_normal(2 * n_bins, dtype=np.float32).view(np.complex64)
    if rms_per_decade_m <= 0.0 or n_samples < 4:
        return np.zeros(n_samples, dtype=np.float32)
    spec *= _flicker_shape(n_samples, dt_s)
    series = scipy.fft.irfft(spec, n_samples, overwrite_x=True)
    decades = math.log10((1.0 / (2.0 * dt_s)) * (n_samples * dt_s))
    series *= np.float32(rms_per_decade_m * math.sqrt(max(decades, 0.0)))
    return np.asarray(series)


@functools.lru_cache(maxsize=8)
def _flicker_shape(n_samples: int, dt_s: float) -> np.ndarray:
    """``(n_samples // 2 + 1,)`` float32 (read-only): the amplitude of each frequency bin of
    :func:`flicker_series` for unit complex normal draws, ``∝ 1 / sqrt(f)`` and normalised so
    that the series has unit variance in expectation.

    Through ``irfft`` (its ``1 / n`` scaling) an interior bin of amplitude ``a`` adds
    ``4 a**2 / n**2`` to the variance; the Nyquist bin of an even ``n`` keeps only its real
    part and adds ``a**2 / n**2``. Its amplitude gets a factor ``√2`` so that it holds the same
    share as in the transform of white noise (half an interior bin's).
    """
    freq = scipy.fft.rfftfreq(n_samples, dt_s)
    shape = np.zeros_like(freq)
    shape[1:] = 1.0 / np.sqrt(freq[1:])
    weights = np.full(freq.shape, 4.0)
    if n_samples % 2 == 0:
        shape[-1] *= math.sqrt(2.0)
        weights[-1] = 1.0
    var = float(np.sum(weights * shape**2)) / n_samples**2
    shape32 = (shape / math.sqrt(var)).astype(np.float32)
    shape32.flags.writeable = False
    return shape32


@dataclass
class DriftModel:
    """Thermal drift: ``velocity_m_per_s`` plus a slow wobble across it; zero at ``t = 0``."""

    velocity_m_per_s: tuple[float, float]
    wobble_m: float = 0.0
    wobble_period_s: float = 900.0
    wobble_phase: float = 0.0

    @classmethod
    def random(cls, rng: np.random.Generator, speed_m_per_s: float) -> DriftModel:
        """A drift of ``speed_m_per_s`` in a random direction with a wobble of ~20 %."""
        angle = rng.uniform(0.0, 2.0 * math.pi)
        period = rng.uniform(600.0, 1800.0)
        phase = rng.uniform(0.0, 2.0 * math.pi)
        wobble = 0.2 * speed_m_per_s * period / (2.0 * math.pi)
        return cls(
            (speed_m_per_s * math.cos(angle), speed_m_per_s * math.sin(angle)),
            wobble_m=wobble,
            wobble_period_s=period,
            wobble_phase=phase,
        )

    def displacement_m(self, t_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Drift displacement ``(dx, dy)`` at simulated times ``t_s`` (any shape)."""
        t = np.asarray(t_s, dtype=np.float64)
        vx, vy = self.velocity_m_per_s
        speed = math.hypot(vx, vy)
        w = self.wobble_m * (
            np.sin(2.0 * math.pi * t / self.wobble_period_s + self.wobble_phase)
            - math.sin(self.wobble_phase)
        )
        if speed > 0.0:
            px, py = -vy / speed, vx / speed
        else:
            px = py = 0.0
        return vx * t + px * w, vy * t + py * w


@dataclass
class CreepModel:
    """Piezo creep: after a move by ``d``, the tip lags ``fraction * d * exp(-(t - t0) / tau)``.

    Moves older than ~30 time constants are forgotten.
    """

    fraction: float
    time_constant_s: float
    _moves: list[tuple[float, float, float]] = field(default_factory=list)

    def add_move(self, t_s: float, dx_m: float, dy_m: float) -> None:
        if self.fraction <= 0.0 or (dx_m == 0.0 and dy_m == 0.0):
            return
        horizon = 30.0 * self.time_constant_s
        self._moves = [m for m in self._moves if t_s - m[0] < horizon]
        self._moves.append((t_s, dx_m, dy_m))

    def displacement_m(self, t_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Creep displacement ``(dx, dy)`` of the tip from its commanded position at ``t_s``."""
        t = np.asarray(t_s, dtype=np.float64)
        dx = np.zeros_like(t)
        dy = np.zeros_like(t)
        for t0, mx, my in self._moves:
            decay = np.where(t >= t0, np.exp(-np.maximum(t - t0, 0.0) / self.time_constant_s), 0.0)
            dx -= self.fraction * mx * decay
            dy -= self.fraction * my * decay
        return dx, dy
