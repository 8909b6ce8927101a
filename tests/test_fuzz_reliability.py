"""Hypothesis fuzzing of what a night-long session reads: commands, settings, session stores.

Each malformed input must end in a clear :class:`~drivers.errors.ScopePilotError` (never a
``TypeError``, ``KeyError`` or a zarr exception), and nothing malformed may reach the instrument
or corrupt a session store. (Command JSON parsing alone and the envelope's arithmetic have their
own property tests in test_commands.py and test_limits_safety.py; here the parsed commands go on
through the gate to an instrument.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.cli import _parse_sim_options
from agent.gate import CommandGate, Fate
from agent.pipeline import build_pipeline
from agent.recorder import SessionRecorder
from agent.replay import replay_config
from agent.resume import plan_resume
from agent.session import Session
from drivers.commands import Capability, Command, command_from_json, command_types
from drivers.errors import ScopePilotError
from drivers.limits import Limits
from drivers.registry import open_instrument
from drivers.safety import SafetyEnvelope
from simulators.stm_config import STMConfig
from tests.fakes import FakeInstrument
from tests.recorder_child import make_event, make_frame

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- commands through the gate ----------------------------------------------------------------

LIMITS = Limits(
    bias_V=(-2.0, 2.0),
    pulse_bias_V=(-5.0, 5.0),
    pulse_duration_s=(0.01, 0.5),
    dip_depth_m=(0.0, 2e-9),
    dip_bias_V=(-0.5, 0.5),
    dwell_s=(1e-5, 1e-2),
    scan_size_m=(2e-9, 5e-7),
    shape_px=(16, 512),
    stage_x_m=(-5e-7, 5e-7),
    stage_y_m=(-5e-7, 5e-7),
)

# (command type, field) -> the Limits range it must lie in: an independent reference
RANGES: dict[tuple[str, str], str] = {
    ("SetDwell", "dwell_s"): "dwell_s",
    ("Scan", "dwell_s"): "dwell_s",
    ("MoveTo", "x_m"): "stage_x_m",
    ("MoveTo", "y_m"): "stage_y_m",
    ("TipPulse", "bias_V"): "pulse_bias_V",
    ("TipPulse", "duration_s"): "pulse_duration_s",
    ("TipDip", "depth_m"): "dip_depth_m",
    ("TipDip", "bias_V"): "dip_bias_V",
    ("SetBias", "bias_V"): "bias_V",
}

numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-10.0, 10.0),
    st.floats(-1e-6, 1e-6),
    st.floats(0.0, 1e-2),
    st.integers(-(2**70), 2**70),
)
junk = st.one_of(st.none(), st.booleans(), st.text(max_size=8), st.lists(st.integers(), max_size=3))
regions = st.fixed_dictionaries(
    {
        "center_x_m": numbers,
        "center_y_m": numbers,
        "width_m": st.one_of(numbers, st.floats(1e-9, 1e-6)),
        "height_m": st.one_of(numbers, st.floats(1e-9, 1e-6)),
    }
)


@st.composite
def command_json(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(sorted(command_types())))
    fields = [
        f for f in dataclasses.fields(command_types()[kind]) if f.name not in ("id", "source")
    ]
    obj: dict[str, Any] = {"type": kind}
    for f in fields:
        if draw(st.integers(0, 9)) == 0:
            continue  # a missing field
        if f.name == "region":
            obj[f.name] = draw(st.one_of(regions, junk))
        elif f.name == "shape_px":
            obj[f.name] = draw(st.one_of(st.lists(st.integers(-4, 4096), max_size=3), junk))
        elif f.name in ("reason", "pattern"):
            obj[f.name] = draw(st.one_of(st.text(max_size=12), junk))
        else:
            obj[f.name] = draw(st.one_of(numbers, numbers, junk))
    if draw(st.booleans()):
        obj[draw(st.text(min_size=1, max_size=6))] = draw(junk)  # an unknown key
    return obj


def out_of_range(command: Command) -> list[str]:
    bad = []
    for name, value in command.params().items():
        limit = RANGES.get((command.kind, name))
        if limit is not None and value is not None:
            low, high = getattr(LIMITS, limit)
            if not low <= value <= high:
                bad.append(f"{name}={value}")
    if command.kind == "Scan":
        params = command.params()
        if params["shape_px"] is not None:
            low, high = LIMITS.shape_px
            bad += [f"shape {n}" for n in params["shape_px"] if not low <= n <= high]
        if params["region"] is not None:
            low, high = LIMITS.scan_size_m
            for key in ("width_m", "height_m"):
                if not low <= params["region"][key] <= high:
                    bad.append(f"region {key}")
    return bad


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=command_json())
def test_fuzzed_command_json_never_reaches_the_instrument_out_of_range(
    obj: dict[str, Any],
) -> None:
    # every capability, and instrument limits that take anything: only the envelope decides
    instrument = FakeInstrument(limits=Limits(), capabilities=frozenset(Capability))
    fates: list[Fate] = []
    gate = CommandGate(instrument, instrument.info(), SafetyEnvelope(LIMITS), on_fate=fates.append)
    for text in (json.dumps(obj), obj):  # the wire form and the parsed form
        try:
            command = command_from_json(text)
        except ScopePilotError as exc:
            assert str(exc), "a parse error must say what is wrong"
            return
    fate = gate.submit_operator(command)
    bad = out_of_range(command)
    if bad:
        assert fate.fate == "rejected", f"{command!r} out of range ({bad}) was {fate.fate}"
        assert command not in instrument.executed
        assert any(word in fate.reason for word in ("outside", "limit", "range")), fate.reason
    if fate.fate == "executed":
        assert instrument.executed[-1] is command and not bad
        for value in command.params().values():
            if isinstance(value, float):
                assert math.isfinite(value)


# -- configuration: the session config and --sim values --------------------------------------

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
)
json_values = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
pipeline_configs = st.dictionaries(
    st.sampled_from(
        ["policy", "policy_options", "assessor", "assessor_options", "quality", "seed", "x"]
    ),
    st.one_of(
        json_values,
        st.sampled_from(["rule", "none", "classical", "snr", ""]),
        st.dictionaries(
            st.sampled_from(["target_snr", "bad_frames_to_act", "max_uncertainty", "ghost_at"]),
            json_leaf,
            max_size=2,
        ),
    ),
    max_size=5,
)


@SETTINGS
@given(config=pipeline_configs, kind=st.sampled_from(["stm", "stem", "sem", "afm", "?"]))
def test_fuzzed_session_config_builds_a_pipeline_or_says_why(
    config: dict[str, Any], kind: str
) -> None:
    try:
        pipeline = build_pipeline(config, kind=kind)
    except ScopePilotError as exc:
        assert str(exc)
        return
    assert pipeline.policy.name in ("rule", "none")
    try:
        replay_config({"policy": "rule", "instrument": "sim:stm"}, config)
    except ScopePilotError as exc:
        assert "replay can change" in str(exc) or "overrides" in str(exc)


STM_OPTIONS = [f.name for f in dataclasses.fields(STMConfig)]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pairs=st.lists(
        st.tuples(
            st.sampled_from([*STM_OPTIONS, "seed", "shape_px", "cube", "nonsense", ""]),
            st.one_of(json_values.map(json.dumps), st.text(max_size=10)),
        ),
        max_size=3,
    ),
    raw=st.lists(st.text(max_size=12), max_size=2),
)
# values a CI run once found to escape as TypeError/KeyError/ValueError/IndexError
@example(pairs=[("cube", "[]")], raw=[])
@example(pairs=[("shape_px", "{}")], raw=[])
@example(pairs=[("shape_px", ":")], raw=[])
@example(pairs=[("shape_px", "0")], raw=[])
@example(pairs=[("shape_px", "")], raw=[])
@example(pairs=[("shape_px", "[1e309, 3]")], raw=[])
def test_fuzzed_sim_options_open_an_instrument_or_say_why(
    pairs: list[tuple[str, str]], raw: list[str]
) -> None:
    try:
        options = _parse_sim_options([f"{k}={v}" for k, v in pairs] + raw)
        instrument = open_instrument("sim:stm", **{"seed": 1, **options})
    except ScopePilotError as exc:
        assert str(exc)
        return
    try:
        assert instrument.info().kind == "stm"
    finally:
        instrument.close()


# -- session stores with missing pieces -------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A killed (unclosed) session store: 9 frames in three shapes, 14 events."""
    path = tmp_path_factory.mktemp("fuzz") / "S.zarr"
    config = {"instrument": "sim:stm", "policy": "none", "frames": 40, "seed": 0}
    rec = SessionRecorder(path, config=config)
    for i in range(9):
        rec.append_frame(make_frame(i))
        kind, payload, t_wall = make_event(i)
        rec.append_event(kind, payload, t_wall=t_wall)
    for j in range(9, 14):
        kind, payload, t_wall = make_event(j)
        rec.append_event(kind, payload, t_wall=t_wall)
    del rec  # never closed: what a kill leaves
    return path


