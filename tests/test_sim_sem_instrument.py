"""sim:sem passes the instrument contract suite, plus SEM-specific driver behaviour."""

from __future__ import annotations

import numpy as np
import pytest

from drivers.commands import Approach, Capability, MoveTo, Scan, SetDwell, TipDip, TipPulse
from drivers.errors import CommandRejected, ConfigError, LimitViolation
from drivers.frame import ScanRegion, TipState
from drivers.sim_sem import SimulatedSEM
from tests.contract.instrument import InstrumentContract

SMALL = {
    "shape_px": (64, 64),
    "region": ScanRegion(0.0, 0.0, 2e-6, 2e-6),
    "lines_per_chunk": 16,
}


class TestSimulatedSEMContract(InstrumentContract):
    def make_instrument(self) -> SimulatedSEM:
        return SimulatedSEM(seed=1, **SMALL)  # type: ignore[arg-type]


def test_defaults_match_a_field_emission_sem() -> None:
    inst = SimulatedSEM(seed=0)
    info, state = inst.info(), inst.state()
    assert info.kind == "sem" and info.channels == ("se",)
    assert info.capabilities == frozenset({Capability.SCAN, Capability.STAGE})
    assert info.limits.dwell_s == (1e-7, 1e-5)
    assert info.limits.scan_size_m == (100e-9, 100e-6)
    assert info.limits.stage_x_m == (-50e-6, 50e-6)
    assert info.limits.shape_px == (16, 4096)
    assert state.shape_px == (256, 256) and state.dwell_s == 1e-6
    assert state.scan_region.width_m == 5e-6


def test_frames_carry_ground_truth_without_a_tip() -> None:
    frame = SimulatedSEM(seed=2, **SMALL).acquire()  # type: ignore[arg-type]
    truth = frame.truth
    assert truth is not None and truth.tip_state is TipState.GOOD
    assert truth.clean is not None and truth.clean.shape == frame.shape
    assert np.asarray(truth.extra["particle_mask"]).shape == frame.shape
    assert frame.channel == "se" and frame.data.dtype == np.float32


def test_same_seed_same_frames_different_seed_different() -> None:
    a = SimulatedSEM(seed=3, **SMALL).acquire().data  # type: ignore[arg-type]
    b = SimulatedSEM(seed=3, **SMALL).acquire().data  # type: ignore[arg-type]
    c = SimulatedSEM(seed=4, **SMALL).acquire().data  # type: ignore[arg-type]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_tip_and_z_commands_are_rejected() -> None:
    inst = SimulatedSEM(seed=5, **SMALL)  # type: ignore[arg-type]
    for command in (TipPulse(4.0, 0.2), TipDip(1e-9), Approach()):
        with pytest.raises(CommandRejected, match="cannot execute"):
            inst.execute(command)


def test_dwell_outside_the_sem_range_is_a_limit_violation() -> None:
    inst = SimulatedSEM(seed=6, **SMALL)  # type: ignore[arg-type]
    with pytest.raises(LimitViolation):
        inst.execute(SetDwell(5e-8))
    with pytest.raises(LimitViolation):
        inst.execute(Scan(region=ScanRegion(0, 0, 200e-6, 200e-6)))
    assert inst.execute(SetDwell(1e-7)).ok


def test_scan_region_command_moves_the_stage_and_shows_another_area() -> None:
    inst = SimulatedSEM(seed=7, **SMALL)  # type: ignore[arg-type]
    before = inst.acquire()
    inst.execute(Scan(region=ScanRegion(10e-6, -5e-6, 2e-6, 2e-6)))
    assert inst.state().position_m == (10e-6, -5e-6)
    after = inst.acquire()
    assert after.scan_region.center_x_m == 10e-6
    assert not np.allclose(before.truth.clean, after.truth.clean)  # type: ignore[union-attr]
    inst.execute(MoveTo(0.0, 0.0))
    assert inst.acquire().scan_region.center_x_m == 0.0


def test_shorter_dwell_gives_noisier_frames() -> None:
    inst = SimulatedSEM(seed=8, **SMALL)  # type: ignore[arg-type]
    inst.execute(SetDwell(1e-5))
    slow = inst.acquire()
    inst.execute(SetDwell(1e-7))
    fast = inst.acquire()

    def relative_noise(frame) -> float:  # type: ignore[no-untyped-def]
        clean = frame.truth.clean
        return float(np.var(frame.data - clean) / np.mean(clean) ** 2)

    assert relative_noise(fast) == pytest.approx(100 * relative_noise(slow), rel=0.2)


def test_unknown_option_is_a_config_error_listing_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="warp_factor") as err:
        SimulatedSEM(warp_factor=9)
    assert "probe_size_m" in str(err.value) and "charging" in str(err.value)


def test_config_overrides_reach_the_simulator() -> None:
    inst = SimulatedSEM(seed=9, charging=True, probe_size_m=4e-9, **SMALL)  # type: ignore[arg-type]
    assert inst.simulator.config.charging and inst.simulator.config.probe_size_m == 4e-9
    with pytest.raises(ConfigError, match="probe_size_m"):
        SimulatedSEM(probe_size_m=-1e-9)
    with pytest.raises(ConfigError, match="lines_per_chunk"):
        SimulatedSEM(lines_per_chunk=0)
