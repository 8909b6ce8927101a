"""Sample surfaces for the STM model: lattices, terraces, point defects, conditioning damage.

Coordinates are sample (stage) coordinates in metres; heights are metres above the atom plane
of terrace 0. Nothing is generated globally:

- terraces are an analytic function of position (a miscut staircase with meandering edges);
- point defects are drawn per square tile of :data:`TILE_M` from
  ``SeedSequence((seed, tag, tile_x, tile_y))``, so any region shows the same atoms whatever the
  order in which regions are visited;
- conditioning damage is a short list of events (discs of disordered material).

Lattices (PHYSICS.md): Au(111) hexagonal, nearest neighbour 2.88 Å, ABC stacking from terrace to
terrace, herringbone ridges (period 6.3 nm); H:Si(100)-2x1 dimer rows 7.68 Å apart, dimers
3.84 Å along the row, each dimer two lobes, rows turning by 90° from one terrace to the next.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.special import ndtr

TILE_M = 32e-9
"""Edge of the square tiles in which point defects are drawn."""

_MAX_DAMAGE_RADIUS_M = 30e-9
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

    def atoms_near(self, x_m: float, y_m: float, radius_m: float) -> np.ndarray:
        """``(n, 2)`` positions of this layer's atoms within ``radius_m`` of a point."""
        frac = np.linalg.solve(self.cell_m, np.array([x_m, y_m]) - self.origin_m)
        lengths = np.hypot(self.cell_m[0], self.cell_m[1])
        # Cells needed along each primitive direction (with slack for oblique cells).
        reach = np.ceil(radius_m / (lengths * 0.5) + 2).astype(int)
        i = np.arange(-reach[0], reach[0] + 1) + round(frac[0])
        j = np.arange(-reach[1], reach[1] + 1) + round(frac[1])
        ii, jj = np.meshgrid(i, j, indexing="ij")
        cells = self.cell_m @ np.stack([ii.ravel(), jj.ravel()]).astype(np.float64)
        pts = (cells.T[:, None, :] + self.origin_m + self.basis_m[None, :, :]).reshape(-1, 2)
        keep = np.hypot(pts[:, 0] - x_m, pts[:, 1] - y_m) <= radius_m
        return np.asarray(pts[keep])

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
        return Features(self.x_m[mask], self.y_m[mask], self.z_m[mask], self.weight[mask],
                        self.alpha_factor[mask], self.level[mask])


@dataclass(frozen=True)
class SurfaceDefect:
    """A ground-truth defect on the surface (sample coordinates)."""

    x_m: float
    y_m: float
    kind: str
    level: int


