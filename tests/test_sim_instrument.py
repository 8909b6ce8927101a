"""sim:stm passes the instrument contract suite, plus simulator-specific driver behaviour."""

from __future__ import annotations

import numpy as np
import pytest

from drivers.commands import MoveTo, TipDip, TipPulse
from drivers.errors import ConfigError, LimitViolation
from drivers.frame import ScanRegion, TipState
from drivers.registry import open_instrument
from drivers.sim import SimulatedSTM
from tests.contract.instrument import InstrumentContract

SMALL = {"shape_px": (64, 64), "region": ScanRegion(0.0, 0.0, 8e-9, 8e-9), "lines_per_chunk": 16}


class TestSimulatedSTMContract(InstrumentContract):
    def make_instrument(self) -> SimulatedSTM:
        return open_instrument("sim:stm", seed=1, **SMALL)  # type: ignore[return-value]


def test_frames_carry_ground_truth() -> None:
    inst = open_instrument("sim:stm", seed=2, **SMALL)
    frame = inst.acquire()
    assert frame.truth is not None
    assert frame.truth.tip_state in set(TipState)
    assert frame.truth.clean is not None and frame.truth.clean.shape == frame.shape


def test_same_seed_same_frames_different_seed_different() -> None:
    a = open_instrument("sim:stm", seed=3, **SMALL).acquire().data
    b = open_instrument("sim:stm", seed=3, **SMALL).acquire().data
    c = open_instrument("sim:stm", seed=4, **SMALL).acquire().data
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_conditioning_goes_through_the_instrument_envelope() -> None:
    inst = open_instrument("sim:stm", seed=5, **SMALL)
    with pytest.raises(LimitViolation) as err:
        inst.execute(TipPulse(12.0, 0.2))
    assert err.value.value == 12.0
    with pytest.raises(LimitViolation):
        inst.execute(TipDip(8e-9))
    result = inst.execute(TipPulse(4.0, 0.2))
    assert result.ok and "tip_after" in result.detail


def test_conditioning_damage_shows_in_a_later_scan_of_that_area_only() -> None:
    inst = open_instrument(
        "sim:stm", seed=6, shape_px=(64, 64), region=ScanRegion(0.0, 0.0, 40e-9, 40e-9)
    )
    assert inst.acquire().truth.damaged_fraction == 0.0
    inst.execute(TipDip(5e-9, 0.02))
    assert inst.acquire().truth.damaged_fraction > 0.05
    inst.execute(MoveTo(300e-9, 300e-9))
    assert inst.acquire().truth.damaged_fraction == 0.0


def test_unknown_simulator_option_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="warp_factor"):
        open_instrument("sim:stm", warp_factor=9)


def test_dft_cube_option_images_the_graphene_lattice() -> None:
    inst = open_instrument(
        "sim:stm",
        seed=7,
        cube="graphene",
        shape_px=(128, 128),
        region=ScanRegion(0.0, 0.0, 4e-9, 4e-9),
        drift_m_per_s=0.0,
    )
    frame = inst.acquire()
    clean = frame.truth.clean - frame.truth.clean.mean()
    spectrum = np.abs(np.fft.fft2(clean))
    spectrum[0, 0] = 0.0
    ky, kx = np.unravel_index(np.argmax(spectrum), spectrum.shape)
    fy = np.fft.fftfreq(128, d=4e-9 / 128)[ky]
    fx = np.fft.fftfreq(128, d=4e-9 / 128)[kx]
    period_m = 1.0 / np.hypot(fx, fy)
    # graphene row spacing a*sqrt(3)/2 = 2.13 Å, within one FFT bin of a 4 nm frame
    assert abs(period_m - 2.46e-10 * np.sqrt(3) / 2) < 0.1e-10


@pytest.mark.parametrize("uri", ["sim:stm", "sim:stem", "sim:sem"])
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("dwell_s", "x"),
        ("dwell_s", None),
        ("dwell_s", [1e-6]),
        ("limits", "x"),
        ("limits", {}),
        ("shape_px", {}),
        ("shape_px", 0),
        ("shape_px", [float("inf"), 3]),
        ("shape_px", [True, 3]),
    ],
)
def test_malformed_driver_keywords_are_config_errors_naming_the_key(
    uri: str, key: str, value: object
) -> None:
    with pytest.raises(ConfigError, match=key):
        open_instrument(uri, **{key: value})
