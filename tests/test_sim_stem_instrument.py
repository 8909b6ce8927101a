"""sim:stem passes the instrument contract suite, plus STEM-specific driver behaviour."""

from __future__ import annotations

import json

import numpy as np
import pytest

from drivers.commands import Approach, MoveTo, Retract, Scan, SetScanPattern, TipDip, TipPulse
from drivers.errors import CommandRejected, ConfigError, DataError, LimitViolation
from drivers.frame import ScanRegion, TipState, frame_problems
from drivers.sim_stem import SimulatedSTEM, open_simulated_stem
from tests.contract.instrument import InstrumentContract

SMALL = {
    "shape_px": (64, 64),
    "region": ScanRegion(0.0, 0.0, 1.6e-9, 1.6e-9),
    "lines_per_chunk": 16,
}


class TestSimulatedSTEMContract(InstrumentContract):
    def make_instrument(self) -> SimulatedSTEM:
        return SimulatedSTEM(seed=1, **SMALL)


def test_info_declares_a_stem_without_tip_commands() -> None:
    info = SimulatedSTEM(seed=1, **SMALL).info()
    assert info.kind == "stem" and info.channels == ("haadf",)
    assert {str(c) for c in info.capabilities} == {"scan", "stage", "partial_scan"}
    assert info.limits.dwell_s == (1e-7, 2e-5)
    assert info.limits.max_conditioning_per_window == 0
    json.dumps(info.to_json())


@pytest.mark.parametrize(
    "command", [TipPulse(2.5, 0.2), TipDip(1e-9), Approach(), Retract()], ids=lambda c: c.kind
)
def test_tip_commands_are_rejected(command: object) -> None:
    inst = SimulatedSTEM(seed=1, **SMALL)
    before = inst.state()
    with pytest.raises(CommandRejected, match="cannot execute"):
        inst.execute(command)  # type: ignore[arg-type]
    assert inst.state().time_s == before.time_s


def test_frames_carry_ground_truth_and_small_metadata() -> None:
    frame = SimulatedSTEM(seed=2, **SMALL).acquire()
    truth = frame.truth
    assert truth is not None and truth.tip_state is TipState.GOOD
    assert truth.clean is not None and truth.clean.shape == frame.shape
    assert truth.extra["class_mask"].shape == frame.shape
    assert truth.extra["class_mask"].dtype == np.uint8
    assert truth.extra["sampling_mask"].all()
    assert dict(frame.metadata) == {"pattern": "raster", "fraction": 1.0, "units": "counts"}
    json.dumps(frame.header())


def test_same_seed_same_frames_different_seed_different() -> None:
    a = SimulatedSTEM(seed=3, **SMALL).acquire().data
    b = SimulatedSTEM(seed=3, **SMALL).acquire().data
    c = SimulatedSTEM(seed=4, **SMALL).acquire().data
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_partial_scan_pattern_gives_nan_where_the_beam_skips() -> None:
    inst = SimulatedSTEM(seed=5, **SMALL)
    inst.execute(SetScanPattern("random", 0.1, source="test"))
    parts = list(inst.stream())
    frame = parts[-1]
    mask = frame.truth.extra["sampling_mask"]
    assert frame.complete and dict(frame.metadata)["pattern"] == "random"
    assert np.array_equal(np.isfinite(frame.data), mask)
    assert mask.mean() == pytest.approx(0.1, abs=1 / mask.size)
    assert frame_problems(frame) == []  # unvisited pixels are NaN by design, not a fault
    # A partial scan dwells only on the visited pixels: it takes a fraction of the time.
    raster = SimulatedSTEM(seed=5, **SMALL)
    t_raster = raster.acquire().truth.extra["frame_time_s"]
    assert frame.truth.extra["frame_time_s"] < 0.5 * t_raster
    inst.execute(SetScanPattern("raster", source="test"))
    assert frame_problems(inst.acquire()) == []


def test_bad_pattern_is_a_data_error_and_bad_options_a_config_error() -> None:
    with pytest.raises(DataError, match="zigzag"):
        SetScanPattern("zigzag", 0.5)
    with pytest.raises(ConfigError, match="zigzag"):
        SimulatedSTEM(pattern="zigzag")
    with pytest.raises(ConfigError, match="warp_factor"):
        SimulatedSTEM(warp_factor=9)
    with pytest.raises(ConfigError, match="unobtainium"):
        open_simulated_stem(specimen="unobtainium")
    with pytest.raises(ConfigError, match="beam_current_A"):
        open_simulated_stem(beam_current_A=-30e-12)


def test_field_of_view_larger_than_the_stage_is_rejected() -> None:
    inst = SimulatedSTEM(seed=6, **SMALL)
    with pytest.raises(LimitViolation):
        inst.execute(Scan(ScanRegion(0.0, 0.0, 3e-6, 3e-6)))
    with pytest.raises(LimitViolation):
        inst.execute(Scan(ScanRegion(0.9e-6, 0.0, 0.5e-6, 0.5e-6)))
    with pytest.raises(LimitViolation):
        inst.execute(Scan(dwell_s=1e-3))


def test_move_changes_what_is_imaged() -> None:
    inst = SimulatedSTEM(seed=7, drift_m_per_s=0.0, **SMALL)
    a = inst.acquire().truth.clean
    inst.execute(MoveTo(2e-10, 0.0))
    b = inst.acquire().truth.clean
    assert a is not None and b is not None and not np.allclose(a, b)
