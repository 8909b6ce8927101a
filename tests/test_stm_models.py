"""Tests of the STM model's parts: tip conditioning table, LDOS solver, surface, noise."""

from __future__ import annotations

import math

import numpy as np
import pytest

from drivers.frame import TipState
from simulators.noise import CreepModel, flicker_series, white_sigma_m
from simulators.stm_grid import Grid
from simulators.stm_ldos import LDOSModel
from simulators.stm_surface import SURFACES, SurfaceModel
from simulators.stm_tip import (
    Apex,
    TipConfig,
    conditioning_probabilities,
    dip_strength,
    pulse_strength,
)

BAD = (TipState.MULTIPLE, TipState.BLUNT, TipState.UNSTABLE, TipState.CRASHED)


@pytest.mark.parametrize("state", list(TipState))
@pytest.mark.parametrize("kind", ["pulse", "dip"])
def test_conditioning_probabilities_are_distributions(state: TipState, kind: str) -> None:
    for strength in (0.0, 0.1, 0.31, 0.5, 1.0, 2.0):
        p = conditioning_probabilities(state, kind, strength)
        assert set(p) == set(TipState)
        assert all(v >= 0.0 for v in p.values())
        assert sum(p.values()) == pytest.approx(1.0)


def test_conditioning_probabilities_follow_the_published_practice() -> None:
    pulse = {v: pulse_strength(v, 0.2) for v in (2.5, 4.0, 8.0)}
    dip = {d: dip_strength(d, 0.02) for d in (0.8e-9, 2e-9, 5e-9)}
    assert pulse[8.0] == pytest.approx(1.0)
    assert pulse_strength(-4.0, 0.2) == pulse[4.0]
    good = TipState.GOOD
    # Stronger actions spoil a good tip more often ...
    spoil = [1 - conditioning_probabilities(good, "pulse", s)[good] for s in pulse.values()]
    assert spoil == sorted(spoil) and spoil[-1] > 3 * spoil[0]
    # ... fix a bad one more often, and more often make it blunt or crashed.
    for state in (TipState.MULTIPLE, TipState.UNSTABLE):
        fixes = [conditioning_probabilities(state, "pulse", s)[good] for s in pulse.values()]
        assert fixes == sorted(fixes) and fixes[0] > 0.2
        worse = [
            sum(
                conditioning_probabilities(state, "pulse", s)[t]
                for t in (TipState.BLUNT, TipState.CRASHED)
            )
            for s in pulse.values()
        ]
        assert worse == sorted(worse)
    # Dips are the cure for blunt and crashed tips; pulses barely help them.
    for state in (TipState.BLUNT, TipState.CRASHED):
        assert conditioning_probabilities(state, "dip", dip[5e-9])[good] > 0.45
        assert conditioning_probabilities(state, "pulse", pulse[2.5])[good] < 0.1


def test_an_escalation_ladder_recovers_a_good_tip_within_a_handful_of_actions() -> None:
    rng = np.random.default_rng(0)
    pulses = [2.5, 4.0, 4.0, 8.0]
    dips = [1e-9, 2e-9, 5e-9]
    for start in BAD:
        recovered = 0
        for _ in range(2000):
            state, tries, family = start, 0, None
            for _ in range(6):
                pulse_family = state in (TipState.MULTIPLE, TipState.UNSTABLE)
                if pulse_family != family:
                    family, tries = pulse_family, 0
                if pulse_family:
                    kind, s = "pulse", pulse_strength(pulses[min(tries, 3)], 0.2)
                else:
                    kind, s = "dip", dip_strength(dips[min(tries, 2)], 0.02)
                tries += 1
                p = conditioning_probabilities(state, kind, s)
                states = list(p)
                state = states[rng.choice(len(states), p=[p[t] for t in states])]
                if state is TipState.GOOD:
                    recovered += 1
                    break
        assert recovered / 2000 > 0.85, start


def _grid(size_m: float, n: int, x0: float = 0.0, y0: float = 0.0) -> Grid:
    u = (np.arange(n) + 0.5) * size_m / n - size_m / 2
    rows = np.stack([np.full(n, x0 + u[0]), y0 + u], axis=1)
    return Grid(rows, np.array([size_m / n, 0.0]), n)


