"""Tersoff–Hamann LDOS of a :class:`~simulators.stm_surface.SurfaceModel` and the
constant-current height.

The sample LDOS at the tip apex is ``rho(r) = sum_i w_i exp(-2 kappa |r - R_i|)`` over atoms
``R_i``. For each terrace the sum over its (infinite) lattice is evaluated exactly by Poisson
summation: with ``alpha = 2 kappa`` and ``q = sqrt(alpha**2 + G**2)``,

    sum_R exp(-alpha |r - R|) = (1/A) sum_G F(q, h) S_G exp(i G . r),
    F(q, h) = 2 pi alpha (1 + q h) exp(-q h) / q**3,

``h`` the height above the atom plane, ``A`` the cell area and ``S_G`` the basis structure
factor; reciprocal vectors whose weight is below ``_TERM_CUTOFF`` of the mean are dropped.
The lattice sums are separable over a raster (:meth:`Grid.wave_sums`), so their cost is a
few small matrix products. Terraces are blended with a soft coverage at their edges; adatoms
and dangling bonds are added atom by atom; near a vacancy the series is replaced by the exact
sum over the remaining neighbours (no cancellation of large terms); conditioning damage is a
corrugation-free layer at a rough height.

A tip is a set of apexes ``j`` (offset ``d_j``, height ``h_j``, weight ``a_j``) with current
``I ∝ sum_j a_j rho(x - d_j, z + h_j)``; a blunt apex (Gaussian radius ``sigma``) multiplies
each lattice term by ``exp(-G**2 sigma**2 / 2)`` and widens steps, defects and damage alike.
The constant-current height solves ``ln(I / I_set) = 0`` per pixel by Newton steps (two over
the whole frame), then a bracketed Newton / Illinois false-position polish on the few pixels
left. Closer than ``_H_CONTACT_M`` to an atom plane the apex "touches": the current keeps
rising exponentially, which keeps ``I(z)`` monotonic and the solver safe.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.special import ndtr

from simulators.stm_grid import Grid
from simulators.stm_solver import solve_decreasing
from simulators.stm_surface import Features, SurfaceModel
from simulators.stm_tip import Apex, TipConfig

EDGE_SIGMA_M = 1.0e-10
"""Softness of a step edge as seen by a sharp tip."""
_H_CONTACT_M = 1.2e-10  # closest approach to an atom plane where the s-wave sums are used ...
_H_LOW_M = -3e-10  # ... below it the current keeps rising exponentially (the apex touches)
_MAX_NEWTON_STEPS = 30
_NEWTON_TOL_M = 1e-13
_MAX_STEP_M = 3e-10
_TERM_CUTOFF = 5e-3  # drop lattice terms below 0.5 % of the mean (< 0.005 Å in z)
_FEATURE_RADIUS_M = 1.2e-9
_VACANCY_WINDOW_M = 0.5e-9  # pixels this close to a vacancy get the exact atom-by-atom sum
_NEIGHBOUR_RADIUS_M = 0.9e-9  # atoms summed around each of those pixels
_EXACT_MAX_BLUR_M = 2e-10  # blunter apexes subtract a blurred missing atom from the series
_F32 = np.float32
_TERMS_CACHE_SIZE = 6
_SMALL_ACTIVE_RATIO = 16  # fewer active pixels than entries / this: search sorted entries


class _EntryIndex:
    """Which entries of a per-entry array (``pix``: the output pixel of each entry) belong to a
    set of active pixels, without a pass over all entries when the set is small."""

    def __init__(self, pix: np.ndarray, *, presorted: bool = False) -> None:
        """``presorted``: ``pix`` is known to be non-decreasing (no sorting needed)."""
        self.pix = pix
        self._order: np.ndarray | None = None
        self._sorted: np.ndarray | None = None
        self._groups: tuple[np.ndarray, np.ndarray] | None = None
        self._presorted = presorted
        if presorted:
            self._order = np.arange(pix.size)
            self._sorted = pix

    def groups(self) -> tuple[np.ndarray, np.ndarray]:
        """The distinct pixels of the entries and each entry's place among them."""
        if self._groups is None:
            if self._sorted is self.pix:  # already sorted: the same as np.unique, no sort
                first = np.empty(self.pix.size, dtype=bool)
                first[:1] = True
                np.not_equal(self.pix[1:], self.pix[:-1], out=first[1:])
                inv = np.cumsum(first)
                inv -= 1
                self._groups = (self.pix[first], inv)
            else:
                uniq, inv = np.unique(self.pix, return_inverse=True)
                self._groups = (uniq, inv.ravel())
        return self._groups

    def active(
        self, act: np.ndarray | None, act_pos: Callable[[], np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray | slice]:
        """Output positions (in ``act``) of the entries of active pixels, and the entries, in
        entry order. ``act_pos()``: each pixel's position in ``act`` (-1: inactive)."""
        pix = self.pix
        if act is None:
            return pix, slice(None)
        if act.size * _SMALL_ACTIVE_RATIO >= pix.size or not _increasing(act):
            out = np.take(act_pos(), pix)
            sel = np.flatnonzero(out >= 0)
            return np.take(out, sel), sel
        if self._order is None or self._sorted is None:
            self._order = np.argsort(pix, kind="stable")
            self._sorted = pix[self._order]
        lo = np.searchsorted(self._sorted, act, "left")
        count = np.searchsorted(self._sorted, act, "right") - lo
        n = int(count.sum())
        if n == 0:
            empty = np.zeros(0, dtype=np.intp)
            return empty, empty
        ends = np.cumsum(count)
        at = np.arange(n) + np.repeat(lo - (ends - count), count)
        if self._presorted:  # the entries are already in order, pixel by pixel of ``act``
            return np.repeat(np.arange(act.size), count), at
        sel = np.sort(self._order[at])
        return np.searchsorted(act, pix[sel]), sel


def _scatter_add(
    rho: np.ndarray,
    drho: np.ndarray,
    out: np.ndarray,
    k: np.ndarray,
    dk: np.ndarray,
    groups: tuple[np.ndarray, np.ndarray] | None,
) -> None:
    """``rho += bincount(out, k)``, ``drho += bincount(out, dk)`` (float64 sums rounded to
    float32), touching only the pixels in ``out``: the per-pixel sums run over the same entries
    in the same order, so the result is bit-identical to full-length bincounts."""
    n_out = rho.size
    if out.size == 0:  # no entries among the active pixels
        return
    if groups is None and out.size * _SMALL_ACTIVE_RATIO < n_out:
        uniq, inv = np.unique(out, return_inverse=True)
        groups = (uniq, inv.ravel())
    if groups is None:
        rho += np.bincount(out, weights=k, minlength=n_out).astype(_F32)
        drho += np.bincount(out, weights=dk, minlength=n_out).astype(_F32)
        return
    uniq, inv = groups
    rho[uniq] += np.bincount(inv, weights=k, minlength=uniq.size).astype(_F32)
    drho[uniq] += np.bincount(inv, weights=dk, minlength=uniq.size).astype(_F32)


def _increasing(a: np.ndarray) -> bool:
    return a.size < 2 or bool(np.all(a[1:] > a[:-1]))


@dataclass(eq=False)
class _Terms:
    """Per-pixel terms defined on a subset ``idx`` of the pixels (None: all of them)."""

    idx: np.ndarray | None
    n_pixels: int
    _inv: np.ndarray | None = None

    def select(self, act: np.ndarray | None) -> tuple[np.ndarray | slice, np.ndarray | slice]:
        """Where the active pixels ``act`` sit in this term's arrays and in the output."""
        if act is None:
            return slice(None), (slice(None) if self.idx is None else self.idx)
        if self.idx is None:
            return act, slice(None)
        if self._inv is None:
            inv = np.full(self.n_pixels, -1, dtype=np.int64)
            inv[self.idx] = np.arange(self.idx.size)
            self._inv = inv
        pos = self._inv[act]
        ok = np.nonzero(pos >= 0)[0]
        return pos[ok], ok


@dataclass(eq=False)
class _LayerTerms(_Terms):
    cov: np.ndarray = field(default_factory=lambda: np.zeros(0, _F32))
    base_m: np.ndarray = field(default_factory=lambda: np.zeros(0, _F32))
    gamma: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), _F32))  # (S + 1, k)
    shells: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    # Exact sum near vacancies, per (pixel, atom) entry: the pixel, the atom plane height and
    # coverage there (``base_m`` and ``cov`` of that pixel) and the squared lateral distance.
    ex_pix: np.ndarray | None = None
    ex_base_m: np.ndarray | None = None
    ex_cov: np.ndarray | None = None
    ex_d2: np.ndarray | None = None
    ex_index: _EntryIndex | None = None


