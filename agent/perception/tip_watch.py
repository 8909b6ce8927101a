"""Mid-scan tip-change detection from the scanned lines themselves (a sequential test).

The tip network's recent read-out (:meth:`~agent.perception.tip_net.TipNetAssessor.watch`)
judges the last 16 lines on their own; it has to decide *what* the tip is from a thin strip, and
its alarm threshold must be high for good tips to pass whole scans without one. A tip change is
easier to see as a *change*: the lines after it differ from the lines before in ways the surface
does not explain. :class:`LineChangeDetector` tests that, line by line, on three statistics of the
scanned lines (``(H, W)`` heights in metres, raw scan lines: no resampling, no network) and on
their coincidence:

- **offset** — the height step between consecutive lines, ``o_i = median_x(z_i - z_{i-1})``.
  The median over the line ignores a step edge of the surface that crosses a few pixels; what
  remains is the line noise of the instrument (white from line to line) plus the tip's own height
  change: a second apex, a crash or an apex jump moves the apparent height of the *whole* line.
  Score: ``|o_i - med| / sigma`` over a reference of the lines before (robust: median and MAD),
  also for the sum of two consecutive steps (a change in mid-line splits its step in two).
- **roughness** — the along-line high-pass scale of each line, ``log(MAD_x(z - blur_x(z)))``; a
  blunt or crashed apex smooths the atomic corrugation, an unstable one adds streaks. Score: a
  generalized-likelihood-ratio (GLR) test for a shift of its mean after a candidate change
  ``p = 1 .. MAX_POST_LINES`` lines back against the reference lines before that candidate
  (at least ``MIN_GLR_REF_LINES`` of them), and the same shift measured against the last
  ``LOCAL_LINES`` of them: the smaller of the two, 0 when they disagree in sign. A tip changes
  the corrugation from one line to the next; the surface's corrugation also drifts over tens of
  lines (H:Si(100) regions, Au herringbone), which a shift against the whole reference takes
  for a change and a shift against the lines just before does not.
- **outliers** — pixels of ``z_i - z_{i-1} - o_i`` beyond ``OUTLIER_SIGMAS`` times the reference
  lines' robust scale: features that appear from one line to the next (the ghost of a new apex
  over a defect, a streak). Score: the pixel count of the line (a fraction of the line width, so
  that it does not depend on the frame size).
- **joint** — a new apex changes the apparent height *and* the corrugation at the same line (a
  second apex adds its current: the height steps up, and the lattice is imaged twice, shifted,
  which changes its contrast), while the surface alone changes one at a time (a herringbone
  ridge or a new terrace changes the corrugation over several lines without a step; line noise
  steps without changing it). Score: for each candidate change line ``k`` of the roughness GLR,
  the geometric mean of that GLR and the offset score of the step into line ``k`` (or of the
  split step into ``k + 1``), at the best ``k``. A double tip whose step and corrugation change
  are each within the surface's own range is seen here (docs/decisions/0011-tip-change-detector.md).
- **level** — the same coincidence with the line's *level*, the running sum of the offsets
  ``L_i = sum_{j <= i} o_j``. The offsets are differences of the lines' own heights, so a
  second apex steps the level once and for good, and a shift of the mean level over the lines
  after a candidate is a far stronger test than the single step (the roughness GLR, computed on
  ``L``: against the reference and against the last ``LOCAL_LINES``). A candidate counts only
  when its level shift is small, at most ``LEVEL_CAP_M`` (a second apex moves the level by tens
  of picometres; a terrace edge crossing the fast axis, or a crash, by far more, and the offset
  score sees those), and abrupt: the steps into the candidate line and the next carry at least
  ``LEVEL_CONCENTRATION`` of the shift against the last ``LOCAL_LINES`` (a curved terrace edge
  ramps the level over tens of lines). Score: the geometric mean of this level GLR and the
  roughness GLR of the same candidate, at the best candidate.

Each statistic at line ``i`` only uses lines ``< i`` as its reference, so the score at a line
count ``n`` depends on the first ``n`` lines only, and the detector is a pure function of the
lines scanned so far (stateless: the agent's loop and its replay call it on the same lines and
get the same answer). :meth:`LineChangeDetector.check` alarms when, within the last
``lookback_lines`` lines, any statistic's score exceeds its threshold; the thresholds are fitted
(:func:`fit_thresholds`) on complete scans without a change, to a fixed share of such scans that
would ever alarm (the false-alarm budget), and stored in ``tip_watch.json`` beside the tip
network's card (:func:`save` / :func:`load`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from drivers.errors import ConfigError, DataError, ModelError

log = logging.getLogger(__name__)

NAME = "tip_watch"
VERSION = "3"
# 2: the roughness GLR (and the joint score built on it) also measured against the last
# LOCAL_LINES before a candidate, with at least MIN_GLR_REF_LINES of reference (session 8);
# a version-1 file was fitted to other scores and must be refit
# 3: the level score, and no score before MIN_SCORED_LINES (session 8, second pass); older
# files lack the level threshold: refit
FEATURES: tuple[str, ...] = ("offset", "roughness", "outliers", "joint", "level")
REF_LINES = 32
"""Lines before a candidate change that form its reference."""
MIN_REF_LINES = 8
"""No score before this many reference lines exist."""
MIN_SCORED_LINES = 16
"""The first line count that gets a score (0 before): the thresholds are fitted on the scores
from line count 16 on (:mod:`~agent.perception.tip_watch_fit`), and the height-step scores of
the line counts before, with 8 to 13 reference lines, alarmed on good lines that the fit never
saw (session 8)."""
MAX_POST_LINES = 16
"""Longest run of lines after a candidate change the roughness test averages."""
MIN_GLR_REF_LINES = 16
"""Reference lines a candidate change of the roughness (and joint) test needs: with fewer, the
robust scale of the reference is too uncertain and good scans alarm near their start."""
LOCAL_LINES = 8
"""The roughness shift is also measured against the mean of this many lines just before the
candidate change (a change is abrupt; the surface's corrugation drifts)."""
LOOKBACK_LINES = 16
""":meth:`LineChangeDetector.check` looks at the scores of the last this many line counts (so a
caller that checks less often than every line still sees every line count)."""
CHECK_EVERY_LINES = 4
"""How often a streaming scan should be checked (the tip assessor states it as
``watch_every_lines``, the agent's loop follows it): a change seen at line count ``n`` is
reported at the next multiple of this; a check of a 256-wide scan costs ~4 ms of CPU."""
LEVEL_CAP_M = 80e-12
"""Largest level shift (metres) the level score considers: a second apex moves the line's level
by tens of picometres; a terrace edge (>= 0.14 nm) or a crash moves it more."""
LEVEL_CONCENTRATION = 0.7
"""Share of a candidate's level shift (against the last ``LOCAL_LINES``) that the height steps
into the candidate line and the next must carry for the level score (a tip steps, a curved
terrace edge ramps)."""
HIGHPASS_SIGMA_PX = 2.0
OUTLIER_SIGMAS = 5.0
ROUGHNESS_FLOOR = 0.0
"""Smallest robust spread of the log roughness a reference may have (natural log units)."""
_TINY = 1e-18


@dataclass(frozen=True)
class ChangeAlarm:
    """A detected change: the ``feature`` whose score crossed its threshold first (by line
    count) and the line count ``line`` at which it did, the ``score`` there and the ratio
    ``score / threshold``; ``scores`` holds every feature's highest score over the lookback."""

    feature: str
    line: int
    score: float
    ratio: float
    scores: dict[str, float] = field(default_factory=dict)


def _robust_scale(x: np.ndarray, axis: int = -1) -> np.ndarray:
    med = np.median(x, axis=axis, keepdims=True)
    out: np.ndarray = 1.4826 * np.median(np.abs(x - med), axis=axis)
    return out


def line_statistics(lines: np.ndarray) -> dict[str, np.ndarray]:
    """Per-line raw statistics of ``lines`` ``(H, W)`` metres (finite): ``offset`` ``(H,)``
    (0 for the first line), ``roughness`` ``(H,)`` and ``residual`` ``(H, W)`` (line-to-line
    difference minus its offset; row 0 is zero). :class:`DataError` on a bad array."""
    z = np.asarray(lines, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 8:
        raise DataError(f"the tip watch needs (lines, >= 8 pixels) heights, got {z.shape}")
    if not np.all(np.isfinite(z)):
        raise DataError("the tip watch got non-finite heights (NaN or inf) in its lines")
    from scipy.ndimage import gaussian_filter1d

    diff = np.zeros_like(z)
    diff[1:] = z[1:] - z[:-1]
    offset = np.median(diff, axis=1)
    offset[0] = 0.0
    residual = diff - offset[:, None]
    high = z - gaussian_filter1d(z, HIGHPASS_SIGMA_PX, axis=1, mode="nearest")
    roughness = np.log(_robust_scale(high, axis=1) + _TINY)
    return {"offset": offset, "roughness": roughness, "residual": residual}


def _reference(values: np.ndarray, k: int) -> np.ndarray:
    return values[max(1, k - REF_LINES) : k]


def feature_scores(lines: np.ndarray, *, first: int = 0) -> dict[str, np.ndarray]:
    """Scores ``(H + 1,)`` per feature, indexed by the line count ``n`` (the score that the
    first ``n`` lines give to their newest lines; 0 for ``n < MIN_SCORED_LINES``, where there
    is no reference yet, and for ``n < first``). Only lines up to ``REF_LINES +
    MAX_POST_LINES + 3`` before ``first`` are read, so a late ``first`` costs little and gives
    the same scores as a whole computation."""
    z = np.asarray(lines)
    h = z.shape[0] if z.ndim == 2 else 0
    start = max(0, first - (REF_LINES + MAX_POST_LINES + 3))
    tail = _tail_scores(z[start:] if h else z, max(first - start, 0))
    out = {name: np.zeros(h + 1) for name in FEATURES}
    for name in FEATURES:
        out[name][start:] = tail[name]
    return out


def _window_stats(
    values: np.ndarray, ks: np.ndarray, lo: int, h: int, *, scale: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Median and robust scale ``(h + 1,)`` (NaN outside ``ks``) of the reference window
    ``values[max(lo, k - REF_LINES) : k]`` of each candidate change line ``k`` in ``ks``: the
    full windows in one vectorized call, the shorter ones at the start of a scan one by one
    (the same numbers either way)."""
    med = np.full(h + 1, np.nan)
    sig = np.full(h + 1, np.nan)
    full = ks[ks - REF_LINES >= lo]
    if len(full):
        windows = np.lib.stride_tricks.sliding_window_view(values, REF_LINES)[full - REF_LINES]
        med[full] = np.median(windows, axis=1)
        if scale:
            sig[full] = _robust_scale(windows, axis=1)
    for k in ks[ks - REF_LINES < lo]:
        window = values[max(lo, k - REF_LINES) : k]
        med[k] = np.median(window)
        if scale:
            sig[k] = float(_robust_scale(window))
    return med, sig


def _tail_scores(lines: np.ndarray, first: int) -> dict[str, np.ndarray]:
    stats = line_statistics(lines)
    offset, rough, residual = stats["offset"], stats["roughness"], stats["residual"]
    h = residual.shape[0]
    out = {name: np.zeros(h + 1) for name in FEATURES}
    n0 = max(first, MIN_SCORED_LINES)
    if n0 > h:
        return out
    # reference location and scale per candidate change line k: lines [k - REF_LINES, k)
    # (offsets from line 1, the first has no predecessor)
    # (the joint score at n reads the step scores of the candidate lines up to 16 back)
    k0 = max(MIN_REF_LINES + 1, n0 - MAX_POST_LINES - 2)
    ks = np.arange(k0, h + 1)
    res_scale = _robust_scale(residual, axis=1)  # per line
    med_o, sig_o = _window_stats(offset, ks, 1, h)
    med_r, sig_r = _window_stats(rough, ks, 0, h)
    level = np.cumsum(offset)
    med_l, sig_l = _window_stats(level, ks, 0, h)
    sig_res = _window_stats(res_scale, ks, 1, h, scale=False)[0]
    sig_o[ks] = np.maximum(sig_o[ks], _TINY)
    sig_r[ks] = np.maximum(sig_r[ks], max(ROUGHNESS_FLOOR, 1e-12))
    sig_l[ks] = np.maximum(sig_l[ks], _TINY)
    sig_res[ks] = np.maximum(sig_res[ks], _TINY)
    csum = np.concatenate([[0.0], np.cumsum(rough)])
    lsum = np.concatenate([[0.0], np.cumsum(level)])
    # the height-step score of every line count from MAX_POST_LINES before n0 on
    steps = np.zeros(h + 3)
    ms = np.arange(max(MIN_REF_LINES + 2, n0 - MAX_POST_LINES), h + 1)
    i = ms - 1  # their newest lines
    score = np.abs(offset[i] - med_o[i]) / sig_o[i]
    two = i - 1 >= MIN_REF_LINES + 1  # a change in mid-line splits its step over two lines
    j = i[two]
    pair = np.abs(offset[j] + offset[j - 1] - 2 * med_o[j - 1]) / (sig_o[j - 1] * np.sqrt(2))
    score[two] = np.maximum(score[two], pair)
    steps[ms] = score
    ns = np.arange(n0, h + 1)  # line counts to score, all at once
    out["offset"][ns] = steps[ns]
    beyond = np.abs(residual[ns - 1]) > OUTLIER_SIGMAS * sig_res[ns - 1][:, None]
    out["outliers"][ns] = np.mean(beyond, axis=1)
    p = np.arange(1, MAX_POST_LINES + 1)
    valid = p[None, :] <= np.minimum(MAX_POST_LINES, ns - MIN_REF_LINES - 1)[:, None]
    cand = np.where(valid, ns[:, None] - p[None, :], ns[:, None] - 1)  # candidate change lines
    valid &= cand >= MIN_GLR_REF_LINES
    nref = np.minimum(REF_LINES, cand)

    def shift_glr(
        sums: np.ndarray, med: np.ndarray, sig: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # the shift of the mean after each candidate against its reference, and the same
        # shift against the last LOCAL_LINES before it (a drift of the surface moves those
        # too, a tip change does not): the smaller GLR, 0 when the two disagree in sign
        post = (sums[ns][:, None] - sums[cand]) / p
        shift = post - med[cand]
        local = post - (sums[cand] - sums[cand - LOCAL_LINES]) / LOCAL_LINES
        scale = sig[cand]
        g = np.minimum(
            np.abs(shift) / (scale * np.sqrt(1.0 / p + 1.0 / nref)),
            np.abs(local) / (scale * np.sqrt(1.0 / p + 1.0 / LOCAL_LINES)),
        )
        return np.where(valid & (np.sign(shift) == np.sign(local)), g, 0.0), shift, local

    glr = shift_glr(csum, med_r, sig_r)[0]
    out["roughness"][ns] = np.max(glr, axis=1)
    glr_l, shift_l, local_l = shift_glr(lsum, med_l, sig_l)
    # the level steps into the candidate line and the next (when scanned) carry the shift
    dev = np.zeros(h + 2)
    dev[ks[:-1]] = offset[ks[:-1]] - med_o[ks[:-1]]
    carried = dev[cand] + np.where(cand + 1 < ns[:, None], dev[cand + 1], 0.0)
    abrupt = carried * np.sign(local_l) >= LEVEL_CONCENTRATION * np.abs(local_l)
    small = np.maximum(np.abs(shift_l), np.abs(local_l)) <= LEVEL_CAP_M
    glr_l = np.where(abrupt & small, glr_l, 0.0)
    out["level"][ns] = np.max(np.sqrt(glr_l * glr), axis=1)
    # the step into candidate line k shows at line count k + 1, or k + 2 when it fell in mid-line
    step_at = np.maximum(steps[cand + 1], np.where(cand + 2 <= ns[:, None], steps[cand + 2], 0.0))
    out["joint"][ns] = np.max(np.sqrt(step_at * glr), axis=1)
    return out


@dataclass(frozen=True)
class LineChangeDetector:
    """Alarms on a tip change from the scanned lines (see the module doc).

    ``thresholds``: per feature of :data:`FEATURES`, the score an alarm needs; ``fit``: how they
    were fitted (command, data, false-alarm budget and the share of calibration scans that
    alarm), stored for the record."""

    thresholds: dict[str, float]
    lookback_lines: int = LOOKBACK_LINES
    fit: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.thresholds) - set(FEATURES)
        if unknown or not self.thresholds:
            raise ConfigError(
                f"tip watch thresholds must name some of {FEATURES}, got {sorted(self.thresholds)}"
            )
        for name, value in self.thresholds.items():
            if not (np.isfinite(value) and value > 0):
                raise ConfigError(f"tip watch threshold {name!r} must be > 0, got {value!r}")
        if self.lookback_lines < 1:
            raise ConfigError(f"lookback_lines must be >= 1, got {self.lookback_lines}")

    def scores(self, lines: np.ndarray) -> dict[str, np.ndarray]:
        """Every feature's score per line count ``(H + 1,)`` (for fitting and plots)."""
        return feature_scores(lines)

    def check(self, lines: np.ndarray) -> ChangeAlarm | None:
        """The first alarm among the last ``lookback_lines`` line counts of ``lines`` (the
        lines scanned so far, ``(n, W)`` metres), or None. Fewer than ``MIN_SCORED_LINES``
        lines never alarm."""
        z = np.asarray(lines)
        n = z.shape[0] if z.ndim == 2 else 0
        first = max(0, n - self.lookback_lines + 1)
        scores = feature_scores(z, first=first)
        best: ChangeAlarm | None = None
        for name, limit in self.thresholds.items():
            window = scores[name][first : n + 1]
            over = np.flatnonzero(window > limit)
            if len(over) and (best is None or first + int(over[0]) < best.line):
                line = first + int(over[0])
                value = float(scores[name][line])
                best = ChangeAlarm(name, line, value, value / limit)
        if best is None:
            return None
        top = {name: float(scores[name][first : n + 1].max()) for name in FEATURES}
        return ChangeAlarm(best.feature, best.line, best.score, best.ratio, top)

    @property
    def label(self) -> str:
        """``"<version>+<digest>"``: the code version and a short digest of the thresholds and
        lookback, recorded in a session's versions (a refit detector judges scans differently)."""
        fitted = json.dumps(
            {"thresholds": self.to_json()["thresholds"], "lookback": self.lookback_lines},
            sort_keys=True,
        )
        return f"{VERSION}+{hashlib.sha256(fitted.encode()).hexdigest()[:8]}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": NAME,
            "version": VERSION,
            "features": list(FEATURES),
            "thresholds": {k: float(v) for k, v in self.thresholds.items()},
            "lookback_lines": self.lookback_lines,
            "constants": _constants(),
            "fit": self.fit,
        }

    @classmethod
    def from_json(cls, obj: Any) -> LineChangeDetector:
        if not isinstance(obj, dict) or obj.get("name") != NAME:
            raise ModelError(f"not a {NAME} file (expected an object with name {NAME!r})")
        if obj.get("version") != VERSION or obj.get("constants") != _constants():
            raise ModelError(
                f"{NAME} file was fitted for version {obj.get('version')} / constants "
                f"{obj.get('constants')}, this code is {VERSION} / {_constants()}: refit it"
            )
        try:
            thresholds = {str(k): float(v) for k, v in dict(obj["thresholds"]).items()}
            return cls(thresholds, int(obj["lookback_lines"]), dict(obj.get("fit", {})))
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise ModelError(f"malformed {NAME} file: {exc}") from None


def _constants() -> dict[str, float]:
    return {
        "ref_lines": REF_LINES,
        "min_ref_lines": MIN_REF_LINES,
        "min_scored_lines": MIN_SCORED_LINES,
        "max_post_lines": MAX_POST_LINES,
        "min_glr_ref_lines": MIN_GLR_REF_LINES,
        "local_lines": LOCAL_LINES,
        "level_cap_m": LEVEL_CAP_M,
        "level_concentration": LEVEL_CONCENTRATION,
        "highpass_sigma_px": HIGHPASS_SIGMA_PX,
        "outlier_sigmas": OUTLIER_SIGMAS,
        "roughness_floor": ROUGHNESS_FLOOR,
    }


def path_in(directory: str | Path) -> Path:
    return Path(directory) / f"{NAME}.json"


def load(directory: str | Path) -> LineChangeDetector | None:
    """The detector stored in ``directory`` (``tip_watch.json``), None when there is none;
    :class:`ModelError` when the file is unreadable or was fitted for other code."""
    path = path_in(directory)
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} is not readable JSON: {exc}") from None
    return LineChangeDetector.from_json(obj)


def save(detector: LineChangeDetector, directory: str | Path) -> Path:
    path = path_in(directory)
    path.write_text(json.dumps(detector.to_json(), indent=2) + "\n")
    return path


def fit_thresholds(
    maxima: Mapping[str, Sequence[float] | np.ndarray], budget: float
) -> dict[str, Any]:
    """Thresholds from calibration scans without a tip change: ``maxima[feature]`` holds each
    scan's highest score. Every feature gets the same upper quantile ``1 - alpha`` of its
    maxima, with the largest ``alpha`` (bisection) at which at most ``budget`` of the scans
    would alarm on any feature. Returns ``thresholds``, ``alpha`` and the achieved share."""
    names = [n for n in FEATURES if n in maxima]
    table = np.array([np.asarray(maxima[n], dtype=np.float64) for n in names])
    if table.ndim != 2 or table.shape[1] == 0 or not 0 < budget < 1:
        raise ConfigError(
            f"fit_thresholds needs scan maxima for {FEATURES} and 0 < budget < 1, got "
            f"{table.shape} and {budget}"
        )

    def at(alpha: float) -> tuple[np.ndarray, float]:
        limits = np.quantile(table, 1.0 - alpha, axis=1)
        return limits, float(np.mean(np.any(table > limits[:, None], axis=0)))

    lo, hi = 0.0, budget
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if at(mid)[1] <= budget:
            lo = mid
        else:
            hi = mid
    limits, share = at(lo)
    return {
        "thresholds": {n: float(v) for n, v in zip(names, limits, strict=True)},
        "alpha": lo,
        "alarm_share": share,
        "scans": int(table.shape[1]),
    }
