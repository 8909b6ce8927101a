"""Scan-line alignment of the ``sr`` network's output: the line jitter of the frame put back.

A scanning microscope places every line with its own small error along the fast axis (line
jitter); the noise-free truth of a frame is the specimen at the probe positions actually visited,
so each line of it carries that shift. The network, trained mostly on noisy frames where one
line's shift is hard to see, returns lines that are nearly straight: on the held-out evaluation
(seed 500,000) per-line shifts of its output explained ~65 % of its squared error even on
noise-free input, and 35-55 % at a quarter dose (docs/benchmarks.md, sr section). A line of a
full raster holds enough signal to measure its shift against the network's own prediction of
that line, so :func:`align_lines` does so: a few Gauss-Newton steps of the least-squares shift
of each predicted line onto the measured one, then shifts the predicted mean and σ by it.

Sparse lines (random and spiral partial scans: ~13 of 256 pixels a line at 1/20) are aligned
too when asked (``sparse=True``, docs/decisions/0017): their shifts are estimated the same way but
as a maximum a posteriori, because a dozen noisy samples measure a shift poorly. Residuals are
weighted by the inverse of the predicted signal (Poisson counting noise), and each line's shift
is shrunk towards 0 by a Gaussian prior whose width is estimated from the frame itself (empirical
Bayes over its sparse lines: the spread of the unregularised shifts minus their noise). The
simulator's jitter is independent from line to line, so a line with no measured pixel (the
skipped lines of a line-subsampled scan) keeps a shift of 0: nothing measured predicts it.
"""

from __future__ import annotations

import numpy as np

MIN_LINE_SAMPLED = 0.5
"""A line is aligned only when at least this fraction of its pixels were measured."""
MIN_LINE_PIXELS = 16
"""... and at least this many."""
MAX_SHIFT_PX = 1.5
"""Largest shift of a line (pixels along the fast axis); the shifts found on the held-out
frames are ~0.25 px RMS (``sim:stem`` jitters lines by 0.1 Å RMS, 0.4 px)."""
ITERATIONS = 2
"""Gauss-Newton steps: on held-out quarter-dose frames one step gains 2.0 / 2.7 dB, two 2.1 /
2.8 dB, more change nothing (docs/benchmarks.md)."""
MIN_SPARSE_PIXELS = 4
"""A sparse line (fewer than :data:`MIN_LINE_SAMPLED` measured) is aligned, with shrinkage, from
this many measured pixels on (1, 2 or 4 gave the same errors on the tuning frames)."""
PRIOR_FLOOR_PX = 0.05
"""Smallest prior width of the sparse lines' shifts: a frame without jitter (or too few sparse
lines to tell) shrinks them almost to 0 instead of dividing by 0."""
WEIGHT_FLOOR = 0.1
"""Sparse-line residuals are weighted by ``1 / max(prediction, WEIGHT_FLOOR * mean)`` (the mean
prediction at the measured pixels), so dark pixels do not get unbounded weight (0.001, 0.1 or
0.3 changed the tuning errors by < 0.005 pp)."""


def shift_lines(image: np.ndarray, shift_px: np.ndarray) -> np.ndarray:
    """``image`` ``(H, W)`` with row ``r`` moved by ``shift_px[r]`` pixels towards higher columns
    (linear interpolation, edge values held; shifts beyond :data:`MAX_SHIFT_PX` are clipped);
    ``(H, W) float32``."""
    h, w = image.shape
    shift_px = np.clip(shift_px, -MAX_SHIFT_PX, MAX_SHIFT_PX)
    pad = int(np.ceil(MAX_SHIFT_PX)) + 1
    padded = np.pad(np.asarray(image, np.float32), ((0, 0), (pad, pad)), mode="edge")
    whole = np.floor(shift_px).astype(np.intp)  # out[x] = (1 - f) in[x - k] + f in[x - k - 1]
    frac = (shift_px - whole).astype(np.float32)[:, None]
    out = np.empty((h, w), np.float32)
    for k in np.unique(whole):
        rows = np.flatnonzero(whole == k)
        near = padded[rows, pad - k : pad - k + w]
        far = padded[rows, pad - k - 1 : pad - k - 1 + w]
        out[rows] = near + (far - near) * frac[rows]
    return out


def _gradient(image: np.ndarray) -> np.ndarray:
    """∂/∂x of ``image`` ``(H, W)`` by central differences, one-sided at the edges."""
    grad = np.empty_like(image)
    grad[:, 1:-1] = 0.5 * (image[:, 2:] - image[:, :-2])
    grad[:, 0] = image[:, 1] - image[:, 0]
    grad[:, -1] = image[:, -1] - image[:, -2]
    return grad


