"""The operator control API (agent.control.Controller) over an agent running on fakes, held
at known points (see tests/console_support.py)."""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import pytest

from agent.control import Controller, ControlLocked, NoSuchCommand, OperatorError
from agent.gate import Mode
from agent.loop import Agent, AgentConfig
from drivers.commands import MoveTo, TipPulse
from drivers.errors import CommunicationError, ConfigError, DataError
from drivers.limits import Limits
from policies.rule import RulePolicy
from tests.console_support import HANG_GUARD_S, finish, operator_events, start
from tests.fakes import (
    FakeInstrument,
    FlakyInstrument,
    MemoryRecorder,
    ScriptedAssessor,
    ScriptedPolicy,
)


def test_status_shows_mode_frame_pending_decisions_and_latencies() -> None:
    _agent, controller, _inst, _rec, holder, thread = start(frames=2)
    holder.next()
    status = controller.status()
    assert status["mode"] == "supervised" and status["state"] == "running"
    assert status["frame"]["seq"] == 0 and status["frame"]["shape"] == [32, 32]
    assert status["frame"]["tip"]["state"] == "good"
    assert [p["type"] for p in status["pending"]] == ["TipPulse", "TipPulse"]
    assert status["pending"][0]["params"] == {"bias_V": 2.5, "duration_s": 0.2}
    decision = status["decisions"][0]
    assert decision["frame"] == 0 and decision["reason"] == "call 0"
    assert decision["uncertainty"] == pytest.approx(0.07)
    assert [f["fate"] for f in decision["fates"]] == ["pending", "pending"]
    assert {"acquire", "perceive", "decide", "gate"} <= set(status["latencies"])
    assert status["latencies"]["acquire"]["n"] == 1
    assert status["lock"]["holder"] is None
    finish(holder, thread, 2)
    final = controller.status()
    assert final["state"] == "stopped" and final["stop_reason"] == "completed 2 frames"
    assert final["pending"] == []  # left-over pending commands expire when the session ends


def test_approve_one_veto_the_other_and_the_record_says_who_did_what() -> None:
    _agent, controller, inst, rec, holder, thread = start(frames=1)
    holder.next()
    first, second = controller.status()["pending"]
    result = controller.approve(first["id"], origin="console:alice")
    assert result["fate"] == "executed"
    vetoed = controller.veto(second["id"], origin="ctl:bob", reason="not now")
    assert vetoed["fate"] == "vetoed"
    finish(holder, thread, 1)
    assert [c.id for c in inst.executed] == [first["id"]]
    ops = operator_events(rec)
    assert [(o["action"], o["origin"], o["command_id"]) for o in ops] == [
        ("approve", "console:alice", first["id"]),
        ("veto", "ctl:bob", second["id"]),
    ]
    fates = [(c["command"]["id"], c["fate"], c["origin"]) for c in rec.kinds("command")]
    assert (first["id"], "executed", "operator") in fates
    assert (second["id"], "vetoed", "policy") in fates
    assert all(e["t_wall"] is not None for e in rec.events if e["kind"] == "operator")
    decision = controller.status()["decisions"][0]
    assert sorted(f["fate"] for f in decision["fates"]) == ["executed", "vetoed"]


def test_approving_a_command_that_no_longer_exists_is_refused_and_recorded() -> None:
    _agent, controller, inst, rec, holder, thread = start(frames=2)
    holder.next()
    stale = controller.status()["pending"][0]["id"]
    holder.go()
    holder.next()  # the decision on frame 1 superseded the pending commands of frame 0
    with pytest.raises(NoSuchCommand, match=stale):
        controller.approve(stale, origin="console:alice")
    with pytest.raises(NoSuchCommand, match="nope"):
        controller.veto("nope", origin="console:alice")
    finish(holder, thread, 1)
    assert inst.executed == []
    refused = [o for o in operator_events(rec) if o.get("refused")]
    assert [(o["action"], o["command_id"]) for o in refused] == [
        ("approve", stale),
        ("veto", "nope"),
    ]
    assert "no pending command" in refused[0]["effect"]


