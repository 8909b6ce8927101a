"""Frames, scan regions and ground truth: validation, partial frames, JSON forms, problems."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.errors import DataError
from drivers.frame import Defect, Frame, GroundTruth, ScanRegion, TipState, frame_problems


def make_frame(data: Any, lines_done: Any = None, **overrides: Any) -> Frame:
    kwargs: dict[str, Any] = {
        "data": data,
        "channel": "z",
        "pixel_size_m": (1e-10, 2e-10),
        "dwell_s": 1e-3,
        "scan_region": ScanRegion(1e-8, 2e-8, 1.6e-9, 3.2e-9, 0.0),
        "frame_index": 3,
        "timestamp_s": 12.5,
        "lines_done": data.shape[0] if lines_done is None else lines_done,
        "instrument": "sim:stm#1",
        "metadata": {"bias_V": 0.5, "note": "test"},
    }
    kwargs.update(overrides)
    return Frame(**kwargs)


def ramp(h: int = 8, w: int = 16, dtype: Any = np.float32) -> np.ndarray:
    return np.arange(h * w, dtype=dtype).reshape(h, w)


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ([[1.0, 2.0], [3.0, 4.0]], "list"),
        (None, "NoneType"),
        (np.zeros(16), "(16,)"),
        (np.zeros((2, 4, 4)), "(2, 4, 4)"),
        (np.float32(1.0), "float32"),
        (np.array(1.0), "()"),
    ],
)
def test_data_must_be_a_2d_array(data: Any, expected: str) -> None:
    with pytest.raises(DataError) as info:
        make_frame(data, lines_done=0)
    assert expected in str(info.value)


@pytest.mark.parametrize("lines_done", [-1, 9, 100])
def test_lines_done_out_of_range_is_rejected(lines_done: int) -> None:
    with pytest.raises(DataError) as info:
        make_frame(ramp(8, 16), lines_done=lines_done)
    assert str(lines_done) in str(info.value)
    assert "(8, 16)" in str(info.value)


@pytest.mark.parametrize("lines_done", [2.5, 8.0, True, "8", None])
def test_lines_done_must_be_an_int(lines_done: Any) -> None:
    with pytest.raises(DataError) as info:
        Frame(ramp(8, 16), "z", (1e-10, 1e-10), 1e-3, ScanRegion(), 0, 0.0, lines_done, "x")
    assert repr(lines_done) in str(info.value)


def test_numpy_integer_lines_done_is_accepted_as_int() -> None:
    frame = make_frame(ramp(8, 16), lines_done=np.int64(3))
    assert frame.lines_done == 3 and type(frame.lines_done) is int
    assert frame.done_data.shape == (3, 16)


@pytest.mark.parametrize("lines_done", [0, 1, 7, 8])
def test_partial_and_complete_frames(lines_done: int) -> None:
    data = ramp(8, 16)
    data[lines_done:] = np.nan
    frame = make_frame(data, lines_done=lines_done)
    assert frame.shape == (8, 16)
    assert frame.complete is (lines_done == 8)
    assert frame.done_data.shape == (lines_done, 16)
    np.testing.assert_array_equal(frame.done_data, ramp(8, 16)[:lines_done])


def test_frames_are_immutable() -> None:
    frame = make_frame(ramp())
    with pytest.raises(dataclasses.FrozenInstanceError):
        frame.lines_done = 2  # type: ignore[misc]


def test_header_is_json_and_holds_everything_but_the_pixels() -> None:
    frame = make_frame(ramp(8, 16), lines_done=5)
    header = json.loads(json.dumps(frame.header(), allow_nan=False))
    assert header == {
        "channel": "z",
        "shape": [8, 16],
        "dtype": "float32",
        "pixel_size_m": [1e-10, 2e-10],
        "dwell_s": 1e-3,
        "scan_region": ScanRegion(1e-8, 2e-8, 1.6e-9, 3.2e-9, 0.0).to_json(),
        "frame_index": 3,
        "timestamp_s": 12.5,
        "lines_done": 5,
        "instrument": "sim:stm#1",
        "metadata": {"bias_V": 0.5, "note": "test"},
    }
    assert ScanRegion.from_json(header["scan_region"]) == frame.scan_region


def test_header_converts_numpy_scalars() -> None:
    frame = make_frame(
        ramp(),
        pixel_size_m=(np.float32(1e-10), np.float64(1e-10)),
        dwell_s=np.float64(1e-3),
        frame_index=np.int64(4),
        timestamp_s=np.float32(2.0),
    )
    text = json.dumps(frame.header(), allow_nan=False)
    assert json.loads(text)["frame_index"] == 4


# --- frame_problems -------------------------------------------------------------------------------


def test_clean_frame_has_no_problems() -> None:
    assert frame_problems(make_frame(ramp())) == []
    assert frame_problems(make_frame(ramp(dtype=np.uint16))) == []
    assert frame_problems(make_frame(ramp()), expected_shape=(8, 16)) == []


def test_flat_frame_is_not_a_problem() -> None:
    # A crashed tip gives a flat image; the assessor has to see it, not have it filtered out.
    assert frame_problems(make_frame(np.zeros((8, 16), np.float32))) == []


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scanned_pixels_are_flagged(bad: float) -> None:
    data = ramp()
    data[2, 3] = bad
    problems = frame_problems(make_frame(data))
    assert len(problems) == 1
    assert "1 of 128" in problems[0] and "NaN or infinite" in problems[0]


def test_nan_in_unscanned_lines_of_a_partial_frame_is_fine() -> None:
    data = ramp()
    data[3:] = np.nan
    assert frame_problems(make_frame(data, lines_done=3)) == []


def test_nan_in_scanned_lines_of_a_partial_frame_is_flagged() -> None:
    data = ramp()
    data[3:] = np.nan
    data[2, 0] = np.nan
    problems = frame_problems(make_frame(data, lines_done=3))
    assert problems == ["1 of 48 pixels are NaN or infinite"]


def test_frame_without_completed_lines_is_flagged() -> None:
    data = np.full((8, 16), np.nan, np.float32)
    assert frame_problems(make_frame(data, lines_done=0)) == ["no completed lines"]


def test_wrong_shape_is_flagged_naming_both_shapes() -> None:
    problems = frame_problems(make_frame(ramp(8, 16)), expected_shape=(16, 16))
    assert len(problems) == 1
    assert "(8, 16)" in problems[0] and "(16, 16)" in problems[0]
    assert frame_problems(make_frame(ramp(8, 16)), expected_shape=[8, 16]) == []  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data",
    [
        np.ones((4, 4), dtype=bool),
        np.full((4, 4), "a"),
        np.full((4, 4), None, dtype=object),
        np.zeros((4, 4), dtype="datetime64[s]"),
    ],
    ids=["bool", "str", "object", "datetime"],
)
def test_non_numeric_dtype_is_flagged(data: np.ndarray) -> None:
    problems = frame_problems(make_frame(data))
    assert any(str(data.dtype) in p and "not numeric" in p for p in problems)


def test_all_problems_are_reported_together() -> None:
    data = ramp(4, 4)
    data[0, 0] = np.nan
    problems = frame_problems(make_frame(data), expected_shape=(8, 8))
    assert len(problems) == 2


# --- GroundTruth ----------------------------------------------------------------------------------

BAD_STATES = [s for s in TipState if s is not TipState.GOOD]


def test_good_tip_and_undamaged_area_is_usable() -> None:
    assert GroundTruth(TipState.GOOD).usable
    assert GroundTruth(TipState.GOOD, (TipState.GOOD, TipState.GOOD), damaged_fraction=0.049).usable


@pytest.mark.parametrize("state", BAD_STATES)
def test_any_bad_tip_state_makes_a_frame_unusable(state: TipState) -> None:
    assert not GroundTruth(state).usable
    # the tip changed during the scan: good at the end is not good throughout
    assert not GroundTruth(TipState.GOOD, (state, TipState.GOOD)).usable
    # the final state counts even when the listed states were all good
    assert not GroundTruth(state, (TipState.GOOD,)).usable


@pytest.mark.parametrize("damaged", [0.05, 0.5, 1.0, math.nan])
def test_damaged_area_makes_a_frame_unusable(damaged: float) -> None:
    assert not GroundTruth(TipState.GOOD, damaged_fraction=damaged).usable


def test_ground_truth_json() -> None:
    truth = GroundTruth(
        TipState.MULTIPLE,
        (TipState.GOOD, TipState.MULTIPLE),
        clean=np.zeros((4, 4), np.float32),
        defects=(Defect(1e-9, 2e-9, "vacancy", 3.0, 4.0), Defect(0.0, 0.0, "adatom")),
        damaged_fraction=0.01,
        extra={"seed": 7},
    )
    obj = json.loads(json.dumps(truth.to_json(), allow_nan=False))
    assert obj == {
        "tip_state": "multiple",
        "tip_states": ["good", "multiple"],
        "defects": [
            {"x_m": 1e-9, "y_m": 2e-9, "kind": "vacancy", "row_px": 3.0, "col_px": 4.0},
            {"x_m": 0.0, "y_m": 0.0, "kind": "adatom", "row_px": None, "col_px": None},
        ],
        "damaged_fraction": 0.01,
        "usable": False,
        "extra": {"seed": 7},
    }


# --- ScanRegion -----------------------------------------------------------------------------------


def test_scan_region_json_round_trip() -> None:
    region = ScanRegion(-1e-7, 2e-7, 3e-8, 4e-8, 30.0)
    assert ScanRegion.from_json(json.loads(json.dumps(region.to_json()))) == region
    assert ScanRegion.from_json({}) == ScanRegion()


@given(
    st.builds(
        ScanRegion,
        center_x_m=st.floats(allow_nan=False, allow_infinity=False),
        center_y_m=st.floats(allow_nan=False, allow_infinity=False),
        width_m=st.floats(min_value=0, exclude_min=True, allow_infinity=False),
        height_m=st.floats(min_value=0, exclude_min=True, allow_infinity=False),
        rotation_deg=st.floats(allow_nan=False, allow_infinity=False),
    )
)
def test_any_scan_region_round_trips(region: ScanRegion) -> None:
    text = json.dumps(region.to_json(), allow_nan=False)
    assert ScanRegion.from_json(json.loads(text)) == region


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"width_m": 0.0}, "width_m=0.0"),
        ({"height_m": -1e-9}, "height_m=-1e-09"),
        ({"center_x_m": math.nan}, "nan"),
        ({"center_y_m": math.inf}, "inf"),
        ({"rotation_deg": -math.inf}, "-inf"),
        ({"width_m": "1e-9"}, "'1e-9'"),
        ({"center_x_m": None}, "None"),
        ({"center_x_m": True}, "True"),
        ({"center_x_m": 10**400}, "center_x_m"),
    ],
)
def test_scan_region_validation(kwargs: dict[str, Any], expected: str) -> None:
    with pytest.raises(DataError) as info:
        ScanRegion(**kwargs)
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ([0.0, 0.0, 1e-9, 1e-9, 0.0], "object"),
        ("region", "object"),
        ({"width_m": 1e-9, "depth_m": 1.0}, "depth_m"),
        ({"width_m": 1e-9, 3: 1.0}, "3"),
        ({"width_m": -1.0}, "-1.0"),
    ],
)
def test_scan_region_from_bad_json(obj: Any, expected: str) -> None:
    with pytest.raises(DataError) as info:
        ScanRegion.from_json(obj)
    assert expected in str(info.value)


def test_moved_to_keeps_size_and_rotation() -> None:
    region = ScanRegion(0.0, 0.0, 3e-8, 4e-8, 30.0)
    moved = region.moved_to(1e-7, -2e-7)
    assert moved == ScanRegion(1e-7, -2e-7, 3e-8, 4e-8, 30.0)
    assert region == ScanRegion(0.0, 0.0, 3e-8, 4e-8, 30.0)


def test_ground_truth_json_replaces_arrays_by_their_shape() -> None:
    truth = GroundTruth(
        TipState.GOOD,
        extra={"mask": np.zeros((3, 4), bool), "x": np.float32(1.5), "ids": [np.int64(2)]},
    )
    out = json.loads(json.dumps(truth.to_json()))
    assert out["extra"] == {
        "mask": {"array": {"shape": [3, 4], "dtype": "bool"}},
        "x": 1.5,
        "ids": [2],
    }
