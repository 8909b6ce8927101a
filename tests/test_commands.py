"""Commands: JSON round trips, strict parsing of bad input, repr, immutability, capabilities."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.commands import (
    AbortScan,
    Approach,
    Capability,
    Command,
    MoveTo,
    Retract,
    Scan,
    SetBias,
    SetDwell,
    SetScanPattern,
    TipDip,
    TipPulse,
    command_from_json,
    command_types,
)
from drivers.errors import DataError
from drivers.frame import ScanRegion
from drivers.observation import Decision

META = {"id": "c0ffee000001", "source": "rule-policy", "reason": "3 bad frames in a row"}

# One example of every command type, with non-default values and metadata.
EXAMPLES: dict[str, Command] = {
    "Scan": Scan(ScanRegion(1e-8, -2e-8, 3e-8, 4e-8, 15.0), (128, 256), 2e-4, **META),
    "SetDwell": SetDwell(5e-4, **META),
    "MoveTo": MoveTo(-1.5e-7, 2.5e-7, **META),
    "TipPulse": TipPulse(-3.5, 0.05, **META),
    "TipDip": TipDip(1.2e-9, 0.1, **META),
    "SetBias": SetBias(0.75, **META),
    "AbortScan": AbortScan(**META),
    "Retract": Retract(**META),
    "Approach": Approach(**META),
    "SetScanPattern": SetScanPattern("spiral", 0.05, **META),
}

REQUIRES = {
    "Scan": Capability.SCAN,
    "SetDwell": Capability.SCAN,
    "AbortScan": Capability.SCAN,
    "MoveTo": Capability.STAGE,
    "TipPulse": Capability.TIP_CONDITIONING,
    "TipDip": Capability.TIP_CONDITIONING,
    "Approach": Capability.Z_CONTROL,
    "Retract": Capability.Z_CONTROL,
    "SetBias": Capability.BIAS,
    "SetScanPattern": Capability.PARTIAL_SCAN,
}


def test_examples_cover_every_command_type() -> None:
    # A new command type must be added to the round-trip and capability tables below.
    assert set(EXAMPLES) == set(command_types())
    assert set(REQUIRES) == set(command_types())


def _assert_same_command(back: Command, cmd: Command) -> None:
    assert type(back) is type(cmd)
    assert back == cmd
    assert back.params() == cmd.params()
    assert (back.id, back.source, back.reason) == (cmd.id, cmd.source, cmd.reason)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_round_trip_through_dict(name: str) -> None:
    cmd = EXAMPLES[name]
    obj = cmd.to_json()
    assert obj["type"] == name
    _assert_same_command(command_from_json(obj), cmd)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_round_trip_through_string(name: str) -> None:
    cmd = EXAMPLES[name]
    text = cmd.dumps()
    # Strict JSON: no NaN/Infinity tokens, so any JSON reader on the wire can parse it.
    assert json.loads(text) == json.loads(json.dumps(cmd.to_json(), allow_nan=False))
    _assert_same_command(command_from_json(text), cmd)
    _assert_same_command(command_from_json(text.encode()), cmd)
    assert command_from_json(text).dumps() == text


def test_json_form_holds_values_with_units_in_names() -> None:
    obj = EXAMPLES["Scan"].to_json()
    assert obj == {
        "type": "Scan",
        **META,
        "region": {
            "center_x_m": 1e-8,
            "center_y_m": -2e-8,
            "width_m": 3e-8,
            "height_m": 4e-8,
            "rotation_deg": 15.0,
        },
        "shape_px": [128, 256],
        "dwell_s": 2e-4,
    }
    assert TipPulse(4, 1).to_json()["bias_V"] == 4.0
    assert isinstance(TipPulse(4, 1).bias_V, float)


def test_scan_fields_left_out_keep_current_values() -> None:
    back = command_from_json({"type": "Scan"})
    assert isinstance(back, Scan)
    assert (back.region, back.shape_px, back.dwell_s) == (None, None, None)
    assert command_from_json(Scan().dumps()) == Scan()


def test_missing_id_gets_a_fresh_one_and_ids_are_unique() -> None:
    a = command_from_json({"type": "Retract"})
    b = command_from_json({"type": "Retract"})
    assert a.id and b.id and a.id != b.id
    assert TipPulse(1.0).id != TipPulse(1.0).id


def test_decision_json_holds_parseable_commands() -> None:
    decision = Decision(commands=(EXAMPLES["TipPulse"], EXAMPLES["MoveTo"]), reason="r")
    obj = json.loads(json.dumps(decision.to_json(), allow_nan=False))
    back = [command_from_json(c) for c in obj["commands"]]
    assert back == [EXAMPLES["TipPulse"], EXAMPLES["MoveTo"]]
    assert [c.id for c in back] == [META["id"], META["id"]]


# --- property: every valid command round-trips -------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(10**6), 10**6)
positive = st.floats(min_value=0.0, exclude_min=True, allow_infinity=False, allow_nan=False)
size_m = st.floats(min_value=1e-12, max_value=1e-3)
regions = st.builds(
    ScanRegion,
    center_x_m=st.floats(-1e-3, 1e-3),
    center_y_m=st.floats(-1e-3, 1e-3),
    width_m=size_m,
    height_m=size_m,
    rotation_deg=st.floats(-360, 360),
)
meta = {"id": st.text(min_size=1), "source": st.text(), "reason": st.text()}

commands = st.one_of(
    st.builds(
        Scan,
        region=st.none() | regions,
        shape_px=st.none() | st.tuples(st.integers(1, 10_000), st.integers(1, 10_000)),
        dwell_s=st.none() | positive,
        **meta,
    ),
    st.builds(SetDwell, finite, **meta),
    st.builds(MoveTo, finite, finite, **meta),
    st.builds(TipPulse, finite, finite, **meta),
    st.builds(TipDip, finite, finite, **meta),
    st.builds(SetBias, finite, **meta),
    st.builds(AbortScan, **meta),
    st.builds(Retract, **meta),
    st.builds(Approach, **meta),
)


@given(commands)
def test_any_valid_command_round_trips(cmd: Command) -> None:
    _assert_same_command(command_from_json(cmd.to_json()), cmd)
    _assert_same_command(command_from_json(cmd.dumps()), cmd)
    json.dumps(cmd.to_json(), allow_nan=False)  # strict JSON, no NaN/Infinity


# --- malformed input -----------------------------------------------------------------------------

MALFORMED: list[tuple[Any, list[str]]] = [
    # (input, substrings the DataError message must contain)
    ("{not json", ["not valid JSON"]),
    (b"\xff\xfe", ["not valid JSON"]),
    ("", ["not valid JSON"]),
    ("[" * 100_000, ["not valid JSON"]),  # deep nesting must not blow the stack
    ('{"type": "TipPulse", "bias_V": ' + "1" * 5000 + "}", ["not valid JSON"]),
    ("[1, 2]", ["object", "list"]),
    ('"TipPulse"', ["object", "str"]),
    (42, ["object", "int"]),
    (None, ["object", "NoneType"]),
    ({"type": "Teleport"}, ["'Teleport'", *sorted(EXAMPLES)]),
    ({"bias_V": 1.0}, ["unknown command type None", "TipPulse"]),
    ({"type": ["TipPulse"]}, ["['TipPulse']", "TipPulse"]),
    ({"type": "Command"}, ["'Command'"]),  # the abstract base is not a command
    ({"type": "TipPulse", "bias_V": 1.0, "voltage": 3.0}, ["voltage", "bias_V"]),
    ({"type": "Retract", 7: "x"}, ["7"]),
    ({"type": "TipPulse"}, ["bias_V"]),
    ({"type": "MoveTo", "x_m": 0.0}, ["y_m"]),
    ({"type": "TipPulse", "bias_V": "4"}, ["bias_V", "'4'"]),
    ({"type": "TipPulse", "bias_V": [4.0]}, ["bias_V", "[4.0]"]),
    ({"type": "TipPulse", "bias_V": None}, ["bias_V", "None"]),
    ({"type": "TipPulse", "bias_V": True}, ["bias_V", "True"]),
    ({"type": "MoveTo", "x_m": 0.0, "y_m": False}, ["y_m", "False"]),
    ('{"type": "TipPulse", "bias_V": NaN}', ["bias_V", "nan"]),
    ('{"type": "TipPulse", "bias_V": 1.0, "duration_s": Infinity}', ["duration_s", "inf"]),
    ('{"type": "MoveTo", "x_m": -Infinity, "y_m": 0}', ["x_m", "-inf"]),
    ({"type": "SetBias", "bias_V": float("nan")}, ["bias_V", "nan"]),
    ('{"type": "TipPulse", "bias_V": ' + "1" * 400 + "}", ["bias_V", "finite"]),
    ({"type": "Scan", "shape_px": [-16, 16]}, ["shape_px", "-16"]),
    ({"type": "Scan", "shape_px": [0, 16]}, ["shape_px", "0, 16"]),
    ({"type": "Scan", "shape_px": [16]}, ["shape_px", "16"]),
    ({"type": "Scan", "shape_px": [16, 16, 16]}, ["shape_px", "16, 16, 16"]),
    ({"type": "Scan", "shape_px": 16}, ["shape_px", "16"]),
    ({"type": "Scan", "shape_px": "ab"}, ["shape_px", "'ab'"]),
    ({"type": "Scan", "shape_px": [16.0, 16]}, ["shape_px", "16.0"]),
    ({"type": "Scan", "shape_px": [True, 16]}, ["shape_px", "True"]),
    ({"type": "Scan", "dwell_s": -1e-3}, ["dwell_s", "-0.001"]),
    ({"type": "Scan", "dwell_s": 0}, ["dwell_s", "0"]),
    ({"type": "Scan", "dwell_s": "fast"}, ["dwell_s", "'fast'"]),
    ({"type": "Scan", "region": "here"}, ["ScanRegion", "'here'"]),
    ({"type": "Scan", "region": {"width_m": -1e-9}}, ["width_m", "-1e-09"]),
    ({"type": "Scan", "region": {"depth_m": 1.0}}, ["depth_m"]),
    ({"type": "Scan", "region": {"center_x_m": "0"}}, ["center_x_m", "'0'"]),
    ({"type": "Retract", "id": 7}, ["id", "7"]),
    ({"type": "Retract", "source": None}, ["source", "None"]),
    ({"type": "Retract", "reason": ["why"]}, ["reason", "['why']"]),
]


@pytest.mark.parametrize(("bad", "expected"), MALFORMED, ids=[repr(b)[:50] for b, _ in MALFORMED])
def test_malformed_input_raises_data_error_naming_it(bad: Any, expected: list[str]) -> None:
    with pytest.raises(DataError) as info:
        command_from_json(bad)
    message = str(info.value)
    for text in expected:
        assert text in message, f"{text!r} not in {message!r}"


@pytest.mark.parametrize(
    "make",
    [
        lambda: TipPulse("4"),  # type: ignore[arg-type]
        lambda: TipPulse(math.inf),
        lambda: TipDip(True),
        lambda: MoveTo(0.0, math.nan),
        lambda: SetDwell(None),  # type: ignore[arg-type]
        lambda: Scan(shape_px=(0, 4)),
        lambda: Scan(shape_px=4),  # type: ignore[arg-type]
        lambda: Scan(dwell_s=-1.0),
        lambda: Scan(region={"width_m": 1e-9}),  # type: ignore[arg-type]
        lambda: Retract(id=None),  # type: ignore[arg-type]
    ],
)
def test_constructors_validate_like_the_parser(make: Any) -> None:
    with pytest.raises(DataError):
        make()


# --- fuzzing: only DataError ever escapes ---------------------------------------------------------

# Numbers at the edges of what a float holds, which hypothesis rarely draws by itself.
edge_numbers = st.sampled_from([10**400, -(10**400), 2**1024, 2**64, 1e308, -0.0, 5e-324])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | edge_numbers | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
FIELD_NAMES = sorted(
    {f.name for cls in command_types().values() for f in dataclasses.fields(cls)} | {"type"}
)
numbers = edge_numbers | st.integers() | st.floats() | st.booleans()
REGION_KEYS = list(ScanRegion().to_json())


def _values_for(field: str) -> st.SearchStrategy[Any]:
    """Values that are often nearly right for ``field``, so parsing gets past the first check."""
    if field in ("id", "source", "reason"):
        return st.text(max_size=12) | json_values
    if field == "region":
        region = st.fixed_dictionaries({}, optional=dict.fromkeys(REGION_KEYS, numbers))
        return region | json_values
    if field == "shape_px":
        return st.lists(numbers, max_size=3) | json_values
    return numbers | json_values


def _fields_of(name: str) -> st.SearchStrategy[dict[str, Any]]:
    own = [f.name for f in dataclasses.fields(command_types()[name])]
    return st.fixed_dictionaries({"type": st.just(name)}, optional={f: _values_for(f) for f in own})


# Objects that look like commands: a known type with random values for its own fields, or with
# a random selection of any command's field names.
command_like = st.sampled_from(sorted(command_types())).flatmap(_fields_of) | st.fixed_dictionaries(
    {"type": st.sampled_from(sorted(command_types()))},
    optional={name: _values_for(name) for name in FIELD_NAMES if name != "type"},
)


def _parse_or_data_error(obj: Any) -> None:
    try:
        result = command_from_json(obj)
    except DataError:
        return
    assert isinstance(result, Command)
    # Whatever parses is a valid command whose JSON form parses back to the same command.
    _assert_same_command(command_from_json(result.dumps()), result)


@settings(max_examples=300)
@given(json_values)
def test_fuzz_arbitrary_json_values(obj: Any) -> None:
    _parse_or_data_error(obj)


@settings(max_examples=300)
@given(command_like)
def test_fuzz_command_like_objects(obj: dict[str, Any]) -> None:
    _parse_or_data_error(obj)
    _parse_or_data_error(json.dumps(obj))


@settings(max_examples=300)
@given(st.text() | st.binary() | json_values.map(json.dumps))
def test_fuzz_arbitrary_text(text: str | bytes) -> None:
    _parse_or_data_error(text)


# --- repr, immutability, capabilities ------------------------------------------------------------


def test_repr_is_readable() -> None:
    text = repr(EXAMPLES["TipPulse"])
    for part in ("TipPulse", "bias_V=-3.5", "duration_s=0.05", META["id"], "rule-policy"):
        assert part in text
    assert "3 bad frames in a row" in text
    scan = repr(EXAMPLES["Scan"])
    for part in ("Scan", "shape_px=[128, 256]", "dwell_s=0.0002", "width_m", META["id"]):
        assert part in scan
    assert repr(Retract(id="r1", source="operator")).startswith("Retract() #r1 from operator")


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_commands_are_immutable(name: str) -> None:
    cmd = EXAMPLES[name]
    before = cmd.dumps()
    for field in dataclasses.fields(cmd):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cmd, field.name, getattr(cmd, field.name))
    assert cmd.dumps() == before
    assert hash(cmd) == hash(command_from_json(before))


def test_with_meta_copies_and_keeps_the_id() -> None:
    cmd = EXAMPLES["TipDip"]
    other = cmd.with_meta(source="operator", reason="manual")
    assert (other.id, other.source, other.reason) == (cmd.id, "operator", "manual")
    assert other == cmd and other is not cmd
    assert (cmd.source, cmd.reason) == (META["source"], META["reason"])
    assert cmd.with_meta(reason="x").source == META["source"]


def test_equality_compares_values_not_metadata() -> None:
    assert TipPulse(1.0, id="a", source="x") == TipPulse(1.0, id="b", source="y")
    assert TipPulse(1.0) != TipPulse(1.5)
    assert TipPulse(1.0, 0.1) != TipDip(1.0, 0.1)


@pytest.mark.parametrize("name", sorted(REQUIRES))
def test_each_command_requires_its_capability(name: str) -> None:
    assert command_types()[name].requires is REQUIRES[name]
    assert EXAMPLES[name].requires is REQUIRES[name]
    assert EXAMPLES[name].kind == name