def test_manual_commands_pass_the_envelope_and_malformed_ones_are_refused() -> None:
    inst = FakeInstrument(limits=Limits(stage_x_m=(-1e-6, 1e-6)))
    _agent, controller, inst, rec, holder, thread = start(
        frames=1, mode=Mode.AUTONOMOUS, commands_for=lambda obs: (), instrument=inst
    )
    holder.next()
    ok = controller.send({"type": "MoveTo", "x_m": 1e-7, "y_m": 0.0}, origin="ctl:alice")
    assert ok["fate"] == "executed"
    far = controller.send(MoveTo(5e-6, 0.0), origin="ctl:alice")
    assert far["fate"] == "rejected" and "outside the stage range" in far["reason"]
    for bad in ('{"type": "Teleport"}', "{not json", {"type": "MoveTo", "x_m": "far"}):
        with pytest.raises(DataError, match="malformed command"):
            controller.send(bad, origin="ctl:alice")  # type: ignore[arg-type]
    finish(holder, thread, 1)
    assert [type(c) for c in inst.executed] == [MoveTo]
    actions = [(o["action"], bool(o.get("refused"))) for o in operator_events(rec)]
    assert actions == [("submit", False), ("submit", False)] + [("submit", True)] * 3
    assert "unknown command type 'Teleport'" in operator_events(rec)[2]["effect"]


def test_two_operators_fighting_for_the_lock_get_clear_errors() -> None:
    _agent, controller, inst, rec, holder, thread = start(frames=1)
    holder.next()
    pending = controller.status()["pending"][0]["id"]
    controller.take_lock(origin="console:alice")
    with pytest.raises(ControlLocked, match="'alice' holds the control lock"):
        controller.take_lock(origin="ctl:bob")
    with pytest.raises(ControlLocked):
        controller.approve(pending, origin="ctl:bob")
    with pytest.raises(ControlLocked):
        controller.set_mode("manual", origin="ctl:bob")
    with pytest.raises(ControlLocked, match="cannot release"):
        controller.release_lock(origin="ctl:bob")
    controller.pause(origin="ctl:bob")  # a safety stop is always accepted
    assert controller.status()["paused"] and controller.status()["lock"]["holder"] == "alice"
    controller.approve(pending, origin="console:alice")  # the holder may act
    controller.release_lock(origin="console:alice")
    controller.take_lock(origin="ctl:bob")
    assert controller.status()["lock"]["holder"] == "bob"
    finish(holder, thread, 1)
    assert [c.id for c in inst.executed] == [pending]
    got = [(o["action"], o["origin"], bool(o.get("refused"))) for o in operator_events(rec)]
    assert got == [
        ("lock", "console:alice", False),
        ("lock", "ctl:bob", True),
        ("approve", "ctl:bob", True),
        ("mode", "ctl:bob", True),
        ("unlock", "ctl:bob", True),
        ("pause", "ctl:bob", False),
        ("approve", "console:alice", False),
        ("unlock", "console:alice", False),
        ("lock", "ctl:bob", False),
    ]


def test_mode_changes_are_recorded_and_an_unknown_mode_is_refused() -> None:
    agent, controller, _inst, rec, holder, thread = start(frames=1)
    holder.next()
    controller.set_mode("manual", origin="console:alice")
    assert agent.gate.mode is Mode.MANUAL and controller.status()["pending"] == []
    with pytest.raises(ConfigError, match="unknown mode 'turbo'"):
        controller.set_mode("turbo", origin="console:alice")
    finish(holder, thread, 1)
    ops = operator_events(rec)
    assert (ops[0]["action"], ops[0]["effect"]) == ("mode", "mode is now manual")
    assert ops[1]["refused"] and "turbo" in ops[1]["effect"]


def test_thresholds_change_live_and_bad_values_change_nothing() -> None:
    policy = RulePolicy()
    agent, controller, _inst, rec, holder, thread = start(
        frames=1, mode=Mode.AUTONOMOUS, policy=policy
    )
    holder.next()
    assert controller.status()["policy"]["thresholds"]["max_uncertainty"] == 0.6
    result = controller.set_thresholds({"max_uncertainty": 0.3}, origin="console:alice")
    assert result["old"] == {"max_uncertainty": 0.6}
    assert policy.config.max_uncertainty == 0.3
    for bad, message in (
        ({"max_uncertainty": 2.0}, "must be in \\[0, 1\\]"),
        ({"bad_frames_to_act": "2"}, "must be a number"),
        ({"warp": 9}, "no threshold 'warp'"),
    ):
        with pytest.raises(ConfigError, match=message):
            controller.set_thresholds(bad, origin="console:alice")
    assert policy.config.max_uncertainty == 0.3 and policy.config.bad_frames_to_act == 2
    finish(holder, thread, 1)
    ops = operator_events(rec)
    assert ops[0]["action"] == "thresholds" and ops[0]["effect"] == "max_uncertainty: 0.6 -> 0.3"
    assert [bool(o.get("refused")) for o in ops] == [False, True, True, True]
    assert agent.policy_thresholds()["max_uncertainty"] == 0.3