@pytest.mark.parametrize("surface", ["au111", "hsi100"])
def test_constant_current_solver_converges_on_a_hard_frame(surface: str) -> None:
    surf = SurfaceModel(
        SURFACES[surface], entropy=3, defect_density_per_nm2=0.15, terrace_width_m=6e-9
    )
    surf.add_damage(np.random.default_rng(1), 6e-9, 0.0, 5e-9, "dip", 0.5)
    model = LDOSModel(surf, kappa_per_m=1.05e10, gap_m=3e-10)
    grid = _grid(16e-9, 128)
    for config in (
        TipConfig(1, TipState.GOOD),
        TipConfig(2, TipState.MULTIPLE, (Apex(), Apex(1e-9, -0.4e-9, 0.2e-10))),
        TipConfig(3, TipState.BLUNT, (Apex(),), blur_m=6e-10),
    ):
        z = model.render(grid, config)
        assert np.all(np.isfinite(z))
        assert np.abs(model.residual(z, grid, config)).max() < 2e-3  # |ln(I / I_set)|


def test_setpoint_conductance_moves_the_tip_by_ln_ratio_over_2kappa() -> None:
    surf = SurfaceModel(SURFACES["au111"], entropy=1)
    near = LDOSModel(surf, kappa_per_m=1.05e10, gap_m=3e-10, conductance_ratio=10.0)
    far = LDOSModel(surf, kappa_per_m=1.05e10, gap_m=3e-10, conductance_ratio=1.0)
    # One decade of current is about one ångström of gap (PHYSICS.md).
    assert far.h_set_m - near.h_set_m == pytest.approx(1e-10, rel=0.35)


def test_surfaces_carry_their_defect_classes() -> None:
    for name, kinds in (
        ("au111", {"vacancy", "adatom"}),
        ("hsi100", {"vacancy", "adatom", "dangling_bond"}),
    ):
        surf = SurfaceModel(SURFACES[name], entropy=4, defect_density_per_nm2=0.1)
        found = {d.kind for d in surf.defects_in_box(0, 100e-9, 0, 100e-9)}
        assert found == kinds


def test_white_noise_sigma_and_flicker_spectrum() -> None:
    assert white_sigma_m(9e-14, 1e-3) == pytest.approx(2.0e-12, rel=0.01, abs=0)
    rng = np.random.default_rng(0)
    n, dt = 2**16, 1e-3
    series = np.stack([flicker_series(rng, n, dt, 1e-12) for _ in range(8)])
    decades = math.log10(n / 2)
    assert np.var(series) == pytest.approx(1e-24 * decades, rel=0.25, abs=0)
    power = np.mean(np.abs(np.fft.rfft(series, axis=1)) ** 2, axis=0)
    freq = np.fft.rfftfreq(n, dt)
    sel = (freq > 0.1) & (freq < 100)
    slope = np.polyfit(np.log10(freq[sel]), np.log10(power[sel]), 1)[0]
    assert slope == pytest.approx(-1.0, abs=0.1)


def test_creep_lags_a_move_and_decays() -> None:
    creep = CreepModel(0.01, 60.0)
    creep.add_move(10.0, 1e-6, 0.0)
    dx, _ = creep.displacement_m(np.array([5.0, 10.0, 70.0, 310.0]))
    assert dx[0] == 0.0
    assert dx[1] == pytest.approx(-1e-8)
    assert dx[2] == pytest.approx(-1e-8 * math.exp(-1.0))
    assert abs(dx[3]) < 1e-10


def test_root_solver_handles_kinks_and_flat_stretches() -> None:
    from simulators.stm_solver import solve_decreasing

    rng = np.random.default_rng(3)
    roots = rng.uniform(-2.0, 2.0, 500).astype(np.float32)

    def f_of(z: np.ndarray, idx: np.ndarray) -> np.ndarray:
        # Decreasing, with a kink at the root and a nearly flat stretch beside it.
        d = roots[idx] - z
        return np.where(d > 0, 3.0 * d, 0.05 * d) + 0.01 * np.tanh(d)

    def evaluate(z: np.ndarray, idx: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        sel = np.arange(roots.size) if idx is None else idx
        f = f_of(z, sel)
        slope = np.where(roots[sel] - z > 0, 3.0, 0.05)
        return f, np.clip(f / slope, -0.5, 0.5).astype(np.float32)

    z = np.zeros(roots.size, dtype=np.float32)
    solve_decreasing(z, evaluate, tol=1e-6, max_iter=60)
    np.testing.assert_allclose(z, roots, atol=1e-4)
