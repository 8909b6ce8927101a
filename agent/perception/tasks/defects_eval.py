"""Held-out evaluation of the ``defects`` model against the classical peak-finding baseline.

Held-out frames are 256² ``sim:stem`` rasters at 0.25 Å pixels from seeds never used in
training, at the simulator's default ("realistic") defect density. Conditions: ``heldout``
(default parameters, 2 µs dwell: about 375 electrons per pixel), ``shifted`` (lower beam
current, more drift, larger source and thermal blur) and ``low_dose`` (0.5 µs). The baseline
(:class:`~agent.perception.tasks.stem_baselines.PeakDefectFinder`) has its tolerances tuned on
training-recipe frames in the same run. A detection matches a true defect within 1 Å; per-class
F1 counts a match only when the class is right.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from tqdm import tqdm

from agent.perception.registry import ModelCard
from agent.perception.tasks import defects
from agent.perception.tasks.stem_baselines import PeakDefectFinder
from agent.perception.tasks.stem_data import (
    DEFECT_CLASSES,
    PIXEL_SIZE_M,
    StemRecipe,
    StemSample,
    defect_class,
    simulate,
)
from agent.perception.tasks.stem_metrics import DetectionScore, expected_calibration_error
from agent.perception.tasks.stem_train import HELD_OUT_SPECIMENS

REFERENCE_DWELL_S = 2e-6
CONDITIONS: dict[str, tuple[float, dict[str, Any]]] = {
    "heldout": (REFERENCE_DWELL_S, {}),
    "shifted": (
        REFERENCE_DWELL_S,
        {
            "beam_current_A": 20e-12,
            "drift_m_per_s": 5e-10,
            "source_fwhm_m": 0.5e-10,
            "thermal_sigma_m": 0.09e-10,
        },
    ),
    "low_dose": (REFERENCE_DWELL_S / 4, {}),
}


def heldout_recipe(
    seed: int,
    frames: int,
    dwell_s: float,
    options: dict[str, Any],
    specimens: tuple[str, ...] = HELD_OUT_SPECIMENS,
) -> StemRecipe:
    return StemRecipe(
        seed=seed,
        frames=frames,
        pixel_size_m=(PIXEL_SIZE_M, PIXEL_SIZE_M),
        dwell_s=(dwell_s, dwell_s),
        frames_per_instrument=2,
        sim_options=dict(options),
        specimens=specimens,
    )


def _truth_classes(sample: StemSample) -> list[str]:
    return [defect_class(d.kind) for d in sample.defects]


def tuned_baseline(seed: int, frames: int = 12) -> PeakDefectFinder:
    """The classical finder tuned on training-recipe frames (2 µs, default density)."""
    tuning = simulate(heldout_recipe(seed, frames, REFERENCE_DWELL_S, {}), progress=False)

    def f1(finder: PeakDefectFinder) -> float:
        score = DetectionScore(DEFECT_CLASSES[1:])
        for s in tuning:
            score.add(
                finder.find(s.image),
                s.defects,
                _truth_classes(s),
                defects.MATCH_DISTANCE_M / s.pixel_size_m,
            )
        return score.detection.f1()

    return PeakDefectFinder.tuned([s.image for s in tuning], f1)


def evaluate_defects(
    model: nn.Module,
    card: ModelCard,
    *,
    seed: int,
    frames: int,
    progress: bool = True,
    specimens: tuple[str, ...] = HELD_OUT_SPECIMENS,
) -> dict[str, Any]:
    """Network and baseline scores per condition, and a summary against the targets; the
    held-out instruments cycle through ``specimens``."""
    baseline = tuned_baseline(seed + 17)
    pixel_nm = PIXEL_SIZE_M * 1e9
    temperature = float(card.training.get("temperature", 1.0))
    results: dict[str, Any] = {}
    seconds: list[float] = []
    example: dict[str, Any] = {}
    for i, (condition, (dwell_s, options)) in enumerate(CONDITIONS.items()):
        samples = simulate(
            heldout_recipe(seed + 101 * i, frames, dwell_s, options, specimens),
            progress=progress,
            desc=f"defects {condition}",
        )
        net, classical = DetectionScore(DEFECT_CLASSES[1:]), DetectionScore(DEFECT_CLASSES[1:])
        pixel_conf: list[np.ndarray] = []
        pixel_ok: list[np.ndarray] = []
        rejects = 0
        for s in tqdm(samples, desc=f"scoring {condition}", disable=not progress):
            tol_px = defects.MATCH_DISTANCE_M / s.pixel_size_m
            t0 = time.perf_counter()
            found = defects.find_defects(s.image, pixel_nm, model=model, card=card)
            seconds.append(time.perf_counter() - t0)
            rejects += int(found.reject)
            net.add(found.defects, s.defects, _truth_classes(s), tol_px)
            classical.add(baseline.find(s.image), s.defects, _truth_classes(s), tol_px)
            prob = defects.class_probabilities(model, defects.model_input(s.image), temperature)
            pixel_conf.append(prob.max(axis=0).ravel()[::5])
            pixel_ok.append((prob.argmax(axis=0) == s.class_mask).ravel()[::5])
            if not example and condition == "heldout":
                example = {"image": s.image, "truth": s.defects, "found": found.defects}
        results[condition] = {
            "frames": frames,
            "dwell_s": dwell_s,
            "options": options,
            "true_defects": net.detection.tp + net.detection.fn,
            "network": net.to_json(),
            "classical": classical.to_json(),
            "pixel_ece": expected_calibration_error(
                np.concatenate(pixel_conf), np.concatenate(pixel_ok)
            ),
            "reject_rate": rejects / len(samples),
        }
    summary: dict[str, Any] = {"baseline": dataclasses.asdict(baseline)}
    for condition, r in results.items():
        summary[condition] = {
            **detection_summary(r),
            "pixel_ece": r["pixel_ece"],
            "target_f1_0_95_met": bool(r["network"]["detection"]["f1"] >= 0.95),
        }
    summary["ms_per_256px_frame"] = 1e3 * float(np.median(seconds))
    return {
        "conditions": results,
        "summary": summary,
        "example": example,
        "seed": seed,
        "card": {"name": card.name, "version": card.version, "sha256": card.sha256},
    }


def detection_summary(result: dict[str, Any]) -> dict[str, Any]:
    """The summary figures of one condition's ``result`` (``network`` and ``classical`` scores
    as ``DetectionScore.to_json``, ``reject_rate``): F1 of both, their ratio, per-class F1,
    the network's detection-confidence ECE and the reject rate (STEM and STM evaluations)."""
    f_net = result["network"]["detection"]["f1"]
    f_cls = result["classical"]["detection"]["f1"]
    return {
        "f1": f_net,
        "classical_f1": f_cls,
        "f1_ratio_vs_classical": f_net / f_cls if f_cls > 0 else None,
        "per_class_f1": {c: v["f1"] for c, v in result["network"]["per_class"].items()},
        "classical_per_class_f1": {c: v["f1"] for c, v in result["classical"]["per_class"].items()},
        "detection_confidence_ece": result["network"]["confidence_ece"],
        "reject_rate": result["reject_rate"],
    }


