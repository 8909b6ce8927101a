"""Sample surfaces for the STM model: lattices, terraces, point defects, conditioning damage.

Coordinates are sample (stage) coordinates in metres; heights are metres above the atom plane
of terrace 0. Nothing is generated globally:

- terraces are an analytic function of position (a miscut staircase with meandering edges);
- point defects are drawn per square tile of :data:`TILE_M` from
  ``SeedSequence((seed, tag, tile_x, tile_y))``, so any region shows the same atoms whatever the
  order in which regions are visited;
- conditioning damage is a list of events (discs of disordered material).

A night-long session wanders over the stage, so the tiles are cached in a least-recently-used
cache of :data:`TILE_CACHE_SIZE`; an evicted tile is drawn again, identically, from its seed.

Lattices (PHYSICS.md): Au(111) hexagonal, nearest neighbour 2.88 Å, ABC stacking from terrace to
terrace, herringbone ridges (period 6.3 nm); H:Si(100)-2x1 dimer rows 7.68 Å apart, dimers
3.84 Å along the row, each dimer two lobes, rows turning by 90° from one terrace to the next.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from simulators.stm_damage import DamageMap
from simulators.stm_grid import Grid

TILE_M = 32e-9
"""Edge of the square tiles in which point defects are drawn."""
TILE_CACHE_SIZE = 256
"""Defect tiles kept (256 tiles of 32 nm: a 0.5 um square); older ones are redrawn."""

_TILE_TAG = 0x5EED_D3F
_SURFACE_TAG = 0x5EED_5F
_INDEX_OFFSET = 2**31


@dataclass(frozen=True)
class SurfaceSpec:
    """A crystal surface: primitive vectors and basis (metres, lattice frame), steps, defects."""

    name: str
    a1_m: tuple[float, float]
    a2_m: tuple[float, float]
    basis_m: tuple[tuple[float, float], ...]
    step_height_m: float
    level_rotation_deg: float  # rotation of the lattice from one terrace to the next
    level_shift_m: tuple[float, float]  # lattice-frame shift of the origin per terrace
    defect_mix: tuple[tuple[str, float], ...]
    adatom_height_m: float
    herringbone: bool = False


_A_AU = 2.88e-10
AU111 = SurfaceSpec(
    name="au111",
    a1_m=(_A_AU, 0.0),
    a2_m=(_A_AU / 2.0, _A_AU * math.sqrt(3.0) / 2.0),
    basis_m=((0.0, 0.0),),
    step_height_m=2.35e-10,
    level_rotation_deg=0.0,
    level_shift_m=(_A_AU / 2.0, _A_AU * math.sqrt(3.0) / 6.0),  # (a1 + a2) / 3: ABC stacking
    defect_mix=(("vacancy", 0.5), ("adatom", 0.5)),
    adatom_height_m=2.35e-10,
    herringbone=True,
)
HSI100 = SurfaceSpec(
    name="hsi100",
    a1_m=(7.68e-10, 0.0),  # across the dimer rows
    a2_m=(0.0, 3.84e-10),  # along a row
    basis_m=((-1.15e-10, 0.0), (1.15e-10, 0.0)),  # the two lobes of a dimer
    step_height_m=1.36e-10,
    level_rotation_deg=90.0,
    level_shift_m=(1.92e-10, 1.92e-10),
    defect_mix=(("dangling_bond", 0.6), ("vacancy", 0.3), ("adatom", 0.1)),
    adatom_height_m=1.5e-10,
)
SURFACES: dict[str, SurfaceSpec] = {s.name: s for s in (AU111, HSI100)}

# Orbital weights and decay of defect features relative to a lattice atom (weight 1, 2κ).
_DB_WEIGHT = 2.5
_DB_HEIGHT_M = 0.6e-10
_DB_DECAY_FACTOR = 0.7
_ADATOM_WEIGHT = {"au111": 1.0, "hsi100": 1.5}


def _rot(angle_rad: float) -> np.ndarray:
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    return np.array([[c, -s], [s, c]])


def _site_key(i: np.ndarray, j: np.ndarray, b: np.ndarray, n_basis: int) -> np.ndarray:
    """One int64 per lattice site (cell i, j within ±2**20, basis atom b)."""
    return ((i + 2**20) * 2**21 + (j + 2**20)) * n_basis + b


@dataclass(frozen=True)
class Layer:
    """The lattice of one terrace level in sample coordinates."""

    level: int
    height_m: float
    origin_m: np.ndarray  # (2,)
    cell_m: np.ndarray  # (2, 2), columns a1, a2
    recip_per_m: np.ndarray  # (2, 2), columns b1, b2 with a_i . b_j = 2π δ_ij
    basis_m: np.ndarray  # (B, 2)
    area_m2: float
    _stencils: dict[float, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def neighbours(
        self,
        x_m: np.ndarray,
        y_m: np.ndarray,
        radius_m: float,
        *,
        exclude_keys: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Atoms of this layer within ``radius_m`` of each point, without any loop over atoms,
        leaving out the atoms whose keys (as :meth:`atom_keys` gives them) are ``exclude_keys``.

        Returns ``(point index, squared distance)`` per pair (``float32`` distances), ordered by
        point, then by atom.
        """
        pts = np.stack([x_m - self.origin_m[0], y_m - self.origin_m[1]])
        cell0 = np.rint(np.linalg.solve(self.cell_m, pts)).astype(np.int64)  # (2, n)
        local = (pts - self.cell_m @ cell0).T.astype(np.float32)  # within half a cell
        st_x, st_y, st_key = self._stencil(radius_m)
        # d2 = dx**2 + dy**2 (float32, (n, stencil)) without temporaries; x**2 is x * x.
        d2 = local[:, 0:1] - st_x[None, :]
        d2 *= d2
        dy = local[:, 1:2] - st_y[None, :]
        dy *= dy
        d2 += dy
        near = d2 < np.float32(radius_m**2)
        if exclude_keys is not None and exclude_keys.size:
            # _site_key is linear in the cell indices: the atom of (point p, stencil entry s)
            # has key cell_key[p] + st_key[s]. Find the entry of each excluded key per point.
            nb = self.basis_m.shape[0]
            cell_key = ((cell0[0] + 2**20) * 2**21 + (cell0[1] + 2**20)) * nb
            order = np.argsort(st_key)
            sorted_keys = st_key[order]
            want = exclude_keys[:, None] - cell_key[None, :]  # (excluded, n)
            at = np.minimum(np.searchsorted(sorted_keys, want), sorted_keys.size - 1)
            k, p = np.nonzero(sorted_keys[at] == want)
            near[p, order[at[k, p]]] = False
        flat = np.flatnonzero(near)  # row-major: by point, then atom
        return flat // st_x.size, d2.ravel()[flat]

    def _stencil(self, radius_m: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Atom positions (float32 x, y) relative to a point's nearest cell origin, within reach
        of ``radius_m`` from anywhere in that cell, and each atom's key offset (cached)."""
        cached = self._stencils.get(radius_m)
        if cached is not None:
            return cached
        a1, a2 = self.cell_m[:, 0], self.cell_m[:, 1]
        # A point lies within half a diagonal of its nearest cell origin (``neighbours``).
        half_diagonal = 0.5 * max(float(np.hypot(*(a1 + a2))), float(np.hypot(*(a1 - a2))))
        reach = radius_m + 0.5 * (float(np.hypot(*(a1 + a2))) + float(np.hypot(*(a1 - a2))))
        reach += float(np.max(np.hypot(*self.basis_m.T)))
        area = abs(float(a1[0] * a2[1] - a1[1] * a2[0]))
        span = int(np.ceil(reach / min(area / float(np.hypot(*a1)), area / float(np.hypot(*a2)))))
        di, dj = np.meshgrid(np.arange(-span, span + 1), np.arange(-span, span + 1), indexing="ij")
        off = np.stack([di.ravel(), dj.ravel()])
        off = off[:, np.hypot(*(self.cell_m @ off)) <= reach]
        nb = self.basis_m.shape[0]
        # Stencil of atom positions relative to the point's nearest cell origin: (O * nb, 2).
        stencil = ((self.cell_m @ off).T[:, None, :] + self.basis_m[None, :, :]).reshape(-1, 2)
        o, b = np.divmod(np.arange(stencil.shape[0]), nb)
        # Only atoms that some point of the cell can have within radius_m (1 pm to spare).
        keep = np.hypot(stencil[:, 0], stencil[:, 1]) <= radius_m + half_diagonal + 1e-12
        stencil, o, b = stencil[keep], o[keep], b[keep]
        st = stencil.astype(np.float32)
        key = _site_key(off[0, o], off[1, o], b, nb) - (2**20 * 2**21 + 2**20) * nb
        out = (np.ascontiguousarray(st[:, 0]), np.ascontiguousarray(st[:, 1]), key)
        self._stencils[radius_m] = out
        return out

    def atom_keys(self, x_m: np.ndarray, y_m: np.ndarray) -> np.ndarray:
        """Keys of the atoms at (or nearest to) the given positions."""
        pts = np.stack([x_m, y_m]) - self.origin_m[:, None]
        inv = np.linalg.inv(self.cell_m)
        nb = self.basis_m.shape[0]
        best = np.full(pts.shape[1], np.inf)
        keys = np.zeros(pts.shape[1], dtype=np.int64)
        for bi, bvec in enumerate(self.basis_m):
            cell = np.rint(inv @ (pts - bvec[:, None])).astype(np.int64)
            err = np.hypot(*(pts - bvec[:, None] - self.cell_m @ cell))
            better = err < best
            best = np.where(better, err, best)
            keys = np.where(
                better, _site_key(cell[0], cell[1], np.full_like(cell[0], bi), nb), keys
            )
        return keys

    def nearest_site(self, x_m: np.ndarray, y_m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The lattice-cell origins (without basis) nearest to the points."""
        rel = np.stack([x_m - self.origin_m[0], y_m - self.origin_m[1]])
        frac = np.linalg.solve(self.cell_m, rel)
        site = self.cell_m @ np.round(frac) + self.origin_m[:, None]
        return site[0], site[1]


@dataclass(frozen=True, eq=False)
class Features:
    """Point features added to the LDOS: ``w * exp(-alpha * |r - R|)`` per feature."""

    x_m: np.ndarray
    y_m: np.ndarray
    z_m: np.ndarray
    weight: np.ndarray  # negative: an atom removed from the lattice (vacancy)
    alpha_factor: np.ndarray  # decay relative to 2κ
    level: np.ndarray  # terrace level (int64)

    @staticmethod
    def empty() -> Features:
        e = np.zeros(0)
        return Features(e, e, e, e, e, np.zeros(0, dtype=np.int64))

    def subset(self, mask: np.ndarray) -> Features:
        return Features(
            self.x_m[mask],
            self.y_m[mask],
            self.z_m[mask],
            self.weight[mask],
            self.alpha_factor[mask],
            self.level[mask],
        )


@dataclass(frozen=True)
class SurfaceDefect:
    """A ground-truth defect on the surface (sample coordinates)."""

    x_m: float
    y_m: float
    kind: str
    level: int


@dataclass
class SurfaceModel:
    """A lazily generated, seeded sample surface."""

    spec: SurfaceSpec
    entropy: int
    defect_density_per_nm2: float = 0.02
    terrace_width_m: float = 60e-9
    herringbone_amplitude_m: float = 0.15e-10
    lattice_angle_rad: float | None = None
    damage: DamageMap = field(default_factory=DamageMap)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(np.random.SeedSequence([self.entropy, _SURFACE_TAG]))
        angle = rng.uniform(0.0, 2.0 * math.pi)
        self.theta0 = angle if self.lattice_angle_rad is None else float(self.lattice_angle_rad)
        step_angle = rng.uniform(0.0, 2.0 * math.pi)
        self.step_normal = np.array([math.cos(step_angle), math.sin(step_angle)])
        self.step_offset = rng.uniform(0.0, 1.0)
        n_modes = 3
        wavelength = rng.uniform(100e-9, 400e-9, n_modes)
        mode_angle = rng.uniform(0.0, 2.0 * math.pi, n_modes)
        self.meander_k = (2.0 * math.pi / wavelength)[:, None] * np.stack(
            [np.cos(mode_angle), np.sin(mode_angle)], axis=1
        )
        self.meander_amp = rng.uniform(0.05, 0.15, n_modes)
        self.meander_phase = rng.uniform(0.0, 2.0 * math.pi, n_modes)
        self.herringbone_phase = rng.uniform(0.0, 1.0, 2)
        self._layers: dict[int, Layer] = {}
        self._tiles: OrderedDict[tuple[int, int], tuple[Features, list[SurfaceDefect]]] = (
            OrderedDict()
        )
        a1, a2 = np.array(self.spec.a1_m), np.array(self.spec.a2_m)
        self.cell_area_m2 = abs(float(a1[0] * a2[1] - a1[1] * a2[0]))

    # -- terraces --------------------------------------------------------------------------------

    def level_phi(self, grid: Grid) -> np.ndarray:
        """The continuous terrace coordinate ``phi`` (level = floor(phi)), ``(nr, W)`` float64."""
        n = self.step_normal
        inv_w = 1.0 / self.terrace_width_m
        lin_rows = (grid.rows_m @ n) * inv_w + self.step_offset
        lin_cols = np.arange(grid.width) * float(grid.step_m @ n) * inv_w
        c = self.meander_amp * np.exp(1j * self.meander_phase)
        meander = grid.wave_sums(self.meander_k[None], (-1j * c)[None])[0]
        meander += lin_rows[:, None]
        meander += lin_cols[None, :]
        return meander

    @property
    def max_level_gradient_per_m(self) -> float:
        """An upper bound of ``|grad phi|`` (terraces per metre)."""
        k = np.hypot(self.meander_k[:, 0], self.meander_k[:, 1])
        return float(1.0 / self.terrace_width_m + np.sum(self.meander_amp * k))

    def level_gradient(self, x_m: np.ndarray, y_m: np.ndarray) -> np.ndarray:
        """``|grad phi|`` at arbitrary points (terraces per metre)."""
        inv_w = 1.0 / self.terrace_width_m
        gx = np.full(np.shape(x_m), self.step_normal[0] * inv_w)
        gy = np.full(np.shape(x_m), self.step_normal[1] * inv_w)
        for k, amp, ph in zip(self.meander_k, self.meander_amp, self.meander_phase, strict=True):
            c = amp * np.cos(k[0] * x_m + k[1] * y_m + ph)
            gx += c * k[0]
            gy += c * k[1]
        return np.maximum(np.sqrt(gx * gx + gy * gy), 0.1 * inv_w)

    def level_at(self, x_m: np.ndarray, y_m: np.ndarray) -> np.ndarray:
        """Terrace level (int) at arbitrary points."""
        n = self.step_normal
        phi = (x_m * n[0] + y_m * n[1]) / self.terrace_width_m + self.step_offset
        for k, amp, ph in zip(self.meander_k, self.meander_amp, self.meander_phase, strict=True):
            phi = phi + amp * np.sin(k[0] * x_m + k[1] * y_m + ph)
        return np.floor(phi).astype(np.int64)

    def level_height_m(self, level: int) -> float:
        """Atom-plane height of terrace ``level`` (terraces step down along the miscut)."""
        return -level * self.spec.step_height_m

    def layer(self, level: int) -> Layer:
        cached = self._layers.get(level)
        if cached is not None:
            return cached
        spec = self.spec
        rot = _rot(self.theta0 + math.radians(spec.level_rotation_deg) * level)
        cell = rot @ np.array([spec.a1_m, spec.a2_m]).T
        origin = _rot(self.theta0) @ (np.array(spec.level_shift_m) * level)
        recip = 2.0 * math.pi * np.linalg.inv(cell).T
        basis = (rot @ np.array(spec.basis_m).T).T
        layer = Layer(
            level, self.level_height_m(level), origin, cell, recip, basis, self.cell_area_m2
        )
        self._layers[level] = layer
        return layer

    def herringbone_m(self, x_m: np.ndarray, y_m: np.ndarray) -> np.ndarray | float:
        """Height of the Au(111) herringbone ridges (zig-zag pairs, period 6.3 nm).

        Ridge pairs run along <11-2> arms at ±30° to a close-packed direction, changing
        direction every 15 nm. Returns 0.0 for surfaces without it.
        """
        if not self.spec.herringbone or self.herringbone_amplitude_m == 0.0:
            return 0.0
        c, s = math.cos(self.theta0), math.sin(self.theta0)
        zz = 15e-9  # length of one arm of the zig-zag
        period = 6.3e-9
        along = c * x_m
        along += s * y_m
        along /= zz
        tri = along.astype(np.float32)  # along a close-packed row
        across = -s * x_m
        across += c * y_m
        across /= period
        u = across.astype(np.float32)
        # tri = |((along + phase) mod 2) - 1|, the mod without the slow float remainder loop
        # (a - 2 floor(a / 2) is exact, and negative results get the + 2 that ``%`` adds).
        tri += np.float32(self.herringbone_phase[0])
        half = tri * np.float32(0.5)
        np.floor(half, out=half)
        half *= np.float32(2.0)
        tri -= half
        negative = tri < 0
        if negative.any():
            tri = np.where(negative, tri + np.float32(2.0), tri)
        tri -= 1.0
        np.abs(tri, out=tri)
        tri *= np.float32(math.tan(math.radians(30.0)) * zz / period)
        u += tri
        u += np.float32(self.herringbone_phase[1])
        u *= np.float32(2.0 * math.pi)  # the phase
        sharp = np.float32(8.0)
        second = u - np.float32(2.0 * math.pi * 2.5 / 6.3)
        ridges = np.cos(u, out=u)
        ridges -= 1.0
        ridges *= sharp
        np.exp(ridges, out=ridges)
        np.cos(second, out=second)
        second -= 1.0
        second *= sharp
        np.exp(second, out=second)
        ridges += second
        ridges *= self.herringbone_amplitude_m
        return np.asarray(ridges, dtype=np.float64)

    def surface_height_m(self, x_m: np.ndarray, y_m: np.ndarray) -> np.ndarray:
        """Atom-plane height under each point (terrace + herringbone), without damage."""
        level = self.level_at(x_m, y_m)
        return np.asarray(-level * self.spec.step_height_m + self.herringbone_m(x_m, y_m))

    # -- point defects ---------------------------------------------------------------------------

    def _tile(self, i: int, j: int) -> tuple[Features, list[SurfaceDefect]]:
        cached = self._tiles.get((i, j))
        if cached is not None:
            self._tiles.move_to_end((i, j))
            return cached
        ss = np.random.SeedSequence([self.entropy, _TILE_TAG, i + _INDEX_OFFSET, j + _INDEX_OFFSET])
        rng = np.random.default_rng(ss)
        n = int(rng.poisson(self.defect_density_per_nm2 * (TILE_M * 1e9) ** 2))
        kinds = [k for k, _ in self.spec.defect_mix]
        p = np.array([w for _, w in self.spec.defect_mix])
        xs = (i + rng.random(n)) * TILE_M
        ys = (j + rng.random(n)) * TILE_M
        which = rng.choice(len(kinds), size=n, p=p / p.sum())
        lobe = rng.integers(0, len(self.spec.basis_m), size=n)
        levels = self.level_at(xs, ys)
        sites = np.zeros((n, 2))
        cells = np.zeros((n, 2, 2))
        bases = np.zeros((n, len(self.spec.basis_m), 2))
        for level in np.unique(levels):  # snap each defect to its terrace's lattice
            on = levels == level
            layer = self.layer(int(level))
            sx, sy = layer.nearest_site(xs[on], ys[on])
            sites[on] = np.stack([sx, sy], axis=1)
            cells[on] = layer.cell_m
            bases[on] = layer.basis_m
        z0 = -levels * self.spec.step_height_m + self.herringbone_m(sites[:, 0], sites[:, 1])
        names = np.array(kinds)[which] if n else np.zeros(0, dtype=str)
        centre = sites + bases.mean(axis=1)
        pos = centre.copy()
        vac, ad, db = names == "vacancy", names == "adatom", names == "dangling_bond"
        if self.spec.name == "au111":  # adatoms sit in fcc hollow sites
            pos[ad] = sites[ad] + (cells[ad, :, 0] + cells[ad, :, 1]) / 3.0
        pos[db] = sites[db] + bases[db, lobe[db]]
        # Vacancies remove every basis atom of the cell (H:Si: a dimer vacancy).
        nb = bases.shape[1]
        vac_xy = (sites[vac][:, None, :] + bases[vac]).reshape(-1, 2)
        vac_z = np.repeat(z0[vac], nb)
        vac_l = np.repeat(levels[vac], nb)
        one = ad | db
        feat_z = z0[one] + np.where(db[one], _DB_HEIGHT_M, self.spec.adatom_height_m)
        feat_w = np.where(db[one], _DB_WEIGHT, _ADATOM_WEIGHT[self.spec.name])
        feat_a = np.where(db[one], _DB_DECAY_FACTOR, 1.0)
        feats = Features(
            np.concatenate([vac_xy[:, 0], pos[one, 0]]),
            np.concatenate([vac_xy[:, 1], pos[one, 1]]),
            np.concatenate([vac_z, feat_z]),
            np.concatenate([np.full(vac_z.size, -1.0), feat_w]),
            np.concatenate([np.ones(vac_z.size), feat_a]),
            np.concatenate([vac_l, levels[one]]).astype(np.int64),
        )
        truth = [
            SurfaceDefect(float(x), float(y), str(k), int(lv))
            for x, y, k, lv in zip(pos[:, 0], pos[:, 1], names, levels, strict=True)
        ]
        self._tiles[(i, j)] = (feats, truth)
        while len(self._tiles) > TILE_CACHE_SIZE:
            self._tiles.popitem(last=False)
        return feats, truth

    def _tiles_in_box(
        self, x0: float, x1: float, y0: float, y1: float
    ) -> list[tuple[Features, list[SurfaceDefect]]]:
        i0, i1 = math.floor(x0 / TILE_M), math.floor(x1 / TILE_M)
        j0, j1 = math.floor(y0 / TILE_M), math.floor(y1 / TILE_M)
        return [self._tile(i, j) for i in range(i0, i1 + 1) for j in range(j0, j1 + 1)]

    def features_in_box(self, x0: float, x1: float, y0: float, y1: float) -> Features:
        """Point features whose centres lie in the box (and are not on damaged surface)."""
        parts = [f for f, _ in self._tiles_in_box(x0, x1, y0, y1) if f.x_m.size]
        if not parts:
            return Features.empty()
        arrays = [
            np.concatenate([getattr(p, n) for p in parts])
            for n in ("x_m", "y_m", "z_m", "weight", "alpha_factor", "level")
        ]
        feats = Features(*arrays)
        x, y = feats.x_m, feats.y_m
        keep = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
        if self.damage and np.any(keep):
            keep &= self.damage_at(x, y) < 0.5
        return feats.subset(keep)

    def defects_in_box(self, x0: float, x1: float, y0: float, y1: float) -> list[SurfaceDefect]:
        """Ground-truth defects in the box that have not been destroyed by damage."""
        found = [
            d
            for _, truth in self._tiles_in_box(x0, x1, y0, y1)
            for d in truth
            if x0 <= d.x_m <= x1 and y0 <= d.y_m <= y1
        ]
        if found and self.damage:
            dmg = self.damage_at(np.array([d.x_m for d in found]), np.array([d.y_m for d in found]))
            found = [d for d, v in zip(found, dmg, strict=True) if v < 0.5]
        return found

    # -- damage ----------------------------------------------------------------------------------

    def add_damage(
        self,
        rng: np.random.Generator,
        x_m: float,
        y_m: float,
        radius_m: float,
        kind: str,
        strength: float,
    ) -> None:
        """Spoil a disc of radius ``radius_m`` around ``(x_m, y_m)`` (see :mod:`stm_damage`)."""
        base = float(self.surface_height_m(np.array([x_m]), np.array([y_m]))[0])
        self.damage.add(rng, x_m, y_m, radius_m, kind, strength, base)

    def damage_at(self, x_m: np.ndarray, y_m: np.ndarray) -> np.ndarray:
        """Damage indicator in [0, 1] at arbitrary points."""
        return self.damage.at(x_m, y_m)

    def damage_fields(
        self, grid: Grid, blur_m: float
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Damage indicator and debris height over ``grid`` (``(None, None)`` if untouched)."""
        return self.damage.fields(grid, blur_m)
