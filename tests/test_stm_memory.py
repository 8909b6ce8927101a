"""The STM simulator's sample state stays small over a night of conditioning, and what it
forgets it redraws identically (damage roughness from saved generator states, defect tiles
from their seeds)."""

from __future__ import annotations

import numpy as np
import pytest

import simulators.stm_damage as stm_damage
import simulators.stm_surface as stm_surface
from drivers.frame import ScanRegion
from simulators.stm import STMConfig, STMSimulator
from simulators.stm_damage import DamageMap

QUIET = STMConfig(
    drift_m_per_s=0.0,
    white_noise_m_per_sqrt_hz=0.0,
    flicker_noise_m_per_decade=0.0,
    line_noise_m=0.0,
    degradation_rate_per_s=0.0,
    bad_tip_change_rate_per_s=0.0,
    defect_density_per_nm2=0.1,
)


def _night(sim: STMSimulator, sites: np.ndarray) -> list[tuple[np.ndarray, object, float]]:
    """Condition at every site, then image the first sites again (edge of their damage)."""
    for k, (x, y) in enumerate(sites):
        sim.move_to(float(x), float(y))
        if k % 2:
            sim.pulse(4.0, 0.2)
        else:
            sim.dip(1e-9, 0.02)
    out = []
    for x, y in sites[:6]:
        region = ScanRegion(float(x) + 8e-9, float(y), 16e-9, 16e-9)
        truth = sim.begin_frame(region, (32, 32), 1e-3).truth()
        out.append((sim.render_clean(region, (32, 32)), truth.defects, truth.damaged_fraction))
    return out


def test_evicted_damage_events_and_tiles_are_redrawn_bit_identically(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sites = np.random.default_rng(4).uniform(-0.9e-6, 0.9e-6, (40, 2))
    whole = _night(STMSimulator(QUIET, seed=9), sites)
    monkeypatch.setattr(stm_damage, "_EVENT_CACHE_SIZE", 2)
    monkeypatch.setattr(stm_surface, "TILE_CACHE_SIZE", 3)
    small = STMSimulator(QUIET, seed=9)
    forgetful = _night(small, sites)
    surface = small._surface
    assert len(surface.damage) == 40 and len(surface.damage._cache) <= 2
    assert len(surface._tiles) <= 3
    # the revisited frames do show the old damage and old defects, so both were redrawn
    assert all(0.05 < fraction < 0.95 for _, _, fraction in forgetful)
    assert sum(len(defects) for _, defects, _ in forgetful) > 5  # type: ignore[arg-type]
    for (z0, d0, f0), (z1, d1, f1) in zip(whole, forgetful, strict=True):
        assert np.array_equal(z0, z1) and d0 == d1 and f0 == f1


def test_damage_map_holds_thousands_of_events_in_under_200_bytes_each() -> None:
    rng = np.random.default_rng(1)
    damage = DamageMap()
    first = damage.add(rng, 0.0, 0.0, 10e-9, "dip", 0.5, 0.0)
    for k in range(1, 5000):
        damage.add(rng, k * 1e-7, 0.0, 10e-9, "pulse" if k % 2 else "dip", 0.5, 0.0)
    held = damage._disc.nbytes + damage._pulse.nbytes + damage._state.nbytes
    assert held / len(damage) < 200
    assert len(damage._cache) <= stm_damage._EVENT_CACHE_SIZE and not damage._kept
    again = damage.event(0)  # long evicted: redrawn from the saved generator state
    assert again is not first
    for name in ("mode_k_per_m", "mode_amp_m", "mode_phase", "edge_amp", "edge_phase"):
        assert np.array_equal(getattr(again, name), getattr(first, name))
    assert damage.sites()[0] == (0.0, 0.0, 10e-9) and len(damage.near((0, 0, 0, 0), 0.0)) == 1


def test_events_from_another_bit_generator_are_kept_whole() -> None:
    damage = DamageMap()
    event = damage.add(np.random.Generator(np.random.MT19937(2)), 0.0, 0.0, 5e-9, "dip", 1, 0)
    for k in range(1, 300):
        damage.add(np.random.default_rng(k), k * 1e-7, 0.0, 5e-9, "dip", 1.0, 0.0)
    assert damage.event(0) is event
    with pytest.raises(ValueError, match="kind"):
        damage.add(np.random.default_rng(0), 0.0, 0.0, 5e-9, "burn", 1.0, 0.0)
