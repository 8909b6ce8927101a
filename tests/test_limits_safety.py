"""Limits and the safety envelope: ranges, forbidden areas, rate limits, operator limits."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.commands import (
    AbortScan,
    Approach,
    Command,
    MoveTo,
    Retract,
    Scan,
    SetBias,
    SetDwell,
    TipDip,
    TipPulse,
)
from drivers.errors import ConfigError, InstrumentError, LimitViolation, ScopePilotError
from drivers.frame import ScanRegion
from drivers.limits import Limits
from drivers.safety import ForbiddenArea, SafetyEnvelope

# Asymmetric ranges, all different, so that a check against the wrong range shows up.
LIMITS = Limits(
    bias_V=(-2.0, 2.5),
    pulse_bias_V=(-3.0, 5.0),
    pulse_duration_s=(0.01, 0.5),
    dip_depth_m=(1e-10, 2e-9),
    dip_bias_V=(-0.5, 0.25),
    dwell_s=(1e-4, 5e-3),
    scan_size_m=(2e-9, 5e-7),
    shape_px=(16, 512),
    stage_x_m=(-1e-6, 2e-6),
    stage_y_m=(-3e-6, 1e-6),
)


def below(x: float) -> float:
    return math.nextafter(x, -math.inf)


def above(x: float) -> float:
    return math.nextafter(x, math.inf)


# name -> (make command from value, limit range, violation field, value reported for v)
RangeCase = tuple[Callable[[Any], Command], tuple[Any, Any], str, Callable[[Any], Any]]
L = LIMITS
RANGE_CASES: dict[str, RangeCase] = {
    "pulse bias": (lambda v: TipPulse(v, 0.1), L.pulse_bias_V, "bias_V", lambda v: v),
    "pulse duration": (lambda v: TipPulse(1.0, v), L.pulse_duration_s, "duration_s", lambda v: v),
    "dip depth": (lambda v: TipDip(v, 0.0), L.dip_depth_m, "depth_m", lambda v: v),
    "dip bias": (lambda v: TipDip(1e-9, v), L.dip_bias_V, "bias_V", lambda v: v),
    "set dwell": (lambda v: SetDwell(v), L.dwell_s, "dwell_s", lambda v: v),
    "scan dwell": (lambda v: Scan(dwell_s=v), L.dwell_s, "dwell_s", lambda v: v),
    "scan width": (
        lambda v: Scan(ScanRegion(width_m=v, height_m=1e-8)),
        L.scan_size_m,
        "width_m",
        lambda v: v,
    ),
    "scan height": (
        lambda v: Scan(ScanRegion(width_m=1e-8, height_m=v)),
        L.scan_size_m,
        "height_m",
        lambda v: v,
    ),
    "scan rows": (lambda v: Scan(shape_px=(v, 64)), L.shape_px, "shape_px", lambda v: v),
    "scan cols": (lambda v: Scan(shape_px=(64, v)), L.shape_px, "shape_px", lambda v: v),
    "stage x": (lambda v: MoveTo(v, 0.0), L.stage_x_m, "target_m", lambda v: (v, 0.0)),
    "stage y": (lambda v: MoveTo(0.0, v), L.stage_y_m, "target_m", lambda v: (0.0, v)),
    "scan centre x": (
        lambda v: Scan(ScanRegion(center_x_m=v, width_m=1e-8, height_m=1e-8)),
        L.stage_x_m,
        "center_m",
        lambda v: (v, 0.0),
    ),
    "scan centre y": (
        lambda v: Scan(ScanRegion(center_y_m=v, width_m=1e-8, height_m=1e-8)),
        L.stage_y_m,
        "center_m",
        lambda v: (0.0, v),
    ),
    "imaging bias": (lambda v: SetBias(v), L.bias_V, "bias_V", lambda v: v),
}


def _outside(allowed: tuple[Any, Any]) -> list[Any]:
    low, high = allowed
    if isinstance(low, int):
        return [low - 1, high + 1]
    return [below(low), above(high)]


@pytest.mark.parametrize("case", sorted(RANGE_CASES))
def test_range_boundaries_are_allowed(case: str) -> None:
    make, allowed, _, _ = RANGE_CASES[case]
    envelope = SafetyEnvelope(LIMITS)
    for value in allowed:
        if case.startswith("scan centre"):  # the whole 10 nm region must fit: centre 5 nm inside
            value = value - math.copysign(5e-9, value)
        envelope.check(make(value))


def test_scan_region_must_fit_inside_the_stage_range() -> None:
    envelope = SafetyEnvelope(LIMITS)
    edge = LIMITS.stage_x_m[1]
    envelope.check(Scan(ScanRegion(center_x_m=edge - 5e-9, width_m=1e-8, height_m=1e-8)))
    with pytest.raises(LimitViolation) as info:
        envelope.check(Scan(ScanRegion(center_x_m=edge - 4e-9, width_m=1e-8, height_m=1e-8)))
    assert info.value.field == "region" and "stage range" in str(info.value)


@pytest.mark.parametrize("side", [0, 1], ids=["below", "above"])
@pytest.mark.parametrize("case", sorted(RANGE_CASES))
def test_just_outside_a_range_is_a_limit_violation(case: str, side: int) -> None:
    make, allowed, field, reported = RANGE_CASES[case]
    value = _outside(allowed)[side]
    command = make(value)
    with pytest.raises(LimitViolation) as info:
        SafetyEnvelope(LIMITS).check(command)
    error = info.value
    assert error.field == field
    assert error.value == reported(value)
    assert error.command_id == command.id
    if field in ("target_m", "center_m"):
        assert error.limit == (LIMITS.stage_x_m, LIMITS.stage_y_m)
    else:
        assert error.limit == allowed
    assert repr(reported(value)) in str(error)
    assert command.id in str(error) and command.kind in str(error)
    assert isinstance(error, InstrumentError) and isinstance(error, ScopePilotError)


@pytest.mark.parametrize("command", [AbortScan(), Retract(), Approach(), Scan()])
def test_commands_without_values_always_pass(command: Command) -> None:
    envelope = SafetyEnvelope(
        Limits(max_conditioning_per_window=0), forbidden=[ForbiddenArea(0.0, 0.0, 1e-6)]
    )
    envelope.check(command, position_m=(0.0, 0.0))


# --- forbidden areas ------------------------------------------------------------------------------

DAMAGE = ForbiddenArea(0.0, 0.0, 1e-7, label="crater")


def test_move_into_a_forbidden_area_is_rejected() -> None:
    envelope = SafetyEnvelope(LIMITS, forbidden=[DAMAGE])
    for x_m, y_m in [(0.0, 0.0), (5e-8, -5e-8), (1e-7, 0.0)]:
        command = MoveTo(x_m, y_m)
        with pytest.raises(LimitViolation) as info:
            envelope.check(command)
        assert info.value.field == "target_m"
        assert info.value.value == (x_m, y_m)
        assert info.value.limit == DAMAGE
        assert info.value.command_id == command.id
        assert "crater" in str(info.value)
    envelope.check(MoveTo(above(1e-7), 0.0))
    envelope.check(MoveTo(8e-8, 8e-8))  # inside the bounding box, outside the disc


@pytest.mark.parametrize(
    "region",
    [
        ScanRegion(3e-7, 0.0, 4.2e-7, 1e-8),  # edge reaches into the disc
        ScanRegion(0.0, -2.5e-7, 1e-8, 3.2e-7),  # from below
        ScanRegion(1.2e-7, 1.2e-7, 4.8e-7, 4.8e-7),  # covers the disc entirely
        ScanRegion(1.6e-7, 0.0, 1e-7, 1e-7, rotation_deg=45.0),  # a rotated corner reaches in
    ],
)
def test_scan_overlapping_a_forbidden_area_is_rejected(region: ScanRegion) -> None:
    envelope = SafetyEnvelope(LIMITS, forbidden=[DAMAGE])
    command = Scan(region)
    with pytest.raises(LimitViolation) as info:
        envelope.check(command)
    assert info.value.field == "region"
    assert info.value.value == region
    assert info.value.limit == DAMAGE
    assert "crater" in str(info.value)


def test_scan_centred_in_a_forbidden_area_is_rejected() -> None:
    envelope = SafetyEnvelope(LIMITS, forbidden=[DAMAGE])
    with pytest.raises(LimitViolation):
        envelope.check(Scan(ScanRegion(1e-8, 1e-8, 1e-8, 1e-8)))


def test_scan_clear_of_forbidden_areas_passes() -> None:
    envelope = SafetyEnvelope(LIMITS, forbidden=[DAMAGE])
    envelope.check(Scan(ScanRegion(3e-7, 0.0, 3.8e-7, 1e-8)))  # edge stops 1e-8 short
    envelope.check(Scan(ScanRegion(-5e-7, 5e-7, 1e-7, 1e-7, rotation_deg=30.0)))
    envelope.check(Scan(ScanRegion(1.4e-7, 1.4e-7, 1e-7, 1e-7)))  # box corner outside the disc
    envelope.check(Scan(ScanRegion(1.6e-7, 0.0, 1e-7, 1e-7)))  # unrotated: edge 1e-8 short


@pytest.mark.parametrize("make", [lambda: TipPulse(1.0, 0.1), lambda: TipDip(1e-9, 0.0)])
def test_conditioning_over_a_forbidden_area_is_rejected(make: Callable[[], Command]) -> None:
    envelope = SafetyEnvelope(LIMITS, forbidden=[DAMAGE])
    command = make()
    with pytest.raises(LimitViolation) as info:
        envelope.check(command, position_m=(2e-8, -3e-8))
    assert info.value.field == "position_m"
    assert info.value.value == (2e-8, -3e-8)
    assert info.value.command_id == command.id
    envelope.check(command, position_m=(3e-7, 0.0))


@pytest.mark.parametrize("position", [(above(2e-6), 0.0), (0.0, below(-3e-6))])
def test_conditioning_outside_the_stage_range_is_rejected(position: tuple[float, float]) -> None:
    with pytest.raises(LimitViolation) as info:
        SafetyEnvelope(LIMITS).check(TipPulse(1.0, 0.1), position_m=position)
    assert info.value.field == "position_m"
    assert info.value.value == position


def test_forbid_adds_an_area_for_later_checks() -> None:
    envelope = SafetyEnvelope(LIMITS)
    envelope.check(MoveTo(0.0, 0.0))
    envelope.forbid(DAMAGE)
    assert envelope.forbidden == (DAMAGE,)
    with pytest.raises(LimitViolation):
        envelope.check(MoveTo(0.0, 0.0))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"x_m": 0.0, "y_m": 0.0, "radius_m": 0.0},
        {"x_m": 0.0, "y_m": 0.0, "radius_m": -1e-9},
        {"x_m": math.nan, "y_m": 0.0, "radius_m": 1e-9},
        {"x_m": 0.0, "y_m": math.inf, "radius_m": 1e-9},
        {"x_m": "0", "y_m": 0.0, "radius_m": 1e-9},
        {"x_m": 0.0, "y_m": 0.0, "radius_m": None},
    ],
)
def test_bad_forbidden_area_is_a_config_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        ForbiddenArea(**kwargs)


# --- rate limits ----------------------------------------------------------------------------------


def test_minimum_interval_between_conditioning_actions() -> None:
    envelope = SafetyEnvelope(Limits(min_conditioning_interval_s=10.0))
    pulse = TipPulse(1.0, 0.1)
    envelope.check(pulse, now_s=0.0)
    envelope.check(pulse, now_s=0.0)  # checking alone does not count
    envelope.record_executed(pulse, now_s=0.0)
    dip = TipDip(1e-9, 0.0)
    with pytest.raises(LimitViolation) as info:
        envelope.check(dip, now_s=below(10.0))  # pulses and dips share the limit
    assert info.value.field == "interval_s"
    assert info.value.limit == 10.0
    assert info.value.command_id == dip.id
    envelope.check(dip, now_s=10.0)
    envelope.check(SetBias(1.0), now_s=1.0)  # other commands are not rate limited


def test_maximum_conditioning_actions_per_window() -> None:
    envelope = SafetyEnvelope(Limits(max_conditioning_per_window=3, conditioning_window_s=100.0))
    pulse = TipPulse(1.0, 0.1)
    for t in (0.0, 10.0, 20.0):
        envelope.check(pulse, now_s=t)
        envelope.record_executed(pulse, now_s=t)
    with pytest.raises(LimitViolation) as info:
        envelope.check(pulse, now_s=30.0)
    assert (info.value.field, info.value.value, info.value.limit) == ("rate", 4, 3)
    with pytest.raises(LimitViolation):
        envelope.check(TipDip(1e-9, 0.0), now_s=below(100.0))
    envelope.check(pulse, now_s=100.0)  # the action at t=0 has left the window
    envelope.record_executed(pulse, now_s=100.0)
    with pytest.raises(LimitViolation):
        envelope.check(pulse, now_s=105.0)
    envelope.check(pulse, now_s=110.0)


def test_only_executed_conditioning_actions_count() -> None:
    envelope = SafetyEnvelope(Limits(max_conditioning_per_window=1, min_conditioning_interval_s=5))
    for _ in range(10):
        envelope.record_executed(SetDwell(1e-3), now_s=0.0)
        envelope.record_executed(MoveTo(0.0, 0.0), now_s=0.0)
        envelope.check(TipPulse(1.0, 0.1), now_s=0.0)
    envelope.record_executed(TipDip(1e-9, 0.0), now_s=0.0)
    with pytest.raises(LimitViolation):
        envelope.check(TipPulse(1.0, 0.1), now_s=3600.0 - 1.0)


def test_zero_conditioning_per_window_forbids_conditioning() -> None:
    envelope = SafetyEnvelope(Limits(max_conditioning_per_window=0))
    with pytest.raises(LimitViolation) as info:
        envelope.check(TipPulse(1.0, 0.1))
    assert info.value.field == "rate"
    envelope.check(SetDwell(1e-3))


def test_a_check_at_a_later_time_does_not_forget_history() -> None:
    # A dry-run check for the future must not change what a check for now decides.
    envelope = SafetyEnvelope(Limits(max_conditioning_per_window=2, conditioning_window_s=100.0))
    pulse = TipPulse(1.0, 0.1)
    for t in (0.0, 10.0):
        envelope.record_executed(pulse, now_s=t)
    envelope.check(pulse, now_s=1000.0)
    with pytest.raises(LimitViolation):
        envelope.check(pulse, now_s=50.0)


# --- operator limits ------------------------------------------------------------------------------


def test_operator_limits_narrow_the_envelope() -> None:
    operator = Limits(pulse_bias_V=(-1.0, 2.0), dwell_s=(1e-3, 1.0), shape_px=(8, 128))
    envelope = SafetyEnvelope(LIMITS, operator_limits=operator)
    assert envelope.limits.pulse_bias_V == (-1.0, 2.0)
    assert envelope.limits.dwell_s == (1e-3, LIMITS.dwell_s[1])
    assert envelope.limits.shape_px == (16, 128)
    assert envelope.instrument_limits == LIMITS
    with pytest.raises(LimitViolation):
        envelope.check(TipPulse(3.0, 0.1))  # the instrument alone would allow it
    with pytest.raises(LimitViolation):
        envelope.check(Scan(shape_px=(256, 256)))
    SafetyEnvelope(LIMITS).check(TipPulse(3.0, 0.1))


def test_operator_limits_cannot_widen() -> None:
    wide = Limits(
        bias_V=(-1e3, 1e3),
        pulse_bias_V=(-1e3, 1e3),
        pulse_duration_s=(0.0, 1e3),
        dip_depth_m=(0.0, 1.0),
        dip_bias_V=(-1e3, 1e3),
        dwell_s=(0.0, 1e3),
        scan_size_m=(0.0, 1.0),
        shape_px=(1, 10**6),
        stage_x_m=(-1.0, 1.0),
        stage_y_m=(-1.0, 1.0),
        min_conditioning_interval_s=0.0,
        max_conditioning_per_window=10**9,
        conditioning_window_s=0.0,
    )
    strict = Limits(
        min_conditioning_interval_s=5.0, max_conditioning_per_window=3, conditioning_window_s=60.0
    )
    assert LIMITS.narrowed(wide) == LIMITS
    assert strict.narrowed(wide) == strict
    envelope = SafetyEnvelope(LIMITS, operator_limits=wide)
    assert envelope.limits == LIMITS
    with pytest.raises(LimitViolation):
        envelope.check(TipPulse(above(5.0), 0.1))


def test_stricter_operator_rate_limits_win() -> None:
    instrument = Limits(
        min_conditioning_interval_s=5.0, max_conditioning_per_window=10, conditioning_window_s=60.0
    )
    operator = Limits(
        min_conditioning_interval_s=1.0, max_conditioning_per_window=2, conditioning_window_s=600.0
    )
    narrowed = instrument.narrowed(operator)
    assert narrowed.min_conditioning_interval_s == 5.0
    assert narrowed.max_conditioning_per_window == 2
    assert narrowed.conditioning_window_s == 600.0


def test_non_overlapping_operator_limits_are_a_config_error() -> None:
    operator = Limits(pulse_bias_V=(6.0, 8.0))
    with pytest.raises(ConfigError) as info:
        SafetyEnvelope(LIMITS, operator_limits=operator)
    assert "pulse_bias_V" in str(info.value) and "(6.0, 8.0)" in str(info.value)
    with pytest.raises(ConfigError):
        LIMITS.narrowed(Limits(shape_px=(1024, 2048)))


def test_set_operator_limits_changes_and_restores() -> None:
    envelope = SafetyEnvelope(LIMITS)
    envelope.set_operator_limits(Limits(bias_V=(-0.5, 0.5)))
    with pytest.raises(LimitViolation):
        envelope.check(SetBias(1.0))
    with pytest.raises(ConfigError):
        envelope.set_operator_limits(Limits(bias_V=(3.0, 4.0)))
    assert envelope.limits.bias_V == (-0.5, 0.5)  # a rejected change changes nothing
    envelope.set_operator_limits(None)
    assert envelope.limits == LIMITS
    envelope.check(SetBias(1.0))


# --- Limits: validation and JSON ------------------------------------------------------------------


def test_limits_json_round_trip() -> None:
    obj = json.loads(json.dumps(LIMITS.to_json(), allow_nan=False))
    assert Limits.from_json(obj) == LIMITS
    assert obj["pulse_bias_V"] == [-3.0, 5.0]
    assert Limits.from_json({}) == Limits()
    assert Limits.from_json({"bias_V": [-1, 1]}).bias_V == (-1, 1)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"bias_V": (1.0, -1.0)}, "(1.0, -1.0)"),
        ({"bias_V": (math.nan, 1.0)}, "nan"),
        ({"dwell_s": (0.0, "1")}, "'1'"),
        ({"dwell_s": [0.0, 1.0]}, "[0.0, 1.0]"),
        ({"dwell_s": (0.0, 1.0, 2.0)}, "(0.0, 1.0, 2.0)"),
        ({"dwell_s": 1.0}, "1.0"),
        ({"dip_bias_V": (True, 1.0)}, "True"),
        ({"stage_x_m": (0, 10**400)}, "stage_x_m"),
        ({"shape_px": (0, 16)}, "(0, 16)"),
        ({"shape_px": (32, 16)}, "(32, 16)"),
        ({"shape_px": (16.0, 32)}, "16.0"),
        ({"shape_px": (True, 2)}, "True"),
        ({"shape_px": [16, 32]}, "[16, 32]"),
        ({"shape_px": (1, 2, 3)}, "(1, 2, 3)"),
        ({"shape_px": 16}, "16"),
        ({"max_conditioning_per_window": -1}, "-1"),
        ({"max_conditioning_per_window": 1.5}, "1.5"),
        ({"max_conditioning_per_window": True}, "True"),
        ({"min_conditioning_interval_s": -1.0}, "-1.0"),
        ({"min_conditioning_interval_s": math.inf}, "inf"),
        ({"conditioning_window_s": math.nan}, "nan"),
        ({"conditioning_window_s": "1"}, "'1'"),
        ({"conditioning_window_s": 10**400}, "conditioning_window_s"),
    ],
)
def test_bad_limits_are_a_config_error(kwargs: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        Limits(**kwargs)
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ([1, 2], "mapping"),
        ({"voltage": [0, 1]}, "voltage"),
        ({"bias_V": [0, 1], 5: 1}, "5"),
        ({"shape_px": [1, 2, 3]}, "shape_px"),
        ({"shape_px": 7}, "shape_px"),
        ({"bias_V": [2, 1]}, "bias_V"),
        ({"dwell_s": None}, "dwell_s"),
    ],
)
def test_bad_limits_json_is_a_config_error(obj: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        Limits.from_json(obj)
    assert expected in str(info.value)


# --- property: check raises iff a value is out of range ------------------------------------------


@st.composite
def ranges(draw: st.DrawFn, low: float, high: float) -> tuple[float, float]:
    a = draw(st.floats(low, high))
    b = draw(st.floats(low, high))
    return (min(a, b), max(a, b))


@st.composite
def limits_strategy(draw: st.DrawFn) -> Limits:
    rows = sorted(draw(st.lists(st.integers(1, 4096), min_size=2, max_size=2)))
    return Limits(
        bias_V=draw(ranges(-20.0, 20.0)),
        pulse_bias_V=draw(ranges(-20.0, 20.0)),
        pulse_duration_s=draw(ranges(1e-4, 2.0)),
        dip_depth_m=draw(ranges(0.0, 1e-8)),
        dip_bias_V=draw(ranges(-2.0, 2.0)),
        dwell_s=draw(ranges(1e-6, 1e-1)),
        scan_size_m=draw(ranges(1e-10, 1e-5)),
        shape_px=(rows[0], rows[1]),
        stage_x_m=draw(ranges(-1e-5, 1e-5)),
        stage_y_m=draw(ranges(-1e-5, 1e-5)),
        min_conditioning_interval_s=draw(st.sampled_from([0.0, 1.0, 30.0])),
        max_conditioning_per_window=draw(st.integers(0, 4)),
        conditioning_window_s=draw(st.sampled_from([0.0, 10.0, 100.0, 1000.0])),
    )


def near(draw: st.DrawFn, allowed: tuple[float, float], floor: float | None = None) -> float:
    """A value inside, on the edge of, just outside or well outside ``allowed``."""
    low, high = allowed
    span = max(high - low, 1e-12)
    value = draw(
        st.sampled_from([low, high, below(low), above(high), (low + high) / 2])
        | st.floats(low - span, high + span)
    )
    return value if floor is None else max(value, floor)


@st.composite
def command_for(draw: st.DrawFn, lim: Limits) -> Command:
    kind = draw(
        st.sampled_from(
            ["Scan", "SetDwell", "MoveTo", "TipPulse", "TipDip", "SetBias", "AbortScan", "Retract"]
        )
    )
    if kind == "Scan":
        region = None
        if draw(st.booleans()):
            region = ScanRegion(
                near(draw, lim.stage_x_m),
                near(draw, lim.stage_y_m),
                near(draw, lim.scan_size_m, floor=1e-12),
                near(draw, lim.scan_size_m, floor=1e-12),
                draw(st.floats(-180, 180)),
            )
        lo, hi = lim.shape_px
        shape_px = draw(
            st.none()
            | st.tuples(st.integers(max(1, lo - 2), hi + 2), st.integers(max(1, lo - 2), hi + 2))
        )
        dwell_s = draw(st.none() | st.just(near(draw, lim.dwell_s, floor=1e-12)))
        return Scan(region, shape_px, dwell_s)
    if kind == "SetDwell":
        return SetDwell(near(draw, lim.dwell_s))
    if kind == "MoveTo":
        return MoveTo(near(draw, lim.stage_x_m), near(draw, lim.stage_y_m))
    if kind == "TipPulse":
        return TipPulse(near(draw, lim.pulse_bias_V), near(draw, lim.pulse_duration_s))
    if kind == "TipDip":
        return TipDip(near(draw, lim.dip_depth_m), near(draw, lim.dip_bias_V))
    if kind == "SetBias":
        return SetBias(near(draw, lim.bias_V))
    return AbortScan() if kind == "AbortScan" else Retract()


def reference_violations(
    command: Command,
    lim: Limits,
    position_m: tuple[float, float],
    history: list[float],
    now_s: float,
) -> set[str]:
    """The fields a careful reader of Limits would reject, written independently of safety.py."""

    def out(value: float, allowed: tuple[float, float]) -> bool:
        return value < allowed[0] or value > allowed[1]

    def off_stage(x: float, y: float) -> bool:
        return out(x, lim.stage_x_m) or out(y, lim.stage_y_m)

    bad: set[str] = set()
    if isinstance(command, (TipPulse, TipDip)):
        if isinstance(command, TipPulse):
            if out(command.bias_V, lim.pulse_bias_V):
                bad.add("bias_V")
            if out(command.duration_s, lim.pulse_duration_s):
                bad.add("duration_s")
        else:
            if out(command.depth_m, lim.dip_depth_m):
                bad.add("depth_m")
            if out(command.bias_V, lim.dip_bias_V):
                bad.add("bias_V")
        if off_stage(*position_m):
            bad.add("position_m")
        if history and now_s - max(history) < lim.min_conditioning_interval_s:
            bad.add("interval_s")
        in_window = [t for t in history if now_s - lim.conditioning_window_s < t]
        if len(in_window) >= lim.max_conditioning_per_window:
            bad.add("rate")
    elif isinstance(command, SetDwell):
        if out(command.dwell_s, lim.dwell_s):
            bad.add("dwell_s")
    elif isinstance(command, SetBias):
        if out(command.bias_V, lim.bias_V):
            bad.add("bias_V")
    elif isinstance(command, MoveTo):
        if off_stage(command.x_m, command.y_m):
            bad.add("target_m")
    elif isinstance(command, Scan):
        if command.dwell_s is not None and out(command.dwell_s, lim.dwell_s):
            bad.add("dwell_s")
        if command.shape_px is not None and any(out(n, lim.shape_px) for n in command.shape_px):
            bad.add("shape_px")
        region = command.region
        if region is not None:
            if out(region.width_m, lim.scan_size_m):
                bad.add("width_m")
            if out(region.height_m, lim.scan_size_m):
                bad.add("height_m")
            if off_stage(region.center_x_m, region.center_y_m):
                bad.add("center_m")
            # every corner of the scan (its bounding circle when rotated) must be on the stage
            if region.rotation_deg % 180:
                hx = hy = math.hypot(region.width_m, region.height_m) / 2
            else:
                hx, hy = region.width_m / 2, region.height_m / 2
            corners = [
                (region.center_x_m + sx * hx, region.center_y_m + sy * hy)
                for sx in (-1, 1)
                for sy in (-1, 1)
            ]
            if any(off_stage(x, y) for x, y in corners):
                bad.add("region")
    return bad


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Limits, Command, tuple[float, float], list[float], float]:
    lim = draw(limits_strategy())
    command = draw(command_for(lim))
    position = (near(draw, lim.stage_x_m), near(draw, lim.stage_y_m))
    history = sorted(draw(st.lists(st.floats(0.0, 2000.0), max_size=5)))
    now_s = max(history, default=0.0) + draw(st.sampled_from([0.0, 1.0, 10.0, 100.0, 1000.0]))
    return lim, command, position, history, now_s


def _envelope_with(lim: Limits, history: list[float]) -> SafetyEnvelope:
    envelope = SafetyEnvelope(lim)
    for t in history:
        envelope.record_executed(TipPulse(0.0, 0.1), now_s=t)
    return envelope


def _outcome(envelope: SafetyEnvelope, command: Command, **kwargs: Any) -> str | None:
    try:
        envelope.check(command, **kwargs)
    except LimitViolation as exc:
        return exc.field
    return None


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_check_raises_iff_some_value_is_out_of_range(
    scenario: tuple[Limits, Command, tuple[float, float], list[float], float],
) -> None:
    lim, command, position, history, now_s = scenario
    envelope = _envelope_with(lim, history)
    expected = reference_violations(command, lim, position, history, now_s)
    field = _outcome(envelope, command, position_m=position, now_s=now_s)
    if expected:
        assert field in expected, f"{command!r}: got {field!r}, expected one of {expected}"
    else:
        assert field is None, f"{command!r} rejected for {field!r}"


@settings(max_examples=300, deadline=None)
@given(scenarios(), st.floats(0.0, 3000.0), st.floats(0.0, 1000.0))
def test_check_never_changes_the_envelope(
    scenario: tuple[Limits, Command, tuple[float, float], list[float], float],
    later_s: float,
    probe_after_s: float,
) -> None:
    lim, command, position, history, now_s = scenario
    last = max(history, default=0.0)
    centre = (sum(lim.stage_x_m) / 2, sum(lim.stage_y_m) / 2)
    # A conditioning action that passes every range check, so a check reaches the rate limits.
    probe = TipPulse(sum(lim.pulse_bias_V) / 2, sum(lim.pulse_duration_s) / 2)
    envelope = _envelope_with(lim, history)
    limits_before, forbidden_before = envelope.limits, envelope.forbidden
    first = _outcome(envelope, command, position_m=position, now_s=now_s)
    # Checks at other times, e.g. a dry run for later, must not change any later decision.
    _outcome(envelope, command, position_m=position, now_s=last + later_s)
    _outcome(envelope, probe, position_m=centre, now_s=last + later_s)
    assert _outcome(envelope, command, position_m=position, now_s=now_s) == first
    fresh = _envelope_with(lim, history)
    probe_s = last + probe_after_s
    assert _outcome(envelope, probe, position_m=centre, now_s=probe_s) == _outcome(
        fresh, probe, position_m=centre, now_s=probe_s
    )
    assert envelope.limits == limits_before and envelope.forbidden == forbidden_before


@settings(deadline=None)
@given(limits_strategy())
def test_any_limits_round_trip_through_json(lim: Limits) -> None:
    text = json.dumps(lim.to_json(), allow_nan=False)
    assert Limits.from_json(json.loads(text)) == lim


@settings(deadline=None)
@given(limits_strategy(), limits_strategy())
def test_narrowed_limits_lie_within_both(a: Limits, b: Limits) -> None:
    try:
        n = a.narrowed(b)
    except ConfigError:
        return
    for name in (
        "bias_V",
        "pulse_bias_V",
        "pulse_duration_s",
        "dip_depth_m",
        "dip_bias_V",
        "dwell_s",
        "scan_size_m",
        "shape_px",
        "stage_x_m",
        "stage_y_m",
    ):
        low, high = getattr(n, name)
        for parent in (a, b):
            assert getattr(parent, name)[0] <= low <= high <= getattr(parent, name)[1]
    assert n.max_conditioning_per_window <= min(
        a.max_conditioning_per_window, b.max_conditioning_per_window
    )
    assert n.min_conditioning_interval_s >= max(
        a.min_conditioning_interval_s, b.min_conditioning_interval_s
    )
