"""Draw docs/img/sem_samples.png: the SEM forward model, clean vs noisy, with and without charging.

.venv/bin/python scripts/sem_montage.py [--out docs/img/sem_samples.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from drivers.frame import ScanRegion
from simulators.sem import SEMConfig, SEMSimulator


def scan(sim: SEMSimulator, region: ScanRegion, dwell_s: float, n: int = 256):
    frame = sim.begin_frame(region, (n, n), dwell_s)
    data = np.stack([frame.next_line() for _ in range(n)])
    return data, frame.truth()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/img/sem_samples.png")
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    wide = ScanRegion(0.0, 0.0, 5e-6, 5e-6)
    sim = SEMSimulator(seed=args.seed)
    noisy, truth = scan(sim, wide, 1e-6)
    fast, _ = scan(sim, wide, 1e-7)
    found = sim.sample.features_in_box("particle", -2.5e-6, 2.5e-6, -2.5e-6, 2.5e-6)
    big = int(np.argmax(found.a_m))
    zoom = ScanRegion(float(found.x_m[big]), float(found.y_m[big]), 1e-6, 1e-6)
    zoom_clean = sim.render_clean(zoom, (256, 256))
    charged = SEMSimulator(
        SEMConfig(
            particle_materials=("Al2O3", "Au"), particle_material_weights=(0.7, 0.3), charging=True
        ),
        seed=args.seed,
    )
    for _ in range(5):
        charged_data, charged_truth = scan(charged, wide, 1e-6)
    panels = [
        (truth.clean, "clean (expected counts), 5 µm"),
        (noisy, "noisy, 1 µs dwell (~70 counts/px)"),
        (fast, "noisy, 0.1 µs dwell"),
        (zoom_clean, "clean, 1 µm around the largest particle"),
        (truth.extra["particle_mask"], "ground truth: particle mask"),
        (charged_truth.clean, "clean, 70 % Al2O3 particles"),
        (charged_data, "charging on: 5th frame, 1 µs"),
        (charged_data - charged_truth.clean, "charging artefacts (data − clean)"),
    ]
    fig, axes = plt.subplots(2, 4, figsize=(16, 8.8))
    for ax, (image, title) in zip(axes.ravel(), panels, strict=True):
        image = np.asarray(image, dtype=np.float64)
        lo, hi = np.percentile(image, [0.5, 99.5])
        ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, origin="lower")
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"sim:sem forward model (seed {args.seed}; 100 pA, 2 nm probe, 256²)")
    fig.tight_layout(h_pad=2.0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
