"""The tip-conditioning action set, the damaged-area map and the RL observation of a tip.

Shared by the training environment (:mod:`policies.env_tip`) and the deployed policy
(:mod:`policies.rl`), so both see exactly the same observation, mask and site choice.

The twelve actions follow DeepSPM (Krull et al., Commun. Phys. 3, 54 (2020)): bias pulses of
±2.5, ±4 and ±8 V for 0.2 s and controlled dips of 0.8–5 nm at 20 mV. Each action damages the
surface around the tip; :func:`footprint_m` is the free radius it needs, the radius of the damage
disc of the simulator's model (25 nm at strength 1, scaling as sqrt(strength): 8 V / 0.2 s pulse
or 5 nm dip). An action is *valid* at a site when the safety envelope accepts it there (limits,
forbidden areas) and the site's free radius (distance to the nearest damaged disc) is at least
its footprint.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from drivers.errors import ConfigError, DataError, LimitViolation
from drivers.frame import TipState
from drivers.limits import Limits
from drivers.observation import TipEstimate
from drivers.safety import ForbiddenArea, SafetyEnvelope
from policies.base import require_positive
from policies.rule import LadderStep, spiral_sites

NM = 1e-9
CONDITIONING_ACTIONS: tuple[LadderStep, ...] = (
    LadderStep.pulse(+2.5),
    LadderStep.pulse(-2.5),
    LadderStep.pulse(+4.0),
    LadderStep.pulse(-4.0),
    LadderStep.pulse(+8.0),
    LadderStep.pulse(-8.0),
    LadderStep.dip(0.8 * NM),
    LadderStep.dip(1.5 * NM),
    LadderStep.dip(2.5 * NM),
    LadderStep.dip(3.0 * NM),
    LadderStep.dip(3.5 * NM),
    LadderStep.dip(5.0 * NM),
)
"""The 12 actions, indexed as the networks' outputs (pulses then dips, gentlest first)."""

N_ACTIONS = len(CONDITIONING_ACTIONS)
STATE_ORDER: tuple[TipState, ...] = tuple(TipState)
HISTORY = 3
"""Earlier tip estimates in the observation (most recent first)."""
FREE_SCALE_M = 50 * NM
"""Free radius that maps to 1.0 in the observation (larger radii are clipped)."""
OBS_DIM = (len(STATE_ORDER) + 1) * (1 + HISTORY) + N_ACTIONS + 2
"""5 probabilities + uncertainty, now and for HISTORY earlier frames; last action one-hot;
free radius / FREE_SCALE_M; actions taken / max actions."""


def footprint_m(step: LadderStep) -> float:
    """Radius of free surface the action needs (its expected damage disc), in metres."""
    if step.action == "pulse":
        strength = min(2.0, abs(step.bias_V) / 8.0 * (step.duration_s / 0.2) ** 0.25)
    else:
        strength = min(2.0, step.depth_m / (5 * NM) * (1.0 + 0.5 * min(abs(step.bias_V), 1.0)))
    return min(25 * NM * math.sqrt(strength), 30 * NM)


_STRONGEST_M = max(footprint_m(s) for s in CONDITIONING_ACTIONS)
_WEAKEST_M = min(footprint_m(s) for s in CONDITIONING_ACTIONS)


def action_index(step: LadderStep) -> int | None:
    """The index of ``step`` in :data:`CONDITIONING_ACTIONS` (None when it is not one of them)."""
    for i, candidate in enumerate(CONDITIONING_ACTIONS):
        if candidate == step:
            return i
    return None


