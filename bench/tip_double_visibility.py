"""How visible are the double tips the tip network reads as good?

    python bench/tip_double_visibility.py                    # the table in docs/benchmarks.md
    python bench/tip_double_visibility.py --weights-dir DIR  # another tip net, same frames

For every double/multiple-tip frame of the bench's test sets (``bench/perception_tip.py``: the
heldout seeds from 20,000,000 with the training parameters, the shifted ones from 30,000,000;
every fifth seed is a double tip), the frame is simulated with its good-tip twin (same seed:
same surface, drift and noise, so ``frame - twin`` is the second apex's doing alone, see
:mod:`agent.perception.tip_data`) and the simulator's apex geometry. Per frame:

- ``rms_sigma``: RMS of ``frame - twin`` (each line's median difference removed, as the label
  rule does) over the frame's white-noise σ: the double tip's signature per pixel;
- ``mf_snr``: the matched-filter SNR, ``||frame - twin|| / σ`` (the signature's energy over
  the noise of one pixel; what an observer who knew the exact signature could reach);
- ``shown``: pixels where the two differ by more than 3 σ (the label rule's count; a double tip
  with fewer than 16 is labelled good), ``p99_sigma``: the 99th percentile of ``|frame - twin|``
  over σ, ``contrast``: RMS of the signature over the RMS of the good-tip image (line medians
  removed): the ghost's strength against the surface's own corrugation;
- the second apex: lateral distance (nm), height above the main apex (pm), number of extra
  apexes (the one nearest in height when there are two);
- the network's frame read-out: P(good) and the state it reads.

Writes ``rows.json`` and ``summary.json`` under ``--out-dir`` and the plot ``--plot``. All
frames are fixed by the seeds; the result does not depend on ``--workers``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.perception.tasks import tip as tip_task  # noqa: E402
from agent.perception.tip_data import (  # noqa: E402
    STATES,
    VISIBLE_SIGMAS,
    TipRecipe,
    _options,
    _scan,
    sample_with_truth,
)
from bench._common import run_facts, write_json  # noqa: E402
from drivers.frame import ScanRegion, TipState  # noqa: E402

DOUBLE = STATES.index(TipState.MULTIPLE)
GOOD = STATES.index(TipState.GOOD)
MARGIN = 40  # pixels: the shift search's range and the edge left out of its residual
BINS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, math.inf)  # rms_sigma bins of the binned table


def _flat(image: np.ndarray) -> np.ndarray:
    out = image.astype(np.float64)
    return out - np.median(out, axis=1, keepdims=True)


def noise_free(recipe: TipRecipe, seed: int, state: TipState) -> np.ndarray:
    """The frame of ``seed`` as :func:`sample` draws it, with ``state`` and no noise (white,
    1/f and line noise off; everything else the same seed draws)."""
    rng = np.random.default_rng([seed, 8_101])
    options = _options(recipe, rng)
    size_m = float(rng.uniform(*recipe.size_nm)) * 1e-9
    x_m, y_m = (float(v) for v in rng.uniform(-500e-9, 500e-9, 2))
    region = ScanRegion(x_m, y_m, size_m, size_m)
    quiet = {**options, "white_noise_m_per_sqrt_hz": 0.0, "line_noise_m": 0.0}
    frame = _scan(seed, state, quiet, region, recipe.shape_px, flicker_noise_m_per_decade=0.0)
    return frame.data.astype(np.float64)


def shift_invariant_rms(double: np.ndarray, good: np.ndarray) -> tuple[float, tuple[float, float]]:
    """RMS of what is left of the noise-free double-tip image after the best match by the
    noise-free good-tip image of the same place, shifted (sub-pixel, within ``MARGIN`` pixels),
    scaled and offset per line, over the frame's interior (``MARGIN`` pixels in from each edge):
    the part of the signature that no shift of a good-tip image explains. Returns it (m) and
    the shift (rows, columns)."""
    from scipy import ndimage, optimize

    d_img, g_img = _flat(double), _flat(good)
    inner = (slice(MARGIN, -MARGIN), slice(MARGIN, -MARGIN))
    g_fft = np.fft.fft2(g_img)

    def residual(shift: np.ndarray) -> float:
        g = np.fft.ifft2(ndimage.fourier_shift(g_fft, shift)).real[inner]
        d = d_img[inner]
        d = d - d.mean(axis=1, keepdims=True)
        g = g - g.mean(axis=1, keepdims=True)
        scale = float(np.sum(d * g) / max(float(np.sum(g * g)), 1e-300))
        return float(np.sqrt(np.mean((d - scale * g) ** 2)))

    corr = np.fft.ifft2(np.fft.fft2(d_img - d_img.mean()) * np.conj(g_fft)).real
    h, w = corr.shape
    starts = [np.zeros(2)]
    for k in np.argsort(corr.ravel())[::-1][:3]:
        dy, dx = np.unravel_index(int(k), corr.shape)
        dy, dx = (dy - h if dy > h // 2 else dy), (dx - w if dx > w // 2 else dx)
        if abs(dy) < MARGIN and abs(dx) < MARGIN:
            starts.append(np.array([dy, dx], dtype=np.float64))
    best = (residual(np.zeros(2)), (0.0, 0.0))
    for start in starts:
        fit = optimize.minimize(
            residual, start, method="Nelder-Mead", options={"xatol": 0.02, "fatol": 1e-18}
        )
        if abs(fit.x[0]) < MARGIN and abs(fit.x[1]) < MARGIN and fit.fun < best[0]:
            best = (float(fit.fun), (float(fit.x[0]), float(fit.x[1])))
    return best


def signature(recipe: TipRecipe, seed: int) -> dict[str, Any]:
    """Simulate the double-tip frame of ``seed`` and measure its signature against its twin."""
    s, truth = sample_with_truth(recipe, seed)
    if s.good_twin is None:
        raise RuntimeError(f"seed {seed}: no good-tip twin (recipe.pairs must be on)")
    sigma = s.noise_sigma_m
    d = _flat(s.data.astype(np.float64) - s.good_twin)
    g = _flat(s.good_twin)
    clean_good = noise_free(recipe, seed, TipState.GOOD)
    clean_double = noise_free(recipe, seed, TipState.MULTIPLE)
    # the noise-free pair must give the same signature (the noise is additive and the same)
    check = float(np.max(np.abs(_flat(clean_double - clean_good) - d))) / sigma
    noise_rms = float(np.sqrt(np.mean(_flat(s.good_twin - clean_good) ** 2)))
    rest, shift = shift_invariant_rms(clean_double, clean_good)
    extra = [a for a in truth.extra["apexes_m"][1:]]
    nearest = min(extra, key=lambda a: a[2]) if extra else [0.0, 0.0, 0.0, 0.0]
    rms = float(np.sqrt(np.mean(d**2)))
    return {
        "seed": seed,
        "surface": s.surface,
        "pixel_size_nm": s.pixel_size_nm,
        "label": int(s.label),
        "sim_label": int(s.sim_label if s.sim_label is not None else s.label),
        "sigma_pm": sigma * 1e12,
        "rms_sigma": rms / sigma,
        "mf_snr": float(np.sqrt(np.sum(d**2))) / sigma,
        "shown": int(np.sum(np.abs(d) > VISIBLE_SIGMAS * sigma)),
        "p99_sigma": float(np.percentile(np.abs(d), 99)) / sigma,
        "contrast": rms / float(np.sqrt(np.mean(g**2))),
        "noise_rms_sigma": noise_rms / sigma,
        "rms_noise": rms / noise_rms,
        "shift_invariant_sigma": rest / sigma,
        "best_shift_px": list(shift),
        "noise_free_check_sigma": check,
        "extra_apexes": len(extra),
        "apex_dist_nm": float(math.hypot(nearest[0], nearest[1])) * 1e9,
        "apex_dz_pm": float(nearest[2]) * 1e12,
        "_data": s.data,
    }


def _signature_job(args: tuple[TipRecipe, int]) -> dict[str, Any]:
    return signature(*args)


def measure(
    sets: dict[str, TipRecipe],
    weights_dir: str | None,
    workers: int,
    progress: bool,
    also: str | None = None,
) -> tuple[list[dict[str, Any]], str, str | None]:
    """Rows per double-tip frame, and the tip nets' ``version+sha`` that read them (``also``: a
    second net's reading of the same frames, as ``also_p_good`` and ``also_read``)."""
    import torch
    from tqdm import tqdm

    from agent.perception.registry import WEIGHTS_DIR
    from agent.perception.tip_net import TipModel

    torch.set_num_threads(1)
    model = TipModel.load(weights_dir or WEIGHTS_DIR)
    other = TipModel.load(also) if also else None
    jobs = [
        (name, recipe, seed)
        for name, recipe in sets.items()
        for seed in range(*recipe.seeds)
        if STATES[seed % len(STATES)] is TipState.MULTIPLE
    ]
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(workers, mp_context=context)
        results = pool.map(_signature_job, [(r, s) for _, r, s in jobs], chunksize=4)
    else:
        pool = None
        results = map(_signature_job, [(r, s) for _, r, s in jobs])
    rows = []
    try:
        for (set_name, _, _), row in tqdm(
            zip(jobs, results, strict=True),
            total=len(jobs),
            desc="double tips",
            unit="frame",
            disable=not progress,
        ):
            data = row.pop("_data")
            probs, _ = model.probabilities(model.prepare(data, row["pixel_size_nm"]))
            row["set"] = set_name
            row["p_good"] = float(probs[GOOD])
            row["p_double"] = float(probs[DOUBLE])
            row["read"] = str(STATES[int(np.argmax(probs))])
            if other is not None:
                probs, _ = other.probabilities(other.prepare(data, row["pixel_size_nm"]))
                row["also_p_good"] = float(probs[GOOD])
                row["also_read"] = str(STATES[int(np.argmax(probs))])
            rows.append(row)
    finally:
        if pool is not None:
            pool.shutdown()

    def tag(m: TipModel) -> str:
        return f"{m.card.version}+{m.card.sha256[:8]}"

    return rows, tag(model), tag(other) if other is not None else None


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in sorted({r["set"] for r in rows}, key=lambda n: n != "heldout"):
        mine = [r for r in rows if r["set"] == name]
        labelled = [r for r in mine if r["label"] == DOUBLE]
        misread = [r for r in labelled if r["read"] == "good"]
        right = [r for r in labelled if r["read"] == "multiple"]

        def q(xs: list[dict[str, Any]], key: str) -> list[float] | None:
            if not xs:
                return None
            v = np.array([x[key] for x in xs])
            return [float(np.min(v)), float(np.median(v)), float(np.max(v))]

        out[name] = {
            "double_frames": len(mine),
            "labelled_good_not_visible": len(mine) - len(labelled),
            "labelled_double": len(labelled),
            "read_double": len(right),
            "read_good": len(misread),
            "read_other": len(labelled) - len(right) - len(misread),
            "misread_seeds": [r["seed"] for r in misread],
            "also_read_double": sum(r.get("also_read") == "multiple" for r in labelled),
            "also_read_good": sum(r.get("also_read") == "good" for r in labelled),
            "also_misread_seeds": [r["seed"] for r in labelled if r.get("also_read") == "good"],
            "rms_sigma_misread_min_median_max": q(misread, "rms_sigma"),
            "rms_sigma_read_double_min_median_max": q(right, "rms_sigma"),
            "mf_snr_misread_min_median_max": q(misread, "mf_snr"),
            "mf_snr_read_double_min_median_max": q(right, "mf_snr"),
            "contrast_misread_min_median_max": q(misread, "contrast"),
            "shift_invariant_sigma_misread_min_median_max": q(misread, "shift_invariant_sigma"),
            "shift_invariant_sigma_read_double_min_median_max": q(right, "shift_invariant_sigma"),
            "rms_noise_misread_min_median_max": q(misread, "rms_noise"),
            "rms_noise_read_double_min_median_max": q(right, "rms_noise"),
            "contrast_read_double_min_median_max": q(right, "contrast"),
            "labelled_double_below_1_sigma": float(
                np.mean([r["rms_sigma"] < 1.0 for r in labelled])
            )
            if labelled
            else None,
            "misread_below_1_sigma": sum(r["rms_sigma"] < 1.0 for r in misread),
            "labelled_double_shift_invariant_below_1_sigma": float(
                np.mean([r["shift_invariant_sigma"] < 1.0 for r in labelled])
            )
            if labelled
            else None,
            "misread_shift_invariant_below_1_sigma": sum(
                r["shift_invariant_sigma"] < 1.0 for r in misread
            ),
            "labelled_double_below_1_total_noise": float(
                np.mean([r["rms_noise"] < 1.0 for r in labelled])
            )
            if labelled
            else None,
            "misread_below_1_total_noise": sum(r["rms_noise"] < 1.0 for r in misread),
            "max_noise_free_check_sigma": max(r["noise_free_check_sigma"] for r in mine),
            "by_rms_sigma": [
                {
                    "bin": [lo, hi],
                    "labelled_double": len(b),
                    "read_good": sum(r["read"] == "good" for r in b),
                }
                for lo, hi in itertools.pairwise(BINS)
                for b in [[r for r in labelled if lo <= r["rms_sigma"] < hi]]
            ],
        }
    return out


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 2, figsize=(12, 9))
    axes = grid.ravel()
    markers = {"heldout": "o", "shifted": "s"}
    lab = [r for r in rows if r["label"] == DOUBLE]
    hidden = [r for r in rows if r["label"] != DOUBLE]

    def colour(r: dict[str, Any]) -> str:
        return {"good": "tab:red", "multiple": "tab:green"}.get(r["read"], "tab:orange")

    def dots(ax: Any, xs: list[dict[str, Any]], x: str, y: str, marker: str, **kw: Any) -> None:
        """``xs`` as points (``x``, ``y``) coloured by their reading unless ``kw`` says."""
        kw.setdefault("c", [colour(r) for r in xs])
        ax.scatter(
            [r[x] for r in xs],
            [r[y] for r in xs],
            marker=marker,
            s=30,
            edgecolors="k",
            linewidths=0.4,
            **kw,
        )

    ax = axes[0]
    for name, m in markers.items():
        xs = [r for r in lab if r["set"] == name]
        dots(ax, xs, "rms_sigma", "p_good", m, label=f"{name} (labelled double)")
        hs = [r for r in hidden if r["set"] == name]
        ax.scatter(
            [r["rms_sigma"] for r in hs],
            [r["p_good"] for r in hs],
            facecolors="none",
            edgecolors="grey",
            marker=m,
            s=30,
            label=f"{name} (not visible: labelled good)",
        )
    ax.axvline(1.0, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("RMS(frame − good twin) / white-noise σ")
    ax.set_ylabel("P(good), frame read-out")
    ax.set_title("red: read as good, green: double, orange: other")
    ax.legend(fontsize=7, loc="center right")

    ax = axes[1]
    edges = np.array([0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 40.0])
    for name, m in markers.items():
        xs = [r for r in lab if r["set"] == name]
        v = np.array([r["rms_sigma"] for r in xs])
        good = np.array([r["read"] == "good" for r in xs])
        centres, frac, counts = [], [], []
        for lo, hi in itertools.pairwise(edges):
            inside = (v >= lo) & (v < hi)
            if inside.any():
                centres.append(math.sqrt(lo * hi))
                frac.append(float(good[inside].mean()))
                counts.append(int(inside.sum()))
        ax.plot(centres, frac, marker=m, label=name)
        for c, f, n in zip(centres, frac, counts, strict=True):
            ax.annotate(str(n), (c, f), textcoords="offset points", xytext=(3, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_ylim(-0.05, 1.05)
    ax.axvline(1.0, color="grey", ls=":", lw=1)
    ax.set_xlabel("RMS(frame − good twin) / σ (bins; n beside each point)")
    ax.set_ylabel("fraction read as good")
    ax.set_title("labelled double tips read as good")
    ax.legend(fontsize=8)

    ax = axes[2]
    for name, m in markers.items():
        xs = [r for r in lab if r["set"] == name]
        dots(ax, xs, "shift_invariant_sigma", "p_good", m, label=name)
    ax.axvline(1.0, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("noise-free residual after the best shifted, scaled good-tip image / σ")
    ax.set_ylabel("P(good), frame read-out")
    ax.set_title("what no shift of a good-tip image explains")
    ax.legend(fontsize=8)

    ax = axes[3]
    for name, m in markers.items():
        xs = [r for r in rows if r["set"] == name]
        shades = [colour(r) if r["label"] == DOUBLE else "lightgrey" for r in xs]
        dots(ax, xs, "apex_dist_nm", "apex_dz_pm", m, c=shades)
    ax.set_xlabel("second apex: lateral distance (nm)")
    ax.set_ylabel("second apex: height above the main apex (pm)")
    ax.set_title("apex geometry (grey: not visible, labelled good)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_examples(
    rows: list[dict[str, Any]], sets: dict[str, TipRecipe], count: int, path: Path
) -> None:
    """The first ``count`` labelled double tips of the heldout set read as good: frame, good
    twin and their difference (the top-left 128² of each; line medians removed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picked = [r for r in rows if r["set"] == "heldout" and r["label"] == DOUBLE]
    picked = [r for r in picked if r["read"] == "good"][:count]
    if not picked:
        return
    fig, axes = plt.subplots(len(picked), 3, figsize=(10, 3.4 * len(picked)), squeeze=False)
    for row, ax in zip(picked, axes, strict=True):
        s, _ = sample_with_truth(sets["heldout"], row["seed"])
        twin = s.good_twin if s.good_twin is not None else s.data
        panels = (
            (s.data, "double tip"),
            (twin, "good-tip twin"),
            (s.data.astype(np.float64) - twin, "difference"),
        )
        for a, (img, what) in zip(ax, panels, strict=True):
            a.imshow(_flat(img)[:128, :128], cmap="gray")
            a.set_xticks([])
            a.set_yticks([])
            a.set_title(
                f"{row['seed']} {row['surface']}: {what}"
                + (
                    f"\nRMS {row['rms_sigma']:.1f} σ, P(good) {row['p_good']:.2f}"
                    if what == "difference"
                    else ""
                ),
                fontsize=9,
            )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=70)
    plt.close(fig)


def pair_sets(frames: int, heldout_seed0: int, shifted_seed0: int) -> dict[str, TipRecipe]:
    """The bench's two test sets (``frames`` each, from those seeds), each frame simulated with
    its good-tip twin."""
    import dataclasses

    return {
        "heldout": dataclasses.replace(
            tip_task.heldout_recipe(frames),
            seeds=(heldout_seed0, heldout_seed0 + frames),
            pairs=True,
        ),
        "shifted": dataclasses.replace(tip_task.shifted_recipe(frames, shifted_seed0), pairs=True),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=200, help="frames per test set, as the bench")
    p.add_argument("--heldout-seed0", type=int, default=tip_task.HELDOUT_SEED0)
    p.add_argument("--shifted-seed0", type=int, default=tip_task.SHIFTED_SEED0)
    p.add_argument("--weights-dir", help="tip net directory (default: the package's)")
    p.add_argument(
        "--also-weights-dir", help="a second tip net read on the same frames (also_* columns)"
    )
    p.add_argument("--workers", type=int, default=2, help="simulation processes (same frames)")
    p.add_argument("--out-dir", default="bench/out/tip_double")
    p.add_argument("--plot", default="docs/img/tip_double_visibility.png")
    p.add_argument(
        "--examples",
        type=int,
        default=3,
        help="heldout double tips read as good to show (frame, twin, difference; 0: none)",
    )
    p.add_argument("--examples-plot", default="docs/img/tip_double_examples.png")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    sets = pair_sets(args.frames, args.heldout_seed0, args.shifted_seed0)
    t0, c0 = time.perf_counter(), time.process_time()
    rows, net, also_net = measure(
        sets, args.weights_dir, args.workers, not args.quiet, args.also_weights_dir
    )
    summary = summarise(rows)
    result = {
        **run_facts("bench/tip_double_visibility.py", argv or sys.argv[1:], t0, c0),
        "tip_net": net,
        "also_tip_net": also_net,
        "summary": summary,
    }
    write_json(args.out_dir, {"rows.json": rows, "summary.json": result})
    plot(
        rows,
        Path(args.plot),
        f"Double/multiple tips of the bench's test sets (tip net {result['tip_net']}): "
        "signature strength against the network's reading",
    )
    if args.examples > 0:
        plot_examples(rows, sets, args.examples, Path(args.examples_plot))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
