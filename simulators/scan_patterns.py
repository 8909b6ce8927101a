"""Sampling masks of partial (sparse) scans: random pixels, line-subsampled rasters, spirals.

Each pattern visits ``round(fraction * H * W)`` pixels (``lines``: ``round(fraction * H)`` whole
rows). The mask is ``(H, W)`` bool, True where the beam dwells. PHYSICS.md: published sparse-scan
reconstructions use coverages of 1/20 to 1/100.
"""

from __future__ import annotations

import math

import numpy as np

from drivers.commands import SCAN_PATTERNS
from drivers.errors import ConfigError

__all__ = ["SCAN_PATTERNS", "check_pattern", "sampling_mask"]


def check_pattern(pattern: str, fraction: float) -> tuple[str, float]:
    """``(pattern, fraction)`` validated; :class:`ConfigError` names a bad value."""
    if not isinstance(pattern, str) or pattern not in SCAN_PATTERNS:
        raise ConfigError(f"scan pattern {pattern!r} is unknown; choose one of {SCAN_PATTERNS}")
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not math.isfinite(fraction)
        or not 0.0 < fraction <= 1.0
    ):
        raise ConfigError(f"scan fraction must be in (0, 1], got {fraction!r}")
    if pattern == "raster" and fraction != 1.0:
        raise ConfigError(
            f"a raster scan visits every pixel (fraction 1), got fraction={fraction!r}; "
            "use 'random', 'lines' or 'spiral' for partial scans"
        )
    return pattern, float(fraction)


def sampling_mask(
    pattern: str, fraction: float, shape_px: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """``(H, W)`` bool mask of the pixels a ``pattern`` scan at ``fraction`` visits.

    Only ``random`` draws from ``rng`` (``H * W`` bits' worth, via a permutation choice).
    """
    pattern, fraction = check_pattern(pattern, fraction)
    h_px, w_px = shape_px
    mask = np.zeros(shape_px, dtype=bool)
    if pattern == "raster":
        mask[:] = True
    elif pattern == "random":
        n = max(1, round(fraction * h_px * w_px))
        mask.ravel()[rng.choice(h_px * w_px, size=n, replace=False)] = True
    elif pattern == "lines":
        n = max(1, round(fraction * h_px))
        rows = np.floor(np.arange(n) * (h_px / n) + 0.5 * (h_px / n)).astype(int)
        mask[np.clip(rows, 0, h_px - 1)] = True
    else:
        mask = _spiral(fraction, shape_px)
    return mask


def _spiral_pixels(spacing_px: float, shape_px: tuple[int, int]) -> np.ndarray:
    """Pixel indices (flat, in path order, unique) of an Archimedean spiral from the centre
    with arm spacing ``spacing_px``, sampled every half pixel of arc length."""
    h_px, w_px = shape_px
    r_max = 0.5 * math.hypot(h_px, w_px)
    b = spacing_px / (2.0 * math.pi)
    theta_max = r_max / b
    # Arc length s ~ b θ² / 2: sample θ = sqrt(2 s / b) uniformly in s.
    s_max = 0.5 * b * theta_max**2
    s = np.arange(0.0, s_max, 0.5)
    theta = np.sqrt(2.0 * s / b)
    r = b * theta
    row = np.round((h_px - 1) / 2.0 + r * np.sin(theta)).astype(np.int64)
    col = np.round((w_px - 1) / 2.0 + r * np.cos(theta)).astype(np.int64)
    inside = (row >= 0) & (row < h_px) & (col >= 0) & (col < w_px)
    flat = row[inside] * w_px + col[inside]
    _, first = np.unique(flat, return_index=True)
    return flat[np.sort(first)]


def _spiral(fraction: float, shape_px: tuple[int, int]) -> np.ndarray:
    h_px, w_px = shape_px
    target = max(1, round(fraction * h_px * w_px))
    mask = np.zeros(h_px * w_px, dtype=bool)
    # Arms 1 / fraction pixels apart cover about `fraction` of the pixels; tighten until the
    # spiral holds enough pixels, then thin it evenly along the path to the target.
    spacing = 1.0 if fraction >= 0.5 else 1.0 / fraction
    pixels = _spiral_pixels(spacing, shape_px)
    while pixels.size < target and spacing > 1.0:
        spacing = max(1.0, spacing * 0.9)
        pixels = _spiral_pixels(spacing, shape_px)
    if pixels.size < target:  # a dense spiral misses some pixels: fill in raster order
        mask[pixels] = True
        missing = np.nonzero(~mask)[0][: target - pixels.size]
        mask[missing] = True
    else:
        keep = np.floor(np.arange(target) * (pixels.size / target)).astype(np.int64)
        mask[pixels[keep]] = True
    return mask.reshape(shape_px)
