"""Incoherent HAADF image formation: fast separable evaluation and a brute-force reference.

Both compute the same thing, the scattered fraction ``f(r) = (K ⊛ O)(r)`` at the probe
positions, with ``K = |ψ|² ⊛ G_σ`` (:class:`simulators.stem_probe.ImagingKernel`) and ``O`` the
specimen's columns weighted by their HAADF cross-sections.

*Fast* (:class:`HAADFRenderer`): the perfect crystal is periodic and ``K̂`` vanishes beyond
``2α/λ``, so its image is a finite Fourier series over the few tens of reciprocal lattice
vectors inside that disc. A scan places pixel ``(row, col)`` at ``A[row] + B[col]`` (row
origins carry the slow scan, drift and line jitter; column offsets the fast scan, flyback and
drift within a line), so ``exp(2πi G·r)`` factorises and the whole image is one matrix
product ``(H x 2m) @ (2m x W)``: exact at every probe position, with no interpolation. Defects
add ``Δσ K(|r − r_d|)`` locally (within ``kernel.cutoff_ang``).

*Reference* (:func:`render_reference`): the textbook route, "deposit the atoms on a grid finer
than the pixels, FFT-convolve with the probe, sample": the baseline of ``bench/stem_speed.py``
and the check of the fast path in the tests.

Lengths in Å; positions are stage coordinates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.fft

from simulators.stem_probe import ImagingKernel
from simulators.stem_specimen import DefectSet, SpecimenModel


@dataclass(frozen=True)
class ScanGeometry:
    """Probe positions of a frame: pixel ``(r, c)`` sits at ``rows_ang[r] + cols_ang[c]``.

    ``e_row`` / ``e_col`` are the unit vectors of the slow / fast scan axes; ``pitch_ang`` the
    nominal (row, col) pixel pitch.
    """

    rows_ang: np.ndarray  # (H, 2)
    cols_ang: np.ndarray  # (W, 2)
    e_row: np.ndarray
    e_col: np.ndarray
    pitch_ang: tuple[float, float]

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.rows_ang.shape[0]), int(self.cols_ang.shape[0]))

    def sub(self, r0: int, r1: int) -> ScanGeometry:
        """The geometry of rows ``r0:r1``."""
        return ScanGeometry(
            self.rows_ang[r0:r1], self.cols_ang, self.e_row, self.e_col, self.pitch_ang
        )

    def bounds(self, margin_ang: float) -> tuple[float, float, float, float]:
        """``(x0, x1, y0, y1)`` of all probe positions, widened by ``margin_ang``."""
        lo = self.rows_ang.min(axis=0) + self.cols_ang.min(axis=0) - margin_ang
        hi = self.rows_ang.max(axis=0) + self.cols_ang.max(axis=0) + margin_ang
        return float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])

    def locate(self, xy_ang: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fractional ``(row, col)`` where the scan passes over points ``xy_ang`` ``(n, 2)``.

        Extrapolates linearly beyond the first and last row / column.
        """
        h_px = self.shape[0]
        s_rows = self.rows_ang @ self.e_row
        s_pts = xy_ang @ self.e_row - float(np.mean(self.cols_ang @ self.e_row))
        row = _interp_extrapolate(s_pts, s_rows)
        k0 = np.clip(np.floor(row).astype(np.int64), 0, max(h_px - 2, 0))
        k1 = np.minimum(k0 + 1, h_px - 1)
        w = np.clip(row - k0, 0.0, 1.0)[:, None]
        origin = self.rows_ang[k0] * (1.0 - w) + self.rows_ang[k1] * w
        col = _interp_extrapolate((xy_ang - origin) @ self.e_col, self.cols_ang @ self.e_col)
        return row, col

    def near(self, xy_ang: np.ndarray, radius_ang: float) -> np.ndarray:
        """``(n,)`` bool: which points lie within about ``radius_ang`` of the frame."""
        h_px, w_px = self.shape
        row, col = self.locate(xy_ang)
        hr = radius_ang / self.pitch_ang[0] + 2
        hc = radius_ang / self.pitch_ang[1] + 2
        return (row > -hr) & (row < h_px - 1 + hr) & (col > -hc) & (col < w_px - 1 + hc)

    def windows(
        self, xy_ang: np.ndarray, radius_ang: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Square pixel windows around points ``xy_ang`` ``(n, 2)`` reaching ``radius_ang``.

        Returns the first row and column of each window ``(n,)`` (they may lie outside the
        frame) and the distance in Å from every window pixel to its point ``(n, nr, nc)``
        (pixels outside the frame get the distance of the nearest edge pixel: slice them off
        with :func:`window_slices`).
        """
        h_px, w_px = self.shape
        row, col = self.locate(xy_ang)
        hr = math.ceil(radius_ang / self.pitch_ang[0]) + 2
        hc = math.ceil(radius_ang / self.pitch_ang[1]) + 2
        r_first = np.rint(row).astype(np.int64) - hr
        c_first = np.rint(col).astype(np.int64) - hc
        r_idx = np.clip(r_first[:, None] + np.arange(2 * hr + 1), 0, h_px - 1)
        c_idx = np.clip(c_first[:, None] + np.arange(2 * hc + 1), 0, w_px - 1)
        rows = (self.rows_ang[r_idx] - xy_ang[:, None, :]).astype(np.float32)  # (n, nr, 2)
        cols = self.cols_ang[c_idx].astype(np.float32)  # (n, nc, 2)
        dx = rows[:, :, None, 0] + cols[:, None, :, 0]
        dy = rows[:, :, None, 1] + cols[:, None, :, 1]
        return r_first, c_first, np.sqrt(dx * dx + dy * dy)


def window_slices(
    shape: tuple[int, int], r_first: int, c_first: int, size: tuple[int, ...]
) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """Slices of the frame and of a window at ``(r_first, c_first)`` where they overlap."""
    r0, c0 = max(r_first, 0), max(c_first, 0)
    r1, c1 = min(r_first + size[0], shape[0]), min(c_first + size[1], shape[1])
    if r0 >= r1 or c0 >= c1:
        return None
    frame = (slice(r0, r1), slice(c0, c1))
    window = (slice(r0 - r_first, r1 - r_first), slice(c0 - c_first, c1 - c_first))
    return frame, window


def _interp_extrapolate(x: np.ndarray, xp: np.ndarray) -> np.ndarray:
    """Fractional index where ``x`` falls in the increasing table ``xp``, linear beyond."""
    n = xp.size
    if n == 1:
        return np.zeros_like(x)
    out = np.interp(x, xp, np.arange(n, dtype=np.float64))
    out = np.where(x < xp[0], (x - xp[0]) / (xp[1] - xp[0]), out)
    return np.where(x > xp[-1], n - 1 + (x - xp[-1]) / (xp[-1] - xp[-2]), out)


class HAADFRenderer:
    """Scattered fraction of a :class:`SpecimenModel` through an :class:`ImagingKernel`."""

    def __init__(self, model: SpecimenModel, kernel: ImagingKernel) -> None:
        self.model = model
        self.kernel = kernel
        self.g_per_ang = model.reciprocal_vectors(kernel.k_max_per_ang)
        self.c0, self._coeff = model.fourier_coefficients(self.g_per_ang, kernel.khat)

    def column_factors(self, cols_ang: np.ndarray) -> np.ndarray:
        """``(W, 2m)`` float32 fast-axis factors of :meth:`perfect` for column offsets
        ``cols_ang`` (compute once per frame and pass them to every block of rows)."""
        ex = np.exp(1j * (2.0 * math.pi * (cols_ang @ self.g_per_ang.T)))
        return np.concatenate([ex.real, ex.imag], axis=1).astype(np.float32)

    def perfect(self, geom: ScanGeometry, factors: np.ndarray | None = None) -> np.ndarray:
        """``(H, W)`` float32 fraction of the defect-free crystal at the probe positions.

        ``factors`` are :meth:`column_factors` of ``geom.cols_ang`` when already known.
        """
        g = self.g_per_ang
        if g.shape[0] == 0:
            return np.full(geom.shape, self.c0, dtype=np.float32)
        ey = np.exp(1j * (2.0 * math.pi * (geom.rows_ang @ g.T))) * self._coeff
        left = np.concatenate([ey.real, -ey.imag], axis=1).astype(np.float32)
        right = self.column_factors(geom.cols_ang) if factors is None else factors
        # 2 Re[ey ex^T] as one real product. einsum's own loops avoid waking BLAS threads,
        # which costs more than this small product on a few cores.
        image = np.einsum("ik,jk->ij", left, right)
        image *= np.float32(2.0)
        image += np.float32(self.c0)
        return image

    def add_defects(self, image: np.ndarray, geom: ScanGeometry, defects: DefectSet) -> None:
        """Add every defect's ``Δσ K(|r − r_d|)`` to ``image`` ``(H, W)`` in place."""
        if not len(defects):
            return
        radius = self.kernel.cutoff_ang
        near = np.nonzero(geom.near(defects.xy_ang, radius))[0]
        for start in range(0, near.size, 32):
            pick = near[start : start + 32]
            r_first, c_first, dist = geom.windows(defects.xy_ang[pick], radius)
            contrib = self.kernel.value_fast(dist)
            contrib *= defects.dsigma_ang2[pick, None, None].astype(np.float32)
            for k in range(pick.size):
                win = window_slices(image.shape, int(r_first[k]), int(c_first[k]), dist.shape[1:])
                if win is not None:
                    image[win[0]] += contrib[k][win[1]]

    def render(
        self, geom: ScanGeometry, defects: DefectSet, factors: np.ndarray | None = None
    ) -> np.ndarray:
        """``(H, W)`` float32 scattered fraction (0..1) at the probe positions."""
        image = self.perfect(geom, factors)
        self.add_defects(image, geom, defects)
        return np.clip(image, 0.0, 1.0, out=image)

    def class_mask(self, geom: ScanGeometry, defects: DefectSet, radius_ang: float) -> np.ndarray:
        """``(H, W)`` uint8: the class of the defect within ``radius_ang`` of each pixel
        (0, lattice, elsewhere; the nearest defect where discs overlap)."""
        mask = np.zeros(geom.shape, dtype=np.uint8)
        if not len(defects) or radius_ang <= 0:
            return mask
        near = np.nonzero(geom.near(defects.xy_ang, radius_ang))[0]
        if not near.size:
            return mask
        best = np.full(geom.shape, np.inf)
        r_first, c_first, dist = geom.windows(defects.xy_ang[near], radius_ang)
        for k, i in enumerate(near):
            win = window_slices(geom.shape, int(r_first[k]), int(c_first[k]), dist.shape[1:])
            if win is None:
                continue
            frame, window = win
            d = dist[k][window]
            closer = (d <= radius_ang) & (d < best[frame])
            best[frame][closer] = d[closer]
            mask[frame][closer] = defects.klass[i]
        return mask


def render_reference(
    model: SpecimenModel,
    kernel: ImagingKernel,
    *,
    center_ang: tuple[float, float],
    size_ang: tuple[float, float],
    shape_px: tuple[int, int],
    fine_ang: float = 0.1,
    margin_ang: float = 12.0,
) -> np.ndarray:
    """Brute-force ``(H, W)`` float64 fraction of an unrotated, undistorted frame.

    ``size_ang`` is (height, width). Deposits every column (defects included) on a grid at
    most ``fine_ang`` fine that nests the pixel grid (cloud-in-cell weights, deconvolved in
    Fourier space), multiplies the grid's FFT by ``K̂``, transforms back and samples at the
    pixel centres. Columns farther than ``margin_ang`` outside the frame are left out.
    """
    h_px, w_px = shape_px
    height, width = size_ang
    px_y, px_x = height / h_px, width / w_px
    my, mx = math.ceil(px_y / fine_ang), math.ceil(px_x / fine_ang)
    hy, hx = px_y / my, px_x / mx
    pad_y, pad_x = math.ceil(margin_ang / hy), math.ceil(margin_ang / hx)
    ny = scipy.fft.next_fast_len(h_px * my + 2 * pad_y)
    nx = scipy.fft.next_fast_len(w_px * mx + 2 * pad_x)
    y_start = center_ang[1] - height / 2 + 0.5 * px_y - pad_y * hy
    x_start = center_ang[0] - width / 2 + 0.5 * px_x - pad_x * hx
    box = (x_start, x_start + (nx - 1) * hx, y_start, y_start + (ny - 1) * hy)
    xy, sigma = model.columns_in_box(*box)
    defects = model.defects_in_box(*box)
    xy = np.concatenate([xy, defects.xy_ang])
    sigma = np.concatenate([sigma, defects.dsigma_ang2])
    grid = np.zeros((ny, nx))
    fy = (xy[:, 1] - y_start) / hy
    fx = (xy[:, 0] - x_start) / hx
    iy, ix = np.floor(fy).astype(np.int64), np.floor(fx).astype(np.int64)
    wy, wx = fy - iy, fx - ix
    for dy, wyy in ((0, 1.0 - wy), (1, wy)):
        for dx, wxx in ((0, 1.0 - wx), (1, wx)):
            where = (np.clip(iy + dy, 0, ny - 1), np.clip(ix + dx, 0, nx - 1))
            np.add.at(grid, where, sigma * wyy * wxx)
    grid /= hy * hx
    ky = scipy.fft.fftfreq(ny, d=hy)
    kx = scipy.fft.rfftfreq(nx, d=hx)
    kk = np.hypot(ky[:, None], kx[None, :])
    cic = (np.sinc(ky * hy) ** 2)[:, None] * (np.sinc(kx * hx) ** 2)[None, :]
    spectrum = scipy.fft.rfft2(grid) * kernel.khat(kk) / cic
    image = scipy.fft.irfft2(spectrum, s=(ny, nx))
    return image[pad_y : pad_y + h_px * my : my, pad_x : pad_x + w_px * mx : mx].copy()
