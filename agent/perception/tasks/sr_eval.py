"""Held-out evaluation of the ``sr`` model against the raw frames and classical baselines.

For every held-out area (new instrument seeds, random stage positions) the same region is
scanned at the reference dwell (2 µs, full dose), at a quarter of it (0.5 µs) and as partial
scans at 1/20 coverage (random pixels, every 20th line, spiral) at the reference dwell. Scores
are taken against each frame's own noise-free truth divided by the incident electrons per pixel,
so that frames of different dose share one scale. Two conditions: ``heldout`` (default simulator
parameters) and ``shifted`` (beam current, drift, source size and thermal blur outside the
training values).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from torch import nn
from tqdm import tqdm

from agent.perception.registry import ModelCard
from agent.perception.tasks import sr
from agent.perception.tasks.stem_baselines import inpaint_sparse, interpolate_sparse
from agent.perception.tasks.stem_data import PIXEL_SIZE_M, STAGE_RANGE_M
from agent.perception.tasks.stem_metrics import psnr, relative_rms, ssim
from agent.perception.tasks.stem_train import HELD_OUT_SPECIMENS
from drivers.commands import MoveTo, Scan, SetScanPattern
from drivers.frame import Frame, ScanRegion
from drivers.registry import open_instrument

REFERENCE_DWELL_S = 2e-6
SHAPE_PX = (256, 256)
PARTIAL_FRACTION = 0.05
PATTERNS = ("random", "lines", "spiral")
CONDITIONS: dict[str, dict[str, Any]] = {
    "heldout": {},
    "shifted": {
        "beam_current_A": 45e-12,
        "drift_m_per_s": 5e-10,
        "source_fwhm_m": 0.5e-10,
        "thermal_sigma_m": 0.09e-10,
    },
}
BIHARMONIC_AREAS = 6
"""Biharmonic inpainting takes seconds per frame: it is run on the first areas only."""


def _acquire(instrument: Any, dwell_s: float, pattern: str, fraction: float) -> Frame:
    instrument.execute(Scan(dwell_s=dwell_s, source="evaluate"))
    instrument.execute(SetScanPattern(pattern, fraction, source="evaluate"))
    return instrument.acquire()


def area_frames(
    rng: np.random.Generator,
    area: int,
    options: dict[str, Any],
    specimens: tuple[str, ...] = HELD_OUT_SPECIMENS,
) -> dict[str, Frame]:
    """The frames of one evaluation area (``full``, ``quarter`` and one per partial pattern),
    drawing the instrument seed and stage position from ``rng``: called in :func:`evaluate_sr`'s
    order (conditions, then areas, one generator seeded with the evaluation seed) it returns
    the evaluation's own frames. Areas cycle through ``specimens``."""
    specimen = specimens[area % len(specimens)]
    inst = open_instrument("sim:stem", seed=int(rng.integers(2**31)), specimen=specimen, **options)
    try:
        x_m, y_m = rng.uniform(-STAGE_RANGE_M, STAGE_RANGE_M, 2)
        inst.execute(MoveTo(float(x_m), float(y_m), source="evaluate"))
        region = ScanRegion(
            float(x_m), float(y_m), SHAPE_PX[1] * PIXEL_SIZE_M, SHAPE_PX[0] * PIXEL_SIZE_M
        )
        inst.execute(Scan(region, SHAPE_PX, REFERENCE_DWELL_S, source="evaluate"))
        frames = {
            "full": _acquire(inst, REFERENCE_DWELL_S, "raster", 1.0),
            "quarter": _acquire(inst, REFERENCE_DWELL_S / 4, "raster", 1.0),
        }
        for pattern in PATTERNS:
            frames[pattern] = _acquire(inst, REFERENCE_DWELL_S, pattern, PARTIAL_FRACTION)
    finally:
        inst.close()
    return frames


def scaled_truth(frame: Frame) -> tuple[np.ndarray, float]:
    assert_truth = frame.truth
    if assert_truth is None or assert_truth.clean is None:
        raise RuntimeError("sim:stem frame without ground truth")
    epp = float(assert_truth.extra["electrons_per_px"])
    return np.asarray(assert_truth.clean, np.float64) / epp, epp


