"""Early scan abort (issue 8 item 3): a tip change seen while an STM scan streams aborts the scan
through the gate, the record says why and at which line, and the policy reacts to it.

The loop's wiring is tested with an oracle watch (the simulator's own tip state), so the test
fails only when the loop does; the shipped tip network's own detection rate is measured in
bench/perception_tip.py. One test runs the real network end to end (and its replay) when its
weights load.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.gate import Mode
from agent.loop import WATCH_EVERY_LINES, Agent, AgentConfig
from agent.recorder import SessionRecorder
from agent.session import Session
from drivers.errors import ConfigError, ModelError
from drivers.frame import Frame, TipState
from drivers.observation import TipEstimate
from drivers.sim import SimulatedSTM
from policies.base import make_policy
from tests.fakes import MemoryRecorder, ScriptedPolicy

CHANGE_FRAME = 1
CHANGE_LINE = 96


class TipChangeMidScan:
    """``sim:stm`` whose tip turns ``to`` after ``line`` lines of scan number ``frame``."""

    def __init__(self, inner: SimulatedSTM, *, frame: int, line: int, to: str) -> None:
        self.inner, self.frame, self.line, self.to = inner, frame, line, to
        self.scans = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def stream(self) -> Iterator[Frame]:
        for part in self.inner.stream():
            yield part
            if self.scans == self.frame and part.lines_done == self.line:
                self.inner._sim.set_tip(self.to)  # lines from here on see the new tip
        self.scans += 1


class OracleWatch:
    """A tip assessor that knows the simulator's tip state (assess and watch alike)."""

    name = "oracle"
    version = "1"

    def __init__(self, instrument: SimulatedSTM) -> None:
        self.instrument = instrument
        self.watched: list[int] = []

    def _estimate(self) -> TipEstimate:
        state = self.instrument.tip_state
        probs = {s: (0.96 if s is state else 0.01) for s in TipState}
        return TipEstimate(state, probs, 0.04, self.name)

    def assess(self, frame: Frame) -> TipEstimate:
        return self._estimate()

    def watch(self, frame: Frame) -> TipEstimate | None:
        self.watched.append(frame.lines_done)
        return self._estimate()


def run(
    *,
    mode: Mode = Mode.AUTONOMOUS,
    early_abort: bool = True,
    frames: int = 3,
    paused: bool = False,
    lines_per_chunk: int = 16,
    watch_every_lines: int | None = None,
) -> tuple[Agent, MemoryRecorder, OracleWatch]:
    inner = SimulatedSTM(seed=3, lines_per_chunk=lines_per_chunk)
    instrument = TipChangeMidScan(inner, frame=CHANGE_FRAME, line=CHANGE_LINE, to="crashed")
    oracle = OracleWatch(inner)
    if watch_every_lines is not None:  # the assessor states how often it wants to look
        oracle.watch_every_lines = watch_every_lines  # type: ignore[attr-defined]
    recorder = MemoryRecorder()
    agent = Agent(
        instrument,
        make_policy("rule"),
        assessor=oracle,
        early_abort=early_abort,
        recorder=recorder,
        config=AgentConfig(frames=frames, mode=mode),
    )
    if paused:
        agent.pause()
    agent.run()
    return agent, recorder, oracle


def events(recorder: MemoryRecorder, kind: str) -> list[dict[str, Any]]:
    return [e["payload"] for e in recorder.events if e["kind"] == kind]


def test_a_tip_change_mid_scan_aborts_the_scan_and_the_policy_reacts() -> None:
    _agent, recorder, oracle = run()
    seen_at = CHANGE_LINE + WATCH_EVERY_LINES  # the first look that includes the change
    (abort,) = events(recorder, "early_abort")
    assert abort["frame"] == CHANGE_FRAME and abort["fate"] == "executed"
    assert abort["lines_done"] == seen_at and abort["tip"]["state"] == "crashed"
    assert f"lines {CHANGE_LINE}-{seen_at - 1}" in abort["reason"]
    # the AbortScan went through the gate, with the reason, and was executed
    commands = [c for c in events(recorder, "command") if c["command"]["type"] == "AbortScan"]
    fates = [(c["command"]["id"], c["fate"]) for c in commands]
    assert fates == [(abort["command_id"], "executed")]
    assert commands[0]["command"]["source"] == "oracle watch"
    # the frame stopped there; it is recorded whole as far as it went, with the abort
    frame, problems, extra = recorder.frames[CHANGE_FRAME]
    assert frame.lines_done == seen_at < frame.shape[0] and frame.metadata.get("aborted")
    assert problems == [] and extra["early_abort"]["lines_done"] == seen_at
    # the scans before and after ran to the end; the watch looked every 16 lines
    assert [f.lines_done for f, _, _ in recorder.frames] == [256, seen_at, 256]
    assert oracle.watched[:16] == [*range(16, 256, 16), 16]  # a complete frame is judged whole
    # the policy decided on the aborted frame with the crashed estimate, not "incomplete"
    perception = events(recorder, "perception")[CHANGE_FRAME]
    assert perception["tip"]["state"] == "crashed" and perception["early_abort"]["lines_done"]
    decision = events(recorder, "decision")[CHANGE_FRAME]
    assert "crashed" in decision["reason"] and "not acted on" not in decision["reason"]
    later = [c["command"]["type"] for c in events(recorder, "command") if c["frame"] == 2]
    assert "TipDip" in later  # the rule ladder for a crashed tip started on the next frame


