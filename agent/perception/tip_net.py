"""The tip-state network and the assessor the agent uses on SPM instruments.

:class:`TipNet` is a small fully convolutional CNN (about 0.1 M parameters) over a topography
image at the trained pixel size (:data:`TRAINED_PIXEL_NM`). Its trunk downsamples by 16, so each
row of its feature map covers 16 scan lines. It has two read-outs with one shared linear head:

- **frame**: the tip state of everything scanned so far (mean and max pooling over all feature
  rows) — a complete frame or a partial one with at least 16 lines;
- **recent**: the tip state during the last 16 scanned lines (pooling over the last feature row),
  which is how a tip change is caught while the frame is still being scanned.

Both are calibrated by temperature scaling (two temperatures, fitted on held-out training seeds,
stored in the weights as the ``temperature`` buffer). :class:`TipNetAssessor` turns the output
into a :class:`~drivers.observation.TipEstimate`; when the network is unsure (uncertainty = one
minus the top probability above ``reject_uncertainty``) it defers to the classical assessor and
says so in ``source`` and ``features`` (``tipnet_rejected`` = 1), so the policy never acts on an
unsure network output blindly.

Input normalisation (:func:`normalise`), two channels: (0) the frame minus its least-squares
plane over the scanned lines, divided by its robust spread with a floor of 2 pm (so that a flat,
crashed image stays flat instead of amplifying noise), clipped to ±8; (1) the same levelled frame
high-pass filtered (minus a Gaussian blur of :data:`HIGHPASS_SIGMA_PX` pixels), divided by its
own robust spread with a floor of 1 pm, clipped to ±8. Channel 1 keeps the atomic-scale detail
that tells the tip states apart (a ghost of every defect, streaks, the lattice a blunt apex
washes out) at full contrast on frames whose height range is dominated by a step edge: with a
0.24 nm step in the frame, channel 0 alone squeezes a 10 pm corrugation into a small fraction of
its range (see docs/decisions/0009-tip-labels.md).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from agent.perception import tip_watch
from agent.perception.registry import (
    WEIGHTS_DIR,
    ModelCard,
    check_image,
    load_model,
    resample_to_pixel_size,
)
from agent.perception.tip_pairs import PairScore, PairSettings, cue_label
from agent.perception.tip_watch import LineChangeDetector
from drivers.errors import DataError, ModelError
from drivers.frame import Frame, TipState
from drivers.observation import TipEstimate

log = logging.getLogger(__name__)

PAIRS_P_GOOD = 0.01
"""The probability of a good tip an estimate keeps when the defect-pair cue overrides the
network's good read (:class:`TipNetAssessor` with ``pairs``): the cue fired on none of 880 good-tip
frames of the session-7 bench (docs/benchmarks.md, helper P), so a 1 % bound; the rest of the
good read's mass goes to ``multiple``."""

READOUT_EVERY_LINES = 16
"""How often the loop watches a streaming scan with the network's recent read-out alone (no
change detector): its ``watch_p_bad`` was fitted for that many looks per scan."""

NAME = "tip"
VERSION = "1.2"
STATES: tuple[TipState, ...] = tuple(TipState)
TRAINED_PIXEL_NM = 0.0625  # 16 nm over 256 pixels
PIXEL_RANGE_NM = (0.04, 0.1)
ROW_LINES = 16  # scan lines per feature row
MIN_LINES = 16
SPREAD_FLOOR_M = 2e-12
HIGHPASS_SIGMA_PX = 2.0
HIGHPASS_FLOOR_M = 1e-12
CLIP = 8.0
IN_CHANNELS = 2