def files_of(path: Path) -> list[str]:
    return sorted(
        str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and "partial" not in p.name
    )


def snapshot(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@st.composite
def damage(draw: st.DrawFn, names: list[str]) -> list[tuple[str, str, Any]]:
    ops = []
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["delete", "truncate", "drop_attribute", "garble_json"]))
        if what == "drop_attribute":
            attr = ["format", "config", "versions", "started", "attributes", "node_type"]
            ops.append((what, "zarr.json", draw(st.sampled_from(attr))))
        elif what == "garble_json":
            jsons = [n for n in names if n.endswith("zarr.json")]
            ops.append((what, draw(st.sampled_from(jsons)), draw(json_values)))
        else:
            ops.append((what, draw(st.sampled_from(names)), draw(st.integers(0, 64))))
    return ops


def apply_damage(path: Path, ops: list[tuple[str, str, Any]]) -> None:
    for what, name, arg in ops:
        target = path / name
        if not target.exists():
            continue
        if what == "delete":
            target.unlink()
        elif what == "truncate":
            data = target.read_bytes()
            target.write_bytes(data[: min(arg, max(len(data) - 1, 0))])
        elif what == "garble_json":
            target.write_text(json.dumps(arg))
        else:
            try:
                meta = json.loads(target.read_text())
            except ValueError:
                continue  # already garbled or truncated by an earlier injury
            if not isinstance(meta, dict):
                continue
            if arg in ("attributes", "node_type"):
                meta.pop(arg, None)
            else:
                meta.get("attributes", {}).pop(arg, None)
            target.write_text(json.dumps(meta))


