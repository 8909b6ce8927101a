"""The SEM sample: a grainy substrate with particles and pores, generated lazily from a seed.

Nothing is stored per tile: every feature is a pure function of ``(seed, population, cell,
slot)`` through a counter-based hash (splitmix64), so any part of the ±stage can be rendered
at any magnification, in any order, with the same result.

- **Substrate**: Voronoi-like grains (one jittered seed point per ``grain_size_m`` cell, nearest
  of the 3 x 3 neighbouring seeds) with a per-grain orientation (channelling) contrast factor
  and thermal grooves of ``groove_depth_m`` along the grain boundaries.
- **Particles**: ellipsoids resting on the substrate (top surface ``c (1 + sqrt(1 - rho^2))``),
  in populations of a few sizes, each of a material from :data:`MATERIALS` (mean atomic number,
  insulating or not).
- **Pores**: ellipsoidal depressions ``-d sqrt(1 - rho^2)`` in the substrate.

:meth:`SampleModel.render` evaluates the height ``z`` and its gradient *analytically* at
arbitrary ``(H, W)`` sample coordinates (so slopes are those of the true surface at the probe
position, not finite differences), plus the material and feature maps the yield model needs.
Lengths are metres; ``x``, ``y`` are sample (stage) coordinates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MATERIALS: dict[str, tuple[float, bool]] = {
    # name: (mean atomic number Z, insulating)
    "C": (6.0, False),
    "Al2O3": (10.65, True),
    "SiO2": (10.8, True),
    "Si": (14.0, False),
    "Ni": (28.0, False),
    "Ag": (47.0, False),
    "W": (74.0, False),
    "Au": (79.0, False),
}
"""Materials by name: mean atomic number (mass-weighted for compounds) and whether it charges."""

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic, no warnings for arrays)."""
    x = x ^ (x >> _U64(30))
    x = x * _U64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> _U64(27))
    x = x * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def hash_ids(seed: int, stream: int, *keys: np.ndarray) -> np.ndarray:
    """A 64-bit hash of ``(seed, stream, *keys)``, elementwise over broadcast int ``keys``."""
    base = np.atleast_1d(np.asarray((seed * 0x2545F491 + stream) % (1 << 64), dtype=np.uint64))
    h = _mix(base * _GOLDEN + _GOLDEN)
    for key in keys:
        k = np.atleast_1d(np.asarray(key, dtype=np.int64)).astype(np.uint64)
        h = _mix((h ^ k) * _GOLDEN + _U64(0x632BE59BD9B4E019))
    return h


def _to_unit(h: np.ndarray) -> np.ndarray:
    return (h >> _U64(11)).astype(np.float64) * (1.0 / (1 << 53))


def hash_uniform(seed: int, stream: int, *keys: np.ndarray) -> np.ndarray:
    """Uniform floats in [0, 1) (float64), a pure function of the arguments."""
    return _to_unit(hash_ids(seed, stream, *keys))


@dataclass(frozen=True)
class Population:
    """Features of one size class: ``density_per_m2`` of them with semi-axis ~``radius_m``."""

    kind: str  # "particle" or "pore"
    index: int
    radius_m: float
    density_per_m2: float
    aspect_max: float  # in-plane semi-axis ratio a / b in 1..aspect_max
    height_ratio: float  # vertical semi-axis c / b (pores: depth / b)
    materials: tuple[str, ...] = ()
    material_weights: tuple[float, ...] = ()


@dataclass(frozen=True, eq=False)
class Features:
    """Ellipsoids ``(n,)``: centre, in-plane semi-axes ``a >= b``, angle, vertical ``c``."""

    kind: str
    id: np.ndarray  # uint64 hash, stable across frames
    x_m: np.ndarray
    y_m: np.ndarray
    a_m: np.ndarray
    b_m: np.ndarray
    angle_rad: np.ndarray
    c_m: np.ndarray
    z_number: np.ndarray
    insulating: np.ndarray  # bool

    @property
    def size(self) -> int:
        return int(self.x_m.shape[0])

    @staticmethod
    def concat(kind: str, parts: list[Features]) -> Features:
        names = ("id", "x_m", "y_m", "a_m", "b_m", "angle_rad", "c_m", "z_number", "insulating")
        if not parts:
            empty = [np.zeros(0, dtype=np.float64) for _ in names]
            empty[0] = np.zeros(0, dtype=np.uint64)
            empty[-1] = np.zeros(0, dtype=bool)
            return Features(kind, *empty)
        return Features(kind, *(np.concatenate([getattr(p, n) for p in parts]) for n in names))


