"""A double-tip cue from repeated defects: under a tip with two apexes every point defect is
imaged twice, the copy displaced by the second apex's lateral offset, so many defect *pairs*
share one displacement vector.

The cue works on points, not pixels. The points are the local maxima of the STM defects model's
defect probability ``1 - p(background)`` (:mod:`agent.perception.tasks.defects_stm`, at its
own pixel size). Over all point pairs whose separation is a plausible apex offset
(:attr:`PairSettings.offset_nm`, 0.4–2.6 nm: the simulator draws 0.4–2.5 nm), the pairs are
grouped by displacement (``v`` and ``-v`` are the same; within :attr:`PairSettings.tolerance_nm`)
and the largest group counts. Two guards keep lattice regularities out of that count:

- points within :attr:`PairSettings.margin_nm` of the frame's edge are dropped (the defects
  model fires in rows along some frame edges, one per lattice period);
- a pair counts only when its first point is not itself the second point of another pair of
  the group, and its second point not the first of another (a chain of equally spaced points,
  a row of detections along a step edge, counts nothing; ghost pairs of a double tip are
  disjoint).

The score is that count, :attr:`PairScore.pairs`; the cue fires at
:attr:`PairSettings.fire_at` pairs. Chance coincidences on good tips are rare because the
defects are sparse (a handful per frame, see docs/benchmarks.md "Session 7 ... helper P" for
the false-alarm rate on good tips and the catch rate on double tips). Positions are
``(row, column)`` pixels of the probability map; offsets are reported in nm, ``(dy, dx)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from drivers.errors import DataError


@dataclass(frozen=True)
class PairSettings:
    """The cue's parameters (set on the session-7 bench, see the module doc).

    ``threshold``: a point is a local maximum (within ``peak_radius_px``) of the defect
    probability above it; ``margin_nm``: points this close to the edge are dropped;
    ``offset_nm``: the range of pair separations (apex offsets) considered;
    ``tolerance_nm``: two displacements closer than this are the same; ``fire_at``: the cue
    fires at this many disjoint pairs with one displacement."""

    threshold: float = 0.5
    peak_radius_px: int = 2
    margin_nm: float = 0.48
    offset_nm: tuple[float, float] = (0.4, 2.6)
    tolerance_nm: float = 0.1
    fire_at: int = 3

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.peak_radius_px < 1 or self.margin_nm < 0 or self.tolerance_nm <= 0:
            raise ValueError(
                "peak_radius_px must be >= 1, margin_nm >= 0 and tolerance_nm > 0, got "
                f"{self.peak_radius_px}, {self.margin_nm}, {self.tolerance_nm}"
            )
        lo, hi = self.offset_nm
        if not 0.0 <= lo < hi:
            raise ValueError(f"offset_nm must be (low, high) with 0 <= low < high, got {lo, hi}")
        if self.fire_at < 1:
            raise ValueError(f"fire_at must be >= 1, got {self.fire_at}")


@dataclass(frozen=True)
class PairScore:
    """The cue's reading of one frame: ``pairs`` disjoint point pairs share the displacement
    ``offset_nm`` ``(dy, dx)`` (``None`` when no pair is in range); ``points``: the defect
    points used; ``fires``: ``pairs >= settings.fire_at``."""

    pairs: int
    offset_nm: tuple[float, float] | None
    points: int
    fires: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "pairs": self.pairs,
            "offset_nm": list(self.offset_nm) if self.offset_nm is not None else None,
            "points": self.points,
            "fires": self.fires,
        }


def defect_points(
    defect_p: np.ndarray, pixel_size_nm: float, settings: PairSettings = PairSettings()
) -> np.ndarray:
    """``(N, 2) float64`` (row, column) pixels of the local maxima of ``defect_p``
    ``(H, W)`` (a probability, ``1 - p(background)``) above ``settings.threshold``, at least
    ``settings.margin_nm`` from every edge. NaN pixels are never points.

    Raises :class:`DataError` for a map that is not 2-D or a pixel size that is not positive."""
    from scipy import ndimage

    d = np.asarray(defect_p, dtype=np.float64)
    if d.ndim != 2:
        raise DataError(f"defect probability map must be 2-D (H, W), got shape {d.shape}")
    if not (np.isfinite(pixel_size_nm) and pixel_size_nm > 0):
        raise DataError(f"pixel_size_nm must be a positive number, got {pixel_size_nm}")
    d = np.where(np.isfinite(d), d, 0.0)
    size = 2 * settings.peak_radius_px + 1
    peak = (d == ndimage.maximum_filter(d, size=size, mode="constant")) & (d > settings.threshold)
    rows, cols = np.nonzero(peak)
    m = int(np.ceil(settings.margin_nm / pixel_size_nm - 1e-9))
    h, w = d.shape
    keep = (rows >= m) & (rows < h - m) & (cols >= m) & (cols < w - m)
    return np.stack([rows[keep], cols[keep]], axis=1).astype(np.float64)


def pair_score(
    points: np.ndarray, pixel_size_nm: float, settings: PairSettings = PairSettings()
) -> PairScore:
    """The largest number of disjoint pairs of ``points`` ``(N, 2)`` (row, column pixels at
    ``pixel_size_nm``) that share one displacement (see the module doc). Rows with a NaN are
    ignored.

    Raises :class:`DataError` for points that are not ``(N, 2)`` or a pixel size that is not
    positive."""
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or (p.size and p.shape[1] != 2):
        raise DataError(f"points must have shape (N, 2), got {p.shape}")
    if not (np.isfinite(pixel_size_nm) and pixel_size_nm > 0):
        raise DataError(f"pixel_size_nm must be a positive number, got {pixel_size_nm}")
    p = p.reshape(-1, 2)
    p = p[np.isfinite(p).all(axis=1)]
    n = len(p)
    if n < 2:
        return PairScore(0, None, n, False)
    i, j = np.triu_indices(n, 1)
    v = (p[j] - p[i]) * pixel_size_nm
    # one orientation per pair: v and -v are the same displacement; a -> b = a + v
    flip = (v[:, 0] < 0) | ((v[:, 0] == 0) & (v[:, 1] < 0))
    v[flip] *= -1
    a, b = np.where(flip, j, i), np.where(flip, i, j)
    r = np.hypot(v[:, 0], v[:, 1])
    lo, hi = settings.offset_nm
    sel = (r >= lo) & (r <= hi)
    v, a, b = v[sel], a[sel], b[sel]
    if len(v) == 0:
        return PairScore(0, None, n, False)
    near = np.hypot(v[:, None, 0] - v[None, :, 0], v[:, None, 1] - v[None, :, 1])
    near = near <= settings.tolerance_nm
    best, best_v = 0, v[0]
    for q in range(len(v)):
        group = np.nonzero(near[q])[0]
        if len(group) <= best:
            continue
        firsts, seconds = a[group], b[group]
        count = int(np.sum(~np.isin(firsts, seconds) & ~np.isin(seconds, firsts)))
        if count > best:
            best, best_v = count, v[group].mean(axis=0)
    offset = (float(best_v[0]), float(best_v[1])) if best > 0 else None
    return PairScore(best, offset, n, best >= settings.fire_at)


def score_probability_map(
    defect_p: np.ndarray, pixel_size_nm: float, settings: PairSettings = PairSettings()
) -> PairScore:
    """:func:`pair_score` of :func:`defect_points` of a defect-probability map ``(H, W)``."""
    return pair_score(defect_points(defect_p, pixel_size_nm, settings), pixel_size_nm, settings)


def defect_probability(
    image: np.ndarray, pixel_size_nm: float, *, directory: Any = None
) -> tuple[np.ndarray, float]:
    """The STM defects model's ``1 - p(background)`` of a full ``(H, W)`` topograph (heights
    in metres) at ``pixel_size_nm``: ``(h, w) float32`` at the model's pixel size, and that
    pixel size (nm). ``directory``: the weights (default: the package's).

    Raises :class:`DataError` for bad input and :class:`ModelError` when the weights cannot be
    loaded (as :func:`agent.perception.tasks.defects_stm.find_defects`)."""
    from agent.perception.tasks import defects_stm

    model, card = defects_stm.load() if directory is None else defects_stm.load(directory)
    # the same map the defects stage then reads (kept for the frame, the network runs once)
    arr, work_shape, prob = defects_stm.probability_map(image, pixel_size_nm, model, card)
    work_px_nm = pixel_size_nm * arr.shape[1] / work_shape[1]
    return (1.0 - prob[0]).astype(np.float32), float(work_px_nm)


def cue_label(settings: PairSettings = PairSettings(), *, directory: Any = None) -> str:
    """What a session records as its ``tip_pairs`` version: the fire threshold and the STM
    defects model (name, version and SHA-256 prefix) the points come from, or why the cue
    cannot run (then every frame is skipped, :class:`TipNetAssessor` marks it)."""
    from agent.perception.tasks import defects_stm
    from drivers.errors import ModelError

    try:
        _, card = defects_stm.load() if directory is None else defects_stm.load(directory)
    except ModelError as exc:
        return f"pairs>={settings.fire_at} (no defects model: {exc})"
    return f"pairs>={settings.fire_at} on {card.name} {card.version}+{card.sha256[:8]}"


def score_image(
    image: np.ndarray,
    pixel_size_nm: float,
    settings: PairSettings = PairSettings(),
    *,
    directory: Any = None,
) -> PairScore:
    """The cue of a full ``(H, W)`` STM topograph: the defects model, then
    :func:`score_probability_map`."""
    defect_p, work_px = defect_probability(image, pixel_size_nm, directory=directory)
    return score_probability_map(defect_p, work_px, settings)
