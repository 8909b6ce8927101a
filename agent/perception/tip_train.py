"""Training of the tip model (``scopepilot train tip``): data, batches, optimisation, calibration.

Every random choice flows from one seed (``torch.manual_seed`` and a ``numpy`` generator), with
single-threaded data preparation, so the same command on the same machine gives the same
weights. Batches mix

- *pure* crops: a random window of ``h`` lines (32–160) of a frame with one tip state, both
  read-outs labelled with that state;
- *change* crops: the first ``h`` lines of a frame stitched from a good-tip and a bad-tip scan of
  the same place, the change ``d`` lines (0–48) before the last line; the frame read-out is
  labelled with the majority state, the recent read-out with the majority of the last 16 lines
  (this teaches it to flag a change within 16 lines). One in four goes the other way
  (bad → good, as after conditioning).

Crops are 128 pixels wide at a random offset and mirrored left–right at random.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from agent.perception.registry import ModelCard, resample_to_pixel_size
from agent.perception.tip_data import (
    GOOD_INDEX,
    STATES,
    VISIBLE_PIXELS,
    VISIBLE_SIGMAS,
    TipSample,
)
from agent.perception.tip_net import (
    IN_CHANNELS,
    NAME,
    PIXEL_RANGE_NM,
    ROW_LINES,
    TRAINED_PIXEL_NM,
    VERSION,
    TipNet,
    fit_temperature,
    normalise,
)

log = logging.getLogger(__name__)

CROP_W = 128
HEIGHTS = tuple(range(32, 161, 16))
MAX_CHANGE_AGE = 48
RECENT_EVIDENCE_LINES = 48
WATCH_WINDOW = 96  # lines TipNetAssessor.watch looks at
WATCH_EVERY = 4  # lines between two checks of a scan in the calibration of the watch threshold
WATCH_FALSE_ALARM = 0.02  # share of good-tip calibration scans allowed one mid-scan alarm


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 900
    batch: int = 24
    lr: float = 2e-3
    weight_decay: float = 1e-4
    width: int = 16
    dropout: float = 0.1
    change_fraction: float = 0.35
    recent_weight: float = 1.0  # loss = frame loss + recent_weight * last-16-lines loss (1.2: 1.0)
    seed: int = 0
    reject_uncertainty: float = 0.3
    watch_false_alarm: float = WATCH_FALSE_ALARM


def _card_for(samples: list[TipSample]) -> ModelCard:
    return ModelCard(
        name=NAME,
        version=VERSION,
        task="tip state of SPM topography frames (complete or partial)",
        pixel_size_range_nm=PIXEL_RANGE_NM,
        trained_pixel_size_nm=TRAINED_PIXEL_NM,
        channels=("topography_m",),
        input_size=(CROP_W, CROP_W),
    )


@dataclass
class Prepared:
    """A sample resampled to the trained pixel size: ``image`` and, when paired, ``twin`` and
    ``shown`` (``(H, W)`` bool: the pixels where the bad tip shows, see the module doc)."""

    image: np.ndarray
    twin: np.ndarray | None
    label: int
    shown: np.ndarray | None = None


def prepare(samples: list[TipSample], card: ModelCard) -> list[Prepared]:
    out = []
    for s in samples:
        img = resample_to_pixel_size(s.data, s.pixel_size_nm, card)
        twin = shown = None
        if s.good_twin is not None:
            twin = resample_to_pixel_size(s.good_twin, s.pixel_size_nm, card)
            diff = img.astype(np.float64) - twin
            diff -= np.median(diff, axis=1, keepdims=True)
            shown = np.abs(diff) > VISIBLE_SIGMAS * s.noise_sigma_m
        out.append(Prepared(img, twin, s.label, shown))
    return out


def _majority(labels: np.ndarray) -> int:
    counts = np.bincount(labels, minlength=len(STATES))
    best = np.flatnonzero(counts == counts.max())
    return int(best[-1]) if len(best) > 1 else int(best[0])  # ties: the later (newer) state


class BatchMaker:
    """Random training crops (see the module doc), deterministic for a given ``rng``."""

    def __init__(
        self, data: list[Prepared], rng: np.random.Generator, change_fraction: float
    ) -> None:
        self.data = data
        self.rng = rng
        self.change_fraction = change_fraction
        self.paired = [
            i for i, d in enumerate(data) if d.twin is not None and d.label != GOOD_INDEX
        ]
        self.max_rows = min(d.image.shape[0] for d in data)

    def crop(self, h: int) -> tuple[np.ndarray, int, int]:
        rng = self.rng
        change = self.paired and rng.random() < self.change_fraction
        per_line = np.full(h, GOOD_INDEX)
        bad_rows = slice(0, 0)
        if change:
            item = self.data[self.paired[int(rng.integers(len(self.paired)))]]
            bad, good = item.image, item.twin if item.twin is not None else item.image
            age = int(rng.integers(0, min(MAX_CHANGE_AGE, h - ROW_LINES) + 1))
            line = h - age
            if rng.random() < 0.25:  # bad -> good
                img = np.concatenate([bad[:line], good[line:h]], axis=0)
                bad_rows = slice(0, line)
            else:
                img = np.concatenate([good[:line], bad[line:h]], axis=0)
                bad_rows = slice(line, h)
            top = 0
        else:
            item = self.data[int(rng.integers(len(self.data)))]
            rows = item.image.shape[0]
            top = int(rng.integers(0, rows - h + 1))
            img = item.image[top : top + h]
            if item.label != GOOD_INDEX:
                bad_rows = slice(0, h)
        per_line[bad_rows] = item.label
        width = img.shape[1]
        left = int(rng.integers(0, width - CROP_W + 1)) if width > CROP_W else 0
        img = img[:, left : left + CROP_W]
        evidence = np.zeros(h, dtype=np.int64)
        if item.shown is not None:
            window = item.shown[top : top + h, left : left + CROP_W]
            evidence[bad_rows] = window[bad_rows].sum(axis=1)
        else:  # no good-tip twin to compare with: the simulator's state stands
            evidence[bad_rows] = VISIBLE_PIXELS
        if evidence.sum() < VISIBLE_PIXELS:
            per_line[bad_rows] = GOOD_INDEX  # the bad tip shows nowhere in this crop
        if rng.random() < 0.5:
            img = img[:, ::-1]
        frame_label = _majority(per_line)
        if per_line[-1] != GOOD_INDEX:
            seen = evidence[-RECENT_EVIDENCE_LINES:].sum() >= VISIBLE_PIXELS
            recent_label = int(per_line[-1]) if seen else GOOD_INDEX
        else:
            recent_label = _majority(per_line[-ROW_LINES:])
        return normalise(img), frame_label, recent_label

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = min(int(self.rng.choice(HEIGHTS)), self.max_rows)
        crops = [self.crop(h) for _ in range(size)]
        x = np.stack([c[0] for c in crops])
        return (
            torch.from_numpy(x),
            torch.tensor([c[1] for c in crops]),
            torch.tensor([c[2] for c in crops]),
        )


def train_model(
    train: list[TipSample],
    val: list[TipSample],
    config: TrainConfig,
    *,
    progress: bool = True,
    device: str = "cpu",
    calib: list[TipSample] | None = None,
) -> tuple[TipNet, ModelCard, dict[str, Any]]:
    """Train (on ``device``; the shipped weights are trained on the CPU), then fit the
    temperatures on ``val`` (the frame temperature on ``val`` and ``calib``, more calibration
    frames over wider simulator parameters); returns the net (on the CPU), its card (no hash yet)
    and the history (losses per step, validation numbers)."""
    from tqdm import tqdm

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    base = _card_for(train)
    data = prepare(train, base)
    maker = BatchMaker(data, rng, config.change_fraction)
    # channels_last: ~20 % less CPU per step for these small convolutions (docs/benchmarks.md)
    net = TipNet(width=config.width, dropout=config.dropout).to(device)
    net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    # OneCycleLR divides by its warm-up length, 0.1 * steps - 1 steps: zero at exactly 10 steps
    pct_start = 0.1 if config.steps != 10 else 0.2
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.lr, total_steps=config.steps, pct_start=pct_start
    )
    loss_fn = nn.CrossEntropyLoss()
    history: dict[str, Any] = {"step": [], "loss": [], "frame_loss": [], "recent_loss": []}
    net.train()
    t0, c0 = time.perf_counter(), time.process_time()
    bar = tqdm(range(config.steps), desc="training tip", unit="step", disable=not progress)
    for step in bar:
        x, y_frame, y_recent = (t.to(device) for t in maker.batch(config.batch))
        x = x.contiguous(memory_format=torch.channels_last)
        frame, recent = net.both(x)
        lf, lr_ = loss_fn(frame, y_frame), loss_fn(recent, y_recent)
        loss = lf + config.recent_weight * lr_
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history["step"].append(step)
        history["loss"].append(float(loss.detach()))
        history["frame_loss"].append(float(lf.detach()))
        history["recent_loss"].append(float(lr_.detach()))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{history['loss'][-1]:.3f}")
    history["train_s"] = time.perf_counter() - t0
    history["train_cpu_s"] = time.process_time() - c0
    net.to("cpu").eval()
    net = net.to(memory_format=torch.contiguous_format)
    extra = prepare(calib, base) if calib else None
    history["validation"] = calibrate(net, prepare(val, base), rng, extra)
    history["validation"].update(
        fit_watch_threshold(net, prepare(val, base), config.watch_false_alarm)
    )
    card = ModelCard(
        **{
            **base.__dict__,
            "architecture": {
                "width": config.width,
                "in_channels": IN_CHANNELS,
                "dropout": config.dropout,
                "reject_uncertainty": config.reject_uncertainty,
                "watch_p_bad": history["validation"]["watch_p_bad"],
                "temperature_frame": float(net.temperature[0]),
                "temperature_recent": float(net.temperature[1]),
                "parameters": int(sum(p.numel() for p in net.parameters())),
            },
        }
    )
    return net, card, history


def logits_on(net: TipNet, images: list[np.ndarray], *, recent: bool = False) -> np.ndarray:
    """Uncalibrated logits of ``net`` for normalised images (one at a time: sizes differ)."""
    out = []
    with torch.inference_mode():
        for img in images:
            x = torch.from_numpy(np.ascontiguousarray(img))[None]
            frame, last = net.both(x)
            out.append((last if recent else frame)[0].numpy())
    return np.stack(out)


def calibrate(
    net: TipNet,
    val: list[Prepared],
    rng: np.random.Generator,
    extra: list[Prepared] | None = None,
) -> dict[str, Any]:
    """Fit the frame and recent temperatures on held-out training seeds (full frames of ``val``
    and ``extra`` for the frame read-out; change and pure crops of ``val`` for the recent one)."""
    frames = val + (extra or [])
    images = [normalise(p.image) for p in frames]
    labels = np.array([p.label for p in frames])
    frame_logits = logits_on(net, images)
    maker = BatchMaker(val, rng, change_fraction=0.5)
    crops, recent_labels = [], []
    for _ in range(4):
        for h in HEIGHTS[::2]:
            for _ in range(len(val) // 4 + 1):
                img, _, r = maker.crop(h)
                crops.append(img)
                recent_labels.append(r)
    recent_logits = logits_on(net, crops, recent=True)
    t_frame = fit_temperature(frame_logits, labels)
    t_recent = fit_temperature(recent_logits, np.array(recent_labels))
    net.temperature.copy_(torch.tensor([t_frame, t_recent]))
    acc = float(np.mean(frame_logits.argmax(1) == labels))
    recent_acc = float(np.mean(recent_logits.argmax(1) == np.array(recent_labels)))
    return {
        "frames": len(frames),
        "extra_frames": len(extra or []),
        "frame_accuracy": acc,
        "recent_crops": len(crops),
        "recent_accuracy": recent_acc,
        "temperature_frame": t_frame,
        "temperature_recent": t_recent,
    }


def _recent_logits_batched(net: TipNet, images: list[np.ndarray]) -> np.ndarray:
    """Recent read-out logits of ``images`` in order, equal shapes batched together."""
    out = np.empty((len(images), len(STATES)), dtype=np.float32)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(img.shape, []).append(i)
    with torch.inference_mode():
        for idx in groups.values():
            for k in range(0, len(idx), 32):
                part = idx[k : k + 32]
                x = torch.from_numpy(np.stack([images[i] for i in part]))
                out[part] = net.both(x)[1].numpy()
    return out


def fit_watch_threshold(net: TipNet, val: list[Prepared], false_alarm: float) -> dict[str, Any]:
    """The bad-state probability a mid-scan alarm needs (``watch_p_bad``): each good-tip scan of
    the calibration seeds (good frames and the good-tip twins of bad ones) is revealed
    :data:`WATCH_EVERY` lines at a time as :meth:`TipNetAssessor.watch` sees it (the last
    :data:`WATCH_WINDOW` lines, calibrated recent read-out); the threshold is the
    ``1 - false_alarm`` quantile of each scan's highest bad-state probability, so that about
    ``false_alarm`` of good scans would raise an alarm somewhere."""
    scans = [p.image for p in val if p.label == GOOD_INDEX]
    scans += [p.twin for p in val if p.twin is not None]
    if not scans:
        return {"watch_p_bad": 0.5, "watch_scans": 0}
    worst = []
    t = float(net.temperature[1])
    with torch.inference_mode():
        for image in scans:
            windows = [
                normalise(image[max(0, n - WATCH_WINDOW) : n])
                for n in range(ROW_LINES, image.shape[0] + 1, WATCH_EVERY)
            ]
            logits = _recent_logits_batched(net, windows) / t
            z = logits - logits.max(axis=1, keepdims=True)
            probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
            worst.append(float(1.0 - probs[:, GOOD_INDEX].min()))
    threshold = float(np.quantile(np.array(worst), 1.0 - false_alarm))
    return {
        "watch_p_bad": min(max(threshold, 0.5), 0.999),
        "watch_scans": len(scans),
        "watch_false_alarm_target": false_alarm,
    }


def plot_history(history: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.asarray(history["step"])
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for key, label in (
        ("loss", "total"),
        ("frame_loss", "frame read-out"),
        ("recent_loss", "last-16-lines read-out"),
    ):
        values = np.asarray(history[key])
        k = max(1, len(values) // 50)
        smooth = np.convolve(values, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (moving average)")
    ax.set_yscale("log")
    ax.set_title("tip model training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