@dataclass(frozen=True, eq=False)
class SurfaceMaps:
    """What the yield model needs at each probe position, all ``(H, W)``.

    ``z_m`` height, ``gx``/``gy`` its gradient (dimensionless), ``z_number`` mean atomic number,
    ``grain_factor`` orientation contrast, ``pore_depth`` depth below the substrate as a
    fraction of the pore's depth (0 outside pores), ``particle`` index into the rendered
    particles (-1 where the substrate is on top).
    """

    z_m: np.ndarray
    gx: np.ndarray
    gy: np.ndarray
    z_number: np.ndarray
    grain_factor: np.ndarray
    pore_depth: np.ndarray
    particle: np.ndarray
    particles: Features
    pores: Features


class SampleModel:
    """A seeded sample (see the module docstring); ``render`` is deterministic in the seed."""

    _CELL_FILL = 1.5  # expected features per cell

    def __init__(
        self,
        seed: int,
        *,
        substrate: str,
        grain_size_m: float,
        grain_contrast: float,
        groove_depth_m: float,
        groove_width_m: float,
        populations: tuple[Population, ...],
    ) -> None:
        self.seed = seed
        self.substrate_z = MATERIALS[substrate][0]
        self.grain_size_m = grain_size_m
        self.grain_contrast = grain_contrast
        self.groove_depth_m = groove_depth_m
        self.groove_width_m = groove_width_m
        self.populations = populations
        self._feature_cache: dict[tuple[Population, int, int, int, int], Features] = {}

    # -- features ------------------------------------------------------------------------------

    def _population_in_box(
        self, pop: Population, x0: float, x1: float, y0: float, y1: float
    ) -> Features:
        if pop.density_per_m2 <= 0.0:
            return Features.concat(pop.kind, [])
        cell = math.sqrt(self._CELL_FILL / pop.density_per_m2)
        margin = 2.5 * pop.radius_m * pop.aspect_max
        i_lo, i_hi = math.floor((x0 - margin) / cell), math.floor((x1 + margin) / cell) + 1
        j_lo, j_hi = math.floor((y0 - margin) / cell), math.floor((y1 + margin) / cell) + 1
        # a pure function of the cells spanned: frames of the same place (drift moves the box by
        # far less than a cell) reuse it
        key = (pop, i_lo, i_hi, j_lo, j_hi)
        hit = self._feature_cache.get(key)
        if hit is None:
            hit = self._population_cells(pop, cell, i_lo, i_hi, j_lo, j_hi)
            if len(self._feature_cache) >= 64:
                self._feature_cache.clear()
            self._feature_cache[key] = hit
        return hit

    def _population_cells(
        self, pop: Population, cell: float, i_lo: int, i_hi: int, j_lo: int, j_hi: int
    ) -> Features:
        slots = 4
        p_active = self._CELL_FILL / slots
        i = np.arange(i_lo, i_hi)
        j = np.arange(j_lo, j_hi)
        ii, jj, kk = (g.ravel() for g in np.meshgrid(i, j, np.arange(slots), indexing="ij"))
        stream = 100 + 10 * pop.index + (0 if pop.kind == "particle" else 500)
        ids = hash_ids(self.seed, stream, ii, jj, kk)

        def u(field: int) -> np.ndarray:  # independent uniforms per slot, derived from its id
            return _to_unit(_mix(ids + _U64((field * 0x9E3779B97F4A7C15) % (1 << 64))))

        keep = u(0) < p_active
        ids = ids[keep]
        ii, jj = ii[keep], jj[keep]
        x = (ii + u(1)) * cell
        y = (jj + u(2)) * cell
        b = pop.radius_m * np.exp(0.5 * (u(3) - 0.5))  # ±25 % in log size
        a = b * (1.0 + (pop.aspect_max - 1.0) * u(4))
        angle = math.pi * u(5)
        c = b * pop.height_ratio * (0.8 + 0.2 * u(6))
        if pop.kind == "particle" and pop.materials:
            cum = np.cumsum(pop.material_weights) / np.sum(pop.material_weights)
            which = np.minimum(np.searchsorted(cum, u(7), side="right"), len(cum) - 1)
            table = np.array([MATERIALS[m] for m in pop.materials], dtype=np.float64)
            z_number = table[which, 0]
            insulating = table[which, 1] > 0.5
        else:
            z_number = np.full(x.shape, self.substrate_z)
            insulating = np.zeros(x.shape, dtype=bool)
        for arr in (ids, x, y, a, b, angle, c, z_number, insulating):
            arr.flags.writeable = False  # shared by every frame that hits the cache
        return Features(pop.kind, ids, x, y, a, b, angle, c, z_number, insulating)

    def features_in_box(self, kind: str, x0: float, x1: float, y0: float, y1: float) -> Features:
        """Every particle (``kind="particle"``) or pore touching the box (plus a margin)."""
        parts = [
            self._population_in_box(p, x0, x1, y0, y1) for p in self.populations if p.kind == kind
        ]
        return Features.concat(kind, parts)

    # -- rendering -----------------------------------------------------------------------------

    def _grains(
        self, x: np.ndarray, y: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Grain factor, groove height and its gradient at ``(x, y)``."""
        g = self.grain_size_m
        i0 = math.floor(float(x.min()) / g) - 1
        j0 = math.floor(float(y.min()) / g) - 1
        ux = (x / g - i0).astype(np.float32)  # >= 1: truncation is floor
        uy = (y / g - j0).astype(np.float32)
        ci, cj = ux.astype(np.int32), uy.astype(np.int32)
        ni, nj = int(ci.max()) + 2, int(cj.max()) + 2
        ti, tj = np.meshgrid(np.arange(i0, i0 + ni), np.arange(j0, j0 + nj), indexing="ij")
        # Seeds jittered within ±35 % of the cell centre, in cell units relative to (i0, j0).
        sx = (ti - i0 + 0.5 + 0.7 * (hash_uniform(self.seed, 1, ti, tj) - 0.5)).ravel()
        sy = (tj - j0 + 0.5 + 0.7 * (hash_uniform(self.seed, 2, ti, tj) - 0.5)).ravel()
        factor = 1.0 + self.grain_contrast * (2.0 * hash_uniform(self.seed, 3, ti, tj) - 1.0)
        factor = factor.ravel().astype(np.float32)
        base = ci * nj + cj
        sxf, syf = sx.astype(np.float32), sy.astype(np.float32)
        shape = x.shape
        # Nearest two of the 9 neighbouring seeds. Each squared distance (float32, >= 0, so its
        # bits order like int32) carries the candidate number in its 4 low mantissa bits (a
        # relative change < 2e-6): two min/max passes then track value and argument together.
        offsets = np.array([di * nj + dj for di in (-1, 0, 1) for dj in (-1, 0, 1)], np.int32)
        d = np.empty(shape, dtype=np.float32)
        t = np.empty(shape, dtype=np.float32)
        dv, tv = d.view(np.int32), t.view(np.int32)
        p1 = np.full(shape, np.iinfo(np.int32).max, dtype=np.int32)
        p2 = np.full(shape, np.iinfo(np.int32).max, dtype=np.int32)
        for c, off in enumerate(offsets.tolist()):
            np.take(np.roll(sxf, -off), base, out=d)  # seed of cell base + off
            np.subtract(ux, d, out=d)
            np.multiply(d, d, out=d)
            np.take(np.roll(syf, -off), base, out=t)
            np.subtract(uy, t, out=t)
            np.multiply(t, t, out=t)
            np.add(d, t, out=d)
            np.bitwise_and(dv, np.int32(~15), out=dv)
            np.bitwise_or(dv, np.int32(c), out=dv)
            np.maximum(p1, dv, out=tv)
            np.minimum(p2, tv, out=p2)
            np.minimum(p1, dv, out=p1)
        k1 = base + offsets[p1 & 15]
        k2 = base + offsets[p2 & 15]
        d1 = (p1 & np.int32(~15)).view(np.float32)
        d2 = (p2 & np.int32(~15)).view(np.float32)
        grain = factor[k1]
        if self.groove_depth_m <= 0.0:
            zero = np.zeros(x.shape, dtype=np.float32)
            return grain, zero, zero, zero
        # Distance to the bisector between the two nearest seeds, and its unit normal.
        nx, ny = sxf[k2] - sxf[k1], syf[k2] - syf[k1]
        sep = np.maximum(np.sqrt(nx * nx + ny * ny), np.float32(1e-6))
        s_w = (d2 - d1) * np.float32(g / (2.0 * self.groove_width_m)) / sep  # in groove widths
        e = np.exp(-(s_w * s_w))
        z = e * np.float32(-self.groove_depth_m)
        # z rises away from the boundary; the distance s grows along -n (towards the own seed)
        slope = s_w * e * np.float32(-2.0 * self.groove_depth_m / self.groove_width_m) / sep
        return grain, z, slope * nx, slope * ny

    def _stamp(
        self, f: Features, x: np.ndarray, y: np.ndarray, pitch_m: float, sign: float
    ) -> tuple[np.ndarray, ...]:
        """Contributions of ellipsoids ``f`` on the pixels they cover.

        Returns flat pixel index, height, gradient x, gradient y and feature index, one entry per
        covered pixel. Heights are evaluated at the exact pixel positions ``x``, ``y``; only the
        stencil around each feature is placed through the frame's mean affine pixel map (widened
        by how far drift bends the rows away from it). ``pitch_m`` is the smaller pixel pitch.
        """
        h, w = x.shape
        empty = tuple(np.zeros(0) for _ in range(5))
        if f.size == 0:
            return empty
        origin = np.array([x[0, 0], y[0, 0]])
        ex = np.array([x[0, -1], y[0, -1]]) - origin
        ex /= max(w - 1, 1)
        ey = np.array([x[-1, 0], y[-1, 0]]) - origin
        ey /= max(h - 1, 1)
        det = ex[0] * ey[1] - ex[1] * ey[0]
        dx, dy = f.x_m - origin[0], f.y_m - origin[1]
        col = (dx * ey[1] - dy * ey[0]) / det
        row = (ex[0] * dy - ex[1] * dx) / det
        rows = np.arange(h)
        bend = np.hypot(
            x[:, 0] - origin[0] - rows * ey[0], y[:, 0] - origin[1] - rows * ey[1]
        ).max()
        half = np.ceil(f.a_m / pitch_m + bend / pitch_m + 1.0).astype(np.int64)
        visible = (col + half >= 0) & (col - half < w) & (row + half >= 0) & (row - half < h)
        ids = np.nonzero(visible)[0]
        if ids.size == 0:
            return empty
        groups: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (rows, cols, feature)
        bins = np.ceil(np.log2(half[ids])).astype(np.int64)
        for b in np.unique(bins):
            members = ids[bins == b]
            k = 1 << int(b)
            if 2 * k + 1 <= min(h, w):
                off = np.arange(-k, k + 1)
                rr = np.rint(row[members]).astype(np.int64)[:, None, None] + off[None, :, None]
                cc = np.rint(col[members]).astype(np.int64)[:, None, None] + off[None, None, :]
                rr, cc = np.broadcast_arrays(rr, cc)
                groups.append((rr, cc, np.broadcast_to(members[:, None, None], rr.shape)))
                continue
            for m in members:  # features as large as the frame: their clipped bounding box
                r0, r1 = max(int(row[m]) - k, 0), min(int(row[m]) + k + 1, h)
                c0, c1 = max(int(col[m]) - k, 0), min(int(col[m]) + k + 1, w)
                rr, cc = np.meshgrid(np.arange(r0, r1), np.arange(c0, c1), indexing="ij")
                groups.append((rr, cc, np.full(rr.shape, m)))
        out: list[tuple[np.ndarray, ...]] = []
        for rr, cc, fid in groups:
            ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
            rr, cc, fid = rr[ok], cc[ok], fid[ok]
            px, py = x[rr, cc] - f.x_m[fid], y[rr, cc] - f.y_m[fid]
            ca, sa = np.cos(f.angle_rad[fid]), np.sin(f.angle_rad[fid])
            u = px * ca + py * sa
            v = -px * sa + py * ca
            a, b_m = f.a_m[fid], f.b_m[fid]
            rho2 = (u / a) ** 2 + (v / b_m) ** 2
            inside = rho2 < 1.0
            if not np.any(inside):
                continue
            u, v, a, b_m, rho2 = u[inside], v[inside], a[inside], b_m[inside], rho2[inside]
            fid, rr, cc, ca, sa = fid[inside], rr[inside], cc[inside], ca[inside], sa[inside]
            c = f.c_m[fid]
            root = np.sqrt(1.0 - rho2)
            z = sign * c * root + (c if sign > 0 else 0.0)
            slope = -sign * c / np.maximum(root, 1e-3)
            du, dv = slope * u / a**2, slope * v / b_m**2
            out.append((rr * w + cc, z, du * ca - dv * sa, du * sa + dv * ca, fid))
        if not out:
            return empty
        return tuple(np.concatenate([o[i] for o in out]) for i in range(5))

    @staticmethod
    def _top(
        flat: np.ndarray, key: np.ndarray, *values: np.ndarray
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        """Per pixel, the entry with the largest ``key``: (pixels, values at those entries)."""
        order = np.lexsort((key, flat))
        flat_s = flat[order]
        last = np.ones(flat_s.shape, dtype=bool)
        last[:-1] = flat_s[1:] != flat_s[:-1]
        pick = order[last]
        return flat[pick], tuple(v[pick] for v in values)

    def render(self, x: np.ndarray, y: np.ndarray, pitch_m: float) -> SurfaceMaps:
        """Surface maps at sample positions ``x``, ``y`` (``(H, W)`` float64 metres)."""
        h, w = x.shape
        x0, x1 = float(x.min()), float(x.max())
        y0, y1 = float(y.min()), float(y.max())
        grain, z_sub, gx_sub, gy_sub = self._grains(x, y)
        z = z_sub.astype(np.float64).ravel()
        gx = gx_sub.astype(np.float64).ravel()
        gy = gy_sub.astype(np.float64).ravel()
        pore_depth = np.zeros(h * w, dtype=np.float32)
        pores = self.features_in_box("pore", x0, x1, y0, y1)
        flat, zp, gxp, gyp, fid = self._stamp(pores, x, y, pitch_m, -1.0)
        if flat.size:
            pix, (zp, gxp, gyp, fid) = self._top(flat.astype(np.int64), -zp, zp, gxp, gyp, fid)
            z[pix] += zp
            gx[pix] += gxp
            gy[pix] += gyp
            pore_depth[pix] = -zp / pores.c_m[fid.astype(np.int64)]
        particles = self.features_in_box("particle", x0, x1, y0, y1)
        z_number = np.full(h * w, self.substrate_z, dtype=np.float32)
        which = np.full(h * w, -1, dtype=np.int64)
        flat, zq, gxq, gyq, fid = self._stamp(particles, x, y, pitch_m, 1.0)
        if flat.size:
            pix, (zq, gxq, gyq, fid) = self._top(flat.astype(np.int64), zq, zq, gxq, gyq, fid)
            on_top = zq > z[pix]
            pix, fid = pix[on_top], fid[on_top].astype(np.int64)
            z[pix] = zq[on_top]
            gx[pix] = gxq[on_top]
            gy[pix] = gyq[on_top]
            z_number[pix] = particles.z_number[fid]
            which[pix] = fid
            pore_depth[pix] = 0.0
        return SurfaceMaps(
            z_m=z.reshape(h, w).astype(np.float32),
            gx=gx.reshape(h, w).astype(np.float32),
            gy=gy.reshape(h, w).astype(np.float32),
            z_number=z_number.reshape(h, w),
            grain_factor=grain.astype(np.float32),
            pore_depth=pore_depth.reshape(h, w),
            particle=which.reshape(h, w),
            particles=particles,
            pores=pores,
        )
