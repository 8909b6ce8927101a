"""Statistics of the STM noise generators (simulators.noise) and of the noise in STM frames.

The 1/f generator changed in session 5 (its spectrum drawn directly, without the forward FFT)
for speed; these tests pin what must not change with them: the 1/f power spectrum the config
asks for (``flicker_noise_m_per_decade`` of RMS in every decade of frequency, slope -1), the
total variance, Gaussian values, and frames fully determined by the seed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from drivers.frame import ScanRegion
from simulators.noise import flicker_series, white_sigma_m
from simulators.stm import STMConfig, STMSimulator

RMS_PER_DECADE_M = 1e-12
DT_S = 1e-3


def _flicker_batch(seed: int, n_series: int, n_samples: int) -> np.ndarray:
    """``(n_series, n_samples)`` float64 flicker in units of ``RMS_PER_DECADE_M`` (so that the
    comparisons below are of numbers near 1, not of 1e-24 m^2 against pytest's absolute
    tolerance)."""
    rng = np.random.default_rng(seed)
    series = [flicker_series(rng, n_samples, DT_S, RMS_PER_DECADE_M) for _ in range(n_series)]
    return np.stack(series).astype(np.float64) / RMS_PER_DECADE_M


def test_flicker_holds_the_configured_variance_in_every_decade_with_slope_minus_one() -> None:
    n = 2**14  # 0.061 Hz .. 500 Hz at 1 ms
    series = _flicker_batch(11, 96, n)
    # One-sided periodogram: the variance held by each frequency bin (mean over series).
    spec = np.fft.rfft(series, axis=1)
    power = 2.0 * np.mean(np.abs(spec) ** 2, axis=0) / n**2
    power[-1] /= 2.0  # the Nyquist bin is counted once
    freq = np.fft.rfftfreq(n, DT_S)
    for lo, hi in ((0.1, 1.0), (1.0, 10.0), (10.0, 100.0), (100.0, 500.0)):
        band = (freq >= lo) & (freq < hi)
        # Each decade holds rms_per_decade**2 (1 in these units), within 10 %: the lowest
        # decade has 15 bins per series, 96 series (a relative standard error of about 3 %);
        # the discrete spectrum puts about 6 % of every decade's share into its lowest bin.
        share = math.log10(hi / lo)
        assert power[band].sum() == pytest.approx(share, rel=0.10, abs=0), (lo, hi)
    sel = (freq >= 0.1) & (freq <= 400.0)
    slope = np.polyfit(np.log10(freq[sel]), np.log10(power[sel]), 1)[0]
    assert slope == pytest.approx(-1.0, abs=0.03)
    decades = math.log10(n / 2)  # from 1 / (n dt) to the Nyquist frequency 1 / (2 dt)
    total = float(np.mean(np.var(series, axis=1)))
    assert total == pytest.approx(decades, rel=0.06, abs=0)


@pytest.mark.parametrize("n", [2**12, 2**12 + 1, 1000, 999])
def test_flicker_variance_is_right_for_even_and_odd_lengths(n: int) -> None:
    # Odd lengths have no Nyquist bin, even ones a real one: both must hold the target variance.
    series = _flicker_batch(12, 400, n)
    target = math.log10(n / 2)
    assert float(np.mean(np.var(series, axis=1))) == pytest.approx(target, rel=0.05, abs=0)
    if n % 2 == 0:
        # The real Nyquist bin has the power its neighbour has, as in the transform of white
        # noise shaped by 1 / sqrt(f) (half of it would be missing without its factor √2).
        power = np.mean(np.abs(np.fft.rfft(series, axis=1)) ** 2, axis=0)
        assert power[-1] / power[-2] == pytest.approx(1.0, abs=0.3)


def test_flicker_values_are_gaussian_and_seeded() -> None:
    series = _flicker_batch(13, 64, 2**12)
    z = (series / series.std(axis=1, keepdims=True)).ravel()
    assert float(np.mean(z**4)) == pytest.approx(3.0, abs=0.1)  # normal kurtosis
    assert float(np.mean(np.abs(z) > 2.0)) == pytest.approx(0.0455, abs=0.004)
    np.testing.assert_array_equal(series, _flicker_batch(13, 64, 2**12))
    assert not np.array_equal(series, _flicker_batch(14, 64, 2**12))
    zero = flicker_series(np.random.default_rng(0), 64, DT_S, 0.0)
    assert zero.shape == (64,) and not zero.any()


def test_frame_noise_matches_the_configured_white_line_and_flicker_variance() -> None:
    # Drift, creep and tip changes off: data - truth.clean is the noise of the trace pixels.
    cfg = STMConfig(
        drift_m_per_s=0.0,
        creep_fraction=0.0,
        degradation_rate_per_s=0.0,
        bad_tip_change_rate_per_s=0.0,
    )
    shape, dwell = (64, 64), 1e-3
    sim = STMSimulator(cfg, seed=40)
    residuals = []
    for i in range(24):
        frame = sim.begin_frame(ScanRegion(i * 20e-9, 0.0, 8e-9, 8e-9), shape, dwell)
        data = np.stack([frame.next_line() for _ in range(shape[0])]).astype(np.float64)
        clean = frame.truth().clean
        assert clean is not None
        residuals.append(data - clean)
    pm = 1e-12
    noise = np.stack(residuals) / pm
    white = (white_sigma_m(cfg.white_noise_m_per_sqrt_hz, dwell) / pm) ** 2  # 4.05 pm^2
    line = (cfg.line_noise_m / pm) ** 2  # 4 pm^2
    n_time = shape[0] * 2 * shape[1]  # the flicker runs through trace and retrace
    flicker = (cfg.flicker_noise_m_per_decade / pm) ** 2 * math.log10(n_time / 2)  # 3.6 pm^2
    # The per-frame mean of the 1/f part is not zero (its lowest frequencies), so compare the
    # variance about zero; 24 frames of a few pm^2 each: within 15 %.
    assert float(np.mean(noise**2)) == pytest.approx(white + line + flicker, rel=0.15, abs=0)
    # Pixel to pixel within a line the line offset cancels; the difference of neighbours holds
    # 2 white + 2 (R(0) - R(dt)) of the 1/f part, its variance shares (∝ 1/f) weighted by
    # 1 - cos(2 pi f dt): here 2 * (4.05 + 0.67) pm^2.
    k = np.arange(1, n_time // 2 + 1, dtype=np.float64)
    weight = np.where(k == n_time // 2, 0.5, 1.0) / k
    shares = flicker * weight / weight.sum()
    flicker_step = float(np.sum(shares * (1.0 - np.cos(2.0 * np.pi * k / n_time))))
    dx = np.diff(noise, axis=2)
    assert float(np.var(dx)) / 2.0 == pytest.approx(white + flicker_step, rel=0.05, abs=0)
