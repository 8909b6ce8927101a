#!/usr/bin/env python3
"""Compute the Tersoff–Hamann LDOS of a graphene sheet with GPAW and write it as a cube file.

This is how ``simulators/data/graphene_ldos.cube`` was made (see simulators/data/README.md).
GPAW is not a scopepilot dependency: on Debian ``apt-get install gpaw`` and run this with the
system interpreter, from the repository root::

    /usr/bin/python3 scripts/make_dft_cube.py simulators/data/graphene_ldos.cube

What it does:

1. builds graphene (a = 2.46 Å) in its *rectangular* 4-atom cell a x a·sqrt(3) (so the cube's
   in-plane axes are orthogonal and the hexagonal 2.46 Å periodicity is something the
   calculation produces, not something the cell imposes), 16 Å of vacuum;
2. runs GPAW in plane-wave mode (PBE, 400 eV cutoff, Γ-centred 12 x 7 x 1 k-point mesh,
   Fermi–Dirac smearing 0.1 eV, time-reversal symmetry only so that every k-point's wave
   functions are summed with its own weight);
3. sums the pseudo wave functions into the sample LDOS of the bias window:
   ``rho(r) = sum_nk w_k g(e_nk) |psi_nk(r)|**2`` where ``g`` is the fraction of a Gaussian
   (sigma 0.1 eV) around ``e_nk`` inside ``[E_F, E_F + eV]`` (``--bias`` V, default +1.0 V,
   empty states; a negative bias gives filled states);
4. keeps the full in-plane cell and crops along z from 1 Å below the sheet to 3 Å above it
   (farther out the LDOS of the states near K, which decays by ~3.5 / Å, reaches the
   calculation's numerical floor, ~1e-6 of its peak; the simulator extrapolates the fitted
   exponential decay beyond the cube), then writes a Gaussian cube in Bohr (values in Å^-3;
   only ratios matter for constant-current imaging).

The pseudo wave functions equal the all-electron ones outside the PAW spheres (~0.7 Å around
C), so the vacuum LDOS that a tip sees is all-electron quality. Runtime: about 2.5 minutes on
2 cores.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.units import Bohr
from gpaw import GPAW, PW, FermiDirac
from gpaw import __version__ as gpaw_version

A_GRAPHENE = 2.46  # Å
VACUUM = 16.0  # Å in total along z
BELOW = 1.0  # Å of cube below the sheet
ABOVE = 3.0  # Å of cube above the sheet (beyond ~3 Å the LDOS nears the numerical floor)


def graphene_rect() -> Atoms:
    """Graphene in the orthogonal cell a x a·sqrt(3), sheet at mid height."""
    a = A_GRAPHENE
    b = a * math.sqrt(3.0)
    d = a / math.sqrt(3.0)  # C-C bond
    z0 = VACUUM / 2
    pos = [
        (0.0, 0.0, z0),
        (0.0, d, z0),
        (a / 2, 1.5 * d, z0),
        (a / 2, 2.5 * d, z0),
    ]
    return Atoms("C4", positions=pos, cell=[a, b, VACUUM], pbc=True)


def window_weight(e: np.ndarray, lo: float, hi: float, sigma: float) -> np.ndarray:
    """Fraction of a Gaussian of width ``sigma`` at ``e`` that lies inside ``[lo, hi]``."""
    from scipy.special import erf

    return 0.5 * (erf((hi - e) / (math.sqrt(2) * sigma)) - erf((lo - e) / (math.sqrt(2) * sigma)))


def write_cube(path: Path, atoms: Atoms, data: np.ndarray, origin: np.ndarray, comment: str):
    """Gaussian cube in Bohr (positive counts), z fastest, 6 values per line."""
    nx, ny, nz = data.shape
    steps = atoms.cell.array / np.array([[nx], [ny], [nz]], dtype=float)
    lines = [comment, "OUTER LOOP: X, MIDDLE LOOP: Y, INNER LOOP: Z"]
    o = origin / Bohr
    lines.append(f"{len(atoms):5d} {o[0]:12.6f} {o[1]:12.6f} {o[2]:12.6f}")
    for n, v in zip((nx, ny, nz), steps, strict=True):
        v = v / Bohr
        lines.append(f"{n:5d} {v[0]:12.6f} {v[1]:12.6f} {v[2]:12.6f}")
    for atom in atoms:
        p = atom.position / Bohr
        lines.append(f"{atom.number:5d} {0.0:12.6f} {p[0]:12.6f} {p[1]:12.6f} {p[2]:12.6f}")
    out = []
    for ix in range(nx):
        for iy in range(ny):
            col = data[ix, iy]
            for k in range(0, nz, 6):
                out.append(" ".join(f"{v:.5e}" for v in col[k : k + 6]))
    path.write_text("\n".join(lines + out) + "\n", encoding="ascii")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="cube file to write")
    ap.add_argument("--bias", type=float, default=1.0, help="sample bias V (window E_F..E_F+eV)")
    ap.add_argument("--ecut", type=float, default=400.0, help="plane-wave cutoff eV")
    ap.add_argument("--kpts", type=int, nargs=2, default=(12, 7), help="k-points along a, b")
    ap.add_argument("--sigma", type=float, default=0.1, help="energy broadening eV")
    args = ap.parse_args()

    t0 = time.perf_counter()
    atoms = graphene_rect()
    calc = GPAW(
        mode=PW(args.ecut),
        xc="PBE",
        h=0.16,
        kpts={"size": (args.kpts[0], args.kpts[1], 1), "gamma": True},
        occupations=FermiDirac(0.1),
        symmetry={"point_group": False, "time_reversal": True},
        nbands=24,
        convergence={"bands": 14, "eigenstates": 1e-9},
        txt=str(args.out.with_suffix(".gpaw.txt")),
    )
    atoms.calc = calc
    energy = atoms.get_potential_energy()
    e_f = calc.get_fermi_level()
    lo, hi = sorted((e_f, e_f + args.bias))

    weights = calc.get_k_point_weights()  # sum to 1
    nk = len(weights)
    ldos = None
    for k in range(nk):
        eps = calc.get_eigenvalues(kpt=k, spin=0)
        g = window_weight(eps, lo, hi, args.sigma)
        for n in np.nonzero(g > 1e-4)[0]:
            psi = calc.get_pseudo_wave_function(band=int(n), kpt=k, spin=0, periodic=True)
            term = weights[k] * g[n] * np.abs(psi) ** 2
            ldos = term if ldos is None else ldos + term
    if ldos is None:
        raise SystemExit(f"no states in the window {lo:.3f}..{hi:.3f} eV")
    ldos = ldos * 2.0  # spin degeneracy

    # Crop along z around the sheet; keep the whole in-plane cell (it is periodic).
    nz = ldos.shape[2]
    dz = atoms.cell[2, 2] / nz
    z_sheet = float(atoms.positions[:, 2].max())
    k0 = math.floor((z_sheet - BELOW) / dz)
    k1 = math.ceil((z_sheet + ABOVE) / dz) + 1
    crop = ldos[:, :, k0:k1]
    origin = np.array([0.0, 0.0, k0 * dz])
    comment = (
        f"graphene LDOS E_F..E_F{args.bias:+.2f} eV (Tersoff-Hamann), GPAW {gpaw_version} "
        f"PW {args.ecut:.0f} eV PBE k {args.kpts[0]}x{args.kpts[1]}x1, units A^-3"
    )
    cube_atoms = atoms.copy()
    cube_atoms.cell[2] = [0.0, 0.0, crop.shape[2] * dz]
    write_cube(args.out, cube_atoms, crop, origin, comment)
    print(
        f"E = {energy:.4f} eV, E_F = {e_f:.4f} eV, {nk} k-points, grid {ldos.shape} -> "
        f"{crop.shape}, dz = {dz:.4f} Å, wrote {args.out} "
        f"({args.out.stat().st_size / 1024:.0f} kB) in {time.perf_counter() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
