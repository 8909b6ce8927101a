"""Draw docs/img/stem_specimens.png: the HAADF-STEM forward model per specimen.

.venv/bin/python scripts/stem_montage.py [--out docs/img/stem_specimens.png]

Columns: noise-free image (ground truth ``clean``), a noisy frame at the default dose (30 pA,
2 µs), the same at a 10 x higher dose, the defect class mask, and a 10 % spiral partial scan.
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
from matplotlib.colors import ListedColormap

from drivers.frame import ScanRegion
from simulators.stem import DEFECT_CLASSES, STEMConfig, STEMSimulator


def scan(sim: STEMSimulator, region: ScanRegion, n: int, dwell_s: float, **kw: object):
    frame = sim.begin_frame(region, (n, n), dwell_s, **kw)  # type: ignore[arg-type]
    data = np.stack([frame.next_line() for _ in range(n)])
    return data, frame.truth()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/img/stem_specimens.png")
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    n = 256
    region = ScanRegion(0.0, 0.0, 5e-9, 5e-9)
    specimens = ("mos2", "ws2", "graphene", "srtio3")
    titles = ("clean (truth)", "30 pA, 2 µs", "30 pA, 20 µs", "defect classes", "10 % spiral")
    fig, axes = plt.subplots(len(specimens), 5, figsize=(15, 12.4), constrained_layout=True)
    cmap = ListedColormap(["black", "tab:blue", "tab:orange", "tab:green"])
    for i, name in enumerate(specimens):
        config = STEMConfig(specimen=name, defect_density_scale=3.0)
        sim = STEMSimulator(config, seed=args.seed + i)  # one seed each: own defects
        noisy, truth = scan(sim, region, n, 2e-6)
        sim.advance(1.0)
        dose, _ = scan(sim, region, n, 20e-6)
        sparse, _ = scan(sim, region, n, 2e-6, pattern="spiral", fraction=0.1)
        panels = (truth.clean, noisy, dose, truth.extra["class_mask"], sparse)
        for j, image in enumerate(panels):
            ax = axes[i, j]
            if j == 3:
                ax.imshow(image, cmap=cmap, vmin=0, vmax=len(DEFECT_CLASSES) - 1,
                          interpolation="nearest")  # fmt: skip
            else:
                ax.imshow(np.nan_to_num(image, nan=0.0), cmap="gray", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j])
        kinds = sorted({d.kind for d in truth.defects})
        axes[i, 0].set_ylabel(f"{name}\n" + "\n".join(kinds[:4]), fontsize=9)
    fig.suptitle(
        "sim:stem HAADF forward model, 5 nm fields, 0.2 Å pixels, 80 kV, 25 mrad "
        "(class mask: blue vacancy, orange substitution, green adatom)"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
