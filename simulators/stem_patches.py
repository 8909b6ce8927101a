"""Sparse dopant-rich patches: where a large specimen holds its defects of interest.

A real specimen is not uniformly doped: dopants segregate into clusters tens of nanometres
across, far apart. :class:`PatchField` places discs of radius ``radius_ang`` at random on the
stage, ``density_per_ang2`` of them per Å² on average (a Poisson process), generated lazily per
square tile of :data:`TILE_ANG` from the same counter-based hash as the point defects
(:func:`simulators.stem_specimen.cell_uniforms`), so a patch is where it is whichever region is
imaged first. Inside a patch the substitution rules' probabilities are multiplied by
``substitution_scale`` (:meth:`simulators.stem_specimen.SpecimenModel.defects_in_box`).

Lengths in Å, stage coordinates.
"""

from __future__ import annotations

import math

import numpy as np

TILE_ANG = 2500.0
"""Side of the square tiles patches are drawn per (250 nm)."""
MAX_PER_TILE = 64
"""Patches per tile are capped (the Poisson tail beyond is dropped)."""
_SITE = 7000
"""Hash site offset of the patch draws (clear of the defect sites 0..1000+n)."""


class PatchField:
    """Discs of radius ``radius_ang`` placed as a Poisson process of ``density_per_ang2``."""

    def __init__(
        self, key: int, *, density_per_ang2: float, radius_ang: float, substitution_scale: float
    ) -> None:
        self.key = int(key)
        self.density_per_ang2 = float(density_per_ang2)
        self.radius_ang = float(radius_ang)
        self.substitution_scale = float(substitution_scale)
        mean = self.density_per_ang2 * TILE_ANG**2
        # the Poisson CDF of the count per tile, for inverse-transform sampling
        pmf = [math.exp(-mean)]
        for k in range(1, MAX_PER_TILE + 1):
            pmf.append(pmf[-1] * mean / k)
        self._cdf = np.cumsum(pmf)

    def centres_in_box(self, x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
        """``(n, 2)`` centres (Å) of every patch reaching into ``[x0, x1] x [y0, y1]``."""
        from simulators.stem_specimen import cell_uniforms

        r = self.radius_ang
        a = np.arange(math.floor((x0 - r) / TILE_ANG), math.floor((x1 + r) / TILE_ANG) + 1)
        b = np.arange(math.floor((y0 - r) / TILE_ANG), math.floor((y1 + r) / TILE_ANG) + 1)
        aa, bb = (m.ravel() for m in np.meshgrid(a, b, indexing="ij"))
        counts = np.searchsorted(self._cdf, cell_uniforms(self.key, aa, bb, _SITE), side="right")
        counts = np.minimum(counts, MAX_PER_TILE)
        found: list[np.ndarray] = []
        for k in range(int(counts.max(initial=0))):
            has = counts > k
            u = cell_uniforms(self.key, aa[has], bb[has], _SITE + 1 + 2 * k)
            v = cell_uniforms(self.key, aa[has], bb[has], _SITE + 2 + 2 * k)
            found.append(np.stack([(aa[has] + u) * TILE_ANG, (bb[has] + v) * TILE_ANG], axis=1))
        if not found:
            return np.zeros((0, 2))
        xy = np.concatenate(found)
        keep = (
            (xy[:, 0] >= x0 - r)
            & (xy[:, 0] <= x1 + r)
            & (xy[:, 1] >= y0 - r)
            & (xy[:, 1] <= y1 + r)
        )
        return xy[keep]

    def inside(self, xy_ang: np.ndarray, centres_ang: np.ndarray) -> np.ndarray:
        """``(n,)`` bool: which points ``xy_ang`` ``(n, 2)`` lie in one of the patches."""
        inside = np.zeros(xy_ang.shape[0], dtype=bool)
        r2 = self.radius_ang**2
        for c in centres_ang:
            d = xy_ang - c
            inside |= d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1] <= r2
        return inside
