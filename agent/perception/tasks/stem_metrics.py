"""Scores of the sr and defects networks against simulator ground truth.

Image scores compare a reconstruction with the noise-free truth in the truth's units:
``data_range`` is the truth's max - min (PSNR, SSIM and the relative RMS error all use it).
Defect detection matches predicted to true defects one to one (Hungarian assignment) within a
distance in pixels; a match counts for a class only when the classes agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from skimage.metrics import structural_similarity

from drivers.frame import Defect


def data_range(truth: np.ndarray) -> float:
    return float(np.max(truth) - np.min(truth))


def psnr(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Peak signal-to-noise ratio (dB) of ``estimate`` against ``truth`` over its range."""
    mse = float(np.mean((np.asarray(estimate, np.float64) - truth) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range(truth) ** 2 / mse)


def ssim(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Structural similarity (skimage, Gaussian-weighted as in Wang et al. 2004)."""
    return float(
        structural_similarity(
            np.asarray(estimate, np.float64),
            np.asarray(truth, np.float64),
            data_range=data_range(truth),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
    )


def relative_rms(estimate: np.ndarray, truth: np.ndarray) -> float:
    """RMS error as a fraction of the truth's intensity range (Ede & Beanland's measure)."""
    rms = math.sqrt(float(np.mean((np.asarray(estimate, np.float64) - truth) ** 2)))
    return rms / data_range(truth)


def interval_coverage(mean: np.ndarray, sigma: np.ndarray, truth: np.ndarray, z: float) -> float:
    """Fraction of pixels whose truth lies within ``mean ± z σ`` (0.683 expected at z = 1 for
    a calibrated Gaussian, 0.954 at z = 2)."""
    return float(np.mean(np.abs(truth - mean) <= z * sigma))


@dataclass(frozen=True)
class PredictedDefect:
    """A detected defect: pixel position, class name and confidence in [0, 1]."""

    row_px: float
    col_px: float
    kind: str
    confidence: float


def match(
    predicted: Sequence[PredictedDefect], truth: Sequence[Defect], max_distance_px: float
) -> list[tuple[int, int]]:
    """Pairs ``(predicted index, truth index)`` of a one-to-one assignment minimising the total
    distance, keeping only pairs closer than ``max_distance_px``."""
    if not predicted or not truth:
        return []
    return match_positions(
        np.array([(d.row_px, d.col_px) for d in predicted]),
        np.array([(d.row_px, d.col_px) for d in truth]),
        max_distance_px,
    )


def match_positions(
    predicted: np.ndarray, truth: np.ndarray, max_distance_px: float
) -> list[tuple[int, int]]:
    """:func:`match` on ``(n, 2)`` arrays of ``(row, col)`` pixel positions."""
    p = np.asarray(predicted, dtype=np.float64).reshape(-1, 2)
    t = np.asarray(truth, dtype=np.float64).reshape(-1, 2)
    if not len(p) or not len(t):
        return []
    dist = np.hypot(p[:, None, 0] - t[None, :, 0], p[:, None, 1] - t[None, :, 1])
    cost = np.where(dist <= max_distance_px, dist, 1e6)
    rows, cols = linear_sum_assignment(cost)
    return [
        (int(r), int(c)) for r, c in zip(rows, cols, strict=True) if dist[r, c] <= max_distance_px
    ]


@dataclass
class DetectionCounts:
    """True positives, false positives and false negatives, overall and per class."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    def f1(self) -> float:
        denominator = 2 * self.tp + self.fp + self.fn
        return 1.0 if denominator == 0 else 2 * self.tp / denominator

    def precision(self) -> float:
        return 1.0 if self.tp + self.fp == 0 else self.tp / (self.tp + self.fp)

    def recall(self) -> float:
        return 1.0 if self.tp + self.fn == 0 else self.tp / (self.tp + self.fn)

    def to_json(self) -> dict[str, float]:
        return {
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "precision": self.precision(),
            "recall": self.recall(),
            "f1": self.f1(),
        }


class DetectionScore:
    """Accumulates detection counts over frames: ``detection`` ignores classes (any defect
    matched to any defect), ``per_class[c]`` counts a match only when the class is right."""

    def __init__(self, classes: Sequence[str]) -> None:
        self.classes = tuple(classes)
        self.detection = DetectionCounts()
        self.per_class = {c: DetectionCounts() for c in self.classes}
        self.confidences: list[float] = []
        self.correct: list[bool] = []

    def add(
        self,
        predicted: Sequence[PredictedDefect],
        truth: Sequence[Defect],
        truth_classes: Sequence[str],
        max_distance_px: float,
    ) -> None:
        pairs = match(predicted, truth, max_distance_px)
        self.detection.tp += len(pairs)
        self.detection.fp += len(predicted) - len(pairs)
        self.detection.fn += len(truth) - len(pairs)
        matched_p = {p: t for p, t in pairs}
        matched_t = {t for _, t in pairs}
        for i, d in enumerate(predicted):
            t = matched_p.get(i)
            ok = t is not None and truth_classes[t] == d.kind
            self.confidences.append(d.confidence)
            self.correct.append(ok)
            if ok:
                self.per_class[d.kind].tp += 1
            else:
                self.per_class[d.kind].fp += 1
                if t is not None:
                    self.per_class[truth_classes[t]].fn += 1
        for j, klass in enumerate(truth_classes):
            if j not in matched_t:
                self.per_class[klass].fn += 1

    def to_json(self) -> dict[str, object]:
        return {
            "detection": self.detection.to_json(),
            "per_class": {c: n.to_json() for c, n in self.per_class.items()},
            "macro_f1": float(np.mean([n.f1() for n in self.per_class.values()])),
            "confidence_ece": expected_calibration_error(
                np.array(self.confidences), np.array(self.correct, dtype=float)
            ),
        }


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, bins: int = 15
) -> float:
    """ECE: the |accuracy - confidence| gap averaged over equal-width confidence bins, weighted
    by the fraction of samples per bin (Guo et al. 2017). NaN with no samples."""
    confidence = np.asarray(confidence, dtype=np.float64).ravel()
    correct = np.asarray(correct, dtype=np.float64).ravel()
    if confidence.size == 0:
        return math.nan
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - confidence[sel].mean())
    return float(ece)