def write_report(
    metrics: dict[str, Any],
    out: Path,
    card: ModelCard,
    *,
    weights_dir: Path | None = None,
    stem: str = "defects",
    plot_example: Callable[[Any, Path], None] | None = None,
) -> Path:
    """``<stem>_eval.json`` and ``<stem>_example.png`` (drawn by ``plot_example``, by default
    this module's STEM figure) in ``out``; with ``weights_dir`` the held-out summary is also
    written into the model card there."""
    out.mkdir(parents=True, exist_ok=True)
    body = {k: v for k, v in metrics.items() if k != "example"}
    path = out / f"{stem}_eval.json"
    path.write_text(json.dumps(body, indent=2) + "\n")
    if metrics["example"]:
        (plot_example or _plot_example)(metrics["example"], out / f"{stem}_example.png")
    if weights_dir is not None:
        updated = dataclasses.replace(
            card, metrics={"held_out": metrics["summary"], "seed": metrics["seed"]}
        )
        (weights_dir / f"{card.name}.json").write_text(
            json.dumps(updated.to_json(), indent=2) + "\n"
        )
    return path


def _plot_example(example: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"vacancy": "tab:red", "substitution": "tab:cyan", "adatom": "tab:orange"}
    fig, ax = plt.subplots(figsize=(6, 6), dpi=100)
    ax.imshow(example["image"], cmap="gray")
    for d in example["truth"]:
        ax.plot(d.col_px, d.row_px, "o", mfc="none", ms=12, mec=colours[defect_class(d.kind)])
    for d in example["found"]:
        ax.plot(d.col_px, d.row_px, "+", ms=8, color=colours[d.kind])
    ax.set_title(
        "defects: truth (circles) and network (+); red vacancy, cyan substitution", fontsize=8
    )
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
