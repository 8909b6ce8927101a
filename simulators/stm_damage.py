"""Surface damage left by tip conditioning: discs of disordered material.

Each pulse or dip spoils a disc of radius ~10–25 nm around the tip (PHYSICS.md): atoms are
removed from the lattice and replaced by disordered material — a mound (pulse: material from
the tip) or a crater with a rim (dip) — with a rough, corrugation-free surface and a ragged
edge. :class:`DamageMap` holds the events (there are few) and evaluates them anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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


@dataclass
class DamageMap:
    """Every damage event so far; evaluates the damage indicator and the debris height."""

    events: list[DamageEvent] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.events)

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
        n_modes = 32
        wavelength = np.exp(rng.uniform(math.log(0.6e-9), math.log(4e-9), n_modes))
        angle = rng.uniform(0.0, 2.0 * math.pi, n_modes)
        k = (2.0 * math.pi / wavelength)[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)
        rms = 1.5e-10 + 1.5e-10 * strength
        amp = wavelength / wavelength.sum() * rms * math.sqrt(n_modes)
        event = DamageEvent(
            x_m,
            y_m,
            radius_m,
            kind,
            strength,
            base_z_m,
            k,
            amp,
            rng.uniform(0.0, 2.0 * math.pi, n_modes),
            rng.uniform(0.0, _EDGE_WOBBLE_MAX, len(_EDGE_HARMONICS)),
            rng.uniform(0.0, 2.0 * math.pi, len(_EDGE_HARMONICS)),
        )
        self.events.append(event)
        return event

    def near(self, bounds: tuple[float, float, float, float], margin_m: float) -> list[DamageEvent]:
        """Events whose (ragged) disc may come within ``margin_m`` of the box."""
        x0, x1, y0, y1 = bounds
        out = []
        for ev in self.events:
            reach = ev.radius_m * (1.0 + len(_EDGE_HARMONICS) * _EDGE_WOBBLE_MAX) + margin_m
            if ev.x_m + reach < x0 or ev.x_m - reach > x1:
                continue
            if ev.y_m + reach < y0 or ev.y_m - reach > y1:
                continue
            out.append(ev)
        return out

    def at(self, x_m: np.ndarray, y_m: np.ndarray) -> np.ndarray:
        """Damage indicator in [0, 1] at arbitrary points (0 on pristine surface)."""
        free = np.ones(np.shape(x_m))
        if not self.events or free.size == 0:
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