@pytest.fixture
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


def _read_everything(path: Path) -> Session:
    session = Session(path)
    for i in range(len(session)):
        frame = session.frame(i)
        assert frame.data.shape == make_frame(i).data.shape
        assert np.array_equal(frame.data, make_frame(i).data, equal_nan=True), (
            f"frame {i} read back different pixels instead of an error"
        )
    session.events()
    return session


def test_damage_fuzz(template: Path) -> None:
    names = files_of(template)

    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(ops=damage(names))
    def check(ops: list[tuple[str, str, Any]]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "S.zarr"
            shutil.copytree(template, path)
            apply_damage(path, ops)
            before = snapshot(path)
            try:
                session = _read_everything(path)
            except ScopePilotError as exc:
                assert str(path) in str(exc), f"the error must name the store: {exc}"
                session = None
            assert snapshot(path) == before, "reading changed the store"
            try:
                plan_resume(path)
                recorder = SessionRecorder.reopen(path)
            except ScopePilotError as exc:
                assert str(exc)
                assert snapshot(path) == before, f"a refused resume changed the store: {exc}"
                return
            assert session is not None, "a store that cannot be read was reopened"
            n = len(session)
            recorder.append_frame(make_frame(n))
            recorder.append_event("status", {"state": "after the damage"})
            recorder.close()
            again = _read_everything(path)  # never corrupted: all old frames plus the new one
            assert len(again) == n + 1
            assert again.events()[-1]["payload"] == {"state": "after the damage"}

    check()


def test_a_deleted_pixel_chunk_is_an_error_not_zeros(template: Path, scratch: Path) -> None:
    path = scratch / "S.zarr"
    shutil.copytree(template, path)
    record = Session(path).frame_records()[4]
    chunk = path / "frames" / record["group"] / "data" / "c" / str(record["slot"]) / "0" / "0"
    os.remove(chunk)
    session = Session(path)
    with pytest.raises(ScopePilotError, match="pixels of frame 4"):
        session.frame(4)
    session.frame(3)  # the others still read