@dataclass(frozen=True, eq=False)
class DamageEvent:
    """A disc of disordered material left by a pulse or a dip."""

    x_m: float
    y_m: float
    radius_m: float
    kind: str  # "pulse" or "dip"
    strength: float
    base_z_m: float
    mode_k_per_m: np.ndarray  # (M, 2) rough-surface wave vectors
    mode_amp_m: np.ndarray  # (M,)
    mode_phase: np.ndarray  # (M,)
    edge_amp: np.ndarray  # (3,) relative radius modulation for harmonics 2, 3, 5
    edge_phase: np.ndarray  # (3,)

    def radius_at(self, x_m: np.ndarray, y_m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distance from the centre and the (irregular) disc radius in that direction."""
        dx, dy = x_m - self.x_m, y_m - self.y_m
        ang = np.arctan2(dy, dx)
        wobble = sum(a * np.cos(n * ang + p) for a, n, p in
                     zip(self.edge_amp, (2, 3, 5), self.edge_phase, strict=True))
        return np.hypot(dx, dy), self.radius_m * (1.0 + wobble)

    def profile_m(self, r_m: np.ndarray) -> np.ndarray:
        """Mean height of the disordered material above ``base_z_m`` at distance ``r_m``."""
        R, s = self.radius_m, self.strength
        if self.kind == "pulse":  # a mound of material from the tip
            return (0.3e-9 + 0.9e-9 * s) * np.exp(-(r_m**2) / (2.0 * (0.3 * R) ** 2))
        crater = -(0.3e-9 + 1.0e-9 * s) * np.exp(-(r_m**2) / (2.0 * (0.2 * R) ** 2))
        rim = (0.2e-9 + 0.4e-9 * s) * np.exp(-((r_m - 0.35 * R) ** 2) / (2.0 * (0.08 * R) ** 2))
        return np.asarray(crater + rim)


@dataclass(frozen=True, eq=False)
class Grid:
    """Pixel positions of (part of) a raster scan: row ``k``, column ``c`` lies at
    ``rows_m[k] + c * step_m`` (sample metres). Rows are straight and equally sampled; each
    row has its own origin (drift and creep move whole lines).
    """

    rows_m: np.ndarray  # (nr, 2)
    step_m: np.ndarray  # (2,)
    width: int

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.rows_m.shape[0]), self.width)

    @property
    def size(self) -> int:
        return int(self.rows_m.shape[0]) * self.width

    def xy(self) -> tuple[np.ndarray, np.ndarray]:
        """Full ``(nr, W)`` float64 coordinate arrays."""
        c = np.arange(self.width, dtype=np.float64)
        x = self.rows_m[:, 0:1] + c[None, :] * self.step_m[0]
        y = self.rows_m[:, 1:2] + c[None, :] * self.step_m[1]
        return x, y

    def shifted(self, dx_m: float, dy_m: float) -> Grid:
        return Grid(self.rows_m - np.array([dx_m, dy_m]), self.step_m, self.width)

    def bounds(self) -> tuple[float, float, float, float]:
        """``(xmin, xmax, ymin, ymax)`` of the pixel centres."""
        end = self.rows_m + (self.width - 1) * self.step_m
        both = np.concatenate([self.rows_m, end])
        return (float(both[:, 0].min()), float(both[:, 0].max()),
                float(both[:, 1].min()), float(both[:, 1].max()))

    def wave_sums(self, k_per_m: np.ndarray, coef: np.ndarray,
                  origin_m: np.ndarray | None = None, dtype: type = np.float64) -> np.ndarray:
        """``sum_t Re(coef[s, t] exp(i k[s, t] . (r - origin)))`` for each set ``s``.

        ``k_per_m`` is ``(S, T, 2)``, ``coef`` ``(S, T)`` complex; returns ``(S, nr, W)``.
        Separable in rows and columns, so it costs one batched matrix product.
        """
        k = np.asarray(k_per_m, dtype=np.float64)
        rows = self.rows_m if origin_m is None else self.rows_m - origin_m
        row_phase = np.exp(1j * (rows @ k.reshape(-1, 2).T)).reshape(
            rows.shape[0], k.shape[0], k.shape[1]
        ).transpose(1, 0, 2) * np.asarray(coef)[:, None, :]  # (S, nr, T)
        col = np.arange(self.width, dtype=np.float64)
        col_phase = (k @ self.step_m)[:, :, None] * col[None, None, :]  # (S, T, W)
        left = np.concatenate([row_phase.real, -row_phase.imag], axis=2).astype(dtype)
        right = np.concatenate([np.cos(col_phase), np.sin(col_phase)], axis=1).astype(dtype)
        return np.asarray(np.matmul(left, right))

    def wave_sum(self, k_per_m: np.ndarray, coef: np.ndarray,
                 origin_m: np.ndarray | None = None) -> np.ndarray:
        """``sum_t Re(coef_t exp(i k_t . (r - origin)))`` over the grid, ``(nr, W)`` float64."""
        k = np.asarray(k_per_m, dtype=np.float64).reshape(1, -1, 2)
        if k.shape[1] == 0:
            return np.zeros(self.shape)
        return self.wave_sums(k, np.asarray(coef).reshape(1, -1), origin_m)[0]


@dataclass
class SurfaceModel:
    """A lazily generated, seeded sample surface."""

    spec: SurfaceSpec
    entropy: int
    defect_density_per_nm2: float = 0.02
    terrace_width_m: float = 60e-9
    herringbone_amplitude_m: float = 0.15e-10
    lattice_angle_rad: float | None = None
    damage: list[DamageEvent] = field(default_factory=list)

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
        self._tiles: dict[tuple[int, int], tuple[Features, list[SurfaceDefect]]] = {}
        a1, a2 = np.array(self.spec.a1_m), np.array(self.spec.a2_m)
        self.cell_area_m2 = abs(float(a1[0] * a2[1] - a1[1] * a2[0]))

    # -- terraces --------------------------------------------------------------------------------

    def level_phi(self, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
        """The continuous terrace coordinate ``phi`` (level = floor(phi)) and ``|grad phi|``.

        Both ``(nr, W)`` float64 over ``grid``.
        """
        n = self.step_normal
        inv_w = 1.0 / self.terrace_width_m
        lin_rows = (grid.rows_m @ n) * inv_w + self.step_offset
        lin_cols = np.arange(grid.width) * float(grid.step_m @ n) * inv_w
        c = self.meander_amp * np.exp(1j * self.meander_phase)
        k = np.broadcast_to(self.meander_k, (3, *self.meander_k.shape))
        sums = grid.wave_sums(
            k, np.stack([-1j * c, c * self.meander_k[:, 0], c * self.meander_k[:, 1]])
        )
        phi = lin_rows[:, None] + lin_cols[None, :] + sums[0]
        gx = n[0] * inv_w + sums[1]
        gy = n[1] * inv_w + sums[2]
        return phi, np.maximum(np.hypot(gx, gy), 0.1 * inv_w)

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
        along = ((c * x_m + s * y_m) / zz).astype(np.float32)  # along a close-packed row
        across = ((-s * x_m + c * y_m) / period).astype(np.float32)
        tri = np.abs(((along + np.float32(self.herringbone_phase[0])) % 2.0) - 1.0)
        u = across + np.float32(math.tan(math.radians(30.0)) * zz / period) * tri
        ph = np.float32(2.0 * math.pi) * (u + np.float32(self.herringbone_phase[1]))
        sharp = np.float32(8.0)
        ridges = np.exp(sharp * (np.cos(ph) - 1.0)) + np.exp(
            sharp * (np.cos(ph - np.float32(2.0 * math.pi * 2.5 / 6.3)) - 1.0)
        )
        return np.asarray(self.herringbone_amplitude_m * ridges, dtype=np.float64)

    def surface_height_m(self, x_m: np.ndarray, y_m: np.ndarray) -> np.ndarray:
        """Atom-plane height under each point (terrace + herringbone), without damage."""
        level = self.level_at(x_m, y_m)
        return np.asarray(-level * self.spec.step_height_m + self.herringbone_m(x_m, y_m))

    # -- point defects ---------------------------------------------------------------------------

    def _tile(self, i: int, j: int) -> tuple[Features, list[SurfaceDefect]]:
        cached = self._tiles.get((i, j))
        if cached is not None:
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
        fx: list[float] = []
        fy: list[float] = []
        fz: list[float] = []
        fw: list[float] = []
        fa: list[float] = []
        fl: list[int] = []
        truth: list[SurfaceDefect] = []
        for k in range(n):
            layer = self.layer(int(levels[k]))
            sx, sy = layer.nearest_site(xs[k : k + 1], ys[k : k + 1])
            site = np.array([sx[0], sy[0]])
            z0 = layer.height_m + float(
                np.sum(self.herringbone_m(site[0:1], site[1:2]))
            )
            kind = kinds[int(which[k])]
            if kind == "vacancy":
                # Au: one missing atom; H:Si: a dimer vacancy (both lobes missing).
                for b in layer.basis_m:
                    fx.append(site[0] + b[0])
                    fy.append(site[1] + b[1])
                    fz.append(z0)
                    fw.append(-1.0)
                    fa.append(1.0)
                    fl.append(layer.level)
                pos = site + layer.basis_m.mean(axis=0)
            elif kind == "adatom":
                if self.spec.name == "au111":  # fcc hollow site
                    pos = site + (layer.cell_m[:, 0] + layer.cell_m[:, 1]) / 3.0
                else:  # on top of a dimer
                    pos = site + layer.basis_m.mean(axis=0)
                fx.append(pos[0])
                fy.append(pos[1])
                fz.append(z0 + self.spec.adatom_height_m)
                fw.append(_ADATOM_WEIGHT[self.spec.name])
                fa.append(1.0)
                fl.append(layer.level)
            else:  # dangling bond: a bright, extended state on one lobe
                pos = site + layer.basis_m[int(lobe[k])]
                fx.append(pos[0])
                fy.append(pos[1])
                fz.append(z0 + _DB_HEIGHT_M)
                fw.append(_DB_WEIGHT)
                fa.append(_DB_DECAY_FACTOR)
                fl.append(layer.level)
            truth.append(SurfaceDefect(float(pos[0]), float(pos[1]), kind, int(levels[k])))
        feats = Features(np.array(fx), np.array(fy), np.array(fz), np.array(fw), np.array(fa),
                         np.array(fl, dtype=np.int64))
        self._tiles[(i, j)] = (feats, truth)
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
        arrays = [np.concatenate([getattr(p, n) for p in parts]) for n in
                  ("x_m", "y_m", "z_m", "weight", "alpha_factor", "level")]
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
            dmg = self.damage_at(
                np.array([d.x_m for d in found]), np.array([d.y_m for d in found])
            )
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
    ) -> DamageEvent:
        """Record a disc of disordered material around ``(x_m, y_m)``."""
        base = float(self.surface_height_m(np.array([x_m]), np.array([y_m]))[0])
        n_modes = 32
        wavelength = np.exp(rng.uniform(math.log(0.6e-9), math.log(4e-9), n_modes))
        angle = rng.uniform(0.0, 2.0 * math.pi, n_modes)
        k = (2.0 * math.pi / wavelength)[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)
        amp = wavelength / wavelength.sum() * (1.5e-10 + 1.5e-10 * strength) * math.sqrt(n_modes)
        event = DamageEvent(
            x_m, y_m, radius_m, kind, strength, base, k, amp, rng.uniform(0, 2 * math.pi, n_modes),
            rng.uniform(0.0, 0.08, 3), rng.uniform(0.0, 2 * math.pi, 3),
        )
        self.damage.append(event)
        return event

    def _events_near(self, bounds: tuple[float, float, float, float],
                     margin_m: float) -> list[DamageEvent]:
        x0, x1, y0, y1 = bounds
        out = []
        for ev in self.damage:
            reach = ev.radius_m + margin_m
            if ev.x_m + reach < x0 or ev.x_m - reach > x1:
                continue
            if ev.y_m + reach < y0 or ev.y_m - reach > y1:
                continue
            out.append(ev)
        return out

    def damage_at(self, x_m: np.ndarray, y_m: np.ndarray) -> np.ndarray:
        """Damage indicator in [0, 1] at arbitrary points (0 on pristine surface)."""
        free = np.ones(np.shape(x_m))
        if not self.damage or free.size == 0:
            return 1.0 - free
        bounds = (float(np.min(x_m)), float(np.max(x_m)), float(np.min(y_m)), float(np.max(y_m)))
        for ev in self._events_near(bounds, 0.3 * _MAX_DAMAGE_RADIUS_M):
            r, edge_r = ev.radius_at(x_m, y_m)
            free *= 1.0 - ndtr((edge_r - r) / 0.5e-9)
        return 1.0 - free

    def damage_fields(
        self, grid: Grid, blur_m: float
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Damage indicator ``D`` in [0, 1] and disordered-material height, ``(nr, W)`` each.

        Returns ``(None, None)`` when no damage event reaches the grid. ``blur_m`` is the
        Gaussian apex radius of a blunt tip: it softens the edge and the roughness.
        """
        if not self.damage:
            return None, None
        edge = math.hypot(0.5e-9, blur_m)
        events = self._events_near(grid.bounds(), 0.3 * _MAX_DAMAGE_RADIUS_M + 4.0 * edge)
        if not events:
            return None, None
        x, y = grid.xy()
        free = np.ones(grid.shape)
        weighted = np.zeros(grid.shape)
        total = np.zeros(grid.shape)
        for ev in events:
            r, edge_r = ev.radius_at(x, y)
            d = ndtr((edge_r - r) / edge)
            kmag2 = np.sum(ev.mode_k_per_m**2, axis=1)
            amp = ev.mode_amp_m * np.exp(-0.5 * kmag2 * blur_m**2)
            rough = grid.wave_sum(ev.mode_k_per_m, amp * np.exp(1j * ev.mode_phase))
            h = ev.base_z_m + ev.profile_m(r) + rough
            free *= 1.0 - d
            weighted += d * h
            total += d
        dmg = 1.0 - free
        height = np.divide(weighted, total, out=np.zeros_like(weighted), where=total > 1e-12)
        return dmg, height
