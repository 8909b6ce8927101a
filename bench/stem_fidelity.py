"""Fidelity and speed of the fast HAADF-STEM model against abTEM multislice on MoS2.

    /tmp/venv/bin/python bench/stem_fidelity.py            # 48 x 48 scan, PRISM, ~2-4 min
    /tmp/venv/bin/python bench/stem_fidelity.py --method multislice --size 32

Needs the optional extra (``pip install 'scopepilot[multislice]'``). One seeded 2H-MoS2
monolayer (the simulator's default configuration: 80 kV, α = 25 mrad, Δf = 0, Cs = 1 µm, source
0.4 Å FWHM, thermal σ 0.075 Å, defects as generated) is imaged over the same scan grid twice:

- ``fast``: ``STEMSimulator.scattered_fraction`` (noise-free, no drift, jitter or flyback);
- ``abTEM``: :func:`simulators.stem_multislice.render_simulator`: the same atoms (defects
  included) in a box 2 x margin larger than the region, the same probe (hard aperture, same
  aberrations), a 70-200 mrad annular detector, the same source and thermal blur.

Both run in this process, one after the other. Printed: the abTEM settings, the Pearson r of
the two images, the shift between them from cross-correlation (it should be 0: the grids share
their pixel centres), both times and the speed ratio, the mean scattered fractions and the
Mo / S2 column contrast of each. Target (issue 3): r >= 0.95 at >= 1000x speed. Writes a
side-by-side picture to bench/out/stem_fidelity.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import scipy.fft

from bench._common import machine
from drivers.frame import ScanRegion
from simulators.stem import STEMConfig, STEMSimulator
from simulators.stem_multislice import MultisliceSettings, import_abtem, render_simulator

OUT = Path(__file__).resolve().parent / "out"
ANG = 1e-10


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def shift_px(a: np.ndarray, b: np.ndarray, *, upsample: int = 20) -> tuple[float, float]:
    """(rows, cols) shift of ``b`` relative to ``a`` at the cross-correlation peak, refined to
    1/``upsample`` pixel by a parabola through the peak and its neighbours."""
    fa = scipy.fft.fft2(a - a.mean())
    fb = scipy.fft.fft2(b - b.mean())
    xc = scipy.fft.ifft2(fb * np.conj(fa)).real
    peak = np.unravel_index(int(np.argmax(xc)), xc.shape)
    out = []
    for axis, p in enumerate(peak):
        n = xc.shape[axis]
        idx = [int(peak[0]), int(peak[1])]
        vals = []
        for d in (-1, 0, 1):
            idx[axis] = (int(p) + d) % n
            vals.append(xc[idx[0], idx[1]])
        denom = vals[0] - 2 * vals[1] + vals[2]
        frac = 0.5 * (vals[0] - vals[2]) / denom if denom != 0 else 0.0
        s = int(p) if p <= n // 2 else int(p) - n
        out.append(round((s + frac) * upsample) / upsample)
    return out[0], out[1]


def column_peaks(image: np.ndarray, uv_px: np.ndarray) -> np.ndarray:
    """Maximum of ``image`` within 1 pixel of each column at fractional (row, col) ``uv_px``."""
    h, w = image.shape
    out = np.full(uv_px.shape[0], np.nan)
    for k, (r, c) in enumerate(np.rint(uv_px).astype(int)):
        if 1 <= r < h - 1 and 1 <= c < w - 1:
            out[k] = image[r - 1 : r + 2, c - 1 : c + 2].max()
    return out


def contrast(image: np.ndarray, atoms_uv: dict[str, np.ndarray]) -> dict[str, float]:
    return {label: float(np.nanmean(column_peaks(image, uv))) for label, uv in atoms_uv.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=48, help="scan side in pixels")
    parser.add_argument("--pixel-ang", type=float, default=0.25, help="scan pitch (Å)")
    parser.add_argument("--method", choices=("prism", "multislice"), default="prism")
    parser.add_argument("--sampling-ang", type=float, default=0.05)
    parser.add_argument("--slice-ang", type=float, default=1.0)
    parser.add_argument("--margin-ang", type=float, default=6.0)
    parser.add_argument("--interpolation", type=int, default=1, help="PRISM interpolation")
    parser.add_argument("--phonons", type=int, default=0, help="frozen-phonon configurations")
    parser.add_argument("--defect-scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    abtem = import_abtem()
    # FFTW_MEASURE plans for up to a minute per transform size; the estimate is fast enough.
    abtem.config.set({"fftw.planning_effort": "FFTW_ESTIMATE"})
    print(f"machine: {machine()}")

    side = args.size
    shape = (side, side)
    region = ScanRegion(0.0, 0.0, side * args.pixel_ang * ANG, side * args.pixel_ang * ANG)
    config = STEMConfig(defect_density_scale=args.defect_scale)

    t0 = time.perf_counter()
    sim = STEMSimulator(config, seed=args.seed)
    fast = sim.scattered_fraction(region, shape)
    fast_cold_s = time.perf_counter() - t0
    runs = []
    for _ in range(20):
        t0 = time.perf_counter()
        sim.scattered_fraction(region, shape)
        runs.append(time.perf_counter() - t0)
    fast_s = float(np.median(runs))

    settings = MultisliceSettings(
        method=args.method,
        sampling_ang=args.sampling_ang,
        slice_thickness_ang=args.slice_ang,
        frozen_phonons=args.phonons,
        prism_interpolation=args.interpolation,
        margin_ang=args.margin_ang,
        seed=args.seed,
    )
    t0 = time.perf_counter()
    result = render_simulator(sim, region, shape, settings=settings)
    slow_s = time.perf_counter() - t0
    slow = result.fraction

    atoms = result.atoms
    box = atoms.cell.lengths()
    print(
        f"abTEM {abtem.__version__}: {settings.method}"
        + (f" (interpolation {settings.prism_interpolation})" if args.method == "prism" else "")
        + f", potential sampling {settings.sampling_ang} Å ({settings.parametrization}, infinite"
        f" projection), slices {settings.slice_thickness_ang} Å, box {box[0]:.1f} x {box[1]:.1f}"
        f" x {box[2]:.1f} Å ({len(atoms)} atoms, margin {settings.margin_ang} Å), detector"
        f" {settings.detector_mrad[0]:.0f}-{settings.detector_mrad[1]:.0f} mrad, frozen phonons"
        f" {settings.frozen_phonons}, float32, CPU"
    )
    print(
        f"probe: {sim.config.voltage_V / 1e3:.0f} kV, {sim.config.convergence_rad * 1e3:.0f} mrad"
        f" (hard aperture), defocus {sim.config.defocus_m / ANG:.0f} Å, Cs"
        f" {sim.config.cs_m * 1e3:.3g} mm, source {sim.config.source_fwhm_m / ANG:.2f} Å FWHM,"
        f" thermal σ {sim.config.thermal_sigma_m / ANG:.3f} Å"
        + (" (frozen phonons)" if args.phonons else " (an image blur, like the source)")
    )
    print(
        f"scan: {side} x {side} px at {args.pixel_ang} Å, lattice at"
        f" {sim.lattice_angle_deg:.1f}°, seed {args.seed}"
    )

    # Columns in image coordinates (fractional row, col) for the contrast numbers.
    margin = settings.margin_ang
    xy = atoms.positions[:, :2]
    uv = np.stack([(xy[:, 1] - margin) / args.pixel_ang - 0.5, (xy[:, 0] - margin) / args.pixel_ang
                   - 0.5], axis=1)  # fmt: skip
    key = np.round(xy, 2)
    _, first, count = np.unique(key, axis=0, return_index=True, return_counts=True)
    numbers = atoms.numbers
    labels = np.array(
        ["Mo" if numbers[i] == 42 and n == 1 else "S2" if numbers[i] == 16 and n == 2 else "other"
         for i, n in zip(first, count, strict=True)]
    )  # fmt: skip
    col_uv = {lab: uv[first[labels == lab]] for lab in ("Mo", "S2")}
    c_fast, c_slow = contrast(fast, col_uv), contrast(slow, col_uv)

    dy, dx = shift_px(fast, slow)
    r = pearson(fast, slow)
    print(f"shift of abTEM vs fast (cross-correlation): rows {dy:+.2f} px, cols {dx:+.2f} px")
    print(f"Pearson r (noise-free images): {r:.4f}   target >= 0.95")
    print(
        f"time: fast {fast_s * 1e3:.2f} ms per frame (first frame with set-up "
        f"{fast_cold_s * 1e3:.0f} ms), abTEM {slow_s:.1f} s"
    )
    print(
        f"speed ratio: {slow_s / fast_s:,.0f}x (vs. the first frame: {slow_s / fast_cold_s:,.0f}x)"
        "   target >= 1000x"
    )
    print(
        f"mean scattered fraction: fast {fast.mean():.4f}, abTEM {slow.mean():.4f} "
        f"(ratio {fast.mean() / slow.mean():.1f})"
    )
    for name, c in (("fast", c_fast), ("abTEM", c_slow)):
        print(
            f"column peaks {name}: Mo {c['Mo']:.4g}, S2 {c['S2']:.4g}, "
            f"Mo/S2 {c['Mo'] / c['S2']:.3f}"
        )

    OUT.mkdir(exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    extent = (0, side * args.pixel_ang, side * args.pixel_ang, 0)
    norm_fast = (fast - fast.mean()) / fast.std()
    norm_slow = (slow - slow.mean()) / slow.std()
    panels = (
        (fast, f"fast model ({fast_s * 1e3:.1f} ms)", "magma"),
        (slow, f"abTEM {args.method} ({slow_s:.0f} s)", "magma"),
        (norm_slow - norm_fast, f"abTEM − fast (z-scores), r = {r:.3f}", "RdBu_r"),
    )
    for ax, (img, title, cmap) in zip(axes, panels, strict=True):
        if cmap == "RdBu_r":
            lim = float(np.abs(img).max())
            im = ax.imshow(img, cmap=cmap, vmin=-lim, vmax=lim, extent=extent)
        else:
            im = ax.imshow(img, cmap=cmap, extent=extent)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("x (Å)")
        fig.colorbar(im, ax=ax, shrink=0.8)
    axes[0].set_ylabel("y (Å)")
    fig.suptitle("MoS2 monolayer, 80 kV, 25 mrad, HAADF 70-200 mrad: scattered fraction")
    fig.tight_layout()
    path = OUT / "stem_fidelity.png"
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
