"""Specimens for HAADF-STEM: periodic crystals in projection, with lazily generated defects.

A specimen is a 2-D lattice (``a1``, ``a2``) with a basis of projected atomic *columns* (every
atom along the beam sharing an (x, y) position), built from an ``ase`` structure. The infinite
crystal is periodic, so its image is a Fourier series (:meth:`SpecimenModel.fourier_coefficients`);
point defects are local changes of a column's atoms, generated per unit cell from a counter-based
hash of (seed, cell, site), so a region shows the same defects whichever order it is visited in.

Lengths are in ångström (``_ang``); HAADF cross-sections ``σ`` in Å². An atom of atomic number
Z scatters ``σ_ref (Z / Z_ref)^n`` onto the detector (``Z_ref = 42``, Mo).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import ase
import ase.build
import ase.data
import numpy as np
from ase.spacegroup import crystal

from drivers.errors import ConfigError
from simulators.stem_patches import PatchField

Z_REF = 42
"""Atomic number whose cross-section is ``STEMConfig.cross_section_ref_m2`` (Mo)."""

DEFECT_CLASSES: tuple[str, ...] = ("lattice", "vacancy", "substitution", "adatom")
"""Classes of the per-pixel ground-truth mask (index = value in ``class_mask``)."""


@dataclass(frozen=True)
class DefectRule:
    """A point defect a site can carry: ``kind`` (e.g. ``s_vacancy``), its ``klass`` (an entry
    of :data:`DEFECT_CLASSES`), the site it replaces (index into the basis, or into the
    interstitial sites for adatoms), the atoms the column holds afterwards, and its probability
    per site."""

    kind: str
    klass: str
    site: int
    atoms_after: tuple[int, ...]
    probability: float
    interstitial: bool = False


@dataclass(frozen=True)
class Specimen:
    """A projected crystal: lattice vectors ``cell_ang`` ``(2, 2)`` (rows a1, a2), basis column
    positions ``basis_ang`` ``(n, 2)`` with their atoms ``columns`` (atomic numbers), empty
    ``interstitial_ang`` sites for adatoms, and the defects the sites can carry."""

    name: str
    cell_ang: np.ndarray
    basis_ang: np.ndarray
    columns: tuple[tuple[int, ...], ...]
    labels: tuple[str, ...]
    interstitial_ang: np.ndarray
    rules: tuple[DefectRule, ...]

    @property
    def cell_area_ang2(self) -> float:
        return float(abs(np.linalg.det(self.cell_ang)))


def atomic_number(symbol: str) -> int:
    """Atomic number of element ``symbol``; :class:`ConfigError` names an unknown one."""
    z = ase.data.atomic_numbers.get(symbol) if isinstance(symbol, str) else None
    if not z:
        raise ConfigError(f"unknown element {symbol!r}; give a chemical symbol such as 'W' or 'Si'")
    return int(z)


def project_columns(
    atoms: ase.Atoms, *, tol_ang: float = 0.05
) -> tuple[np.ndarray, np.ndarray, tuple[tuple[int, ...], ...]]:
    """Project ``atoms`` along z: ``(cell (2, 2), positions (n, 2), atoms per column)``.

    Atoms whose (x, y) agree within ``tol_ang`` modulo the in-plane lattice share a column.
    """
    cell = np.asarray(atoms.cell[:2, :2], dtype=np.float64)
    frac = np.asarray(atoms.positions[:, :2]) @ np.linalg.inv(cell)
    frac = np.mod(frac + 1e-9, 1.0)
    positions: list[np.ndarray] = []
    members: list[list[int]] = []
    for f, z in zip(frac, atoms.numbers, strict=True):
        for i, p in enumerate(positions):
            d = f - p
            d -= np.round(d)
            if float(np.linalg.norm(d @ cell)) < tol_ang:
                members[i].append(int(z))
                break
        else:
            positions.append(f)
            members.append([int(z)])
    basis = np.array(positions) @ cell
    return cell, basis, tuple(tuple(sorted(m, reverse=True)) for m in members)


def _site_of(columns: tuple[tuple[int, ...], ...], atoms: tuple[int, ...]) -> int:
    return columns.index(tuple(sorted(atoms, reverse=True)))


def _tmd(name: str, metal: str, chalcogen: str, a_ang: float, dopant: str | None) -> Specimen:
    atoms = ase.build.mx2(formula=f"{metal}{chalcogen}2", kind="2H", a=a_ang, vacuum=None)
    cell, basis, columns = project_columns(atoms)
    zm, zx = atomic_number(metal), atomic_number(chalcogen)
    sub = dopant or ("W" if metal == "Mo" else "Mo")
    zs = atomic_number(sub)
    m_site, x_site = _site_of(columns, (zm,)), _site_of(columns, (zx, zx))
    hollow = (cell[0] + 2.0 * cell[1]) / 3.0  # the empty third site of the honeycomb
    rules = (
        DefectRule(f"{chalcogen.lower()}_vacancy", "vacancy", x_site, (zx,), 0.02),
        DefectRule(f"{chalcogen.lower()}2_vacancy", "vacancy", x_site, (), 0.003),
        DefectRule(f"{metal.lower()}_vacancy", "vacancy", m_site, (), 0.002),
        DefectRule(f"{sub.lower()}_substitution", "substitution", m_site, (zs,), 0.01),
        DefectRule(f"{metal.lower()}_adatom", "adatom", 0, (zm,), 0.002, interstitial=True),
    )
    labels = tuple(metal if c == (zm,) else f"{chalcogen}2" for c in columns)
    return Specimen(name, cell, basis, columns, labels, hollow[None, :], rules)


def _graphene(dopant: str | None) -> Specimen:
    atoms = ase.build.graphene(formula="C2", a=2.46, size=(1, 1, 1), vacuum=None)
    cell, basis, columns = project_columns(atoms)
    sub = dopant or "Si"
    zs = atomic_number(sub)
    hollow = (cell[0] + 2.0 * cell[1]) / 3.0  # the hexagon centre
    rules: list[DefectRule] = []
    for site in range(len(columns)):
        rules.append(DefectRule("c_vacancy", "vacancy", site, (), 0.003))
        rules.append(DefectRule(f"{sub.lower()}_substitution", "substitution", site, (zs,), 0.003))
    rules.append(DefectRule(f"{sub.lower()}_adatom", "adatom", 0, (zs,), 0.001, interstitial=True))
    return Specimen("graphene", cell, basis, columns, ("C", "C"), hollow[None, :], tuple(rules))


def _srtio3(thickness_cells: int, dopant: str | None) -> Specimen:
    unit = crystal(
        ["Sr", "Ti", "O"],
        basis=[(0.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, 0.5, 0.0)],
        spacegroup=221,
        cellpar=[3.905, 3.905, 3.905, 90, 90, 90],
    )
    atoms = unit.repeat((1, 1, thickness_cells))
    cell, basis, columns = project_columns(atoms)
    z_sr, z_ti, z_o = 38, 22, 8
    sub = dopant or "La"
    zs = atomic_number(sub)
    n = thickness_cells
    sr_site = _site_of(columns, (z_sr,) * n)
    ti_site = _site_of(columns, (z_ti,) * n + (z_o,) * n)
    n_sub = max(1, n // 4)
    rules = (
        DefectRule("sr_column_vacancy", "vacancy", sr_site, (z_sr,) * (n - max(1, n // 2)), 0.004),
        DefectRule(
            f"{sub.lower()}_substitution", "substitution", sr_site,
            (zs,) * n_sub + (z_sr,) * (n - n_sub), 0.01,
        ),
        DefectRule("ti_column_vacancy", "vacancy", ti_site, (z_ti,) * (n // 2) + (z_o,) * n, 0.003),
    )  # fmt: skip
    names = {(z_sr,) * n: "Sr", (z_ti,) * n + (z_o,) * n: "TiO"}
    labels = tuple(names.get(c, "O") for c in columns)
    return Specimen("srtio3", cell, basis, columns, labels, np.zeros((0, 2)), rules)


SPECIMENS: dict[str, Callable[[int, str | None], Specimen]] = {
    "mos2": lambda _t, dopant: _tmd("mos2", "Mo", "S", 3.19, dopant),
    "ws2": lambda _t, dopant: _tmd("ws2", "W", "S", 3.18, dopant),
    "graphene": lambda _t, dopant: _graphene(dopant),
    "srtio3": _srtio3,
}
"""Specimen builders by name: ``builder(thickness_cells, dopant) -> Specimen``."""


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on a uint64 array (wrapping arithmetic, no warnings)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def cell_uniforms(key: int, i: np.ndarray, j: np.ndarray, site: int) -> np.ndarray:
    """Uniform [0, 1) numbers, one per cell ``(i, j)``, fixed by ``key`` and ``site``."""
    ii = i.astype(np.int64).astype(np.uint64)
    jj = j.astype(np.int64).astype(np.uint64)
    base = np.full(ii.shape, key & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64)
    h = _splitmix64(base ^ _splitmix64(ii * np.uint64(0x9E3779B1) + np.uint64(site)))
    h = _splitmix64(h ^ _splitmix64(jj + np.uint64(0x632BE59BD9B4E019)))
    return (h >> np.uint64(11)).astype(np.float64) / float(2**53)


@dataclass(frozen=True)
class DefectSet:
    """Defects in a box: positions ``xy_ang`` ``(n, 2)``, cross-section change ``dsigma_ang2``
    ``(n,)`` (negative for vacancies), class index ``klass`` ``(n,)`` into
    :data:`DEFECT_CLASSES`, and ``kinds`` (names)."""

    xy_ang: np.ndarray
    dsigma_ang2: np.ndarray
    klass: np.ndarray
    kinds: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.dsigma_ang2.size)


class SpecimenModel:
    """A specimen placed on the stage: rotated by ``angle_rad``, shifted by ``origin_ang``.

    ``sigma(z_list)`` is the HAADF cross-section of a column; ``density_scale`` multiplies every
    defect probability. Inside the discs of ``patches`` (optional,
    :class:`simulators.stem_patches.PatchField`) the substitution rules' probabilities are
    ``probability * patches.substitution_scale`` instead.
    """

    def __init__(
        self,
        specimen: Specimen,
        *,
        key: int,
        angle_rad: float,
        origin_ang: tuple[float, float],
        z_exponent: float,
        cross_section_ref_ang2: float,
        density_scale: float,
        patches: PatchField | None = None,
    ) -> None:
        self.specimen = specimen
        self.patches = patches
        self.key = int(key)
        c, s = math.cos(angle_rad), math.sin(angle_rad)
        rot = np.array([[c, -s], [s, c]])
        self.cell_ang = specimen.cell_ang @ rot.T  # rows: rotated a1, a2
        self.basis_ang = specimen.basis_ang @ rot.T
        self.interstitial_ang = specimen.interstitial_ang @ rot.T
        self.origin_ang = np.asarray(origin_ang, dtype=np.float64)
        self.z_exponent = float(z_exponent)
        self.sigma_ref = float(cross_section_ref_ang2)
        self.density_scale = float(density_scale)
        self.column_sigma = np.array([self.sigma(col) for col in specimen.columns])

    def sigma(self, atoms: tuple[int, ...]) -> float:
        """HAADF cross-section (Å²) of a column holding ``atoms`` (atomic numbers)."""
        return float(sum(self.sigma_ref * (z / Z_REF) ** self.z_exponent for z in atoms))

    @property
    def mean_fraction(self) -> float:
        """Mean fraction of the beam scattered onto the detector by the perfect crystal."""
        return float(self.column_sigma.sum()) / self.specimen.cell_area_ang2

    # -- the perfect crystal as a Fourier series ------------------------------------------------

    def reciprocal_vectors(self, k_max_per_ang: float) -> np.ndarray:
        """``(m, 2)`` reciprocal lattice vectors G with ``0 < |G| < k_max`` in the half plane
        (the image is real, so -G is implied); G = 0 is not included."""
        recip = np.linalg.inv(self.cell_ang).T  # rows b1, b2 with a_i . b_j = delta_ij
        # h = G . a1 and k = G . a2, so |h|, |k| <= k_max * max |a_i|.
        h_max = math.ceil(k_max_per_ang * float(np.linalg.norm(self.cell_ang, axis=1).max()))
        hk = np.stack(
            np.meshgrid(np.arange(-h_max, h_max + 1), np.arange(-h_max, h_max + 1)), axis=-1
        ).reshape(-1, 2)
        half = (hk[:, 0] > 0) | ((hk[:, 0] == 0) & (hk[:, 1] > 0))
        g = hk[half] @ recip
        norm = np.linalg.norm(g, axis=1)
        return g[(norm < k_max_per_ang) & (norm > 0)]

    def fourier_coefficients(
        self, g_per_ang: np.ndarray, khat: Callable[[np.ndarray], np.ndarray]
    ) -> tuple[float, np.ndarray]:
        """Mean level and ``(m,)`` complex coefficients of the perfect crystal's image.

        The image is ``c0 + 2 Re Σ_G c_G exp(2πi G·r)`` with
        ``c_G = K̂(|G|) / A_cell Σ_c σ_c exp(−2πi G·(origin + r_c))``.
        """
        area = self.specimen.cell_area_ang2
        pos = self.basis_ang + self.origin_ang
        phase = np.exp(-2j * math.pi * (g_per_ang @ pos.T))  # (m, n_columns)
        structure = phase @ self.column_sigma
        coeff = khat(np.linalg.norm(g_per_ang, axis=1)) * structure / area
        return float(self.column_sigma.sum()) / area, coeff.astype(np.complex128)

    # -- defects ---------------------------------------------------------------------------------

    def _cells(
        self, x0: float, x1: float, y0: float, y1: float
    ) -> Iterator[tuple[np.ndarray, ...]]:
        corners = np.array([[x0, y0], [x0, y1], [x1, y0], [x1, y1]]) - self.origin_ang
        frac = corners @ np.linalg.inv(self.cell_ang)
        lo = np.floor(frac.min(axis=0)).astype(int) - 1
        hi = np.ceil(frac.max(axis=0)).astype(int) + 1
        j_all = np.arange(lo[1], hi[1] + 1)
        per_chunk = max(1, 2_000_000 // max(1, j_all.size))
        for i_start in range(lo[0], hi[0] + 1, per_chunk):
            i_all = np.arange(i_start, min(i_start + per_chunk, hi[0] + 1))
            ii, jj = np.meshgrid(i_all, j_all, indexing="ij")
            yield ii.ravel(), jj.ravel()

    def defects_in_box(self, x0: float, x1: float, y0: float, y1: float) -> DefectSet:
        """Every defect whose column lies in ``[x0, x1] x [y0, y1]`` (Å, stage coordinates)."""
        spec = self.specimen
        xy: list[np.ndarray] = []
        dsig: list[np.ndarray] = []
        klass: list[np.ndarray] = []
        kinds: list[str] = []
        centres = self.patches.centres_in_box(x0, x1, y0, y1) if self.patches is not None else None
        for ii, jj in self._cells(x0, x1, y0, y1):
            cell_origin = (
                self.origin_ang + np.outer(ii, self.cell_ang[0]) + np.outer(jj, self.cell_ang[1])
            )
            in_patch = (
                self.patches.inside(cell_origin, centres)
                if self.patches is not None and centres is not None and centres.shape[0]
                else None
            )
            # One uniform per (cell, site): the site's rules split [0, 1) into defect kinds.
            sites = sorted({(r.interstitial, r.site) for r in spec.rules})
            for interstitial, site in sites:
                u = cell_uniforms(self.key, ii, jj, 1000 * int(interstitial) + site)
                start: float | np.ndarray = 0.0
                for rule in spec.rules:
                    if (rule.interstitial, rule.site) != (interstitial, site):
                        continue
                    base = rule.probability * self.density_scale
                    p: float | np.ndarray
                    if in_patch is not None and rule.klass == "substitution" and self.patches:
                        rich = rule.probability * self.patches.substitution_scale
                        p = np.minimum(np.where(in_patch, rich, base), 1.0 - start)
                    elif isinstance(start, np.ndarray):
                        p = np.minimum(base, 1.0 - start)
                    else:
                        p = min(base, 1.0 - start)
                    hit = np.nonzero((u >= start) & (u < start + p))[0]
                    start = start + p
                    if hit.size == 0:
                        continue
                    offset = (self.interstitial_ang if interstitial else self.basis_ang)[site]
                    pos = cell_origin[hit] + offset
                    inside = (
                        (pos[:, 0] >= x0)
                        & (pos[:, 0] <= x1)
                        & (pos[:, 1] >= y0)
                        & (pos[:, 1] <= y1)
                    )
                    pos = pos[inside]
                    if not pos.shape[0]:
                        continue
                    before = 0.0 if interstitial else float(self.column_sigma[site])
                    delta = self.sigma(rule.atoms_after) - before
                    xy.append(pos)
                    dsig.append(np.full(pos.shape[0], delta))
                    klass.append(np.full(pos.shape[0], DEFECT_CLASSES.index(rule.klass)))
                    kinds.extend([rule.kind] * pos.shape[0])
        if not xy:
            return DefectSet(np.zeros((0, 2)), np.zeros(0), np.zeros(0, dtype=np.uint8), ())
        return DefectSet(
            np.concatenate(xy),
            np.concatenate(dsig),
            np.concatenate(klass).astype(np.uint8),
            tuple(kinds),
        )

    def columns_in_box(self, x0: float, x1: float, y0: float, y1: float) -> tuple[np.ndarray, ...]:
        """Every column of the perfect crystal in the box: ``(xy_ang (n, 2), sigma_ang2 (n,))``.

        Used by the reference (brute-force) renderer; add :meth:`defects_in_box` for defects.
        """
        xy: list[np.ndarray] = []
        sig: list[np.ndarray] = []
        for ii, jj in self._cells(x0, x1, y0, y1):
            cell_origin = (
                self.origin_ang + np.outer(ii, self.cell_ang[0]) + np.outer(jj, self.cell_ang[1])
            )
            for site, offset in enumerate(self.basis_ang):
                pos = cell_origin + offset
                inside = (
                    (pos[:, 0] >= x0) & (pos[:, 0] <= x1) & (pos[:, 1] >= y0) & (pos[:, 1] <= y1)
                )
                xy.append(pos[inside])
                sig.append(np.full(int(inside.sum()), self.column_sigma[site]))
        return np.concatenate(xy), np.concatenate(sig)
