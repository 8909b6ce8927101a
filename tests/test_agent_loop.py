"""The agent loop against deterministic fakes: modes, gating, bad frames, faults, control."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from agent.gate import Mode
from agent.loop import Agent, AgentConfig, Step
from drivers.commands import AbortScan, MoveTo, Retract, SetDwell, TipDip, TipPulse
from drivers.errors import CommunicationError, ConfigError
from drivers.frame import TipState
from drivers.limits import Limits
from drivers.safety import SafetyEnvelope
from tests.fakes import (
    FakeInstrument,
    FlakyInstrument,
    MemoryRecorder,
    ScriptedAssessor,
    ScriptedPolicy,
)


def pulse_every_frame(obs):
    return (TipPulse(2.5, 0.2),)


def make_agent(instrument=None, policy=None, *, frames=6, recorder=None, **config):
    instrument = instrument or FakeInstrument()
    policy = policy or ScriptedPolicy()
    recorder = recorder if recorder is not None else MemoryRecorder()
    agent = Agent(
        instrument,
        policy,
        assessor=ScriptedAssessor(),
        recorder=recorder,
        config=AgentConfig(frames=frames, fault_backoff_s=0.0, **config),
        sleep=lambda s: None,
    )
    return agent, instrument, policy, recorder


def test_every_frame_is_recorded_and_decided_in_lockstep() -> None:
    agent, _inst, policy, rec = make_agent(frames=8)
    result = agent.run()
    assert result.frames == 8 and len(rec.frames) == 8
    assert [f.frame_index for f, _, _ in rec.frames] == list(range(8))
    assert len(policy.seen) == 8 and result.stale_skipped == 0
    assert [d["frame"] for d in rec.kinds("decision")] == list(range(8))
    assert rec.kinds("status")[-1]["reason"] == "completed 8 frames"
    for stage in ("acquire", "perceive", "decide", "gate", "record"):
        assert result.latencies_s[stage].n == 8


def test_autonomous_commands_are_executed_and_recorded_with_source() -> None:
    policy = ScriptedPolicy(commands_for=pulse_every_frame)
    agent, inst, _, rec = make_agent(policy=policy, frames=3)
    agent.run()
    assert [type(c) for c in inst.executed] == [TipPulse] * 3
    fates = rec.kinds("command")
    assert [f["fate"] for f in fates] == ["executed"] * 3
    assert all(f["command"]["source"] == "scripted" for f in fates)
    assert [f["frame"] for f in fates] == [0, 1, 2]


def test_commands_are_issued_between_frames_in_lockstep() -> None:
    policy = ScriptedPolicy(commands_for=pulse_every_frame)
    agent, inst, _, rec = make_agent(policy=policy, frames=4)
    agent.run()
    frame_times = [f.timestamp_s for f, _, _ in rec.frames]
    for k, t in enumerate(inst.executed_at_time):
        assert frame_times[k] <= t < frame_times[k + 1] if k + 1 < len(frame_times) else True


def test_envelope_rejection_is_recorded_and_nothing_reaches_the_instrument() -> None:
    policy = ScriptedPolicy(commands_for=lambda obs: (TipPulse(9.0, 0.2),))
    envelope = SafetyEnvelope(Limits(), operator_limits=Limits(pulse_bias_V=(-4.0, 4.0)))
    inst = FakeInstrument()
    agent = Agent(
        inst,
        policy,
        assessor=ScriptedAssessor(),
        recorder=(rec := MemoryRecorder()),
        envelope=envelope,
        config=AgentConfig(frames=2),
    )
    agent.run()
    assert inst.executed == []
    rejected = rec.kinds("command")
    assert [r["fate"] for r in rejected] == ["rejected", "rejected"]
    assert "bias_V=9.0" in rejected[0]["reason"] and "(-4.0, 4.0)" in rejected[0]["reason"]


def test_unsupported_command_is_rejected_by_capability() -> None:
    policy = ScriptedPolicy(commands_for=lambda obs: (TipDip(1e-9),))
    inst = FakeInstrument(capabilities=frozenset({"scan"}))  # type: ignore[arg-type]
    agent, _, _, rec = make_agent(inst, policy, frames=1)
    agent.run()
    assert inst.executed == []
    assert rec.kinds("command")[0]["fate"] == "rejected"
    assert "tip_conditioning" in rec.kinds("command")[0]["reason"]


def test_nan_frame_is_recorded_flagged_and_never_acted_on() -> None:
    def corrupt(index: int, data: np.ndarray) -> np.ndarray | None:
        if index == 1:
            data[3, 4] = np.nan
            return data
        return None

    policy = ScriptedPolicy(commands_for=pulse_every_frame)
    agent, inst, _, rec = make_agent(FakeInstrument(corrupt=corrupt), policy, frames=3)
    agent.run()
    assert len(rec.frames) == 3
    frame, problems, _ = rec.frames[1]
    assert np.isnan(frame.data[3, 4]) and "NaN" in problems[0]
    assert len(policy.seen) == 2  # the policy never saw the NaN frame
    assert len(inst.executed) == 2
    perception = rec.kinds("perception")[1]
    assert perception["tip"] is None and perception["problems"]
    assert rec.kinds("decision")[1]["commands"] == []
    assert "not acted on" in rec.kinds("decision")[1]["reason"]


def test_wrong_shape_frame_is_flagged() -> None:
    def corrupt(index: int, data: np.ndarray) -> np.ndarray | None:
        return np.zeros((5, 7), np.float32) if index == 0 else None

    agent, _inst, policy, rec = make_agent(FakeInstrument(corrupt=corrupt), frames=2)
    agent.run()
    assert "shape (5, 7)" in rec.frames[0][1][0]
    assert len(policy.seen) == 1


def test_policy_exception_is_a_recorded_fault_not_a_crash() -> None:
    policy = ScriptedPolicy(commands_for=pulse_every_frame, raise_at={1})
    agent, inst, _, rec = make_agent(policy=policy, frames=3)
    result = agent.run()
    assert result.frames == 3 and result.faults == 1
    assert "policy bug" in rec.kinds("fault")[0]["error"]
    assert len(inst.executed) == 2


def test_acquisition_faults_are_retried_then_stop_the_session() -> None:
    inst = FlakyInstrument({1, 2}, CommunicationError("link down"))
    agent, _, _, rec = make_agent(inst, frames=3, max_consecutive_faults=3)
    result = agent.run()
    assert result.frames == 3 and result.faults == 2
    assert [f["consecutive"] for f in rec.kinds("fault")] == [1, 2]

    inst = FlakyInstrument(set(range(1, 100)), CommunicationError("link down"))
    agent, _, _, rec = make_agent(inst, frames=5, max_consecutive_faults=3)
    result = agent.run()
    assert result.frames == 1
    assert "3 consecutive acquisition faults" in result.stop_reason


def test_policy_stop_ends_the_session() -> None:
    agent, _, _, _rec = make_agent(policy=ScriptedPolicy(stop_at=2), frames=50)
    result = agent.run()
    assert result.frames == 3
    assert "stopped" in result.stop_reason


def test_supervised_mode_waits_for_approval_and_records_veto() -> None:
    calls = {"n": 0}

    def two_commands(obs):
        calls["n"] += 1
        return (SetDwell(2e-3), MoveTo(1e-8, 0.0)) if calls["n"] == 1 else ()

    agent, inst, _policy, rec = make_agent(
        policy=ScriptedPolicy(commands_for=two_commands), frames=3, mode=Mode.SUPERVISED
    )

    def on_step(step: Step) -> None:
        if step.seq == 0:
            pending = agent.gate.pending()
            assert [type(c) for c in pending] == [SetDwell, MoveTo]
            agent.approve(pending[0].id)
            agent.veto(pending[1].id, reason="not there")

    agent._on_step = on_step
    agent.run()
    assert [type(c) for c in inst.executed] == [SetDwell]
    fates = [f["fate"] for f in rec.kinds("command")]
    assert fates == ["pending", "pending", "approved", "executed", "vetoed"]
    assert [o["action"] for o in rec.kinds("operator")] == ["approve", "veto"]


def test_manual_mode_only_advises() -> None:
    agent, inst, policy, rec = make_agent(
        policy=ScriptedPolicy(commands_for=pulse_every_frame), frames=2, mode=Mode.MANUAL
    )
    agent.run()
    assert inst.executed == []
    assert [f["fate"] for f in rec.kinds("command")] == ["advised", "advised"]
    # the policy is told its commands are advice, and the record says so (replay reads it)
    assert [o.advisory for o in policy.seen] == [True, True]
    assert [d["advisory"] for d in rec.kinds("decision")] == [True, True]


def test_operator_commands_pass_the_envelope() -> None:
    agent, inst, _, _rec = make_agent(frames=1)
    assert agent.submit(SetDwell(2e-3)).fate == "executed"
    assert agent.submit(SetDwell(10.0)).fate == "rejected"
    assert [type(c) for c in inst.executed] == [SetDwell]
    assert inst.executed[0].source == "operator"
    with pytest.raises(ConfigError):
        agent.set_mode("turbo")


@pytest.mark.parametrize("lockstep", [True, False])
def test_pause_from_another_thread_stops_commands_before_the_next_one(lockstep: bool) -> None:
    """Pause at random moments; once pause() has returned nothing more reaches the instrument."""
    rng = np.random.default_rng(7)
    for trial in range(8):
        inst = FakeInstrument(shape_px=(16, 16))
        agent, _, _, rec = make_agent(
            inst, ScriptedPolicy(commands_for=pulse_every_frame), frames=400, lockstep=lockstep
        )
        delay_s = float(rng.uniform(0.0, 0.02))
        at_pause: list[int] = []

        def operator(
            agent: Agent = agent,
            inst: FakeInstrument = inst,
            delay_s: float = delay_s,
            at_pause: list[int] = at_pause,
        ) -> None:
            threading.Event().wait(delay_s)
            agent.pause()
            at_pause.append(len(inst.executed))

        worker = threading.Thread(target=operator)
        worker.start()
        agent.run()
        worker.join()
        assert len(inst.executed) == at_pause[0], trial
        fates = [f["fate"] for f in rec.kinds("command")]
        assert "suppressed" in fates, "the pause must land while the session runs"
        assert "executed" not in fates[fates.index("suppressed") :]


def test_resume_lets_commands_flow_again() -> None:
    agent, _inst, _, rec = make_agent(
        policy=ScriptedPolicy(commands_for=pulse_every_frame), frames=4
    )

    def on_step(step: Step) -> None:
        if step.seq == 0:
            agent.pause()
        if step.seq == 1:
            agent.resume()

    agent._on_step = on_step
    agent.run()
    fates = [f["fate"] for f in rec.kinds("command")]
    assert fates == ["executed", "suppressed", "executed", "executed"]


def test_abort_stops_scan_retracts_and_ends_session() -> None:
    box: list[Agent] = []

    def on_line(index: int, row: int) -> None:
        if index == 2 and row == 10:
            threading.Thread(target=lambda: box[0].abort()).start()
            import time

            time.sleep(0.2)

    inst = FakeInstrument(on_line=on_line)
    agent, _, _, rec = make_agent(inst, ScriptedPolicy(commands_for=pulse_every_frame), frames=50)
    box.append(agent)
    result = agent.run()
    assert result.frames <= 3
    kinds = [type(c) for c in inst.executed]
    assert AbortScan in kinds and Retract in kinds
    assert kinds.count(TipPulse) == 2  # nothing from the policy after the abort
    assert result.stop_reason == "operator abort"
    assert rec.kinds("operator")[-1]["action"] == "abort"
    assert not rec.frames[-1][0].complete or len(rec.frames) == 2


def test_free_running_counts_stale_frames() -> None:
    slow = threading.Event()

    def slow_decide(obs):
        slow.wait(0.05)
        return ()

    agent, _, policy, rec = make_agent(
        policy=ScriptedPolicy(commands_for=slow_decide), frames=30, lockstep=False
    )
    result = agent.run()
    assert len(rec.frames) == 30  # the recorder still got every frame
    assert result.stale_skipped > 0
    assert len(policy.seen) + result.stale_skipped == 30


def test_seeded_fake_session_is_deterministic() -> None:
    def run() -> list[tuple[str, ...]]:
        agent, inst, _, rec = make_agent(
            FakeInstrument(seed=3, states=lambda i: TipState.BLUNT if i % 3 else TipState.GOOD),
            ScriptedPolicy(
                commands_for=lambda obs: (TipPulse(2.5),) if obs.tip.state != "good" else ()
            ),
            frames=9,
        )
        agent.run()
        return [(f.frame_index, float(f.data.sum())) for f, _, _ in rec.frames], [
            c.kind for c in inst.executed
        ]

    assert run() == run()


def test_repeated_faults_pause_and_alert_then_recovery_resumes() -> None:
    inst = FlakyInstrument({1, 2, 3, 4}, CommunicationError("link down"))
    agent, _, _, rec = make_agent(
        inst,
        ScriptedPolicy(commands_for=pulse_every_frame),
        frames=3,
        pause_after_faults=2,
        max_consecutive_faults=10,
    )
    result = agent.run()
    assert result.frames == 3 and result.stop_reason == "completed 3 frames"
    faults = rec.kinds("fault")
    assert [f["alert"] for f in faults] == [False, True, False, False]
    assert [(o["action"], o["origin"]) for o in rec.kinds("operator")] == [
        ("pause", "agent"),
        ("resume", "agent"),
    ]
    assert [f["fate"] for f in rec.kinds("command")] == ["executed"] * 3


def test_an_operator_pause_is_not_lifted_by_fault_recovery() -> None:
    """The agent pauses itself after 2 faults; the operator then pauses too (during the backoff
    after fault 3); when the instrument recovers the agent must not resume on its own."""
    inst = FlakyInstrument({1, 2, 3}, CommunicationError("link down"))
    recorder = MemoryRecorder()
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:
            agent.pause()

    agent = Agent(
        inst,
        ScriptedPolicy(commands_for=pulse_every_frame),
        assessor=ScriptedAssessor(),
        recorder=recorder,
        config=AgentConfig(frames=3, fault_backoff_s=0.0, pause_after_faults=2),
        sleep=sleep,
    )
    agent.run()
    assert [f["fate"] for f in recorder.kinds("command")] == [
        "executed",
        "suppressed",
        "suppressed",
    ]
    actions = [(o["action"], o["origin"]) for o in recorder.kinds("operator")]
    assert actions == [("pause", "agent"), ("pause", "operator")]