def test_pause_acknowledged_means_no_further_command_and_resume_restores() -> None:
    _agent, controller, inst, rec, holder, thread = start(
        frames=3, mode=Mode.AUTONOMOUS, commands_for=lambda obs: (TipPulse(2.5, 0.2),)
    )
    holder.next()
    assert len(inst.executed) == 1
    controller.pause(origin="ctl:alice")
    assert controller.status()["state"] == "paused"
    holder.go()
    holder.next()
    assert len(inst.executed) == 1  # frame 1's pulse was suppressed
    controller.resume(origin="ctl:alice")
    finish(holder, thread, 2)
    assert len(inst.executed) == 2
    fates = [c["fate"] for c in rec.kinds("command")]
    assert fates == ["executed", "suppressed", "executed"]


def test_a_stuck_recorder_cannot_delay_a_pause() -> None:
    """The gate reports fates under its lock; if reporting could block on a full recorder
    queue, pause() (which takes that lock) would wait for the disk. Events never block."""
    release = threading.Event()

    class StuckRecorder(MemoryRecorder):
        def append_event(self, kind: str, payload: Any, **kw: Any) -> int:
            release.wait(HANG_GUARD_S)
            return super().append_event(kind, payload, **kw)

    recorder = StuckRecorder()
    inst = FakeInstrument()
    agent = Agent(
        inst,
        ScriptedPolicy(commands_for=lambda obs: (TipPulse(2.5, 0.2),)),
        assessor=ScriptedAssessor(),
        recorder=recorder,
        config=AgentConfig(frames=30, record_queue_size=1),
    )
    controller = Controller(agent)
    thread = threading.Thread(target=agent.run)
    thread.start()
    while not inst.executed:  # the first command flows although nothing has been recorded
        threading.Event().wait(0.001)
    paused = threading.Thread(target=controller.pause, kwargs={"origin": "ctl:alice"})
    paused.start()
    paused.join(HANG_GUARD_S)
    assert not paused.is_alive(), "pause waited for the stuck recorder"
    assert not release.is_set() and recorder.events == []
    issued = len(inst.executed)
    release.set()
    thread.join(HANG_GUARD_S)
    assert len(inst.executed) == issued and len(recorder.frames) == 30
    assert "suppressed" in [c["fate"] for c in recorder.kinds("command")]


def test_faults_and_stopped_sessions() -> None:
    inst = FlakyInstrument({0}, CommunicationError("link down"))
    _agent, controller, _inst, _rec, _holder, thread = start(
        frames=1, instrument=inst, hold=False, commands_for=lambda obs: ()
    )
    thread.join(HANG_GUARD_S)
    status = controller.status()
    assert status["faults"][0]["stage"] == "acquire"
    assert "link down" in status["faults"][0]["error"]
    with pytest.raises(OperatorError, match="the session has stopped"):
        controller.approve("x", origin="ctl:alice")


def test_status_polling_during_a_fast_supervised_session_never_deadlocks() -> None:
    """The gate reports fates to the controller while holding its lock; status() asks the gate
    for its pending commands. Polled from another thread all session long, neither may wait for
    the other forever (a lock-order deadlock fails this test instead of finishing)."""
    _agent, controller, _inst, _rec, _holder, thread = start(frames=300, hold=False)
    polls: list[int] = []

    def poll() -> None:
        while thread.is_alive():
            status = controller.status()
            polls.append(1)
            for command in status["pending"][:1]:
                # superseded by a newer decision, or the session just ended: both fine here
                with contextlib.suppress(NoSuchCommand, OperatorError):
                    controller.approve(command["id"], origin="ctl:alice")

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    thread.join(HANG_GUARD_S)
    poller.join(HANG_GUARD_S)
    assert not thread.is_alive() and not poller.is_alive(), "agent and controller deadlocked"
    assert len(polls) > 10 and controller.status()["frames"] == 300
