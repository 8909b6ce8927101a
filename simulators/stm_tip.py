"""The STM tip: apex geometry per tip state, spontaneous changes and conditioning outcomes.

A tip is a set of apex atoms (:class:`Apex`: lateral offset, height offset, weight) plus an
optional Gaussian blur radius (a blunt apex). Each :class:`TipConfig` is one geometry; the
:class:`TipModel` owns the current one and changes it

- spontaneously, as a continuous-time Markov process in simulated time (a GOOD tip degrades with
  ``degradation_rate_per_s``; bad tips change among themselves more rarely; an UNSTABLE tip
  also flips between apex configurations), and
- when conditioned by a bias pulse or a dip, with outcome probabilities from
  :func:`conditioning_probabilities` that depend on the state and the action's strength.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from drivers.frame import TipState

GOOD, MULTIPLE, BLUNT, UNSTABLE, CRASHED = (
    TipState.GOOD,
    TipState.MULTIPLE,
    TipState.BLUNT,
    TipState.UNSTABLE,
    TipState.CRASHED,
)
BAD_STATES = (MULTIPLE, BLUNT, UNSTABLE, CRASHED)

PULSE_REFERENCE_V = 8.0
"""A pulse of this bias for 0.2 s has strength 1."""
DIP_REFERENCE_M = 5e-9
"""A dip of this depth has strength 1."""


@dataclass(frozen=True)
class Apex:
    """One apex atom: lateral offset (m), height offset above the main apex (m), weight."""

    dx_m: float = 0.0
    dy_m: float = 0.0
    dz_m: float = 0.0
    weight: float = 1.0

    def to_json(self) -> list[float]:
        return [self.dx_m, self.dy_m, self.dz_m, self.weight]


@dataclass(frozen=True)
class TipConfig:
    """One tip geometry. ``blur_m``: Gaussian apex radius; ``crash_depth_m``: CRASHED only."""

    id: int
    state: TipState
    apexes: tuple[Apex, ...] = (Apex(),)
    blur_m: float = 0.0
    crash_depth_m: float = 0.0


CANONICAL_GOOD = TipConfig(0, GOOD)
"""The single sharp apex used for ground-truth clean images."""

# Spontaneous changes: where a tip goes when it changes by itself (weights, normalised).
_DEGRADE_TO = {MULTIPLE: 0.35, UNSTABLE: 0.3, BLUNT: 0.25, CRASHED: 0.1}
_BAD_DRIFT_TO = {
    MULTIPLE: {BLUNT: 0.4, UNSTABLE: 0.5, CRASHED: 0.1},
    BLUNT: {MULTIPLE: 0.5, UNSTABLE: 0.3, CRASHED: 0.2},
    UNSTABLE: {MULTIPLE: 0.4, BLUNT: 0.3, GOOD: 0.2, CRASHED: 0.1},
    CRASHED: {},
}


@dataclass(frozen=True)
class _Response:
    """How one state responds to one kind of action of strength ``s``.

    ``p_fix = fix_max * (1 - exp(-s / fix_scale))`` (back to GOOD);
    ``p_change = change_base + change_slope * s + change_quad * s**2`` (to another bad state,
    drawn from ``change_to``; BLUNT and CRASHED weighted up by ``1 + 2 s``); otherwise unchanged.
    """

    fix_max: float
    fix_scale: float
    change_base: float
    change_quad: float
    change_to: tuple[tuple[TipState, float], ...]
    change_slope: float = 0.0


_RESPONSES: dict[tuple[str, TipState], _Response] = {
    ("pulse", GOOD): _Response(
        0, 1, 0.05, 0.45, ((MULTIPLE, 0.35), (UNSTABLE, 0.35), (BLUNT, 0.2), (CRASHED, 0.1))
    ),
    ("pulse", MULTIPLE): _Response(
        0.55, 0.35, 0.03, 0.25, ((UNSTABLE, 0.45), (BLUNT, 0.4), (CRASHED, 0.15))
    ),
    ("pulse", UNSTABLE): _Response(
        0.6, 0.3, 0.03, 0.25, ((MULTIPLE, 0.45), (BLUNT, 0.4), (CRASHED, 0.15))
    ),
    ("pulse", BLUNT): _Response(
        0.3, 1.0, 0.02, 0.2, ((MULTIPLE, 0.5), (UNSTABLE, 0.3), (CRASHED, 0.2))
    ),
    ("pulse", CRASHED): _Response(
        0.15, 1.0, 0.05, 0.0, ((BLUNT, 0.7), (MULTIPLE, 0.2), (UNSTABLE, 0.1)), change_slope=0.3
    ),
    ("dip", GOOD): _Response(
        0, 1, 0.08, 0.45, ((BLUNT, 0.4), (MULTIPLE, 0.35), (UNSTABLE, 0.15), (CRASHED, 0.1))
    ),
    ("dip", MULTIPLE): _Response(
        0.5, 0.4, 0.05, 0.3, ((BLUNT, 0.5), (UNSTABLE, 0.3), (CRASHED, 0.2))
    ),
    ("dip", UNSTABLE): _Response(
        0.5, 0.4, 0.05, 0.3, ((BLUNT, 0.5), (MULTIPLE, 0.3), (CRASHED, 0.2))
    ),
    ("dip", BLUNT): _Response(
        0.75, 0.5, 0.04, 0.25, ((MULTIPLE, 0.6), (UNSTABLE, 0.25), (CRASHED, 0.15))
    ),
    ("dip", CRASHED): _Response(
        0.6, 0.6, 0.1, 0.0, ((BLUNT, 0.6), (MULTIPLE, 0.3), (UNSTABLE, 0.1)), change_slope=0.3
    ),
}


def pulse_strength(bias_V: float, duration_s: float) -> float:
    """Strength of a bias pulse: ``|V| / 8 V * (duration / 0.2 s) ** 0.25``, capped at 2."""
    return min(2.0, abs(bias_V) / PULSE_REFERENCE_V * (max(duration_s, 0.0) / 0.2) ** 0.25)


def dip_strength(depth_m: float, bias_V: float) -> float:
    """Strength of a dip: depth / 5 nm, slightly more at a higher bias; capped at 2."""
    return min(2.0, max(depth_m, 0.0) / DIP_REFERENCE_M * (1.0 + 0.5 * min(abs(bias_V), 1.0)))


def conditioning_probabilities(
    state: TipState, kind: str, strength: float
) -> dict[TipState, float]:
    """Outcome distribution of conditioning a tip in ``state`` with a ``kind`` action.

    ``kind`` is ``"pulse"`` or ``"dip"``; ``strength`` from :func:`pulse_strength` or
    :func:`dip_strength`. Returns probabilities over all tip states (summing to 1).
    """
    resp = _RESPONSES[(kind, state)]
    s = max(0.0, strength)
    out = dict.fromkeys(TipState, 0.0)
    p_fix = 0.0 if state is GOOD else resp.fix_max * (1.0 - math.exp(-s / resp.fix_scale))
    p_change = resp.change_base + resp.change_slope * s + resp.change_quad * s * s
    p_change = min(p_change, 0.95 - p_fix)
    weights = {
        st: w * (1.0 + 2.0 * s if st in (BLUNT, CRASHED) else 1.0) for st, w in resp.change_to
    }
    total = sum(weights.values())
    for st, w in weights.items():
        out[st] += p_change * w / total
    out[GOOD] += p_fix
    out[state] += 1.0 - p_fix - p_change
    return out


class TipModel:
    """The tip's current state and geometry, and how it changes (all draws from ``rng``)."""

    def __init__(
        self,
        rng: np.random.Generator,
        *,
        degradation_rate_per_s: float,
        bad_change_rate_per_s: float,
        unstable_switch_rate_per_s: float,
        initial: TipState = GOOD,
    ) -> None:
        self._rng = rng
        self.degradation_rate_per_s = degradation_rate_per_s
        self.bad_change_rate_per_s = bad_change_rate_per_s
        self.unstable_switch_rate_per_s = unstable_switch_rate_per_s
        self._ids = itertools.count(1)
        self._configs: tuple[TipConfig, ...] = (CANONICAL_GOOD,)
        self._active = 0
        self._leave_rate = 0.0
        self._return_rate = 0.0
        self.set_state(initial)

    @property
    def state(self) -> TipState:
        return self._configs[0].state

    @property
    def config(self) -> TipConfig:
        return self._configs[self._active]

    # -- drawing geometries ----------------------------------------------------------------------

    def set_state(self, state: TipState, apexes: tuple[Apex, ...] | None = None) -> TipConfig:
        """Enter ``state`` with a random geometry for it (or the given apexes)."""
        rng = self._rng
        self._active = 0
        self._leave_rate = self._return_rate = 0.0
        if apexes is not None:
            blur = rng.uniform(4e-10, 12e-10) if state is BLUNT else 0.0
            self._configs = (TipConfig(next(self._ids), state, tuple(apexes), blur),)
            if state is UNSTABLE:
                self._add_unstable_alternates()
            return self.config
        if state is GOOD:
            self._configs = (CANONICAL_GOOD,)
        elif state is MULTIPLE:
            n_extra = 1 if rng.random() < 0.7 else 2
            extra = []
            for _ in range(n_extra):
                dist = rng.uniform(0.4e-9, 2.5e-9)
                ang = rng.uniform(0.0, 2.0 * math.pi)
                extra.append(
                    Apex(
                        dist * math.cos(ang),
                        dist * math.sin(ang),
                        rng.uniform(-0.1e-10, 1.0e-10),
                        1.0,
                    )
                )
            self._configs = (TipConfig(next(self._ids), state, (Apex(), *extra)),)
        elif state is BLUNT:
            self._configs = (
                TipConfig(next(self._ids), state, (Apex(),), blur_m=rng.uniform(4e-10, 12e-10)),
            )
        elif state is UNSTABLE:
            self._configs = (
                TipConfig(next(self._ids), state, (Apex(),), blur_m=rng.uniform(0.0, 1.0e-10)),
            )
            self._add_unstable_alternates()
        else:
            self._configs = (
                TipConfig(
                    next(self._ids), state, (Apex(),), crash_depth_m=rng.uniform(0.3e-9, 5e-9)
                ),
            )
        return self.config

    def _add_unstable_alternates(self) -> None:
        rng = self._rng
        base = self._configs[0]
        alternates = []
        for _ in range(int(rng.integers(1, 3))):
            jump = rng.choice([-1.0, 1.0]) * rng.uniform(0.3e-10, 1.5e-10)
            shift = rng.uniform(0.0, 3e-10)
            ang = rng.uniform(0.0, 2.0 * math.pi)
            moved = tuple(
                Apex(
                    a.dx_m + shift * math.cos(ang),
                    a.dy_m + shift * math.sin(ang),
                    a.dz_m + jump,
                    a.weight,
                )
                for a in base.apexes
            )
            blur = base.blur_m + rng.uniform(0.0, 2e-10)
            alternates.append(TipConfig(next(self._ids), UNSTABLE, moved, blur))
        self._configs = (base, *alternates)
        # Log-uniform spread: from rare jumps between two quasi-stable apexes to streaks
        # every few lines; excursions last from a fraction of a line to many lines.
        self._leave_rate = self.unstable_switch_rate_per_s * math.exp(rng.uniform(-1.2, 1.2))
        self._return_rate = math.exp(rng.uniform(math.log(0.3), math.log(10.0)))

    # -- spontaneous dynamics --------------------------------------------------------------------

    def _state_rate(self) -> float:
        if self.state is GOOD:
            return self.degradation_rate_per_s
        if not _BAD_DRIFT_TO[self.state]:
            return 0.0
        return self.bad_change_rate_per_s

    def _switch_rate(self) -> float:
        if self.state is not UNSTABLE:
            return 0.0
        return self._leave_rate if self._active == 0 else self._return_rate

    def evolve(
        self, t0_s: float, dt_s: float, *, active: bool = True
    ) -> list[tuple[float, TipConfig]]:
        """Let ``dt_s`` pass from ``t0_s``; returns ``(time, new config)`` for each change.

        ``active=False`` (tip retracted) suspends all spontaneous changes.
        """
        events: list[tuple[float, TipConfig]] = []
        if not active or dt_s <= 0.0:
            return events
        t, end = t0_s, t0_s + dt_s
        rng = self._rng
        while True:
            r_state, r_switch = self._state_rate(), self._switch_rate()
            rate = r_state + r_switch
            if rate <= 0.0:
                break
            t += float(rng.exponential(1.0 / rate))
            if t >= end:
                break
            if rng.random() * rate < r_state:
                table = _DEGRADE_TO if self.state is GOOD else _BAD_DRIFT_TO[self.state]
                self.set_state(_choose(rng, table))
            elif self._active == 0:
                self._active = int(rng.integers(1, len(self._configs)))
            else:
                self._active = 0
            events.append((t, self.config))
        return events

    # -- conditioning ----------------------------------------------------------------------------

    def condition(self, kind: str, strength: float) -> TipState:
        """Apply a pulse or dip of ``strength``; returns the new state.

        A tip that stays bad usually gets a new geometry of the same kind.
        """
        probs = conditioning_probabilities(self.state, kind, strength)
        new = _choose(self._rng, probs)
        if new is not self.state or (new is not GOOD and self._rng.random() < 0.5):
            self.set_state(new)
        return self.state


def _choose(rng: np.random.Generator, table: dict[TipState, float]) -> TipState:
    states = list(table)
    p = np.array([table[s] for s in states], dtype=np.float64)
    return states[int(rng.choice(len(states), p=p / p.sum()))]
