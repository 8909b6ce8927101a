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

Lines with too few measured pixels (random and spiral partial scans) keep a shift of 0.
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


def line_shifts(prediction: np.ndarray, data: np.ndarray) -> np.ndarray:
    """``(H,) float64`` shift of every line of ``prediction`` ``(H, W)`` that best matches the
    measured ``data`` ``(H, W)`` (NaN where not measured) in least squares; 0 for lines with
    too few measured pixels or no gradient to register against."""
    h, w = prediction.shape
    sampled = np.isfinite(data)
    counts = sampled.sum(axis=1)
    usable = (counts >= MIN_LINE_SAMPLED * w) & (counts >= MIN_LINE_PIXELS)
    shift = np.zeros(h)
    if w < 3 or not usable.any():
        return shift
    measured = np.where(sampled, data, 0.0).astype(np.float32)
    weight = sampled.astype(np.float32)
    for _ in range(ITERATIONS):
        moved = shift_lines(prediction, shift) if shift.any() else prediction.astype(np.float32)
        grad = np.empty_like(moved)  # ∂/∂x by central differences, one-sided at the edges
        grad[:, 1:-1] = 0.5 * (moved[:, 2:] - moved[:, :-2])
        grad[:, 0] = moved[:, 1] - moved[:, 0]
        grad[:, -1] = moved[:, -1] - moved[:, -2]
        grad *= weight
        num = np.einsum("ij,ij->i", measured - moved, grad, dtype=np.float64)
        den = np.einsum("ij,ij->i", grad, grad, dtype=np.float64)
        ok = usable & (den > 0)
        # data ≈ moved(x - δ) ≈ moved - δ ∂moved/∂x  ->  δ = -Σ (data - moved) ∂x / Σ ∂x²
        shift[ok] -= num[ok] / den[ok]
        np.clip(shift, -MAX_SHIFT_PX, MAX_SHIFT_PX, out=shift)
    return shift


def align_lines(
    mean: np.ndarray, sigma: np.ndarray, data: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``mean`` and ``sigma`` ``(H, W)`` with every line shifted onto the measured ``data``
    (same shape and units, NaN = not measured), and the shifts ``(H,)`` in pixels."""
    shift = line_shifts(np.asarray(mean), np.asarray(data))
    if not shift.any():
        return mean, sigma, shift
    return shift_lines(mean, shift), shift_lines(sigma, shift), shift
