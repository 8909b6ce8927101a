"""Surface damage left by tip conditioning: discs of disordered material.

Each pulse or dip spoils a disc of radius ~10–25 nm around the tip (PHYSICS.md): atoms are
removed from the lattice and replaced by disordered material — a mound (pulse: material from
the tip) or a crater with a rim (dip) — with a rough, corrugation-free surface and a ragged
edge. :class:`DamageMap` holds the events compactly (a long session has thousands) and evaluates
them anywhere.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr

from simulators.stm_grid import Grid

EDGE_WIDTH_M = 0.5e-9
"""Width of the soft edge of a damage disc."""
_EDGE_WOBBLE_MAX = 0.08  # per harmonic, relative to the radius
_EDGE_HARMONICS = (2, 3, 5)


@dataclass(frozen=True, eq=False)
class DamageEvent:
    """A disc of disordered material left by a pulse or a dip (sample metres)."""

    x_m: float
    y_m: float
    radius_m: float
    kind: str  # "pulse" or "dip"
    strength: float
    base_z_m: float  # surface height where it happened
    mode_k_per_m: np.ndarray  # (M, 2) rough-surface wave vectors
    mode_amp_m: np.ndarray  # (M,)
    mode_phase: np.ndarray  # (M,)
    edge_amp: np.ndarray  # (3,) relative radius modulation of the edge harmonics
    edge_phase: np.ndarray  # (3,)

    def radius_at(self, x_m: np.ndarray, y_m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distance of the points from the centre and the ragged disc radius in their direction."""
        dx, dy = x_m - self.x_m, y_m - self.y_m
        ang = np.arctan2(dy, dx)
        wobble = sum(
            a * np.cos(n * ang + p)
            for a, n, p in zip(self.edge_amp, _EDGE_HARMONICS, self.edge_phase, strict=True)
        )
        return np.hypot(dx, dy), self.radius_m * (1.0 + wobble)

    def profile_m(self, r_m: np.ndarray) -> np.ndarray:
        """Mean height of the disordered material above ``base_z_m`` at distance ``r_m``."""
        R, s = self.radius_m, self.strength
        if self.kind == "pulse":  # a mound of material from the tip
            return (0.3e-9 + 0.9e-9 * s) * np.exp(-(r_m**2) / (2.0 * (0.3 * R) ** 2))
        crater = -(0.3e-9 + 1.0e-9 * s) * np.exp(-(r_m**2) / (2.0 * (0.2 * R) ** 2))
        rim = (0.2e-9 + 0.4e-9 * s) * np.exp(-((r_m - 0.35 * R) ** 2) / (2.0 * (0.08 * R) ** 2))
        return np.asarray(crater + rim)


_EVENT_CACHE_SIZE = 128
"""Damage events kept whole (with their roughness modes); the rest are redrawn on demand."""
_MODES = 32
_U64 = (1 << 64) - 1


def _draw_event(
    rng: np.random.Generator,
    x_m: float,
    y_m: float,
    radius_m: float,
    kind: str,
    strength: float,
    base_z_m: float,
) -> DamageEvent:
    """The event's random roughness and edge, drawn from ``rng`` (102 doubles, in this order)."""
    wavelength = np.exp(rng.uniform(math.log(0.6e-9), math.log(4e-9), _MODES))
    angle = rng.uniform(0.0, 2.0 * math.pi, _MODES)
    k = (2.0 * math.pi / wavelength)[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)
    rms = 1.5e-10 + 1.5e-10 * strength
    amp = wavelength / wavelength.sum() * rms * math.sqrt(_MODES)
    return DamageEvent(
        x_m,
        y_m,
        radius_m,
        kind,
        strength,
        base_z_m,
        k,
        amp,
        rng.uniform(0.0, 2.0 * math.pi, _MODES),
        rng.uniform(0.0, _EDGE_WOBBLE_MAX, len(_EDGE_HARMONICS)),
        rng.uniform(0.0, 2.0 * math.pi, len(_EDGE_HARMONICS)),
    )


def _pcg64_state(rng: np.random.Generator) -> np.ndarray | None:
    """``rng``'s PCG64 state as 6 uint64 (``None`` for another bit generator)."""
    state = rng.bit_generator.state
    if state.get("bit_generator") != "PCG64":
        return None
    s, inc = int(state["state"]["state"]), int(state["state"]["inc"])
    return np.array(
        [s >> 64, s & _U64, inc >> 64, inc & _U64, state["has_uint32"], state["uinteger"]],
        dtype=np.uint64,
    )


