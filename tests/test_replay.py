"""scopepilot replay / diff: deterministic re-decision of recorded sessions, and why they differ."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.cli import main
from agent.replay import canonical_decision, diff_sessions, replay_session
from agent.session import Session
from drivers.errors import ConfigError, DataError

SMALL = ["--instrument", "sim:stm", "--shape", "64", "--size-nm", "8", "--quiet"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("replay") / "s.zarr"
    assert main(["run", *SMALL, "--frames", "16", "--seed", "5", "--out", str(out)]) == 0
    return out


def decisions(path: Path) -> dict[int, dict[str, object]]:
    return {
        e["payload"]["frame"]: canonical_decision(e["payload"])
        for e in Session(path).events("decision")
    }


def test_replay_with_the_recorded_config_reproduces_every_decision(
    recorded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    original = decisions(recorded)
    assert any(d["commands"] for d in original.values())  # the session did act
    out = tmp_path / "r.zarr"
    assert main(["replay", str(recorded), "--out", str(out), "--quiet"]) == 0
    assert "replayed 16 frames" in capsys.readouterr().out
    assert decisions(out) == original
    again = replay_session(recorded, tmp_path / "r2.zarr")
    assert decisions(tmp_path / "r2.zarr") == original and again.frames == 16
    replayed = Session(out)
    assert len(replayed) == 16 and replayed.config["replay"]["source"] == str(recorded)
    assert (replayed.frame(7).data == Session(recorded).frame(7).data).all()

    assert main(["diff", str(recorded), str(out)]) == 0
    text = capsys.readouterr().out
    assert "settings: the same" in text and "16 the same, 0 the same action" in text


def test_a_changed_threshold_is_reported_as_the_cause(
    recorded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r.zarr"
    args = ["replay", str(recorded), "--out", str(out), "--quiet"]
    assert main([*args, "--policy-option", "bad_frames_to_act=5"]) == 0
    diff = diff_sessions(recorded, out)
    assert diff.config_changes == ["policy_options.bad_frames_to_act: default -> 5"]
    assert diff.differences, "waiting for 5 bad frames must change some action"
    first = diff.differences[0]
    assert first.a is not None and first.a["commands"] and first.b is not None
    assert any("bad_frames_to_act" in cause for cause in first.causes)
    capsys.readouterr()
    assert main(["diff", str(recorded), str(out), "--json"]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert as_json["differences"][0]["frame"] == first.frame


def test_a_changed_perception_output_is_reported_per_frame(recorded: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.zarr"
    # an impossible lattice threshold: every coherent frame now reads as a blunt tip
    replay_session(recorded, out, overrides={"assessor_options": {"lattice_snr_at": 50.0}})
    diff = diff_sessions(recorded, out)
    causes = [c for d in diff.differences for c in d.causes]
    assert any(c.startswith("tip state: good -> blunt") for c in causes), causes
    assert "assessor_options.lattice_snr_at: default -> 50.0" in diff.config_changes


def test_other_policy_and_bad_requests(recorded: Path, tmp_path: Path) -> None:
    result = replay_session(recorded, tmp_path / "none.zarr", overrides={"policy": "none"})
    assert result.acted == 0 and result.frames == 16
    diff = diff_sessions(recorded, tmp_path / "none.zarr")
    assert any("policy: rule -> none" in c for d in diff.differences for c in d.causes)
    with pytest.raises(ConfigError, match="not \\['seed'\\]"):
        replay_session(recorded, tmp_path / "x.zarr", overrides={"seed": 3})
    with pytest.raises(ConfigError, match="is the source session"):
        replay_session(recorded, recorded)
    with pytest.raises(ConfigError, match="exists"):
        replay_session(recorded, tmp_path / "none.zarr")
    with pytest.raises(ConfigError, match="unknown policy 'magic'"):
        replay_session(recorded, tmp_path / "y.zarr", overrides={"policy": "magic"})
    assert not (tmp_path / "y.zarr").exists()  # a refused replay leaves nothing behind
    with pytest.raises(DataError, match="no session store there"):
        replay_session(tmp_path / "missing.zarr", tmp_path / "z.zarr")


def test_diff_refuses_sessions_over_different_frames(recorded: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.zarr"
    assert main(["run", *SMALL, "--frames", "3", "--seed", "6", "--out", str(other)]) == 0
    with pytest.raises(DataError, match="hold different frames"):
        diff_sessions(recorded, other)


def test_operator_threshold_changes_are_replayed_where_they_happened(tmp_path: Path) -> None:
    from agent.loop import Agent, AgentConfig, Step
    from agent.pipeline import build_pipeline
    from agent.recorder import SessionRecorder
    from drivers.commands import Scan
    from drivers.frame import ScanRegion
    from drivers.registry import open_instrument

    store = tmp_path / "s.zarr"
    config = {"instrument": "sim:stm", "policy": "rule", "policy_options": {}, "frames": 14}
    pipeline = build_pipeline(config, kind="stm")
    instrument = open_instrument("sim:stm", seed=5)
    instrument.execute(Scan(region=ScanRegion(0, 0, 8e-9, 8e-9), shape_px=(64, 64)))
    with SessionRecorder(store, config=config) as recorder:
        agent: Agent

        def on_step(step: Step) -> None:
            if step.seq == 4:  # between two decisions, as from the console
                agent.adjust_policy({"bad_frames_to_act": 4, "max_uncertainty": 0.3})

        agent = pipeline.agent(
            instrument,
            recorder=recorder,
            config=AgentConfig(frames=14),
            on_step=on_step,
        )
        agent.run()
    instrument.close()
    replay_session(store, tmp_path / "r.zarr")
    assert decisions(tmp_path / "r.zarr") == decisions(store)
    replayed = Session(tmp_path / "r.zarr").events("operator")
    assert [e["payload"]["values"]["bad_frames_to_act"] for e in replayed] == [4]
    # the change mattered: pinning those thresholds (an override wins over the operator's
    # change) gives other decisions, and only after frame 4
    pinned = {"policy_options": {"bad_frames_to_act": 2, "max_uncertainty": 0.6}}
    replay_session(store, tmp_path / "u.zarr", overrides=pinned)
    recorded, unadjusted = decisions(store), decisions(tmp_path / "u.zarr")
    changed = [k for k in recorded if recorded[k] != unadjusted[k]]
    assert changed and min(changed) > 4


def test_a_session_with_injected_faults_replays_exactly(tmp_path: Path) -> None:
    from agent.loop import AgentConfig
    from agent.pipeline import build_pipeline
    from agent.recorder import SessionRecorder
    from drivers.commands import Scan
    from drivers.faults import FaultInjector, FaultKind
    from drivers.frame import ScanRegion
    from drivers.registry import open_instrument

    store = tmp_path / "s.zarr"
    config = {"instrument": "sim:stm", "policy": "rule", "policy_options": {}, "frames": 16}
    pipeline = build_pipeline(config, kind="stm")
    inner = open_instrument("sim:stm", seed=8)
    inner.execute(Scan(region=ScanRegion(0, 0, 8e-9, 8e-9), shape_px=(48, 48)))
    kinds = [k for k in FaultKind if k is not FaultKind.DELAY]
    instrument = FaultInjector(inner, seed=2, probabilities={k: 0.5 / len(kinds) for k in kinds})
    with SessionRecorder(store, config=config) as recorder:
        pipeline.agent(
            instrument,
            recorder=recorder,
            config=AgentConfig(frames=16, fault_backoff_s=0.0),
        ).run()
    instrument.close()
    flagged = [r for r in Session(store).frame_records() if r["problems"]]
    assert len(flagged) >= 2, "the fault injector should have corrupted some frames"
    replay_session(store, tmp_path / "r.zarr")
    assert decisions(tmp_path / "r.zarr") == decisions(store)