@dataclass(eq=False)
class _DamageTerms(_Terms):
    dmg: np.ndarray = field(default_factory=lambda: np.zeros(0, _F32))
    height_m: np.ndarray = field(default_factory=lambda: np.zeros(0, _F32))


@dataclass(frozen=True, eq=False)
class _FeatureTerms:
    pix: np.ndarray
    d2_m2: np.ndarray
    z_m: np.ndarray
    weight: np.ndarray  # relative to rho_set
    alpha_per_m: np.ndarray
    index: _EntryIndex


@dataclass(frozen=True, eq=False)
class _ApexTerms:
    apex: Apex
    layers: list[_LayerTerms]
    damage: _DamageTerms | None
    features: _FeatureTerms | None
    guess_m: np.ndarray  # local surface height, for the first Newton step


class LDOSModel:
    """Evaluates the LDOS of ``surface`` and solves for constant-current heights.

    ``conductance_ratio`` is ``(I_set / V) / (100 pA / 0.5 V)``; at ratio 1 the tip sits
    ``gap_m`` above a flat terrace. LDOS values inside are in units of the setpoint LDOS.
    """

    def __init__(
        self,
        surface: SurfaceModel,
        *,
        kappa_per_m: float,
        gap_m: float,
        conductance_ratio: float = 1.0,
    ) -> None:
        self.surface = surface
        self.alpha = 2.0 * kappa_per_m
        self.c0 = 2.0 * math.pi * self.alpha
        layer0 = surface.layer(0)
        self.area_m2 = layer0.area_m2
        self.n_basis = float(layer0.basis_m.shape[0])
        self._select_terms(gap_m)
        self.rho_set = self.rho_flat(gap_m) * conductance_ratio
        self.h_set_m = self._solve_flat()
        self._terms_cache: dict[tuple[object, ...], _ApexTerms] = {}
        # Per-shell prefactors of F(q, h) / (A rho_set), mean term first.
        q = np.concatenate([[self.alpha], self.shell_q])
        scale = np.ones_like(q)
        scale[0] = self.n_basis
        self._q32 = q.astype(_F32)[:, None]
        self._pref = (scale * self.c0 / (q**3 * self.area_m2 * self.rho_set)).astype(_F32)
        self._prefq = (self._pref * q).astype(_F32)
        self._dpref = (scale * self.c0 / (q * self.area_m2 * self.rho_set)).astype(_F32)

    def _F(self, q: np.ndarray | float, h: np.ndarray | float) -> np.ndarray:
        return np.asarray(self.c0 * (1.0 + q * h) * np.exp(-q * h) / q**3)

    def rho_flat(self, h_m: float) -> float:
        """LDOS above a flat, perfect terrace at height ``h_m``, averaged over the cell."""
        return float(self.n_basis * self._F(self.alpha, h_m) / self.area_m2)

    def _solve_flat(self) -> float:
        h = 3e-10
        for _ in range(50):
            f = math.log(self.rho_flat(h) / self.rho_set)
            d = (math.log(self.rho_flat(h + 1e-13)) - math.log(self.rho_flat(h))) / 1e-13
            h -= f / d
        return h

    def _select_terms(self, gap_m: float) -> None:
        """Pick the reciprocal vectors (m, n) worth keeping and group them in |G| shells."""
        lay = self.surface.layer(0)
        h_ref = 0.85 * gap_m
        f0 = self.n_basis * float(self._F(self.alpha, h_ref))
        terms: list[tuple[int, int, float, complex]] = []
        for m in range(0, 8):
            for n in range(-8, 9):
                if m == 0 and n <= 0:
                    continue
                g = lay.recip_per_m @ np.array([m, n], dtype=np.float64)
                gabs = float(np.hypot(g[0], g[1]))
                sg = complex(np.sum(np.exp(-1j * (lay.basis_m @ g))))
                q = math.hypot(self.alpha, gabs)
                if 2.0 * abs(sg) * float(self._F(q, h_ref)) < _TERM_CUTOFF * f0:
                    continue
                terms.append((m, n, gabs, sg))
        shells: list[float] = []
        members: list[list[tuple[int, int, complex]]] = []
        for m, n, gabs, sg in terms:
            for s, val in enumerate(shells):
                if abs(val - gabs) <= 1e-6 * gabs:
                    members[s].append((m, n, sg))
                    break
            else:
                shells.append(gabs)
                members.append([(m, n, sg)])
        self._shells = members
        self.shell_g = np.array(shells)
        self.shell_q = np.hypot(self.alpha, self.shell_g)

    # -- lateral precomputation ------------------------------------------------------------------

    def _gamma(self, level: int, grid: Grid, blur_m: float) -> tuple[np.ndarray, np.ndarray]:
        """Lattice sums of the shells that survive the blunt-apex blur.

        Returns ``(gamma, shells)``: ``(1 + S', nr * W)`` float32 with row 0 all ones (the mean
        term), and the indices of those rows into ``[mean, shell 0, shell 1, ...]``.
        """
        lay = self.surface.layer(level)
        damp = np.exp(-0.5 * self.shell_g**2 * blur_m**2)
        kept = [s for s in range(len(self._shells)) if damp[s] > _TERM_CUTOFF]
        out = np.empty((len(kept) + 1, grid.size), dtype=_F32)
        out[0] = 1.0
        if kept:
            t_max = max(len(self._shells[s]) for s in kept)
            k = np.zeros((len(kept), t_max, 2))
            coef = np.zeros((len(kept), t_max), dtype=np.complex128)
            for row, s in enumerate(kept):
                members = self._shells[s]
                mn = np.array([(m, n) for m, n, _ in members], dtype=np.float64)
                k[row, : len(members)] = mn @ lay.recip_per_m.T
                coef[row, : len(members)] = [2.0 * sg * damp[s] for _, _, sg in members]
            out[1:] = grid.wave_sums(k, coef, lay.origin_m, dtype=_F32).reshape(len(kept), -1)
        return out, np.array([0] + [s + 1 for s in kept], dtype=np.int64)

    def _cached_apex_terms(self, grid: Grid, apex: Apex, blur_m: float) -> _ApexTerms:
        """Lateral terms, reused while the grid, the apex offset and the sample are unchanged
        (a double tip's main apex and the good-tip truth image share them)."""
        key = (
            grid.rows_m.tobytes(),
            grid.step_m.tobytes(),
            grid.width,
            apex.dx_m,
            apex.dy_m,
            blur_m,
            len(self.surface.damage),
        )
        hit = self._terms_cache.get(key)
        if hit is None:
            hit = self._apex_terms(grid, Apex(apex.dx_m, apex.dy_m), blur_m)
            if len(self._terms_cache) >= _TERMS_CACHE_SIZE:
                self._terms_cache.pop(next(iter(self._terms_cache)))
            self._terms_cache[key] = hit
        return _ApexTerms(apex, hit.layers, hit.damage, hit.features, hit.guess_m)

    def _apex_terms(self, grid: Grid, apex: Apex, blur_m: float) -> _ApexTerms:
        g = grid.shifted(apex.dx_m, apex.dy_m)
        n_pix = g.size
        surf = self.surface
        phi = surf.level_phi(g).ravel()
        floor_phi = np.floor(phi)
        sigma = math.hypot(EDGE_SIGMA_M, blur_m)
        frac = phi - floor_phi
        edge_zone = 6.0 * sigma * surf.max_level_gradient_per_m  # in terraces
        near_lo = frac < edge_zone
        near_hi = (1.0 - frac) < edge_zone
        dmg, dmg_h = surf.damage_fields(g, blur_m)
        hb: np.ndarray | float = 0.0
        if surf.spec.herringbone:
            x, y = g.xy()
            hb = surf.herringbone_m(x.ravel(), y.ravel())
        layers: list[_LayerTerms] = []
        guess = np.zeros(n_pix)
        radius = _FEATURE_RADIUS_M + 3.0 * blur_m
        x0, x1, y0, y1 = g.bounds()
        feats = surf.features_in_box(x0 - radius, x1 + radius, y0 - radius, y1 + radius)
        if blur_m < _EXACT_MAX_BLUR_M:
            vacancies = feats.subset(feats.weight < 0)
            feats = feats.subset(feats.weight >= 0)
        else:
            vacancies = Features.empty()
        lo, hi = int(floor_phi.min()), int(floor_phi.max())
        near_any = bool(near_lo.any() or near_hi.any())
        levels = [lo] if lo == hi and not near_any else list(range(lo - 1, hi + 2))
        dmg_flat = None if dmg is None else dmg.ravel()
        for level in levels:
            idx: np.ndarray | None
            if len(levels) == 1:
                idx = None
                cov = np.ones(n_pix)
            else:
                cand_mask = (floor_phi == level) | ((floor_phi == level + 1) & near_lo)
                cand_mask |= (floor_phi == level - 1) & near_hi
                idx = np.nonzero(cand_mask)[0]
                if idx.size == 0:
                    continue
                ph = phi[idx]
                cov = np.ones(idx.size)
                edge = near_lo[idx] | near_hi[idx]
                if np.any(edge):  # soft coverage across step edges
                    rows, cols = np.divmod(idx[edge], g.width)
                    ex = g.rows_m[rows, 0] + cols * g.step_m[0]
                    ey = g.rows_m[rows, 1] + cols * g.step_m[1]
                    wd = surf.level_gradient(ex, ey) * sigma
                    pe = ph[edge]
                    cov[edge] = ndtr((pe - level) / wd) - ndtr((pe - level - 1.0) / wd)
                cov[~edge] = (np.floor(ph[~edge]) == level).astype(np.float64)
            if dmg_flat is not None:
                cov = cov * (1.0 - (dmg_flat if idx is None else dmg_flat[idx]))
            if idx is not None:
                keep = cov > 1e-6
                idx, cov = idx[keep], cov[keep]
                if idx.size == 0:
                    continue
            sel = slice(None) if idx is None else idx
            n_sel = n_pix if idx is None else idx.size
            base = np.full(n_sel, surf.level_height_m(level))
            if isinstance(hb, np.ndarray):
                base += hb[sel]
            gamma, shells = self._gamma(level, g, blur_m)
            if idx is not None:
                gamma = gamma[:, idx]
            unit_cov = idx is None and dmg_flat is None  # cov all ones: 1 * x == x, skip it
            terms = _LayerTerms(
                idx,
                n_pix,
                cov=np.ones(n_pix, dtype=_F32) if unit_cov else cov.astype(_F32),
                base_m=np.asarray(base, dtype=_F32),
                gamma=gamma,
                shells=shells,
            )
            on_level = vacancies.level == level
            if np.any(on_level):
                self._exact_near_vacancies(terms, level, g, vacancies.subset(on_level))
            layers.append(terms)
            guess[sel] += base if unit_cov else cov * base
        damage = None
        if dmg is not None and dmg_h is not None:
            dflat, hflat = dmg.ravel(), dmg_h.ravel()
            didx = np.nonzero(dflat > 1e-6)[0]
            damage = _DamageTerms(
                didx, n_pix, dmg=dflat[didx].astype(_F32), height_m=hflat[didx].astype(_F32)
            )
            guess[didx] += dflat[didx] * hflat[didx]
        return _ApexTerms(apex, layers, damage, self._feature_terms(g, feats, radius), guess)

    def _exact_near_vacancies(
        self, terms: _LayerTerms, level: int, grid: Grid, vacancies: Features
    ) -> None:
        """Replace the lattice series by the exact sum over the remaining atoms near vacancies.

        Subtracting a missing atom from the truncated series would cancel two large numbers
        where the tip dips into the hole; the direct sum has no such cancellation.
        """
        pix, _, _ = grid.pixels_near(vacancies.x_m, vacancies.y_m, _VACANCY_WINDOW_M)
        if pix.size == 0:
            return
        pix = np.unique(pix)
        if terms.idx is None:
            pos = pix
        else:
            pos = np.searchsorted(terms.idx, pix)
            ok = pos < terms.idx.size
            ok[ok] &= terms.idx[pos[ok]] == pix[ok]
            pix, pos = pix[ok], pos[ok]
            if pix.size == 0:
                return
        terms.gamma[:, pos] = 0.0  # the exact sum replaces the series (mean term included)
        layer = self.surface.layer(level)
        rows, cols = pix // grid.width, pix % grid.width
        px = grid.rows_m[rows, 0] + cols * grid.step_m[0]
        py = grid.rows_m[rows, 1] + cols * grid.step_m[1]
        missing = layer.atom_keys(vacancies.x_m, vacancies.y_m)
        point, d2 = layer.neighbours(px, py, _NEIGHBOUR_RADIUS_M, exclude_keys=missing)
        terms.ex_pix = pix[point]
        # ``pix`` is sorted and ``point`` non-decreasing (row-major matches), so is ex_pix.
        terms.ex_index = _EntryIndex(terms.ex_pix, presorted=True)
        ex_pos = terms.ex_pix if terms.idx is None else pos[point]
        terms.ex_base_m = terms.base_m[ex_pos]
        terms.ex_cov = terms.cov[ex_pos]
        terms.ex_d2 = d2.astype(_F32, copy=False)

    def _feature_terms(self, grid: Grid, feats: Features, radius: float) -> _FeatureTerms | None:
        if feats.x_m.size == 0:
            return None
        pix, d2, which = grid.pixels_near(feats.x_m, feats.y_m, radius)
        if pix.size == 0:
            return None
        return _FeatureTerms(
            pix,
            d2.astype(_F32),
            feats.z_m[which].astype(_F32),
            (feats.weight[which] / self.rho_set).astype(_F32),
            (self.alpha * feats.alpha_factor[which]).astype(_F32),
            _EntryIndex(pix),
        )

    # -- evaluation ------------------------------------------------------------------------------

    def _rho(
        self, z: np.ndarray, act: np.ndarray | None, terms: list[_ApexTerms], blur_m: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """LDOS / rho_set and its z-derivative at heights ``z`` of the pixels ``act``."""
        n_out = z.size
        rho = np.zeros(n_out, dtype=_F32)
        drho = np.zeros(n_out, dtype=_F32)
        q, pref, prefq, dpref = self._q32, self._pref, self._prefq, self._dpref
        alpha = _F32(self.alpha)
        hmin = _F32(_H_CONTACT_M)
        hlow = _F32(_H_LOW_M)
        inv_rho_set = _F32(1.0 / self.rho_set)
        act_pos_cache: list[np.ndarray] = []

        def act_pos() -> np.ndarray:
            if not act_pos_cache:
                assert act is not None
                pos = np.full(self._n_pixels, -1, dtype=np.int64)
                pos[act] = np.arange(act.size)
                act_pos_cache.append(pos)
            return act_pos_cache[0]

        for t in terms:
            a = _F32(t.apex.weight)
            height = z + _F32(t.apex.dz_m)
            for lay in t.layers:
                src, dst = lay.select(act)
                h_raw = height[dst] - lay.base_m[src]
                h = np.maximum(h_raw, hmin)
                sh = lay.shells
                amp = np.multiply(-q[sh], h[None, :])  # (S + 1, k); row 0 is the mean term
                np.exp(amp, out=amp)
                amp *= lay.gamma if isinstance(src, slice) else np.take(lay.gamma, src, axis=1)
                below = h_raw < hmin
                any_below = bool(below.any())
                # Closer than contact the corrugation freezes and the mean keeps growing, so
                # the current rises monotonically as the tip descends (elsewhere the factor
                # is exactly exp(0) = 1).
                if any_below:
                    amp[0] *= np.exp(alpha * (h - np.maximum(h_raw, hlow)))
                # In place, the same products as r = sum(pref amp) + h sum(prefq amp) and
                # dr = -h sum(dpref amp) (x * y == y * x and (-x) * y == -(x * y) exactly).
                r = np.einsum("s,sk->k", pref[sh], amp)
                part = np.einsum("s,sk->k", prefq[sh], amp)
                part *= h
                r += part
                dr = np.einsum("s,sk->k", dpref[sh], amp)
                dr *= h
                np.negative(dr, out=dr)
                if any_below:
                    dr = np.where(below, -(prefq[0] + dpref[0] * h) * amp[0], dr)
                w = lay.cov[src] if a == 1.0 else a * lay.cov[src]  # 1 * x == x
                r *= w
                dr *= w
                rho[dst] += r
                drho[dst] += dr
                if (
                    lay.ex_index is not None
                    and lay.ex_base_m is not None
                    and lay.ex_cov is not None
                    and lay.ex_d2 is not None
                ):
                    out_pix, sel = lay.ex_index.active(act, act_pos)
                    he = height[out_pix]
                    he -= lay.ex_base_m[sel]
                    k, dk = _atom_kernel(lay.ex_d2[sel], he, alpha)
                    w_ex = (a * inv_rho_set) * lay.ex_cov[sel]
                    k *= w_ex
                    dk *= w_ex
                    groups = lay.ex_index.groups() if act is None else None
                    _scatter_add(rho, drho, out_pix, k, dk, groups)
            if t.damage is not None:
                src, dst = t.damage.select(act)
                h_raw = height[dst] - t.damage.height_m[src]
                h = np.maximum(h_raw, hmin)
                e0 = np.exp(-alpha * np.maximum(h_raw, hlow))
                w = a * t.damage.dmg[src]
                rho[dst] += w * pref[0] * (1.0 + alpha * h) * e0
                drho[dst] -= w * (dpref[0] * h + (h_raw < hmin) * prefq[0]) * e0
            f = t.features
            if f is not None:
                fp, sel = f.index.active(act, act_pos)
                hf = height[fp] - f.z_m[sel]
                al = f.alpha_per_m[sel]
                if blur_m <= 0.0:
                    k, dk = _atom_kernel(f.d2_m2[sel], hf, al)
                    w_f = a * f.weight[sel]
                    k *= w_f
                    dk *= w_f
                else:
                    s0 = np.maximum(hf, hmin) / al
                    var = s0 + _F32(blur_m**2)
                    gauss = np.exp(-al * np.maximum(hf, hlow) - f.d2_m2[sel] / (2 * var))
                    k = a * f.weight[sel] * gauss * s0 / var
                    dk = -al * k
                _scatter_add(rho, drho, fp, k, dk, f.index.groups() if act is None else None)
        return rho, drho

    def render(self, grid: Grid, config: TipConfig) -> np.ndarray:
        """Constant-current topography ``(nr, W)`` float64 metres for tip ``config``.

        Heights are relative to the tip height above a flat terrace 0 (terrace 0 reads about 0,
        the terrace below ``-step``).
        """
        self._n_pixels = grid.size
        terms = [self._cached_apex_terms(grid, ap, config.blur_m) for ap in config.apexes]
        main = max(
            range(len(terms)),
            key=lambda j: terms[j].apex.weight * math.exp(-self.alpha * terms[j].apex.dz_m),
        )
        z = (terms[main].guess_m + self.h_set_m - terms[main].apex.dz_m).astype(_F32)
        tiny = _F32(1e-12)
        min_slope = _F32(0.2 * self.alpha)

        def newton_step(zs: np.ndarray, act: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
            """f = ln(I / I_set) (falls monotonically with z) and its Newton step."""
            rho, drho = self._rho(zs, act, terms, config.blur_m)
            np.maximum(rho, tiny, out=rho)
            f = np.log(rho)
            slope = np.negative(drho, out=drho)
            slope /= rho
            np.maximum(slope, min_slope, out=slope)  # -df/dz > 0
            step = np.divide(f, slope, out=slope)
            return f, np.clip(step, -_MAX_STEP_M, _MAX_STEP_M, out=step)

        solve_decreasing(z, newton_step, tol=_NEWTON_TOL_M, max_iter=_MAX_NEWTON_STEPS)
        return (z.astype(np.float64) - self.h_set_m).reshape(grid.shape)

    def residual(self, z_image_m: np.ndarray, grid: Grid, config: TipConfig) -> np.ndarray:
        """``ln(I / I_set)`` at the given image heights (for tests of the solver)."""
        self._n_pixels = grid.size
        terms = [self._apex_terms(grid, ap, config.blur_m) for ap in config.apexes]
        z = (z_image_m.ravel() + self.h_set_m).astype(_F32)
        rho, _ = self._rho(z, None, terms, config.blur_m)
        return np.asarray(np.log(np.maximum(rho.astype(np.float64), 1e-30)).reshape(grid.shape))


def _atom_kernel(
    d2_m2: np.ndarray, h_m: np.ndarray, alpha_per_m: np.ndarray | np.floating
) -> tuple[np.ndarray, np.ndarray]:
    """``exp(-alpha |r - R|)`` of one atom and its derivative in the tip height ``h_m``.

    Closer than the contact height the distance keeps shrinking linearly, so the current
    rises monotonically as the tip descends.
    """
    contact = _F32(_H_CONTACT_M)
    above = h_m >= contact
    h = np.maximum(h_m, contact)
    root = h * h
    root += d2_m2
    np.sqrt(root, out=root)
    if above.all():
        dist = root
        slope = h / root
    else:
        dist = np.where(above, root, root - (contact - np.maximum(h_m, _H_LOW_M)))
        slope = np.where(above, h / root, _F32(1.0))
    k = np.exp(-alpha_per_m * dist)
    slope *= -alpha_per_m
    slope *= k
    return k, slope
