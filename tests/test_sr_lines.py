"""Scan-line alignment of the sr output: known shifts of a synthetic lattice are found from noisy
lines, and from sparse (1/20 random) samples with shrinkage; lines with too little data are left
alone, and a featureless image is not moved."""

from __future__ import annotations

import numpy as np
import pytest

from agent.perception.tasks.sr_lines import (
    ITERATIONS,
    MAX_SHIFT_PX,
    MIN_SPARSE_PIXELS,
    PRIOR_FLOOR_PX,
    WEIGHT_FLOOR,
    align_lines,
    line_shifts,
    shift_lines,
    sparse_line_shifts,
)

SHAPE = (96, 128)
WIDE = (64, 512)
"""Lines as long as a 512² frame's: ~25 samples a line at 1/20 coverage."""


def _lattice(shift_px: np.ndarray, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    """Gaussian columns on a 7.3 x 6.1 px lattice, row ``r`` displaced by ``shift_px[r]`` along
    the fast axis (rendered exactly, not interpolated)."""
    rows = np.arange(shape[0], dtype=np.float64)
    cols = np.arange(shape[1], dtype=np.float64)[None, :] - shift_px[:, None]
    # the Gaussians separate: (sum over lattice rows) x (sum over lattice columns)
    across = sum(
        np.exp(-((rows - r0) ** 2) / (2 * 1.2**2)) for r0 in np.arange(-6.1, shape[0] + 6.1, 6.1)
    )
    along = sum(
        np.exp(-((cols - c0) ** 2) / (2 * 1.2**2)) for c0 in np.arange(-7.3, shape[1] + 7.3, 7.3)
    )
    return 2.0 + 40.0 * np.asarray(across)[:, None] * np.asarray(along)


def _random_scan(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Poisson counts of ``image`` at a random 1/20 of its pixels, NaN elsewhere."""
    counts = rng.poisson(image).astype(np.float64)
    return np.where(rng.random(image.shape) < 0.05, counts, np.nan)


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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_known_line_jitter_is_found_from_sparse_samples(seed: int) -> None:
    rng = np.random.default_rng(seed)
    jitter = np.clip(rng.normal(0.0, 0.4, WIDE[0]), -1.2, 1.2)
    truth = _lattice(jitter, WIDE)
    straight = _lattice(np.zeros(WIDE[0]), WIDE)
    data = _random_scan(truth, rng)  # ~25 noisy samples a line
    assert not line_shifts(straight, data).any()  # without `sparse` these lines stay put
    found = line_shifts(straight, data, sparse=True)
    # 0.16-0.21 px RMS off a 0.34-0.42 px jitter (shrinkage keeps them a little short of it)
    assert np.sqrt(np.mean((found - jitter) ** 2)) < 0.6 * np.sqrt(np.mean(jitter**2))
    assert np.corrcoef(found, jitter)[0, 1] > 0.8
    mean, sigma, shift = align_lines(straight, np.ones(WIDE), data, sparse=True)
    assert np.array_equal(shift, found)
    # the whole image, measured or not, follows its lines: 7-14 % of the squared error is left
    assert np.mean((mean - truth) ** 2) < 0.3 * np.mean((straight - truth) ** 2)
    np.testing.assert_allclose(sigma, 1.0)


def test_sparse_shifts_shrink_to_nothing_without_jitter() -> None:
    rng = np.random.default_rng(4)
    straight = _lattice(np.zeros(WIDE[0]), WIDE)
    found = line_shifts(straight, _random_scan(straight, rng), sparse=True)
    # the noise alone moves unregularised shifts by ~0.14 px RMS; the frame's own prior ~0.02
    assert np.sqrt(np.mean(found**2)) < 0.07


def test_sparse_alignment_leaves_full_and_empty_lines_as_they_were() -> None:
    rng = np.random.default_rng(5)
    jitter = rng.normal(0.0, 0.4, WIDE[0])
    truth = _lattice(jitter, WIDE)
    straight = _lattice(np.zeros(WIDE[0]), WIDE)
    data = _random_scan(truth, rng)
    data[10] = rng.poisson(truth[10])  # a fully measured line
    data[20] = np.nan  # lines with no or too few samples
    data[21, :] = np.nan
    data[21, 100 : 100 + MIN_SPARSE_PIXELS - 1] = truth[21, 100 : 100 + MIN_SPARSE_PIXELS - 1]
    plain = line_shifts(straight, data)
    found = line_shifts(straight, data, sparse=True)
    assert found[10] == plain[10] == pytest.approx(jitter[10], abs=0.15)
    assert found[20] == found[21] == 0.0
    assert np.count_nonzero(found) == WIDE[0] - 2


def test_a_featureless_prediction_is_not_moved_by_sparse_samples() -> None:
    flat = np.full(WIDE, 5.0)
    rng = np.random.default_rng(6)
    mean, sigma, shift = align_lines(flat, flat, _random_scan(flat, rng), sparse=True)
    assert not shift.any() and mean is flat and sigma is flat
    far = _lattice(np.full(WIDE[0], 3.0), WIDE)
    shifts = line_shifts(_lattice(np.zeros(WIDE[0]), WIDE), _random_scan(far, rng), sparse=True)
    assert np.all(np.abs(shifts) <= MAX_SHIFT_PX)


def _whole_line_reference(prediction: np.ndarray, data: np.ndarray) -> np.ndarray:
    """sparse_line_shifts written the slow way: whole lines shifted by shift_lines and
    differentiated everywhere, sums over the measured pixels."""
    sampled = np.isfinite(data)
    pred = prediction.astype(np.float64)
    weight = np.where(
        sampled, 1.0 / np.maximum(pred, WEIGHT_FLOOR * np.abs(pred[sampled]).mean()), 0
    )
    measured = np.where(sampled, data, 0.0)
    variance = np.sum(weight * ((measured - pred) * sampled) ** 2) / sampled.sum()
    shift, lam = np.zeros(pred.shape[0]), 0.0
    for step in range(ITERATIONS):
        moved = shift_lines(pred, shift).astype(np.float64)
        grad = np.gradient(moved, axis=1)  # central, one-sided at the edges
        num = np.sum((measured - moved) * sampled * weight * grad, axis=1)
        den = np.sum(weight * grad**2, axis=1)
        if step == 0:
            tau2 = np.clip(np.mean((num / den) ** 2 - variance / den), PRIOR_FLOOR_PX**2, 2.25)
            lam = variance / tau2
        shift = np.clip(shift + (-num - lam * shift) / (den + lam), -MAX_SHIFT_PX, MAX_SHIFT_PX)
    return shift


def test_sparse_shifts_equal_the_whole_line_computation() -> None:
    rng = np.random.default_rng(7)
    truth = _lattice(rng.normal(0.0, 0.4, WIDE[0]), WIDE)
    prediction = _lattice(np.zeros(WIDE[0]), WIDE).astype(np.float32)
    data = _random_scan(truth, rng)
    data[:, 0] = truth[:, 0]  # measured edge pixels take the one-sided gradient
    data[:, -1] = truth[:, -1]
    np.testing.assert_allclose(
        sparse_line_shifts(prediction, data), _whole_line_reference(prediction, data), atol=1e-6
    )