def line_shifts(prediction: np.ndarray, data: np.ndarray, *, sparse: bool = False) -> np.ndarray:
    """``(H,) float64`` shift of every line of ``prediction`` ``(H, W)`` that best matches the
    measured ``data`` ``(H, W)`` (NaN where not measured) in least squares; 0 for lines with
    too few measured pixels or no gradient to register against.

    With ``sparse`` the lines with fewer than :data:`MIN_LINE_SAMPLED` but at least
    :data:`MIN_SPARSE_PIXELS` measured pixels get the shrunk, noise-weighted shift of
    :func:`sparse_line_shifts`; the well-measured lines are found as without it.
    """
    h, w = prediction.shape
    sampled = np.isfinite(data)
    counts = sampled.sum(axis=1)
    usable = (counts >= MIN_LINE_SAMPLED * w) & (counts >= MIN_LINE_PIXELS)
    shift = np.zeros(h)
    if w < 3:
        return shift
    if sparse:
        few = ~usable & (counts >= MIN_SPARSE_PIXELS)
        if few.any():
            shift = sparse_line_shifts(prediction, data, few)
    if not usable.any():
        return shift
    full = np.flatnonzero(usable)
    prediction = prediction[full]
    measured = np.where(sampled[full], data[full], 0.0).astype(np.float32)
    weight = sampled[full].astype(np.float32)
    found = np.zeros(full.size)
    for _ in range(ITERATIONS):
        moved = shift_lines(prediction, found) if found.any() else prediction.astype(np.float32)
        grad = _gradient(moved) * weight
        num = np.einsum("ij,ij->i", measured - moved, grad, dtype=np.float64)
        den = np.einsum("ij,ij->i", grad, grad, dtype=np.float64)
        ok = den > 0
        # data ≈ moved(x - δ) ≈ moved - δ ∂moved/∂x  ->  δ = -Σ (data - moved) ∂x / Σ ∂x²
        found[ok] -= num[ok] / den[ok]
        np.clip(found, -MAX_SHIFT_PX, MAX_SHIFT_PX, out=found)
    shift[full] = found
    return shift


def sparse_line_shifts(
    prediction: np.ndarray, data: np.ndarray, lines: np.ndarray | None = None
) -> np.ndarray:
    """``(H,) float64`` maximum a posteriori shifts of sparsely measured lines.

    ``prediction`` ``(H, W)`` (positive, in the data's units) and ``data`` ``(H, W)`` (NaN where
    not measured); only the measured pixels of ``lines`` (``(H,)`` bool, default all) are used,
    and the other lines get 0. The residual of a measured pixel is weighted by
    ``1 / prediction`` (counting noise); the shifts get a Gaussian prior of mean 0 whose variance
    τ² is the mean square of the lines' unregularised one-step shifts minus their noise variance
    (at least :data:`PRIOR_FLOOR_PX`²), so each line's shift is shrunk by ``den / (den + λ)``,
    ``λ`` = residual variance / τ². :data:`ITERATIONS` Gauss-Newton steps, computed at the
    measured pixels only (the same values as shifting whole lines with :func:`shift_lines`).
    """
    h, w = prediction.shape
    shift = np.zeros(h)
    sampled = np.isfinite(data)
    if lines is not None:
        sampled &= np.asarray(lines, bool)[:, None]
    index = np.flatnonzero(sampled)  # flat indices: much faster than nonzero and [row, col]
    if w < 3 or index.size == 0:
        return shift
    row = index // w
    base = row * w
    col = index - base
    flat = np.asarray(prediction).ravel()
    measured = np.asarray(data).ravel()[index].astype(np.float64)
    at_sample = flat[index].astype(np.float64)
    floor = WEIGHT_FLOOR * float(np.abs(at_sample).mean())
    if not floor > 0:
        return shift
    weight = 1.0 / np.maximum(at_sample, floor)
    variance = float(np.sum(weight * (measured - at_sample) ** 2)) / row.size
    if not variance > 0:
        return shift
    # central differences, one-sided at the edges, as in _gradient
    after, before = np.minimum(col + 1, w - 1), np.maximum(col - 1, 0)
    spacing = (after - before).astype(np.float64)

    def moved(columns: np.ndarray, by: np.ndarray) -> np.ndarray:
        """The line shifted by ``by`` px at ``columns``: shift_lines' interpolation."""
        position = columns - by
        left = np.floor(position)
        frac = position - left
        left = left.astype(np.intp)
        lo = flat[base + np.clip(left, 0, w - 1)].astype(np.float64)
        hi = flat[base + np.clip(left + 1, 0, w - 1)].astype(np.float64)
        return lo + (hi - lo) * frac

    lam = 0.0
    for step in range(ITERATIONS):
        by = np.clip(shift, -MAX_SHIFT_PX, MAX_SHIFT_PX)[row]
        value = moved(col, by)
        grad = (moved(after, by) - moved(before, by)) / spacing
        wgrad = weight * grad
        num = np.bincount(row, (measured - value) * wgrad, minlength=h)
        den = np.bincount(row, wgrad * grad, minlength=h)
        if step == 0:  # empirical Bayes: τ² from the unregularised shifts and their noise
            ok = den > 0
            if not ok.any():
                return shift
            raw = num[ok] / den[ok]
            tau2 = float(np.mean(raw**2 - variance / den[ok]))
            tau2 = min(max(tau2, PRIOR_FLOOR_PX**2), MAX_SHIFT_PX**2)
            lam = variance / tau2
        # minimise Σ w (data - moved + δ ∂x)² + λ (shift + δ)²
        shift += (-num - lam * shift) / (den + lam)
        np.clip(shift, -MAX_SHIFT_PX, MAX_SHIFT_PX, out=shift)
    return shift


def align_lines(
    mean: np.ndarray, sigma: np.ndarray, data: np.ndarray, *, sparse: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``mean`` and ``sigma`` ``(H, W)`` with every line shifted onto the measured ``data``
    (same shape and units, NaN = not measured), and the shifts ``(H,)`` in pixels; ``sparse``
    aligns sparsely measured lines too (:func:`line_shifts`)."""
    shift = line_shifts(np.asarray(mean), np.asarray(data), sparse=sparse)
    if not shift.any():
        return mean, sigma, shift
    return shift_lines(mean, shift), shift_lines(sigma, shift), shift
