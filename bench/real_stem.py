"""The sr and defects networks on a real HAADF-STEM image, against classical methods in one run.

    /tmp/venv/bin/python bench/real_stem.py          # ~1 min; fetches the image once (pip download)

Our STEM networks are trained only on simulated MoS2 / WS2 (``sim:stem``). This bench shows what
they do on a real image they never saw: the ADF image of a perovskite-like square lattice shipped
inside atomap 0.4.2's tests (400 x 380 pixels of 0.0093 nm, GPL-3; see ../shared/REAL_DATA.md).
The wheel is fetched with ``pip download`` into ``--data-dir`` (bench/out/real_data) on the first
run and never committed; reading it needs h5py. The image is binned 2 x 2 to 0.0187 nm pixels
(the models take 0.0125-0.05 nm).

The real image is noisy itself, so every figure compares methods against the same reference in the
same run; no figure is an absolute error:

- **partial scans** (1/20 random, lines, spiral; 1/10 too): the binned image sampled as the scan
  would, filled by the sr network, by linear (Delaunay) interpolation and by biharmonic inpainting.
  RMS error against the full binned image as a fraction of its intensity range, over the pixels
  the scan skipped (the measured ones are the reference itself for the classical fills) and over
  all pixels. The reference's own noise adds the same amount to every method.
- **quarter dose**: each binned pixel is the mean of 4 raw pixels. One raw pixel of each 2 x 2
  block is a quarter-dose image at the binned pixel size; the mean of the other three is a
  reference whose noise is independent of it. The sr network on the quarter-dose image against
  that image raw and smoothed (Gaussian, sigma chosen best *against the reference*, which flatters
  the baseline) and median-filtered (3 x 3). The lower the RMS, the closer to the specimen, since
  the reference's noise adds the same to all.
- **defects on a mostly perfect lattice**: the defects network and the classical peak finder on
  the full binned image. The atomap image has no labelled defects; every detection is shown on the
  plot. The network was trained on transition-metal dichalcogenides, so this is an out-of-
  distribution check: does it flag the frame (reject, uncertain detections) or report confident
  defects?

Writes ``bench/out/real_stem.json`` and ``docs/img/real_stem.png``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402
from skimage.feature import peak_local_max  # noqa: E402

from agent.perception.registry import WEIGHTS_DIR, ModelCard  # noqa: E402
from agent.perception.tasks import defects as defects_task  # noqa: E402
from agent.perception.tasks import sr  # noqa: E402
from agent.perception.tasks.stem_baselines import (  # noqa: E402
    PeakDefectFinder,
    inpaint_sparse,
    interpolate_sparse,
)
from agent.perception.tasks.stem_metrics import data_range  # noqa: E402
from bench._common import machine  # noqa: E402
from simulators.scan_patterns import sampling_mask  # noqa: E402

WHEEL = "atomap==0.4.2"
MEMBER = "atomap/tests/datasets/test_{}_cropped.hdf5"
RAW_PIXEL_NM = 0.009326270238006416  # the file's axis scale (no unit recorded; nm per REAL_DATA.md)
PATTERNS = (("random", 1 / 20), ("lines", 1 / 20), ("spiral", 1 / 20), ("random", 1 / 10))


@dataclass(frozen=True)
class Models:
    """The sr and defects models (and cards) this run scores."""

    sr_model: Any
    sr_card: ModelCard
    defects_model: Any
    defects_card: ModelCard

    @classmethod
    def load(cls, weights: Path) -> Models:
        """The models in ``weights`` where it holds them, the committed ones otherwise."""
        sr_dir = weights if (weights / "sr.json").is_file() else WEIGHTS_DIR
        defects_dir = weights if (weights / "defects.json").is_file() else WEIGHTS_DIR
        return cls(*sr.load(sr_dir), *defects_task.load(defects_dir))

    def recover(self, image: np.ndarray, pixel_nm: float) -> Any:
        return sr.recover(image, pixel_nm, model=self.sr_model, card=self.sr_card)

    def find_defects(self, image: np.ndarray, pixel_nm: float) -> Any:
        return defects_task.find_defects(
            image, pixel_nm, model=self.defects_model, card=self.defects_card
        )


def fetch(data_dir: Path, kind: str) -> Path:
    """The atomap test image ``kind`` (ADF or ABF), downloaded once with pip into ``data_dir``."""
    target = data_dir / MEMBER.format(kind)
    if target.is_file():
        return target
    data_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(data_dir.glob("atomap-0.4.2-*.whl"))
    if not wheels:
        print(f"fetching {WHEEL} into {data_dir} (pip download, once)")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "-q",
                "-d",
                str(data_dir),
                WHEEL,
            ],
            check=True,
        )
        wheels = sorted(data_dir.glob("atomap-0.4.2-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extract(MEMBER.format(kind), data_dir)
    return target


def read_hspy(path: Path) -> np.ndarray:
    try:
        import h5py
    except ImportError:
        raise SystemExit("reading the atomap image needs h5py: pip install h5py") from None
    with h5py.File(path, "r") as f:
        return np.asarray(f["Experiments/__unnamed__/data"], dtype=np.float64)


def sub_images(raw: np.ndarray) -> np.ndarray:
    """``(4, H/2, W/2)``: the four raw pixels of every 2 x 2 block."""
    h, w = (raw.shape[0] // 2) * 2, (raw.shape[1] // 2) * 2
    r = raw[:h, :w]
    return np.stack([r[0::2, 0::2], r[0::2, 1::2], r[1::2, 0::2], r[1::2, 1::2]])


def rms_pct(estimate: np.ndarray, reference: np.ndarray, where: np.ndarray | None = None) -> float:
    span = data_range(reference)
    diff = (
        (np.asarray(estimate, np.float64) - reference)
        if where is None
        else (np.asarray(estimate, np.float64)[where] - reference[where])
    )
    return 100.0 * float(np.sqrt(np.mean(diff**2))) / span


def partial_scans(
    models: Models, full: np.ndarray, pixel_nm: float, seeds: int
) -> list[dict[str, Any]]:
    rows = []
    for pattern, fraction in PATTERNS:
        for seed in range(seeds if pattern == "random" else 1):
            mask = sampling_mask(pattern, fraction, full.shape, np.random.default_rng(seed))
            scan = np.where(mask, full, np.nan)
            t0 = time.perf_counter()
            rec = models.recover(scan, pixel_nm)
            sr_ms = 1e3 * (time.perf_counter() - t0)
            fills = {
                "sr": rec.image,
                "linear": interpolate_sparse(scan),
                "biharmonic": inpaint_sparse(scan),
            }
            rows.append(
                {
                    "pattern": pattern,
                    "fraction": fraction,
                    "seed": seed,
                    "coverage": float(mask.mean()),
                    "sr_reject": rec.reject,
                    "sr_relative_uncertainty": rec.relative_uncertainty,
                    "sr_ms": sr_ms,
                    "skipped_rms_pct": {k: rms_pct(v, full, ~mask) for k, v in fills.items()},
                    "all_rms_pct": {k: rms_pct(v, full) for k, v in fills.items()},
                }
            )
    return rows


def quarter_dose(models: Models, subs: np.ndarray, pixel_nm: float) -> dict[str, Any]:
    """sr on one raw pixel per block against raw, smoothed and median-filtered, scored against
    the mean of the other three (independent noise); each of the four pixels in turn."""
    per: dict[str, list[float]] = {"raw": [], "gaussian_best": [], "median3": [], "sr": []}
    sigmas = []
    rejects = []
    for k in range(4):
        low = subs[k]
        ref = np.delete(subs, k, axis=0).mean(axis=0)
        per["raw"].append(rms_pct(low, ref))
        per["median3"].append(rms_pct(ndimage.median_filter(low, 3), ref))
        best = min(
            (rms_pct(ndimage.gaussian_filter(low, s), ref), s) for s in np.arange(0.3, 2.55, 0.1)
        )
        per["gaussian_best"].append(best[0])
        sigmas.append(float(best[1]))
        rec = models.recover(low, pixel_nm)
        rejects.append(rec.reject)
        per["sr"].append(rms_pct(rec.image, ref))
    return {
        "rms_pct_mean": {k: float(np.mean(v)) for k, v in per.items()},
        "rms_pct": per,
        "gaussian_sigma_px": sigmas,
        "sr_rejected": rejects,
    }


def _detections(models: Models, image: np.ndarray, pixel_nm: float) -> dict[str, Any]:
    """Both detectors on ``image``: positions in its pixels."""
    res = models.find_defects(image, pixel_nm)
    zoom = pixel_nm / 0.025  # the classical finder's sizes are in 0.25 Å pixels
    classical = PeakDefectFinder().find(ndimage.zoom(image, zoom, order=1))
    return {
        "network": {
            "found": len(res.defects),
            "uncertain": int(sum(res.uncertain)),
            "reject": res.reject,
            "reason": res.reason,
            "kinds": sorted({str(d.kind) for d in res.defects}),
            "confidence": [round(float(d.confidence), 3) for d in res.defects],
            "positions_px": [(float(d.row_px), float(d.col_px)) for d in res.defects],
        },
        "classical": {
            "found": len(classical),
            "positions_px": [(d.row_px / zoom, d.col_px / zoom) for d in classical],
        },
    }


def planted(full: np.ndarray, n: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """``full`` with ``n`` of its brighter atomic columns (away from the edges) altered: ``dark``
    blends each into the background (a vacancy-like empty site), ``bright`` adds 60 % of its
    contrast (a heavier substitution); and their positions ``(n, 2)``."""
    smooth = ndimage.gaussian_filter(full, 1.5)
    peaks = peak_local_max(smooth, min_distance=4, exclude_border=20)
    values = smooth[peaks[:, 0], peaks[:, 1]]
    chosen = peaks[values > np.percentile(values, 60)]
    chosen = chosen[np.random.default_rng(3).choice(len(chosen), n, replace=False)]
    background = float(np.percentile(full, 5))
    rows, cols = np.mgrid[: full.shape[0], : full.shape[1]]
    out = full.copy()
    for r, c in chosen:
        weight = np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * 3.0**2))
        if kind == "dark":
            out = out * (1 - weight) + background * weight
        else:
            out = out + 0.6 * weight * (full[r, c] - background)
    return out, chosen.astype(float)


def recall(found: list[tuple[float, float]], truth: np.ndarray, radius_px: float) -> int:
    """How many of ``truth`` have a detection within ``radius_px``."""
    pos = np.array(found, float).reshape(-1, 2)
    if not len(pos):
        return 0
    d = np.hypot(truth[:, None, 0] - pos[None, :, 0], truth[:, None, 1] - pos[None, :, 1])
    return int((d.min(axis=1) <= radius_px).sum())


def find_all_defects(
    models: Models, full: np.ndarray, pixel_nm: float, n_planted: int
) -> dict[str, Any]:
    area_nm2 = full.shape[0] * full.shape[1] * pixel_nm**2
    out: dict[str, Any] = {"area_nm2": area_nm2, "as_is": _detections(models, full, pixel_nm)}
    for kind in ("dark", "bright"):
        image, truth = planted(full, n_planted, kind)
        found = _detections(models, image, pixel_nm)
        for who in ("network", "classical"):
            found[who]["planted_found"] = recall(found[who]["positions_px"], truth, 0.1 / pixel_nm)
        out[f"planted_{kind}"] = {"planted": n_planted, "positions_px": truth.tolist(), **found}
    return out


def plot(
    models: Models,
    full: np.ndarray,
    pixel_nm: float,
    quarter: np.ndarray,
    out: Path,
    found: dict[str, Any],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mask = sampling_mask("random", 1 / 20, full.shape, np.random.default_rng(0))
    scan = np.where(mask, full, np.nan)
    rec = models.recover(scan, pixel_nm).image
    lin = interpolate_sparse(scan)
    q_rec = models.recover(quarter, pixel_nm).image
    dark = found["planted_dark"]
    with_dark, _ = planted(full, dark["planted"], "dark")
    fig, ax = plt.subplots(2, 4, figsize=(16, 8.4))
    lo, hi = np.percentile(full, (0.5, 99.5))
    panels = [
        (full, "real ADF, binned to 0.0187 nm (reference)"),
        (np.where(mask, full, lo), "1/20 random samples"),
        (rec, f"sr fill: skipped-pixel RMS {rms_pct(rec, full, ~mask):.2f} %"),
        (lin, f"linear fill: skipped-pixel RMS {rms_pct(lin, full, ~mask):.2f} %"),
        (quarter, "quarter dose (1 raw pixel per 2x2)"),
        (q_rec, "sr on the quarter dose"),
        (with_dark, "planted dark columns (yellow x); network (red o), peak finder (cyan o)"),
        (rec - full, "sr 1/20 fill minus reference"),
    ]
    for a, (img, title) in zip(ax.ravel(), panels, strict=True):
        if title.startswith("sr 1/20 fill minus"):
            span = np.percentile(np.abs(img), 99)
            a.imshow(img, cmap="RdBu_r", vmin=-span, vmax=span)
        else:
            a.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        a.set_title(title, fontsize=9)
        a.set_axis_off()
    truth = np.array(dark["positions_px"]).reshape(-1, 2)
    ax[1, 2].plot(truth[:, 1], truth[:, 0], "x", color="yellow", ms=7)
    for key, colour in (("network", "red"), ("classical", "cyan")):
        pos = np.array(dark[key]["positions_px"]).reshape(-1, 2)
        if len(pos):
            ax[1, 2].plot(pos[:, 1], pos[:, 0], "o", mfc="none", mec=colour, ms=9)
    card = models.sr_card
    specimens = sorted(set(card.training.get("recipe", {}).get("specimens", ["?"])))
    fig.suptitle(
        f"scopepilot sr {card.sha256[:8]} (trained on simulated {', '.join(specimens)}) "
        "and defects on a real perovskite ADF image"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT / "bench" / "out" / "real_data"))
    parser.add_argument("--seeds", type=int, default=5, help="random masks per fraction (5)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--planted", type=int, default=6, help="altered columns per check (6)")
    parser.add_argument(
        "--weights",
        default=str(WEIGHTS_DIR),
        help="weights directory: its sr and defects models where it holds them, "
        "the committed ones otherwise",
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "real_stem.json"))
    parser.add_argument("--plot", default=str(ROOT / "docs" / "img" / "real_stem.png"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    models = Models.load(Path(args.weights))
    wall0, cpu0 = time.perf_counter(), time.process_time()
    raw = read_hspy(fetch(Path(args.data_dir), "ADF"))
    subs = sub_images(raw)
    full = subs.mean(axis=0)
    pixel_nm = 2 * RAW_PIXEL_NM
    print(f"real ADF image {raw.shape} at {RAW_PIXEL_NM:.4f} nm, binned to {full.shape}")

    partial = partial_scans(models, full, pixel_nm, args.seeds)
    print("\npartial scans: RMS % of the range against the full image (skipped pixels / all)")
    print(f"{'pattern':<16}{'sr':>16}{'linear':>16}{'biharmonic':>16}  sr/linear (skipped)")
    for pattern, fraction in dict.fromkeys((r["pattern"], r["fraction"]) for r in partial):
        rows = [r for r in partial if r["pattern"] == pattern and r["fraction"] == fraction]
        cells = []
        for k in ("sr", "linear", "biharmonic"):
            s = np.mean([r["skipped_rms_pct"][k] for r in rows])
            a = np.mean([r["all_rms_pct"][k] for r in rows])
            cells.append(f"{s:6.2f} / {a:5.2f}")
        ratio = np.mean([r["skipped_rms_pct"]["sr"] / r["skipped_rms_pct"]["linear"] for r in rows])
        label = f"{pattern} 1/{round(1 / fraction)}"
        rejected = sum(r["sr_reject"] for r in rows)
        print(
            f"{label:<16}{cells[0]:>16}{cells[1]:>16}{cells[2]:>16}  {ratio:.3f}"
            f"  (sr rejected {rejected}/{len(rows)})"
        )

    quarter = quarter_dose(models, subs, pixel_nm)
    print(
        "\nquarter dose: RMS % of the range against the other three raw pixels (mean of 4 choices)"
    )
    for k, v in quarter["rms_pct_mean"].items():
        print(f"  {k:<14}{v:6.2f}")
    print(
        f"  sr rejected {sum(quarter['sr_rejected'])}/4; best Gaussian sigma "
        f"{quarter['gaussian_sigma_px']} px"
    )

    found = find_all_defects(models, full, pixel_nm, args.planted)
    net, cls = found["as_is"]["network"], found["as_is"]["classical"]
    print(
        f"\ndefects on {found['area_nm2']:.1f} nm² of a mostly perfect lattice: network "
        f"{net['found']} ({net['uncertain']} uncertain, reject={net['reject']}"
        f"{': ' + net['reason'] if net['reason'] else ''}); peak finder {cls['found']}"
    )
    for kind, words in (
        ("dark", "columns blended into the background"),
        ("bright", "columns +60 %"),
    ):
        row = found[f"planted_{kind}"]
        print(
            f"  {row['planted']} {words}: network finds {row['network']['planted_found']} "
            f"(of {row['network']['found']} detections), peak finder "
            f"{row['classical']['planted_found']} (of {row['classical']['found']}) within 1 Å"
        )

    plot(models, full, pixel_nm, subs[0], Path(args.plot), found)
    result = {
        "command": " ".join(sys.argv),
        "machine": machine(),
        "wall_s": time.perf_counter() - wall0,
        "cpu_s": time.process_time() - cpu0,
        "image": {
            "source": WHEEL,
            "member": MEMBER.format("ADF"),
            "raw_shape": list(raw.shape),
            "pixel_nm": pixel_nm,
        },
        "weights": {
            name: {"version": card.version, "sha256": card.sha256}
            for name, card in (("sr", models.sr_card), ("defects", models.defects_card))
        },
        "partial": partial,
        "quarter_dose": quarter,
        "defects": found,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out} and {args.plot} ({result['wall_s']:.0f} s wall)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