@dataclass
class SiteMap:
    """Where conditioning has damaged the surface, and where to go next.

    Sites lie on a square grid of pitch ``pitch_m`` filling an *approach area* of side
    ``area_m`` around ``origin_m``. After an action the tip moves to the nearest unvisited site
    whose free radius allows the strongest action (else the weakest); when no site of the area
    qualifies, :meth:`next_site` opens the next approach area (a spiral of areas around the
    origin) and says so. Positions are sample coordinates in metres.

    Only the current area's sites can be chosen and the spiral never returns to an area, so the
    visited set holds sites of the current area only (cleared when the next area opens): its
    size stays below ``(area_m / pitch_m) ** 2`` however long the session runs.
    """

    origin_m: tuple[float, float]
    limits: Limits
    frame_m: float = 6.4 * NM
    pitch_m: float = 30 * NM
    area_m: float = 300 * NM
    discs: list[ForbiddenArea] = field(default_factory=list)
    area_moves: int = 0

    def __post_init__(self) -> None:
        require_positive(self, ("frame_m", "pitch_m", "area_m"))
        if self.pitch_m > self.area_m:
            raise ConfigError(f"SiteMap.pitch_m={self.pitch_m!r} exceeds area_m={self.area_m!r}")
        self._areas: Iterator[tuple[int, int]] = spiral_sites()
        self._area = next(self._areas)
        self._visited: set[tuple[float, float]] = set()
        self._site_cache: dict[tuple[int, int], tuple[tuple[float, float], ...]] = {}
        self._keys: frozenset[tuple[float, float]] = frozenset()
        self._keys_area: tuple[int, int] | None = None

    # -- queries --------------------------------------------------------------------------------

    def free_radius_m(self, x_m: float, y_m: float) -> float:
        """Distance from ``(x_m, y_m)`` to the nearest damaged disc (inf when none)."""
        if not self.discs:
            return math.inf
        return max(0.0, min(math.hypot(x_m - d.x_m, y_m - d.y_m) - d.radius_m for d in self.discs))

    def mask(self, position_m: tuple[float, float]) -> np.ndarray:
        """``(N_ACTIONS,) bool``: which actions are valid at ``position_m`` (see module doc)."""
        return action_mask(self.limits, self.discs, position_m)

    def sites(self) -> list[tuple[float, float]]:
        """The grid sites of the current approach area that keep a frame inside the stage."""
        cached = self._site_cache.get(self._area)
        if cached is not None:
            return list(cached)
        i, j = self._area
        cx = self.origin_m[0] + i * self.area_m
        cy = self.origin_m[1] + j * self.area_m
        n = int(self.area_m // self.pitch_m)
        half = self.frame_m / 2
        lim = self.limits
        out = []
        for a in range(n):
            for b in range(n):
                x = cx + (a - (n - 1) / 2) * self.pitch_m
                y = cy + (b - (n - 1) / 2) * self.pitch_m
                if (
                    lim.stage_x_m[0] + half <= x <= lim.stage_x_m[1] - half
                    and lim.stage_y_m[0] + half <= y <= lim.stage_y_m[1] - half
                ):
                    out.append((x, y))
        self._site_cache = {self._area: tuple(out)}
        return out

    # -- changes --------------------------------------------------------------------------------

    def add_damage(self, x_m: float, y_m: float, radius_m: float) -> None:
        """Record a damage disc (no-op for a zero radius)."""
        if radius_m > 0:
            self.discs.append(ForbiddenArea(x_m, y_m, radius_m, label="conditioned"))

    def next_site(self, position_m: tuple[float, float]) -> tuple[float, float] | None:
        """The site to image and condition at next (marks it visited).

        Prefers the nearest unvisited site with room for the strongest action, then the nearest
        with room for the weakest; opens the next approach area when this one is used up, up to
        one full ring of areas around the stage; None when the whole stage is used up.
        """
        here = (round(position_m[0], 12), round(position_m[1], 12))
        if here in self._site_keys():  # only the current area's sites can ever be chosen
            self._visited.add(here)
        lim = self.limits
        span = max(lim.stage_x_m[1] - lim.stage_x_m[0], lim.stage_y_m[1] - lim.stage_y_m[0])
        max_ring = math.ceil(span / self.area_m) + 1
        while True:
            sites = self.sites()
            free = self._free_radii(sites)
            for need in (_STRONGEST_M, _WEAKEST_M):
                best: tuple[float, tuple[float, float]] | None = None
                for site, room in zip(sites, free, strict=True):
                    if room < need:
                        continue
                    if (round(site[0], 12), round(site[1], 12)) in self._visited:
                        continue
                    dist = math.hypot(site[0] - position_m[0], site[1] - position_m[1])
                    if best is None or dist < best[0]:
                        best = (dist, site)
                if best is not None:
                    self._visited.add((round(best[1][0], 12), round(best[1][1], 12)))
                    return best[1]
            self._area = next(self._areas)
            self._visited.clear()  # the spiral never comes back to an area
            self.area_moves += 1
            if max(abs(self._area[0]), abs(self._area[1])) > max_ring:
                return None

    @property
    def visited_count(self) -> int:
        """How many sites of the current approach area have been used."""
        return len(self._visited)

    def _site_keys(self) -> frozenset[tuple[float, float]]:
        if self._keys_area != self._area:
            self._keys = frozenset((round(x, 12), round(y, 12)) for x, y in self.sites())
            self._keys_area = self._area
        return self._keys

    def _free_radii(self, sites: Sequence[tuple[float, float]]) -> list[float]:
        """:meth:`free_radius_m` of every site (one pass over the discs per site)."""
        discs = [(d.x_m, d.y_m, d.radius_m) for d in self.discs]
        if not discs:
            return [math.inf] * len(sites)
        return [
            max(0.0, min(math.hypot(x - dx, y - dy) - r for dx, dy, r in discs)) for x, y in sites
        ]


def action_mask(
    limits: Limits, discs: Sequence[ForbiddenArea], position_m: tuple[float, float]
) -> np.ndarray:
    """``(N_ACTIONS,) bool``: the actions the envelope accepts at ``position_m`` and whose
    footprint fits in the free radius left by the damage ``discs``."""
    envelope = SafetyEnvelope(limits, forbidden=discs)
    free = math.inf
    if discs:
        free = min(math.hypot(position_m[0] - d.x_m, position_m[1] - d.y_m) - d.radius_m
                   for d in discs)  # fmt: skip
    out = np.zeros(N_ACTIONS, dtype=bool)
    for i, step in enumerate(CONDITIONING_ACTIONS):
        if footprint_m(step) > free:
            continue
        try:
            envelope.check(step.command(source="mask", reason=""), position_m=position_m)
        except LimitViolation:
            continue
        out[i] = True
    return out


def _estimate_vector(estimate: TipEstimate | None) -> list[float]:
    if estimate is None:
        return [0.0] * (len(STATE_ORDER) + 1)
    values = [float(estimate.probabilities.get(s, 0.0)) for s in STATE_ORDER]
    values.append(float(estimate.uncertainty))
    if not all(math.isfinite(v) for v in values):
        raise DataError(
            f"tip estimate from {estimate.source!r} holds non-finite values {values}: "
            "the RL observation needs finite probabilities and uncertainty"
        )
    return values


def tip_observation(
    current: TipEstimate,
    history: Sequence[TipEstimate],
    *,
    last_action: int | None,
    free_radius_m: float,
    actions_taken: int,
    max_actions: int,
) -> np.ndarray:
    """The ``(OBS_DIM,) float32`` observation of the tip policy.

    ``history`` is oldest first (as :attr:`drivers.observation.Observation.history`); the last
    :data:`HISTORY` entries are used, most recent first, zero-padded. Raises
    :class:`DataError` for non-finite inputs.
    """
    values = _estimate_vector(current)
    recent = list(history)[-HISTORY:][::-1]
    for k in range(HISTORY):
        values += _estimate_vector(recent[k] if k < len(recent) else None)
    one_hot = [0.0] * N_ACTIONS
    if last_action is not None:
        if not 0 <= last_action < N_ACTIONS:
            raise DataError(f"last_action must be in 0..{N_ACTIONS - 1}, got {last_action!r}")
        one_hot[last_action] = 1.0
    values += one_hot
    if math.isnan(free_radius_m):
        raise DataError("free_radius_m is NaN")
    values.append(min(max(free_radius_m, 0.0), 2 * FREE_SCALE_M) / FREE_SCALE_M)
    values.append(min(actions_taken / max(max_actions, 1), 1.0))
    return np.asarray(values, dtype=np.float32)
