"""Scan-line alignment of the sr output: known shifts of a synthetic lattice are found from noisy
lines, lines with too little data are left alone, and a featureless image is not moved."""

from __future__ import annotations

import numpy as np
import pytest

from agent.perception.tasks.sr_lines import (
    MAX_SHIFT_PX,
    align_lines,
    line_shifts,
    shift_lines,
)

SHAPE = (96, 128)


def _lattice(shift_px: np.ndarray) -> np.ndarray:
    """Gaussian columns on a 7.3 x 6.1 px lattice, row ``r`` displaced by ``shift_px[r]`` along
    the fast axis (rendered exactly, not interpolated)."""
    rows, cols = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]].astype(np.float64)
    cols = cols - shift_px[:, None]
    image = np.full(SHAPE, 2.0)
    for r0 in np.arange(-6.1, SHAPE[0] + 6.1, 6.1):
        for c0 in np.arange(-7.3, SHAPE[1] + 7.3, 7.3):
            image += 40.0 * np.exp(-((rows - r0) ** 2 + (cols - c0) ** 2) / (2 * 1.2**2))
    return image


def test_shift_lines_moves_content_by_the_given_pixels() -> None:
    image = np.random.default_rng(0).random(SHAPE, np.float32)
    assert np.array_equal(shift_lines(image, np.zeros(SHAPE[0])), image)
    moved = shift_lines(image, np.full(SHAPE[0], 1.0))
    assert np.array_equal(moved[:, 1:], image[:, :-1]) and np.array_equal(moved[:, 0], image[:, 0])
    back = shift_lines(image, np.full(SHAPE[0], -1.0))
    assert np.array_equal(back[:, :-1], image[:, 1:])
    half = shift_lines(image, np.full(SHAPE[0], 0.5))
    np.testing.assert_allclose(half[:, 1:], 0.5 * (image[:, 1:] + image[:, :-1]), atol=1e-6)
    mixed = shift_lines(image, np.arange(SHAPE[0]) % 2 - 0.25)  # rows by -0.25 and 0.75 px
    np.testing.assert_allclose(mixed[0, :-1], 0.75 * image[0, :-1] + 0.25 * image[0, 1:], atol=1e-6)
    np.testing.assert_allclose(mixed[1, 1:], 0.25 * image[1, 1:] + 0.75 * image[1, :-1], atol=1e-6)


def test_known_line_jitter_is_found_in_noisy_lines() -> None:
    rng = np.random.default_rng(1)
    jitter = np.clip(rng.normal(0.0, 0.4, SHAPE[0]), -1.2, 1.2)
    truth = _lattice(jitter)
    straight = _lattice(np.zeros(SHAPE[0]))
    exact = line_shifts(straight, truth)  # noise-free lines: only the interpolation errs
    assert np.sqrt(np.mean((exact - jitter) ** 2)) < 0.03
    data = rng.poisson(truth).astype(np.float64)  # ~2-40 counts a pixel
    found = line_shifts(straight, data)
    assert np.sqrt(np.mean((found - jitter) ** 2)) < 0.4 * np.sqrt(np.mean(jitter**2))
    sigma = np.ones(SHAPE)
    mean, sigma_out, shift = align_lines(straight, sigma, data)
    assert np.array_equal(shift, found)
    before = np.mean((straight - truth) ** 2)
    after = np.mean((mean - truth) ** 2)
    assert after < 0.15 * before
    np.testing.assert_allclose(sigma_out, 1.0)


def test_lines_with_few_measured_pixels_keep_their_place() -> None:
    rng = np.random.default_rng(2)
    jitter = rng.normal(0.0, 0.4, SHAPE[0])
    data = rng.poisson(_lattice(jitter)).astype(np.float64)
    sparse = np.where(rng.random(SHAPE) < 0.05, data, np.nan)  # a 1/20 random scan
    sparse[10] = data[10]  # one fully measured line
    found = line_shifts(_lattice(np.zeros(SHAPE[0])), sparse)
    assert found[10] == pytest.approx(jitter[10], abs=0.15)
    assert not np.delete(found, 10).any()


def test_a_featureless_prediction_is_not_moved_and_shifts_are_bounded() -> None:
    flat = np.full(SHAPE, 5.0)
    noise = np.random.default_rng(3).poisson(5.0, SHAPE).astype(np.float64)
    mean, sigma, shift = align_lines(flat, flat, noise)
    assert not shift.any() and mean is flat and sigma is flat
    far = line_shifts(_lattice(np.zeros(SHAPE[0])), _lattice(np.full(SHAPE[0], 3.0)))
    assert np.all(np.abs(far) <= MAX_SHIFT_PX)