class DamageMap:
    """Every damage event so far; evaluates the damage indicator and the debris height.

    A long session conditions the tip thousands of times, so events are held compactly: the
    disc (centre, radius, kind, strength, base height) in columns plus the 6-word state the
    random generator had before the event's roughness was drawn, about 90 bytes per event
    instead of ~1.3 KiB with the mode arrays. The :data:`_EVENT_CACHE_SIZE` most recently used
    events are kept whole; any other is redrawn from its saved state when imaging comes near
    it, bit-identical to the first draw. Events drawn from a generator other than PCG64 are
    kept whole.
    """

    def __init__(self) -> None:
        self._n = 0
        self._disc = np.zeros((0, 5))  # x_m, y_m, radius_m, strength, base_z_m
        self._pulse = np.zeros(0, dtype=bool)
        self._state = np.zeros((0, 6), dtype=np.uint64)
        self._cache: OrderedDict[int, DamageEvent] = OrderedDict()
        self._kept: dict[int, DamageEvent] = {}  # not redrawable (another bit generator)
        self._scratch = np.random.Generator(np.random.PCG64(0))

    def __bool__(self) -> bool:
        return self._n > 0

    def __len__(self) -> int:
        return self._n

    def sites(self) -> tuple[tuple[float, float, float], ...]:
        """``(x_m, y_m, radius_m)`` of every event, in order."""
        return tuple((float(x), float(y), float(r)) for x, y, r in self._disc[: self._n, :3])

    def add(
        self,
        rng: np.random.Generator,
        x_m: float,
        y_m: float,
        radius_m: float,
        kind: str,
        strength: float,
        base_z_m: float,
    ) -> DamageEvent:
        """Record a disc of disordered material around ``(x_m, y_m)`` (draws from ``rng``)."""
        if kind not in ("pulse", "dip"):
            raise ValueError(f"damage kind must be 'pulse' or 'dip', got {kind!r}")
        state = _pcg64_state(rng)
        event = _draw_event(rng, x_m, y_m, radius_m, kind, strength, base_z_m)
        i = self._n
        if i == len(self._disc):  # grow by doubling: amortized O(1) appends
            size = max(16, 2 * i)
            self._disc = np.resize(self._disc, (size, 5))
            self._pulse = np.resize(self._pulse, size)
            self._state = np.resize(self._state, (size, 6))
        self._disc[i] = (x_m, y_m, radius_m, strength, base_z_m)
        self._pulse[i] = kind == "pulse"
        if state is None:
            self._kept[i] = event
        else:
            self._state[i] = state
        self._n = i + 1
        self._remember(i, event)
        return event

    def event(self, i: int) -> DamageEvent:
        """Event ``i`` (in the order added), whole."""
        if not 0 <= i < self._n:
            raise IndexError(f"damage event {i} of {self._n}")
        kept = self._kept.get(i)
        if kept is not None:
            return kept
        cached = self._cache.get(i)
        if cached is not None:
            self._cache.move_to_end(i)
            return cached
        w = [int(v) for v in self._state[i]]
        self._scratch.bit_generator.state = {
            "bit_generator": "PCG64",
            "state": {"state": (w[0] << 64) | w[1], "inc": (w[2] << 64) | w[3]},
            "has_uint32": w[4],
            "uinteger": w[5],
        }
        x, y, r, strength, base = (float(v) for v in self._disc[i])
        kind = "pulse" if self._pulse[i] else "dip"
        event = _draw_event(self._scratch, x, y, r, kind, strength, base)
        self._remember(i, event)
        return event

    def _remember(self, i: int, event: DamageEvent) -> None:
        if i in self._kept:
            return
        self._cache[i] = event
        self._cache.move_to_end(i, last=True)
        while len(self._cache) > _EVENT_CACHE_SIZE:
            self._cache.popitem(last=False)

    def near(self, bounds: tuple[float, float, float, float], margin_m: float) -> list[DamageEvent]:
        """Events whose (ragged) disc may come within ``margin_m`` of the box, in order."""
        x0, x1, y0, y1 = bounds
        disc = self._disc[: self._n]
        reach = disc[:, 2] * (1.0 + len(_EDGE_HARMONICS) * _EDGE_WOBBLE_MAX) + margin_m
        x, y = disc[:, 0], disc[:, 1]
        close = ~((x + reach < x0) | (x - reach > x1) | (y + reach < y0) | (y - reach > y1))
        return [self.event(int(i)) for i in np.flatnonzero(close)]

    def at(self, x_m: np.ndarray, y_m: np.ndarray) -> np.ndarray:
        """Damage indicator in [0, 1] at arbitrary points (0 on pristine surface)."""
        free = np.ones(np.shape(x_m))
        if not self._n or free.size == 0:
            return 1.0 - free
        bounds = (float(np.min(x_m)), float(np.max(x_m)), float(np.min(y_m)), float(np.max(y_m)))
        for ev in self.near(bounds, 4.0 * EDGE_WIDTH_M):
            r, edge_r = ev.radius_at(x_m, y_m)
            free *= 1.0 - ndtr((edge_r - r) / EDGE_WIDTH_M)
        return 1.0 - free

    def fields(self, grid: Grid, blur_m: float) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Damage indicator ``D`` in [0, 1] and debris height over ``grid``, ``(nr, W)`` each.

        Returns ``(None, None)`` when no event reaches the grid. ``blur_m`` is the Gaussian
        apex radius of a blunt tip: it softens the edge and the roughness.
        """
        edge = math.hypot(EDGE_WIDTH_M, blur_m)
        events = self.near(grid.bounds(), 4.0 * edge)
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
