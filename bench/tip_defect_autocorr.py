"""Does the autocorrelation of a *defect map* show the double tips that tip net 1.2 misses?

    python bench/tip_defect_autocorr.py          # the table in docs/benchmarks.md

For every double/multiple-tip frame of the bench's test sets (the 40 heldout + 40 shifted seeds of
``bench/tip_double_visibility.py``), the frame and its good-tip twin (same seed: same surface,
drift and noise, no second apex) are turned into a defect map, and the map's autocorrelation is
read at the second apex's offset (the simulator's ``apexes_m``) and over all lags a second apex
could have (a detector that does not know the offset).

Defect map (each ``(H, W)`` frame in its own pixels, 256² here):

1. plane and per-line median removed (line noise), then a band-pass: the frame minus its
   Gaussian blur of ``--lowpass-px`` (herringbone, steps, 1/f noise out);
2. the lattice notched out: Fourier bins whose power exceeds ``--notch-factor`` times the
   smoothed local spectrum (Gaussian of ``--notch-smooth-px`` on the log power), dilated by one
   bin, are set to zero (their inverse is the "lattice" image);
3. ``map="notch"``: the rest; ``map="sigma"``: only its pixels beyond ``--k-sigma`` robust σ
   (the others zero).

Autocorrelation: circular (FFT), divided by its zero lag. Per frame and map:

- ``at_apex``: its largest value within ±1 px of the main second apex's lag (the extra apex
  highest above the main one, i.e. the strongest ghost), frame and twin;
- ``blind``: a z-score, the largest value over lags ``--lag-nm`` from zero (the simulator's
  second apexes are 0.7-2.4 nm away) outside the lattice's own lags (where the lattice image's
  autocorrelation exceeds ``--lattice-ac``), minus the median over those lags, over their robust
  spread — what a detector that does not know the offset could use.

Separation of double vs twin over the 80 pairs: ROC AUC (all doubles against all twins), the
fraction of pairs where the double scores higher, and the doubles above the twins' 95th
percentile. CPU cost (``time.thread_time``) of map + autocorrelation + both scores per frame.
Writes ``rows.json`` / ``summary.json`` under ``--out-dir`` and the plot ``--plot``. Fully fixed
by the seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.perception.tasks import tip as tip_task  # noqa: E402
from agent.perception.tip_data import STATES, TipRecipe, sample_with_truth  # noqa: E402
from bench._common import run_facts, write_json  # noqa: E402
from bench.tip_double_visibility import pair_sets  # noqa: E402
from drivers.frame import TipState  # noqa: E402

MAPS = ("highpass", "notch", "sigma")
GOOD = STATES.index(TipState.GOOD)


@dataclasses.dataclass(frozen=True)
class MapConfig:
    lowpass_px: float = 6.0
    notch_factor: float = 20.0
    notch_smooth_px: float = 4.0
    notch_keep_px: int = 3  # Fourier bins this close to zero frequency are left alone
    k_sigma: float = 3.0
    lag_nm: tuple[float, float] = (0.5, 2.6)
    lattice_ac: float = 0.2


def _levelled(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image, dtype=np.float64)
    h, w = img.shape
    y = np.arange(h) - (h - 1) / 2
    x = np.arange(w) - (w - 1) / 2
    img = img - (y @ img.mean(axis=1)) / (y @ y) * y[:, None]
    img = img - (img.mean(axis=0) @ x) / (x @ x) * x[None, :]
    return img - np.median(img, axis=1, keepdims=True)


def defect_maps(image: np.ndarray, cfg: MapConfig) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``(H, W)`` frame -> the maps of :data:`MAPS` (float64, each ``(H, W)``) and the lattice
    image (the notched-out part)."""
    from scipy.ndimage import binary_dilation, gaussian_filter

    flat = _levelled(image)
    band = flat - gaussian_filter(flat, cfg.lowpass_px, mode="nearest")
    spec = np.fft.fft2(band)
    logp = np.fft.fftshift(np.log(np.abs(spec) ** 2 + 1e-300))
    background = gaussian_filter(logp, cfg.notch_smooth_px, mode="wrap")
    peaks = logp - background > np.log(cfg.notch_factor)
    h, w = band.shape
    fy, fx = np.mgrid[0:h, 0:w]
    peaks &= np.hypot(fy - h // 2, fx - w // 2) > cfg.notch_keep_px
    peaks = np.fft.ifftshift(binary_dilation(peaks, iterations=1))
    lattice = np.fft.ifft2(np.where(peaks, spec, 0)).real
    notch = np.fft.ifft2(np.where(peaks, 0, spec)).real
    spread = 1.4826 * float(np.median(np.abs(notch - np.median(notch))))
    sigma = np.where(np.abs(notch) > cfg.k_sigma * max(spread, 1e-300), notch, 0.0)
    return {"highpass": band, "notch": notch, "sigma": sigma}, lattice


def autocorrelation(image: np.ndarray) -> np.ndarray:
    """Circular autocorrelation of ``image`` minus its mean, zero lag at ``(H//2, W//2)``,
    divided by the zero lag (zeros for a constant image)."""
    z = image - image.mean()
    spec = np.fft.fft2(z)
    ac = np.fft.fftshift(np.fft.ifft2(np.abs(spec) ** 2).real)
    h, w = ac.shape
    zero = ac[h // 2, w // 2]
    return ac / zero if zero > 0 else np.zeros_like(ac)


def apex_lag_px(apexes_m: list[list[float]], pixel_size_nm: float) -> tuple[float, float]:
    """(row, column) lag of the strongest ghost: the extra apex highest above the main one."""
    main = apexes_m[0]
    extra = min(apexes_m[1:], key=lambda a: a[2])
    px_m = pixel_size_nm * 1e-9
    return (extra[1] - main[1]) / px_m, (extra[0] - main[0]) / px_m


def score(
    image: np.ndarray,
    pixel_size_nm: float,
    lag: tuple[float, float],
    cfg: MapConfig,
    maps_wanted: tuple[str, ...] = MAPS,
) -> dict[str, dict[str, float]]:
    """Per map of ``maps_wanted``: ``at_apex`` (largest AC within ±1 px of ``lag``; the
    autocorrelation is symmetric, so ``-lag`` reads the same) and ``blind``."""
    maps, lattice = defect_maps(image, cfg)
    lat_ac = autocorrelation(lattice)
    h, w = image.shape
    ly, lx = np.mgrid[0:h, 0:w]
    r_nm = np.hypot(ly - h // 2, lx - w // 2) * pixel_size_nm
    window = (r_nm >= cfg.lag_nm[0]) & (r_nm <= cfg.lag_nm[1]) & (lat_ac < cfg.lattice_ac)
    cy, cx = round(h // 2 + lag[0]), round(w // 2 + lag[1])
    out = {}
    for name in maps_wanted:
        ac = autocorrelation(maps[name])
        at = float(ac[cy - 1 : cy + 2, cx - 1 : cx + 2].max())
        vals = ac[window]
        med = float(np.median(vals))
        mad = max(1.4826 * float(np.median(np.abs(vals - med))), 1e-12)
        out[name] = {"at_apex": at, "blind": (float(vals.max()) - med) / mad}
    return out


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC area: P(a double scores above a twin), ties half."""
    pos, neg = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def simulate(job: tuple[str, TipRecipe, int]) -> dict[str, Any]:
    name, recipe, seed = job
    s, truth = sample_with_truth(recipe, seed)
    if s.good_twin is None:
        raise RuntimeError(f"seed {seed}: no good-tip twin (recipe.pairs must be on)")
    return {
        "set": name,
        "seed": seed,
        "surface": s.surface,
        "pixel_size_nm": s.pixel_size_nm,
        "label": int(s.label),
        "apexes_m": truth.extra["apexes_m"],
        "_data": s.data,
        "_twin": s.good_twin,
    }


def separation(
    rows: list[dict[str, Any]], key: str, reference: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """How ``key`` (``"<map>.<stat>"``) separates the doubles of ``rows`` from their twins;
    ``twin_p95`` (a threshold passing 5 % of good tips) from the twins of ``reference``."""
    f = np.array([r["frame"][key] for r in rows])
    t = np.array([r["twin"][key] for r in rows])
    p95 = float(np.percentile([r["twin"][key] for r in (reference or rows)], 95))
    return {
        "pairs": len(rows),
        "auc": auc(f, t),
        "pair_win": float(np.mean(f > t)),
        "frame_median": float(np.median(f)),
        "twin_median": float(np.median(t)),
        "twin_p95": p95,
        "frames_above_twin_p95": int(np.sum(f > p95)),
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [f"{m}.{stat}" for m in MAPS for stat in ("at_apex", "blind")]
    out: dict[str, Any] = {}
    groups = {
        "heldout": [r for r in rows if r["set"] == "heldout"],
        "shifted": [r for r in rows if r["set"] == "shifted"],
        "both": rows,
    }
    for name, group in groups.items():
        out[name] = {k: separation(group, k) for k in keys}
    misread = [r for r in rows if r["read12"] == "good"]
    # the misread pairs' thresholds come from all 80 twins (12 twins give no 95th percentile)
    out["misread_by_1.2"] = {
        "seeds": [r["seed"] for r in misread],
        **{k: separation(misread, k, rows) for k in keys},
    }
    return out


def cost_ms(rows: list[dict[str, Any]], cfg: MapConfig, repeats: int) -> dict[str, float]:
    """CPU (thread) time per 256² frame of the notch map with both scores, and of all maps."""
    out = {}
    for what, wanted in (("notch_only_ms", ("notch",)), ("all_maps_ms", MAPS)):
        times = []
        for _ in range(repeats):
            for r in rows:
                c = time.thread_time()
                score(r["_data"], r["pixel_size_nm"], r["lag_px"], cfg, wanted)
                times.append(time.thread_time() - c)
        out[what] = 1000.0 * float(np.median(times))
    return out


def plot(rows: list[dict[str, Any]], summary: dict[str, Any], cfg: MapConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 2, figsize=(12, 10))
    axes = grid.ravel()
    markers = {"heldout": "o", "shifted": "s"}

    def colour(r: dict[str, Any]) -> str:
        return {"good": "tab:red", "multiple": "tab:green"}.get(r["read12"], "tab:orange")

    for ax, key, title, log in (
        (axes[0], "notch.at_apex", "notch map: AC at the second apex's lag (±1 px)", False),
        (axes[1], "notch.blind", "notch map: blind score (max z over 0.5-2.6 nm lags)", True),
    ):
        for name, m in markers.items():
            xs = [r for r in rows if r["set"] == name]
            ax.scatter(
                [r["twin"][key] for r in xs],
                [r["frame"][key] for r in xs],
                c=[colour(r) for r in xs],
                marker=m,
                s=30,
                edgecolors="k",
                linewidths=0.4,
                label=name,
            )
        lo = min(min(r["twin"][key], r["frame"][key]) for r in rows)
        hi = max(max(r["twin"][key], r["frame"][key]) for r in rows)
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls=":")
        ax.set_xlabel("good-tip twin")
        ax.set_ylabel("double-tip frame")
        both = summary["both"][key]
        ax.set_title(f"{title}\nAUC {both['auc']:.3f}; red: 1.2 reads good, green: double")
        ax.legend(fontsize=8)

    ax = axes[2]
    for m, ls in zip(MAPS, ("-", "--", ":"), strict=True):
        for stat, col in (("at_apex", "tab:blue"), ("blind", "tab:purple")):
            key = f"{m}.{stat}"
            f = np.array([r["frame"][key] for r in rows])
            t = np.array([r["twin"][key] for r in rows])
            thr = np.sort(np.concatenate([f, t]))[::-1]
            tpr = [0.0] + [float(np.mean(f >= x)) for x in thr]
            fpr = [0.0] + [float(np.mean(t >= x)) for x in thr]
            ax.plot(
                fpr, tpr, ls=ls, color=col, label=f"{key} (AUC {summary['both'][key]['auc']:.2f})"
            )
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
    ax.set_xlabel("good-tip twins above threshold")
    ax.set_ylabel("double tips above threshold")
    ax.set_title("ROC over the 80 pairs (heldout + shifted)")
    ax.legend(fontsize=7, loc="lower right")

    ax = axes[3]
    pick = next((r for r in rows if r["read12"] == "good"), rows[0])
    cut = 48
    panels = []
    for which in ("_data", "_twin"):
        maps, _ = defect_maps(pick[which], cfg)
        ac = autocorrelation(maps["notch"])
        h, w = ac.shape
        panels.append(ac[h // 2 - cut : h // 2 + cut + 1, w // 2 - cut : w // 2 + cut + 1])
    both_img = np.concatenate([panels[0], np.full((panels[0].shape[0], 4), np.nan), panels[1]], 1)
    vmax = float(np.nanpercentile(np.abs(both_img), 99.5))
    ax.imshow(both_img, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    dy, dx = pick["lag_px"]
    for off in (0, 2 * cut + 1 + 4):
        for sgn in (1, -1):
            ax.scatter(
                [cut + sgn * dx + off], [cut + sgn * dy], s=120, facecolors="none", edgecolors="k"
            )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(
        f"{pick['seed']} {pick['surface']} (1.2 reads good): notch-map AC, ±{cut} px\n"
        "left: double-tip frame, right: good-tip twin; circles: ± second apex"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--frames", type=int, default=200, help="frames per test set, as the bench")
    p.add_argument("--heldout-seed0", type=int, default=tip_task.HELDOUT_SEED0)
    p.add_argument("--shifted-seed0", type=int, default=tip_task.SHIFTED_SEED0)
    p.add_argument("--weights-dir", help="tip net whose reading is recorded (default: shipped)")
    p.add_argument("--lowpass-px", type=float, default=MapConfig.lowpass_px)
    p.add_argument("--notch-factor", type=float, default=MapConfig.notch_factor)
    p.add_argument("--notch-smooth-px", type=float, default=MapConfig.notch_smooth_px)
    p.add_argument("--k-sigma", type=float, default=MapConfig.k_sigma)
    p.add_argument("--lag-nm", type=float, nargs=2, default=MapConfig.lag_nm)
    p.add_argument("--lattice-ac", type=float, default=MapConfig.lattice_ac)
    p.add_argument("--cost-repeats", type=int, default=3, help="timing passes over the frames")
    p.add_argument("--out-dir", default="bench/out/tip_double")
    p.add_argument("--plot", default="docs/img/tip_defect_autocorr.png")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    import torch
    from tqdm import tqdm

    from agent.perception.registry import WEIGHTS_DIR
    from agent.perception.tip_net import TipModel

    torch.set_num_threads(1)
    cfg = MapConfig(
        lowpass_px=args.lowpass_px,
        notch_factor=args.notch_factor,
        notch_smooth_px=args.notch_smooth_px,
        k_sigma=args.k_sigma,
        lag_nm=(args.lag_nm[0], args.lag_nm[1]),
        lattice_ac=args.lattice_ac,
    )
    sets = pair_sets(args.frames, args.heldout_seed0, args.shifted_seed0)
    jobs = [
        (name, recipe, seed)
        for name, recipe in sets.items()
        for seed in range(*recipe.seeds)
        if STATES[seed % len(STATES)] is TipState.MULTIPLE
    ]
    model = TipModel.load(args.weights_dir or WEIGHTS_DIR)
    t0, c0 = time.perf_counter(), time.process_time()
    rows = []
    for job in tqdm(jobs, desc="double tips", unit="pair", disable=args.quiet):
        row = simulate(job)
        probs, _ = model.probabilities(model.prepare(row["_data"], row["pixel_size_nm"]))
        row["p_good12"] = float(probs[GOOD])
        row["read12"] = str(STATES[int(np.argmax(probs))])
        lag = apex_lag_px(row["apexes_m"], row["pixel_size_nm"])
        row["lag_px"] = [float(lag[0]), float(lag[1])]
        row["apex_dist_nm"] = float(np.hypot(*lag)) * row["pixel_size_nm"]
        for which, key in (("frame", "_data"), ("twin", "_twin")):
            got = score(row[key], row["pixel_size_nm"], lag, cfg)
            row[which] = {f"{m}.{stat}": v for m, d in got.items() for stat, v in d.items()}
        rows.append(row)
    summary = summarise(rows)
    cost = cost_ms(rows, cfg, args.cost_repeats)
    plot(rows, summary, cfg, Path(args.plot))
    for r in rows:
        r.pop("_data")
        r.pop("_twin")
    result = {
        **run_facts("bench/tip_defect_autocorr.py", argv or sys.argv[1:], t0, c0),
        "config": dataclasses.asdict(cfg),
        "tip_net": f"{model.card.version}+{model.card.sha256[:8]}",
        "cpu_ms_per_256_frame": cost,
        "summary": summary,
    }
    write_json(
        args.out_dir,
        {"defect_autocorr_rows.json": rows, "defect_autocorr_summary.json": result},
    )
    if not args.quiet:
        print(json.dumps({k: v for k, v in result.items() if k != "summary"}, indent=1))
        for group, seps in summary.items():
            for key, sep in seps.items():
                if key != "seeds":
                    print(
                        f"{group:15s} {key:18s} AUC {sep['auc']:.3f}  pair win "
                        f"{sep['pair_win']:.2f}  median {sep['frame_median']:.3g} vs "
                        f"{sep['twin_median']:.3g}  above twin p95 "
                        f"{sep['frames_above_twin_p95']}/{sep['pairs']}"
                    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