def _block(c_in: int, c_out: int, stride: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class TipNet(nn.Module):
    """``(N, 2, H, W)`` normalised topography -> ``(N, 5)`` frame logits (see module doc)."""

    temperature: torch.Tensor

    def __init__(
        self,
        width: int = 16,
        classes: int = len(STATES),
        dropout: float = 0.1,
        in_channels: int = IN_CHANNELS,
    ) -> None:
        super().__init__()
        w = width
        self.trunk = nn.Sequential(
            _block(in_channels, w, 2, kernel=5),
            _block(w, 2 * w, 2),
            _block(2 * w, 3 * w, 2),
            _block(3 * w, 3 * w, 1),
            _block(3 * w, 4 * w, 2),
            _block(4 * w, 4 * w, 1),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(8 * w, classes)
        # temperatures of the frame and the recent read-out (fitted after training)
        self.register_buffer("temperature", torch.ones(2))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.trunk(x)
        return out

    def pooled_logits(self, fmap: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """Logits from the feature rows ``rows`` (all when None), uncalibrated."""
        part = fmap if rows is None else fmap[:, :, rows]
        pooled = torch.cat([part.mean(dim=(2, 3)), part.amax(dim=(2, 3))], dim=1)
        out: torch.Tensor = self.head(self.dropout(pooled))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated frame logits (divided by the frame temperature)."""
        return self.pooled_logits(self.features(x)) / self.temperature[0]

    def both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Uncalibrated ``(frame logits, recent logits)``."""
        fmap = self.features(x)
        return self.pooled_logits(fmap), self.pooled_logits(fmap, slice(-1, None))


def build(card: ModelCard) -> TipNet:
    arch = dict(card.architecture)
    return TipNet(
        width=int(arch.get("width", 16)),
        dropout=float(arch.get("dropout", 0.1)),
        in_channels=int(arch.get("in_channels", IN_CHANNELS)),
    )


def normalise(image: np.ndarray) -> np.ndarray:
    """``(H, W)`` metres -> ``(2, H, W)`` float32: plane-free and high-pass, each robustly
    scaled and clipped (see module doc)."""
    from scipy.ndimage import gaussian_filter

    img = np.asarray(image, dtype=np.float64)
    h, w = img.shape
    # least-squares plane: on a full grid the centred row and column indices are orthogonal
    y = np.arange(h) - (h - 1) / 2
    x = np.arange(w) - (w - 1) / 2
    slope_y = float(y @ img.mean(axis=1)) / max(float(y @ y), 1e-12)
    slope_x = float(img.mean(axis=0) @ x) / max(float(x @ x), 1e-12)
    flat = img - slope_y * y[:, None] - slope_x * x[None, :]
    flat -= np.median(flat)
    spread = 1.4826 * float(np.median(np.abs(flat)))
    spread = max(spread, SPREAD_FLOOR_M)
    high = flat - gaussian_filter(flat, HIGHPASS_SIGMA_PX, mode="nearest")
    high_spread = max(1.4826 * float(np.median(np.abs(high))), HIGHPASS_FLOOR_M)
    out = np.empty((IN_CHANNELS, h, w), dtype=np.float32)
    out[0] = np.clip(flat / spread, -CLIP, CLIP)
    out[1] = np.clip(high / high_spread, -CLIP, CLIP)
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


class TipModel:
    """The loaded network with numpy in, numpy out (device and grad mode hidden).

    ``TipModel.load()`` reads the shipped weights (or ``directory``); :class:`ModelError` when
    they are missing, corrupt or do not match.
    """

    def __init__(
        self, net: TipNet, card: ModelCard, change_detector: LineChangeDetector | None = None
    ) -> None:
        self.net = net
        self.card = card
        self.reject_uncertainty = float(card.architecture.get("reject_uncertainty", 0.3))
        # a mid-scan alarm needs this much probability on the bad states (fitted on good-tip
        # calibration scans so that few of them would ever raise one, see tip_train)
        self.watch_p_bad = float(card.architecture.get("watch_p_bad", 0.0))
        # the line-statistics change detector beside the weights (tip_watch.json), if fitted
        self.change_detector = change_detector

    @classmethod
    def load(cls, directory: str | Path = WEIGHTS_DIR) -> TipModel:
        net, card = load_model(NAME, build, directory, version=VERSION)
        if not isinstance(net, TipNet):
            raise ModelError(f"model {NAME!r} did not build a TipNet")
        return cls(net, card, tip_watch.load(directory))

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def prepare(self, image: np.ndarray, pixel_size_nm: float | tuple[float, float]) -> np.ndarray:
        """Checked, resampled, normalised ``(2, H, W)`` float32 input."""
        arr = check_image(image)
        arr = resample_to_pixel_size(arr, pixel_size_nm, self.card)
        if arr.shape[0] < MIN_LINES or arr.shape[1] < 32:
            raise DataError(
                f"the tip model needs at least {MIN_LINES} lines of 32 pixels at "
                f"{self.card.trained_pixel_size_nm:g} nm, got {arr.shape} after resampling"
            )
        return normalise(arr)

    def probabilities(self, prepared: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated ``(frame probs (5,), recent probs (5,))`` for one prepared image."""
        x = torch.from_numpy(np.ascontiguousarray(prepared))[None].to(self.device)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            frame, recent = self.net.both(x)
            t = self.net.temperature
            frame, recent = frame / t[0], recent / t[1]
        return softmax(frame[0].float().cpu().numpy()), softmax(recent[0].float().cpu().numpy())

    def predict(
        self, image: np.ndarray, pixel_size_nm: float | tuple[float, float]
    ) -> dict[str, Any]:
        """JSON-able result for one image (``scopepilot infer tip``)."""
        frame, recent = self.probabilities(self.prepare(image, pixel_size_nm))
        out: dict[str, Any] = {}
        for key, probs in (("frame", frame), ("recent_lines", recent)):
            top = int(np.argmax(probs))
            uncertainty = 1.0 - float(probs[top])
            out[key] = {
                "state": str(STATES[top]),
                "probabilities": {str(s): float(p) for s, p in zip(STATES, probs, strict=True)},
                "uncertainty": uncertainty,
                "rejected": uncertainty > self.reject_uncertainty,
            }
        out["model"] = {
            "name": self.card.name,
            "version": self.card.version,
            "sha256": self.card.sha256,
        }
        return out


def pairs_override_probabilities(probs: np.ndarray) -> np.ndarray:
    """The frame probabilities (5,) after the defect-pair cue overrode a good read: P(good) cut
    to :data:`PAIRS_P_GOOD`, the rest of its mass moved to ``multiple`` (float64, sums to 1)."""
    good, double = STATES.index(TipState.GOOD), STATES.index(TipState.MULTIPLE)
    out = np.asarray(probs, dtype=np.float64).copy()
    keep = min(float(out[good]), PAIRS_P_GOOD)
    out[double] += float(out[good]) - keep
    out[good] = keep
    return out


class TipNetAssessor:
    """The agent's tip assessor for SPM frames: the network, with a classical fallback.

    :meth:`assess` returns the network's calibrated frame estimate; when its uncertainty is above
    the model's ``reject_uncertainty`` (or the frame is too short or not assessable) the classical
    assessor's estimate is returned instead, with ``source`` naming both and
    ``features["tipnet_rejected"] = 1`` plus the network's uncertainty, so the record says why.
    With ``baseline`` (the default) the classical assessor also judges every frame the network
    accepts and its verdict is recorded beside it (``baseline_p_good``, ``baseline_uncertainty``,
    ``baseline_agrees``), so a session shows where the two disagree.
    :meth:`watch` judges the last 16 lines of a partial frame (to abort a scan early).

    With ``pairs`` (:class:`~agent.perception.tip_pairs.PairSettings`; None here, but the
    agent's ``tipnet`` assessor and the RL tip environment pass the defaults, ADR 0014), a
    complete STM frame the network reads as good is also given to the defect-pair cue of
    :mod:`agent.perception.tip_pairs` (the STM defects model from ``pairs_weights_dir``, then
    defect pairs sharing one displacement): when the cue fires the estimate becomes ``multiple``
    (P(good) cut to :data:`PAIRS_P_GOOD`, the rest to ``multiple``), ``source`` says why and
    ``features`` keep the network's own read (``tipnet_p_good``) and the cue's (``pairs_count``,
    ``pairs_offset_dy_nm``, ``pairs_offset_dx_nm``, ``pairs_override`` = 1). Frames the cue
    cannot judge (pixel size outside the defects model's range, non-square pixels, no weights)
    keep the network's read, with ``pairs_skipped`` = 1. The cue is not part of ``version``
    (the network's); ``pairs_version`` labels it.
    """

    name = "tipnet"

    def __init__(
        self,
        model: TipModel | None = None,
        *,
        fallback: Any | None = None,
        directory: str | Path | None = None,
        baseline: bool = True,
        pairs: PairSettings | None = None,
        pairs_weights_dir: str | Path | None = None,
    ) -> None:
        if model is None:
            model = TipModel.load(directory if directory is not None else WEIGHTS_DIR)
        self.model = model
        if fallback is None:
            from agent.perception.classical import ClassicalTipAssessor

            fallback = ClassicalTipAssessor()
        self.fallback = fallback
        self.baseline = baseline
        self.version = f"{model.card.version}+{model.card.sha256[:8]}"
        self.pairs = pairs
        self.pairs_weights_dir = pairs_weights_dir
        # the cue's label, recorded in a session's versions as ``tip_pairs`` beside the
        # network's (like the watch's); None without the cue
        self.pairs_version = (
            None if pairs is None else cue_label(pairs, directory=pairs_weights_dir)
        )
        # the mid-scan change detector's label (its fitted thresholds are not part of the
        # network's version), recorded in a session's versions as ``tip_watch``; None without
        detector = model.change_detector
        self.watch_version = None if detector is None else detector.label
        # how often the agent's loop should watch a streaming scan: the detector every
        # CHECK_EVERY_LINES (it reports a change when it sees it), the read-out alone every 16
        # (its ``watch_p_bad`` was fitted for that many looks per scan)
        self.watch_every_lines = (
            READOUT_EVERY_LINES if detector is None else tip_watch.CHECK_EVERY_LINES
        )

    def _pixel_nm(self, frame: Frame) -> tuple[float, float]:
        return (abs(frame.pixel_size_m[0]) * 1e9, abs(frame.pixel_size_m[1]) * 1e9)

    def assess(self, frame: Frame) -> TipEstimate:
        try:
            prepared = self.model.prepare(frame.done_data, self._pixel_nm(frame))
        except DataError as exc:
            return self._fallback(frame, f"tip model cannot judge this frame: {exc}", {})
        probs, _ = self.model.probabilities(prepared)
        top = int(np.argmax(probs))
        uncertainty = 1.0 - float(probs[top])
        features = {
            "tipnet_uncertainty": uncertainty,
            "tipnet_p_good": float(probs[STATES.index(TipState.GOOD)]),
        }
        if uncertainty > self.model.reject_uncertainty:
            return self._fallback(
                frame,
                f"tip model unsure (uncertainty {uncertainty:.2f} > "
                f"{self.model.reject_uncertainty:.2f}, most likely {STATES[top]})",
                features,
            )
        if self.baseline:  # the classical verdict on the same frame, for the record
            base = self.fallback.assess(frame)
            features["baseline_p_good"] = float(base.p_good)
            features["baseline_uncertainty"] = float(base.uncertainty)
            features["baseline_agrees"] = float(base.state is STATES[top])
        if self.pairs is not None and STATES[top] is TipState.GOOD and frame.complete:
            cue = self._pair_cue(frame)
            if cue is None:
                features["pairs_skipped"] = 1.0
            else:
                features["pairs_count"] = float(cue.pairs)
                features["pairs_points"] = float(cue.points)
                if cue.fires and cue.offset_nm is not None:
                    return self._pairs_override(probs, cue, features)
        return TipEstimate(
            state=STATES[top],
            probabilities={s: float(p) for s, p in zip(STATES, probs, strict=True)},
            uncertainty=uncertainty,
            source=self.name,
            features={**features, "tipnet_rejected": 0.0},
        )

    def _pair_cue(self, frame: Frame) -> PairScore | None:
        """The defect-pair cue of a complete frame, or None when it cannot judge it."""
        from agent.perception.tip_pairs import score_image

        py, px = self._pixel_nm(frame)
        if abs(py - px) > 0.02 * px:
            log.info("%s: pair cue skipped (non-square pixels %.4g x %.4g nm)", self.name, py, px)
            return None
        settings = self.pairs if self.pairs is not None else PairSettings()
        try:
            return score_image(frame.data, px, settings, directory=self.pairs_weights_dir)
        except (DataError, ModelError) as exc:
            log.info("%s: pair cue skipped (%s)", self.name, exc)
            return None

    def _pairs_override(
        self, probs: np.ndarray, cue: PairScore, features: dict[str, float]
    ) -> TipEstimate:
        double = STATES.index(TipState.MULTIPLE)
        out = pairs_override_probabilities(probs)
        dy, dx = cue.offset_nm if cue.offset_nm is not None else (0.0, 0.0)
        return TipEstimate(
            state=TipState.MULTIPLE,
            probabilities={s: float(p) for s, p in zip(STATES, out, strict=True)},
            uncertainty=1.0 - float(out[double]),
            source=(
                f"{self.name}+pairs (read good, but {cue.pairs} defects are imaged twice at "
                f"one offset, ({dy:.2f}, {dx:.2f}) nm: a second apex)"
            ),
            features={
                **features,
                "tipnet_rejected": 0.0,
                "pairs_override": 1.0,
                "pairs_offset_dy_nm": float(dy),
                "pairs_offset_dx_nm": float(dx),
            },
        )

    def _fallback(self, frame: Frame, why: str, features: Mapping[str, float]) -> TipEstimate:
        log.info("%s: %s; using the %s assessor", self.name, why, self.fallback.name)
        est: TipEstimate = self.fallback.assess(frame)
        return TipEstimate(
            state=est.state,
            probabilities=est.probabilities,
            uncertainty=est.uncertainty,
            source=f"{self.fallback.name} (fallback: {why})",
            features={**est.features, **features, "tipnet_rejected": 1.0},
        )

    def watch(self, frame: Frame) -> TipEstimate | None:
        """The tip state during the last 16 completed lines of a (partial) frame, or None with
        fewer than 16 lines or when there are no grounds to abort.

        With the model's change detector (``tip_watch.json`` beside the weights, see
        :mod:`agent.perception.tip_watch`): when the scanned lines show a tip change within
        the last 16 line counts, the estimate is the most likely *bad* state of the network's
        recent read-out, with the network's probabilities as they are and the uncertainty
        the network's probability that the tip is still good (the detector says that
        something changed, the network how sure it is that the result is bad; a policy that
        ignores uncertain estimates re-judges the next frame). ``features`` name the detector's
        feature, line count and score ratio.

        Otherwise the network's recent read-out: None when its top state's uncertainty is
        above ``reject_uncertainty``; a good state as it is. A bad top state is returned only
        without a detector, and only when the bad states together have at least the model's
        ``watch_p_bad`` (a scan is checked every few lines, so one alarm must be rare on a good
        tip); with a detector the alarms are the detector's alone (the network's alarms on top
        of them fired early more often than they added detections; docs/benchmarks.md)."""
        if frame.lines_done < MIN_LINES:
            return None
        done = frame.done_data
        # the recent read-out only sees ~80 lines back; bound the work on long frames
        window = done[-min(len(done), 96) :]
        try:
            probs = self.model.probabilities(self.model.prepare(window, self._pixel_nm(frame)))[1]
        except DataError:
            return None
        good = STATES.index(TipState.GOOD)
        detector = self.model.change_detector
        if detector is not None:
            try:
                alarm = detector.check(done)
            except DataError:
                alarm = None
            if alarm is not None:
                bad = [i for i in range(len(STATES)) if i != good]
                state = STATES[max(bad, key=lambda i: float(probs[i]))]
                return TipEstimate(
                    state=state,
                    probabilities={s: float(p) for s, p in zip(STATES, probs, strict=True)},
                    uncertainty=float(probs[good]),
                    source=f"{self.name} (tip change in the scanned lines: {alarm.feature})",
                    features={
                        "lines_done": float(frame.lines_done),
                        "change_line": float(alarm.line),
                        "change_ratio": float(alarm.ratio),
                        **{f"change_{k}": v for k, v in alarm.scores.items()},
                    },
                )
        top = int(np.argmax(probs))
        uncertainty = 1.0 - float(probs[top])
        if uncertainty > self.model.reject_uncertainty:
            return None
        p_bad = 1.0 - float(probs[good])
        if STATES[top] is not TipState.GOOD and (
            detector is not None or p_bad < self.model.watch_p_bad
        ):
            return None
        return TipEstimate(
            state=STATES[top],
            probabilities={s: float(p) for s, p in zip(STATES, probs, strict=True)},
            uncertainty=uncertainty,
            source=f"{self.name} (last {ROW_LINES} lines)",
            features={"lines_done": float(frame.lines_done)},
        )


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        sel = (conf > lo) & (conf <= hi)
        if np.any(sel):
            ece += float(np.mean(sel)) * abs(float(correct[sel].mean()) - float(conf[sel].mean()))
    return ece


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood of ``softmax(logits / T)``
    (bounded scalar search over log T in [-4, 4]; the NLL is convex in 1/T)."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if z.ndim != 2 or len(z) != len(y) or len(y) == 0:
        raise ModelError(
            f"temperature fit needs (N, K) logits and N labels, got {z.shape}, {y.shape}"
        )

    def nll(log_t: float) -> float:
        scaled = z / math.exp(log_t)
        scaled = scaled - scaled.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(scaled).sum(axis=1))
        return float(np.mean(log_norm - scaled[np.arange(len(y)), y]))

    result = minimize_scalar(nll, bounds=(-4.0, 4.0), method="bounded", options={"xatol": 1e-6})
    t = math.exp(float(result.x))
    if not math.isfinite(t) or t <= 0:
        raise ModelError(f"temperature fit failed (got {t})")
    return t
