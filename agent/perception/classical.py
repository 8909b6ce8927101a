"""A classical (no machine learning) STM tip-quality assessor.

:class:`ClassicalTipAssessor` reads a topography frame (complete or partial) and scores the five
tip states from a handful of physically motivated numbers, each a symptom of one bad tip:

==========  ===========================================================================
state       symptom and feature
==========  ===========================================================================
crashed     the image is flat or pinned: ``flat_fraction`` (adjacent pixels equal),
            ``saturated_fraction`` (pixels on the image's extreme values) and ``rms_m``
            (robust height spread) far below the corrugation a working tip shows.
unstable    the apex changes between lines: ``offset_jump_z`` and ``line_jump_z``, robust
            z-scores of the largest line-to-line change of the line heights and of the line
            contents (after removing per-line offsets) against the typical line-to-line change.
blunt       atomic corrugation is gone: ``lattice_snr``, log10 of the strongest Fourier peak
            over the median power in the band of atomic spatial frequencies (periods 2–8 Å,
            set from ``frame.pixel_size_m``); ``lattice_resolvable`` says whether the pixel
            size allows seeing that band at all.
multiple    every feature repeats at the apex offsets: ``ghost_peak``, the strongest side peak
            of the autocorrelation of the image with its lattice peaks clipped away (so only
            defects and steps remain), relative to the zero-lag peak.
==========  ===========================================================================

Each bad state gets a logit ``(feature - threshold) / width`` (the largest of its symptoms);
``good`` has logit 0; probabilities are their softmax, and uncertainty is one minus the margin
between the two most probable states. Every threshold is a field of :class:`ClassicalConfig`;
``bench/assessor_accuracy.py`` measures the result on simulated frames.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import numpy as np
import scipy.fft
from scipy import ndimage

from drivers.errors import ConfigError
from drivers.frame import Frame, TipState
from drivers.observation import TipEstimate

logger = logging.getLogger(__name__)

_STATES = (TipState.GOOD, TipState.MULTIPLE, TipState.BLUNT, TipState.UNSTABLE, TipState.CRASHED)
_TINY = 1e-30


@dataclass(frozen=True)
class ClassicalConfig:
    """Thresholds of :class:`ClassicalTipAssessor` (lengths in metres).

    A logit is ``(feature - *_at) / *_width``: positive above the threshold.
    """

    min_lines: int = 16
    lattice_period_min_m: float = 2.0e-10
    lattice_period_max_m: float = 8.0e-10
    expected_corrugation_m: float = 5e-12
    # crashed
    flat_at: float = 0.3
    flat_width: float = 0.05
    saturated_at: float = 0.2
    saturated_width: float = 0.05
    rms_ratio_at: float = 0.1
    rms_ratio_width: float = 0.3
    # unstable
    offset_jump_at: float = 12.0
    offset_jump_width: float = 2.0
    line_jump_at: float = 10.0
    line_jump_width: float = 2.0
    # blunt
    lattice_snr_at: float = 2.0
    lattice_snr_width: float = 0.3
    # multiple
    ghost_at: float = 0.25
    ghost_width: float = 0.05
    ghost_exclusion_m: float = 3.0e-10
    highpass_sigma_m: float = 2.0e-9

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"ClassicalConfig.{f.name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"ClassicalConfig.{f.name} must be finite, got {value!r}")
            if f.name.endswith(("_width", "_m")) and value <= 0:
                raise ConfigError(f"ClassicalConfig.{f.name} must be > 0, got {value!r}")
        if not isinstance(self.min_lines, int) or self.min_lines < 4:
            raise ConfigError(f"ClassicalConfig.min_lines must be an int >= 4, got {self.min_lines!r}")
        if self.lattice_period_min_m >= self.lattice_period_max_m:
            raise ConfigError(
                "ClassicalConfig.lattice_period_min_m must be below lattice_period_max_m, got "
                f"{self.lattice_period_min_m!r} >= {self.lattice_period_max_m!r}"
            )


class ClassicalTipAssessor:
    """Tip state from image statistics; see the module docstring for the features."""

    name = "classical"
    version = "1.0"

    def __init__(self, config: ClassicalConfig | None = None) -> None:
        if config is not None and not isinstance(config, ClassicalConfig):
            raise ConfigError(f"ClassicalTipAssessor config must be a ClassicalConfig, got {config!r}")
        self.config = config or ClassicalConfig()

    def assess(self, frame: Frame) -> TipEstimate:
        """Score the completed lines of ``frame`` (``frame.done_data``).

        With fewer than ``min_lines`` usable lines the estimate is uniform with uncertainty 1.
        Non-finite pixels are replaced by the median of the finite ones (and counted in
        ``features["nonfinite_fraction"]``); the output never holds NaN.
        """
        features = self.features(frame.done_data, frame.pixel_size_m)
        return self.estimate(features)

    # ------------------------------------------------------------------ features

    def features(
        self, data: np.ndarray, pixel_size_m: tuple[float, float]
    ) -> dict[str, float]:
        """The diagnostic numbers of ``data`` ``(lines, W)`` with pixels ``(y, x)`` metres."""
        cfg = self.config
        arr = np.array(data, dtype=np.float64, copy=True)
        if arr.ndim != 2:
            raise ConfigError(f"tip assessment needs a 2-D image, got shape {arr.shape}")
        finite = np.isfinite(arr)
        n_bad = int(arr.size - np.count_nonzero(finite))
        feats: dict[str, float] = {
            "lines": float(arr.shape[0]),
            "nonfinite_fraction": n_bad / arr.size if arr.size else 1.0,
        }
        if arr.shape[0] < cfg.min_lines or arr.shape[1] < 8 or n_bad == arr.size:
            feats["informative"] = 0.0
            return feats
        if n_bad:
            arr[~finite] = np.median(arr[finite])
        py, px = (abs(float(p)) for p in pixel_size_m)
        if not (math.isfinite(py) and math.isfinite(px) and py > 0 and px > 0):
            raise ConfigError(f"pixel_size_m must be two positive numbers, got {pixel_size_m!r}")
        feats["informative"] = 1.0

        # Work in units of the image's own spread so that nothing overflows.
        centre = float(np.median(arr))
        span = float(np.max(np.abs(arr - centre)))
        if not math.isfinite(span):
            # differences overflow float64: rescale before subtracting
            arr = arr / np.max(np.abs(arr))
            centre = float(np.median(arr))
            span = float(np.max(np.abs(arr - centre)))
        unit = span if span > 0 else 1.0
        img = (arr - centre) / unit
        feats.update(_crash_features(img))
        flat = _remove_plane(img)
        offsets = np.median(flat, axis=1)
        lines = flat - offsets[:, None]
        rms = _robust_std(lines)
        feats["rms_m"] = rms * (unit if span > 0 else 0.0)
        feats["rms_ratio"] = feats["rms_m"] / cfg.expected_corrugation_m
        feats.update(_line_jump_features(offsets, lines))
        feats.update(self._lattice_features(lines, py, px))
        feats.update(self._ghost_features(lines, py, px))
        return {k: float(np.nan_to_num(v, nan=0.0, posinf=1e6, neginf=-1e6)) for k, v in feats.items()}

    def _band(self, shape: tuple[int, int], py: float, px: float) -> tuple[np.ndarray, np.ndarray]:
        """Radial spatial frequency (cycles/m) and the mask of the atomic band."""
        fy = scipy.fft.fftfreq(shape[0], d=py)
        fx = scipy.fft.fftfreq(shape[1], d=px)
        f = np.hypot(fy[:, None], fx[None, :])
        nyquist = 0.5 / max(py, px)
        high = min(1.0 / self.config.lattice_period_min_m, 0.9 * nyquist)
        low = 1.0 / self.config.lattice_period_max_m
        return f, (f >= low) & (f <= high)

    def _lattice_features(self, lines: np.ndarray, py: float, px: float) -> dict[str, float]:
        window = np.outer(np.hanning(lines.shape[0]), np.hanning(lines.shape[1]))
        power = np.abs(scipy.fft.fft2(lines * window)) ** 2
        _, band = self._band(lines.shape, py, px)
        if np.count_nonzero(band) < 16:
            return {"lattice_resolvable": 0.0, "lattice_snr": 0.0}
        in_band = power[band]
        background = float(np.median(in_band))
        peak = float(np.max(in_band))
        return {
            "lattice_resolvable": 1.0,
            "lattice_snr": math.log10((peak + _TINY) / (background + _TINY)),
        }

    def _ghost_features(self, lines: np.ndarray, py: float, px: float) -> dict[str, float]:
        cfg = self.config
        sigma = (cfg.highpass_sigma_m / py, cfg.highpass_sigma_m / px)
        detail = lines - ndimage.gaussian_filter(lines, sigma, mode="nearest")
        window = np.outer(np.hanning(lines.shape[0]), np.hanning(lines.shape[1]))
        spectrum = scipy.fft.fft2(detail * window)
        amplitude = np.abs(spectrum)
        f, _ = self._band(lines.shape, py, px)
        # clip periodic (lattice) peaks to a few times the radial median amplitude
        ring = np.minimum((f / (f.max() + _TINY) * 32).astype(int), 32)
        median_by_ring = ndimage.median(amplitude, labels=ring, index=np.arange(33))
        limit = 3.0 * np.asarray(median_by_ring)[ring]
        clipped = np.minimum(amplitude, limit)
        ac = np.real(scipy.fft.ifft2(clipped**2))
        ac = scipy.fft.fftshift(ac)
        cy, cx = ac.shape[0] // 2, ac.shape[1] // 2
        zero = ac[cy, cx]
        if zero <= _TINY:
            return {"ghost_peak": 0.0}
        yy = (np.arange(ac.shape[0]) - cy)[:, None] * py
        xx = (np.arange(ac.shape[1]) - cx)[None, :] * px
        r = np.hypot(yy, xx)
        # The central peak (a feature with itself) is round; a ghost is a pair of side peaks at
        # +-offset. Subtract the radial median so that only the anisotropic part remains.
        ring_px = np.rint(r / min(py, px)).astype(int)
        radial = np.asarray(ndimage.median(ac, labels=ring_px, index=np.arange(ring_px.max() + 1)))
        residual = (ac - radial[ring_px]) / zero
        outside = r > max(cfg.ghost_exclusion_m, 2.5 * max(py, px))
        # keep to offsets well inside the image (the autocorrelation is noisy at the edges)
        inside = (np.abs(yy) < 0.4 * ac.shape[0] * py) & (np.abs(xx) < 0.4 * ac.shape[1] * px)
        region = outside & inside
        if not np.any(region):
            return {"ghost_peak": 0.0}
        best = int(np.argmax(np.where(region, residual, -np.inf)))
        by, bx = np.unravel_index(best, ac.shape)
        return {
            "ghost_peak": float(residual[by, bx]),
            "ghost_offset_m": float(r[by, bx]),
        }

    # ------------------------------------------------------------------ scoring

    def logits(self, features: dict[str, float]) -> dict[TipState, float]:
        """The evidence for each state (``good`` is the reference at 0)."""
        cfg = self.config
        f = features.get
        crashed = max(
            (f("flat_fraction", 0.0) - cfg.flat_at) / cfg.flat_width,
            (f("saturated_fraction", 0.0) - cfg.saturated_at) / cfg.saturated_width,
            (cfg.rms_ratio_at - f("rms_ratio", 1.0)) / cfg.rms_ratio_width,
        )
        unstable = max(
            (f("offset_jump_z", 0.0) - cfg.offset_jump_at) / cfg.offset_jump_width,
            (f("line_jump_z", 0.0) - cfg.line_jump_at) / cfg.line_jump_width,
        )
        if f("lattice_resolvable", 0.0) > 0:
            blunt = (cfg.lattice_snr_at - f("lattice_snr", 0.0)) / cfg.lattice_snr_width
        else:
            blunt = 0.0  # cannot tell: as likely as good
        multiple = (f("ghost_peak", 0.0) - cfg.ghost_at) / cfg.ghost_width
        return {
            TipState.GOOD: 0.0,
            TipState.MULTIPLE: multiple,
            TipState.BLUNT: blunt,
            TipState.UNSTABLE: unstable,
            TipState.CRASHED: crashed,
        }

    def estimate(self, features: dict[str, float]) -> TipEstimate:
        """Probabilities and uncertainty from ``features`` (see :meth:`features`)."""
        if features.get("informative", 0.0) <= 0:
            probs = dict.fromkeys(_STATES, 1.0 / len(_STATES))
            return TipEstimate(TipState.GOOD, probs, 1.0, source=self.name, features=features)
        logits = self.logits(features)
        z = np.clip(np.array([logits[s] for s in _STATES], dtype=np.float64), -50.0, 50.0)
        z = np.nan_to_num(z, nan=0.0)
        p = np.exp(z - z.max())
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        margin = float(p[order[0]] - p[order[1]])
        probs = {s: float(v) for s, v in zip(_STATES, p, strict=True)}
        return TipEstimate(
            state=_STATES[int(order[0])],
            probabilities=probs,
            uncertainty=min(1.0, max(0.0, 1.0 - margin)),
            source=self.name,
            features=features,
        )


# ---------------------------------------------------------------------- helpers


def _robust_std(values: np.ndarray) -> float:
    v = np.asarray(values, dtype=np.float64).ravel()
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def _remove_plane(img: np.ndarray) -> np.ndarray:
    """``img`` minus its least-squares plane."""
    h, w = img.shape
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.column_stack([np.ones(img.size), yy.ravel() / h, xx.ravel() / w])
    coef, *_ = np.linalg.lstsq(a, img.ravel(), rcond=None)
    return img - (a @ coef).reshape(h, w)


def _crash_features(img: np.ndarray) -> dict[str, float]:
    """Flatness and saturation of ``img`` (scaled to [-1, 1] around its median)."""
    lo, hi = float(img.min()), float(img.max())
    rng = hi - lo
    if rng <= 0:
        return {"flat_fraction": 1.0, "saturated_fraction": 1.0}
    dx = np.abs(np.diff(img, axis=1))
    flat = float(np.mean(dx <= 1e-9 * rng))
    tol = 1e-3 * rng
    saturated = float(np.mean((img <= lo + tol) | (img >= hi - tol)))
    return {"flat_fraction": flat, "saturated_fraction": saturated}


def _line_jump_features(offsets: np.ndarray, lines: np.ndarray) -> dict[str, float]:
    """Robust z-scores of the largest line-to-line changes of offsets and of line contents."""
    d_off = np.diff(offsets)
    change = np.median(np.abs(np.diff(lines, axis=0)), axis=1)
    return {
        "offset_jump_z": _max_robust_z(np.abs(d_off)),
        "line_jump_z": _max_robust_z(change),
    }


def _max_robust_z(values: np.ndarray) -> float:
    """How far the largest value lies above the median, in robust standard deviations."""
    if values.size < 3:
        return 0.0
    med = float(np.median(values))
    scale = 1.4826 * float(np.median(np.abs(values - med)))
    floor = 1e-3 * (abs(med) + float(np.max(np.abs(values)))) + _TINY
    return float((np.max(values) - med) / max(scale, floor))
