"""Raster-scan pixel grids in sample coordinates.

A :class:`Grid` is (part of) a frame: each scan line is straight and equally sampled, with its
own origin (drift and creep move whole lines). That structure makes lattice sums separable
(:meth:`Grid.wave_sums`) and point neighbourhoods cheap (:meth:`Grid.pixels_near`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from threadpoolctl import ThreadpoolController


@dataclass(frozen=True, eq=False)
class Grid:
    """Pixel positions of (part of) a raster scan: row ``k``, column ``c`` lies at
    ``rows_m[k] + c * step_m`` (sample metres). Rows are straight and equally sampled; each
    row has its own origin (drift and creep move whole lines).
    """

    rows_m: np.ndarray  # (nr, 2)
    step_m: np.ndarray  # (2,)
    width: int

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.rows_m.shape[0]), self.width)

    @property
    def size(self) -> int:
        return int(self.rows_m.shape[0]) * self.width

    def xy(self) -> tuple[np.ndarray, np.ndarray]:
        """Full ``(nr, W)`` float64 coordinate arrays."""
        c = np.arange(self.width, dtype=np.float64)
        x = self.rows_m[:, 0:1] + c[None, :] * self.step_m[0]
        y = self.rows_m[:, 1:2] + c[None, :] * self.step_m[1]
        return x, y

    def shifted(self, dx_m: float, dy_m: float) -> Grid:
        return Grid(self.rows_m - np.array([dx_m, dy_m]), self.step_m, self.width)

    def bounds(self) -> tuple[float, float, float, float]:
        """``(xmin, xmax, ymin, ymax)`` of the pixel centres."""
        end = self.rows_m + (self.width - 1) * self.step_m
        both = np.concatenate([self.rows_m, end])
        return (
            float(both[:, 0].min()),
            float(both[:, 0].max()),
            float(both[:, 1].min()),
            float(both[:, 1].max()),
        )

    def wave_sums(
        self,
        k_per_m: np.ndarray,
        coef: np.ndarray,
        origin_m: np.ndarray | None = None,
        dtype: type = np.float64,
    ) -> np.ndarray:
        """``sum_t Re(coef[s, t] exp(i k[s, t] . (r - origin)))`` for each set ``s``.

        ``k_per_m`` is ``(S, T, 2)``, ``coef`` ``(S, T)`` complex; returns ``(S, nr, W)``.
        Separable in rows and columns, so it costs one batched matrix product.
        """
        k = np.asarray(k_per_m, dtype=np.float64)
        rows = self.rows_m if origin_m is None else self.rows_m - origin_m
        row_phase = (
            np.exp(1j * (rows @ k.reshape(-1, 2).T))
            .reshape(rows.shape[0], k.shape[0], k.shape[1])
            .transpose(1, 0, 2)
            * np.asarray(coef)[:, None, :]
        )  # (S, nr, T)
        col = np.arange(self.width, dtype=np.float64)
        col_phase = (k @ self.step_m)[:, :, None] * col[None, None, :]  # (S, T, W)
        left: np.ndarray = np.concatenate([row_phase.real, -row_phase.imag], axis=2).astype(dtype)
        right: np.ndarray = np.concatenate([np.cos(col_phase), np.sin(col_phase)], axis=1).astype(
            dtype
        )
        # One BLAS thread: the products are small, so threads only add overhead (several
        # times slower with 2 threads at 512²), and the result cannot depend on how many
        # cores the machine has (deterministic frames for a seed on any machine).
        with _blas_controller().limit(limits=1, user_api="blas"):
            return np.asarray(np.matmul(left, right))

    def wave_sum(
        self, k_per_m: np.ndarray, coef: np.ndarray, origin_m: np.ndarray | None = None
    ) -> np.ndarray:
        """``sum_t Re(coef_t exp(i k_t . (r - origin)))`` over the grid, ``(nr, W)`` float64."""
        k = np.asarray(k_per_m, dtype=np.float64).reshape(1, -1, 2)
        if k.shape[1] == 0:
            return np.zeros(self.shape)
        return self.wave_sums(k, np.asarray(coef).reshape(1, -1), origin_m)[0]

    def pixels_near(
        self, x_m: np.ndarray, y_m: np.ndarray, radius_m: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Flat pixel indices within ``radius_m`` of each point, their squared distances and the
        point each belongs to (a pixel near two points appears twice)."""
        ax, ay = self.rows_m[:, 0], self.rows_m[:, 1]
        width = self.width
        bx, by = float(self.step_m[0]), float(self.step_m[1])
        b2 = max(bx * bx + by * by, 1e-40)
        pix_parts: list[np.ndarray] = []
        which_parts: list[np.ndarray] = []
        r2 = radius_m**2
        for start in range(0, x_m.size, 1024):
            fx = x_m[start : start + 1024]
            fy = y_m[start : start + 1024]
            relx = fx[None, :] - ax[:, None]
            rely = fy[None, :] - ay[:, None]
            t = (relx * bx + rely * by) / b2
            perp2 = relx**2 + rely**2 - t**2 * b2
            rows, fi = np.nonzero(perp2 < r2)
            if rows.size == 0:
                continue
            half = np.sqrt(np.maximum(r2 - perp2[rows, fi], 0.0) / b2)
            lo = np.clip(np.ceil(t[rows, fi] - half), 0, width - 1).astype(np.int64)
            hi = np.clip(np.floor(t[rows, fi] + half), -1, width - 1).astype(np.int64)
            count = np.maximum(hi - lo + 1, 0)
            ok = count > 0
            rows, fi, lo, count = rows[ok], fi[ok], lo[ok], count[ok]
            if rows.size == 0:
                continue
            rep_row = np.repeat(rows, count)
            offsets = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
            cols = np.repeat(lo, count) + offsets
            pix_parts.append(rep_row * width + cols)
            which_parts.append(np.repeat(fi + start, count))
        if not pix_parts:
            empty = np.zeros(0, dtype=np.int64)
            return empty, np.zeros(0), empty
        pix = np.concatenate(pix_parts)
        which = np.concatenate(which_parts)
        rows_idx, cols_idx = pix // width, pix % width
        px = self.rows_m[rows_idx, 0] + cols_idx * bx
        py = self.rows_m[rows_idx, 1] + cols_idx * by
        d2 = (px - x_m[which]) ** 2 + (py - y_m[which]) ** 2
        keep = d2 < r2
        return pix[keep], d2[keep], which[keep]


@functools.cache
def _blas_controller() -> ThreadpoolController:
    """The process's thread pools (found once: discovery walks the loaded libraries)."""
    return ThreadpoolController()