def evaluate_sr(
    model: nn.Module,
    card: ModelCard,
    *,
    seed: int,
    areas: int,
    progress: bool = True,
    specimens: tuple[str, ...] = HELD_OUT_SPECIMENS,
) -> dict[str, Any]:
    """Per-condition metrics (means over areas) and a summary against the issue's targets; the
    areas cycle through ``specimens``."""
    rng = np.random.default_rng(seed)
    pixel_nm = PIXEL_SIZE_M * 1e9
    results: dict[str, Any] = {}
    examples: dict[str, np.ndarray] = {}
    sr_seconds: list[float] = []
    for condition, options in CONDITIONS.items():
        rows: list[dict[str, float]] = []
        z_all: list[np.ndarray] = []
        rejects = 0
        outputs = 0
        for area in tqdm(range(areas), desc=f"sr {condition}", disable=not progress):
            frames = area_frames(rng, area, options, specimens)
            row: dict[str, float] = {}
            truth_full, epp_full = scaled_truth(frames["full"])
            raw_full = frames["full"].data / epp_full
            row["full_raw_psnr"] = psnr(raw_full, truth_full)
            row["full_raw_ssim"] = ssim(raw_full, truth_full)
            truth_q, epp_q = scaled_truth(frames["quarter"])
            raw_q = frames["quarter"].data / epp_q
            row["quarter_raw_psnr"] = psnr(raw_q, truth_q)
            row["quarter_raw_ssim"] = ssim(raw_q, truth_q)
            gauss = ndimage.gaussian_filter(raw_q, 1.5)
            row["quarter_gauss_psnr"] = psnr(gauss, truth_q)
            row["quarter_gauss_ssim"] = ssim(gauss, truth_q)
            t0 = time.perf_counter()
            rec = sr.recover(frames["quarter"].data, pixel_nm, model=model, card=card)
            sr_seconds.append(time.perf_counter() - t0)
            est_q, sig_q = rec.image / epp_q, rec.sigma / epp_q
            row["quarter_sr_psnr"] = psnr(est_q, truth_q)
            row["quarter_sr_ssim"] = ssim(est_q, truth_q)
            z_all.append(((est_q - truth_q) / sig_q).ravel()[::7])
            rejects += int(rec.reject)
            outputs += 1
            if area == 0 and condition == "heldout":
                examples.update(full=raw_full, quarter=raw_q, quarter_sr=est_q, truth=truth_q)
            for pattern in PATTERNS:
                frame = frames[pattern]
                truth_p, epp_p = scaled_truth(frame)
                data = frame.data / epp_p
                rec = sr.recover(frame.data, pixel_nm, model=model, card=card)
                est, sig = rec.image / epp_p, rec.sigma / epp_p
                row[f"{pattern}_sr_rms"] = relative_rms(est, truth_p)
                row[f"{pattern}_sr_psnr"] = psnr(est, truth_p)
                row[f"{pattern}_griddata_rms"] = relative_rms(interpolate_sparse(data), truth_p)
                if area < BIHARMONIC_AREAS:
                    row[f"{pattern}_biharmonic_rms"] = relative_rms(inpaint_sparse(data), truth_p)
                z_all.append(((est - truth_p) / sig).ravel()[::7])
                rejects += int(rec.reject)
                outputs += 1
                if area == 0 and condition == "heldout":
                    examples[f"{pattern}_input"] = data
                    examples[f"{pattern}_sr"] = est
                    examples[f"{pattern}_griddata"] = interpolate_sparse(data)
                    examples[f"{pattern}_truth"] = truth_p
            rows.append(row)
        z = np.concatenate(z_all)
        keys = sorted({k for r in rows for k in r})
        means = {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}
        means["coverage_1sigma"] = float(np.mean(np.abs(z) <= 1.0))
        means["coverage_2sigma"] = float(np.mean(np.abs(z) <= 2.0))
        means["reject_rate"] = rejects / max(outputs, 1)
        results[condition] = {"areas": areas, "options": options, "mean": means}
    summary = _summary(results)
    summary["sr_ms_per_256px_frame"] = 1e3 * float(np.median(sr_seconds))
    return {
        "conditions": results,
        "summary": summary,
        "examples": examples,
        "seed": seed,
        "specimens": list(specimens),
        "card": {"name": card.name, "version": card.version, "sha256": card.sha256},
    }


def _summary(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for condition, res in results.items():
        m = res["mean"]
        out[condition] = {
            "quarter_dose_sr_psnr_minus_full_raw_db": m["quarter_sr_psnr"] - m["full_raw_psnr"],
            "quarter_dose_sr_ssim_minus_full_raw": m["quarter_sr_ssim"] - m["full_raw_ssim"],
            "quarter_dose_target_met": bool(
                m["quarter_sr_psnr"] >= m["full_raw_psnr"]
                and m["quarter_sr_ssim"] >= m["full_raw_ssim"]
            ),
            **{f"{p}_1_20_rms_of_range": m[f"{p}_sr_rms"] for p in PATTERNS},
            **{
                f"{p}_1_20_target_met": bool(
                    m[f"{p}_sr_rms"] <= 0.026 and m[f"{p}_sr_rms"] < m[f"{p}_griddata_rms"]
                )
                for p in PATTERNS
            },
            **{
                f"{p}_griddata_over_sr_rms": m[f"{p}_griddata_rms"] / m[f"{p}_sr_rms"]
                for p in PATTERNS
            },
            "coverage_1sigma": m["coverage_1sigma"],
            "coverage_2sigma": m["coverage_2sigma"],
            "reject_rate": m["reject_rate"],
        }
    return out


def write_report(
    metrics: dict[str, Any], out: Path, card: ModelCard, *, weights_dir: Path | None = None
) -> Path:
    """``sr_eval.json`` and ``sr_examples.png`` in ``out``; with ``weights_dir`` the held-out
    summary is also written into the model card there."""
    out.mkdir(parents=True, exist_ok=True)
    body = {k: v for k, v in metrics.items() if k != "examples"}
    path = out / "sr_eval.json"
    path.write_text(json.dumps(body, indent=2, default=_json_default) + "\n")
    _plot_examples(metrics["examples"], out / "sr_examples.png")
    if weights_dir is not None:
        updated = dataclasses.replace(
            card,
            metrics={
                "held_out": metrics["summary"],
                "seed": metrics["seed"],
                "conditions": {c: r["options"] for c, r in metrics["conditions"].items()},
            },
        )
        (weights_dir / f"{card.name}.json").write_text(
            json.dumps(updated.to_json(), indent=2, default=_json_default) + "\n"
        )
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON-able: {type(value).__name__}")


def _plot_examples(examples: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("full", "quarter", "quarter_sr", "truth")] + [
        (f"{p}_input", f"{p}_griddata", f"{p}_sr", f"{p}_truth") for p in PATTERNS
    ]
    fig, axes = plt.subplots(len(rows), 4, figsize=(10, 2.6 * len(rows)), dpi=90)
    for r, names in enumerate(rows):
        for c, name in enumerate(names):
            ax = axes[r, c]
            ax.axis("off")
            if name in examples:
                img = examples[name]
                ax.imshow(np.nan_to_num(img, nan=0.0), cmap="gray")
                ax.set_title(name.replace("_", " "), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