def test_the_loop_watches_as_often_as_the_assessor_asks() -> None:
    """An assessor that states ``watch_every_lines`` (the tip network with its change detector:
    4) is looked at that often, so a change is aborted 4 lines after it, not 16."""
    _agent, recorder, oracle = run(frames=2, lines_per_chunk=4, watch_every_lines=4)
    assert oracle.watched[:5] == [4, 8, 12, 16, 20]
    (abort,) = events(recorder, "early_abort")
    assert abort["frame"] == CHANGE_FRAME and abort["lines_done"] == CHANGE_LINE + 4
    assert [f.lines_done for f, _, _ in recorder.frames] == [256, CHANGE_LINE + 4]


def test_without_early_abort_the_scan_runs_to_its_end() -> None:
    _agent, recorder, oracle = run(early_abort=False)
    assert events(recorder, "early_abort") == [] and oracle.watched == []
    assert [f.lines_done for f, _, _ in recorder.frames] == [256, 256, 256]


@pytest.mark.parametrize(
    ("mode", "paused", "fate"),
    [
        (Mode.MANUAL, False, "advised"),
        (Mode.AUTONOMOUS, True, "suppressed"),
        (Mode.SUPERVISED, False, "not sent"),
    ],
)
def test_the_operator_mode_and_pause_hold_for_the_abort_too(
    mode: Mode, paused: bool, fate: str
) -> None:
    _agent, recorder, _oracle = run(mode=mode, paused=paused, frames=2)
    (abort,) = events(recorder, "early_abort")
    assert abort["fate"] == fate
    assert [f.lines_done for f, _, _ in recorder.frames] == [256, 256]  # nothing aborted


def test_early_abort_needs_an_assessor_that_watches() -> None:
    from agent.perception.classical import ClassicalTipAssessor

    with pytest.raises(ConfigError, match="watch"):
        Agent(
            SimulatedSTM(seed=1),
            ScriptedPolicy(),
            assessor=ClassicalTipAssessor(),
            early_abort=True,
        )


@pytest.mark.slow
def test_the_tip_network_aborts_a_scan_and_the_replay_reproduces_it(tmp_path: Path) -> None:
    from agent.pipeline import build_pipeline
    from agent.replay import diff_sessions, replay_session

    config = {"policy": "rule", "assessor": "tipnet", "early_abort": True}
    try:
        pipeline = build_pipeline(config, kind="stm")
    except ModelError as exc:  # weights being retrained beside this code
        pytest.skip(f"the tip network does not load: {exc}")
    inner = SimulatedSTM(seed=3, lines_per_chunk=16)
    instrument = TipChangeMidScan(inner, frame=CHANGE_FRAME, line=CHANGE_LINE, to="crashed")
    store = tmp_path / "run.zarr"
    with SessionRecorder(store, config=config, versions=pipeline.versions()) as recorder:
        pipeline.agent(instrument, recorder=recorder, config=AgentConfig(frames=3)).run()
    session = Session(store)
    aborts = [e["payload"] for e in session.events("early_abort")]
    assert [(a["frame"], a["fate"]) for a in aborts] == [(CHANGE_FRAME, "executed")]
    assert CHANGE_LINE < aborts[0]["lines_done"] <= CHANGE_LINE + 2 * WATCH_EVERY_LINES
    assert session.frame(CHANGE_FRAME).lines_done == aborts[0]["lines_done"]
    replayed = tmp_path / "replay.zarr"
    replay_session(store, replayed)
    diff = diff_sessions(store, replayed)
    assert diff.frames_compared == 3 and diff.same == 3 and not diff.differences


def test_a_replay_with_an_assessor_that_cannot_watch_does_not_act_on_the_aborted_frame(
    tmp_path: Path,
) -> None:
    from agent.replay import replay_session

    inner = SimulatedSTM(seed=3, lines_per_chunk=16)
    instrument = TipChangeMidScan(inner, frame=CHANGE_FRAME, line=CHANGE_LINE, to="crashed")
    store = tmp_path / "run.zarr"
    config = {"policy": "rule", "assessor": "classical", "early_abort": True}
    with SessionRecorder(store, config=config) as recorder:
        Agent(
            instrument,
            make_policy("rule"),
            assessor=OracleWatch(inner),
            early_abort=True,
            recorder=recorder,
            config=AgentConfig(frames=2),
        ).run()
    assert Session(store).frame_records()[CHANGE_FRAME]["extra"]["early_abort"]
    replayed = tmp_path / "replay.zarr"
    replay_session(store, replayed)  # the classical assessor has no watch
    perception = [e["payload"] for e in Session(replayed).events("perception")]
    assert perception[CHANGE_FRAME]["tip"] is None
    (problem,) = perception[CHANGE_FRAME]["problems"]
    assert "aborted early by the recorded run" in problem
    decision = Session(replayed).events("decision")[CHANGE_FRAME]["payload"]
    assert decision["commands"] == [] and "not acted on" in decision["reason"]


def test_run_refuses_early_abort_without_a_watching_assessor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli import main

    out = tmp_path / "s.zarr"
    code = main(["run", "--frames", "1", "--out", str(out), "--early-abort", "--quiet"])
    assert code == 2 and not out.exists()
    assert "early_abort needs a tip assessor that watches partial frames" in capsys.readouterr().err
