"""Classical baselines the sr and defects networks are measured against.

- :func:`interpolate_sparse`: a partial scan filled by linear interpolation over the Delaunay
  triangulation of the visited pixels (``scipy.interpolate.griddata``), nearest neighbour outside
  their convex hull;
- :func:`inpaint_sparse`: the same filled by biharmonic inpainting
  (``skimage.restoration.inpaint_biharmonic``);
- :class:`PeakDefectFinder`: point defects by peak finding and intensity classification (atomic
  columns are the local maxima of the smoothed image; their intensities split into the metal and
  chalcogen populations; a column far from its population's typical intensity is a defect).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.interpolate import griddata
from skimage.feature import peak_local_max
from skimage.restoration import inpaint_biharmonic

from agent.perception.tasks.stem_metrics import PredictedDefect


def interpolate_sparse(image: np.ndarray) -> np.ndarray:
    """``(H, W)`` with NaN at unvisited pixels -> filled ``(H, W) float32``."""
    known = np.isfinite(image)
    rows, cols = np.nonzero(known)
    values = image[known]
    grid_r, grid_c = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    linear = griddata((rows, cols), values, (grid_r, grid_c), method="linear")
    nearest = griddata((rows, cols), values, (grid_r, grid_c), method="nearest")
    return np.where(np.isfinite(linear), linear, nearest).astype(np.float32)


def inpaint_sparse(image: np.ndarray) -> np.ndarray:
    """``(H, W)`` with NaN at unvisited pixels -> biharmonic inpainting ``(H, W) float32``."""
    known = np.isfinite(image)
    filled = np.where(known, image, 0.0)
    return np.asarray(inpaint_biharmonic(filled, ~known), dtype=np.float32)


@dataclass(frozen=True)
class PeakDefectFinder:
    """Peak finding plus intensity classification, in pixels of 0.25 Å.

    ``smooth_px`` is the Gaussian smoothing before peak finding, ``min_distance_px`` the
    smallest distance between two columns; a column of the brighter (metal) population whose
    intensity differs from the population median by more than ``substitution_tol`` (relative)
    is a substitution, one of the darker (chalcogen) population below ``1 - vacancy_tol`` times
    its median a vacancy. Empty sites and adatoms are not found by this method.
    """

    smooth_px: float = 1.5
    min_distance_px: int = 4
    substitution_tol: float = 0.25
    vacancy_tol: float = 0.3

    def find(self, image: np.ndarray) -> list[PredictedDefect]:
        smooth = ndimage.gaussian_filter(np.asarray(image, np.float64), self.smooth_px)
        # a low floor: the chalcogen columns of a TMD are only ~40 % as bright as the metal
        floor = np.percentile(smooth, 2)
        peaks = peak_local_max(
            smooth, min_distance=self.min_distance_px, threshold_abs=floor, exclude_border=2
        )
        if len(peaks) < 4:
            return []
        values = smooth[peaks[:, 0], peaks[:, 1]]
        metal, chalcogen = _two_means(np.log(values))
        split = 0.5 * (metal + chalcogen)
        log_v = np.log(values)
        is_metal = log_v > split
        med_m = float(np.median(values[is_metal])) if is_metal.any() else float(np.exp(metal))
        med_c = (
            float(np.median(values[~is_metal])) if (~is_metal).any() else float(np.exp(chalcogen))
        )
        out: list[PredictedDefect] = []
        for (r, c), v, m in zip(peaks, values, is_metal, strict=True):
            if m and abs(v / med_m - 1.0) > self.substitution_tol:
                out.append(PredictedDefect(float(r), float(c), "substitution", 1.0))
            elif not m and v / med_c < 1.0 - self.vacancy_tol:
                out.append(PredictedDefect(float(r), float(c), "vacancy", 1.0))
        return out

    @classmethod
    def tuned(
        cls,
        images: Sequence[np.ndarray],
        score: Callable[[PeakDefectFinder], float],
    ) -> PeakDefectFinder:
        """The finder whose tolerances maximise ``score`` over a small grid (tuning on
        training frames gives the baseline its best shot)."""
        best, best_score = cls(), -1.0
        for distance in (2, 3, 4):
            for smooth in (1.0, 1.5, 2.0):
                for sub in (0.1, 0.2, 0.3, 0.4):
                    for vac in (0.15, 0.25, 0.35, 0.45):
                        finder = cls(smooth, distance, sub, vac)
                        s = score(finder)
                        if s > best_score:
                            best, best_score = finder, s
        return best


def _two_means(values: np.ndarray, iterations: int = 20) -> tuple[float, float]:
    """1-D k-means with two clusters: ``(high centre, low centre)``."""
    lo, hi = float(np.percentile(values, 25)), float(np.percentile(values, 90))
    for _ in range(iterations):
        split = 0.5 * (lo + hi)
        high, low = values[values > split], values[values <= split]
        if not len(high) or not len(low):
            break
        lo, hi = float(low.mean()), float(high.mean())
    return hi, lo
