"""Helpers for the control and console tests: an agent on fakes, held at known points.

``Holder`` blocks the agent's ``on_step`` observer (called by the decision thread after gating
each frame) until the test lets it go on, so that a supervised session has known pending
commands while the test acts on them.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.control import Controller
from agent.gate import Mode
from agent.loop import Agent, AgentConfig, Step
from drivers.commands import TipPulse
from tests.fakes import FakeInstrument, MemoryRecorder, ScriptedAssessor, ScriptedPolicy

HANG_GUARD_S = 20.0  # only guards against a hang; nothing here asserts on timing


class Holder:
    """``on_step`` that stops the session after each step until :meth:`go` is called."""

    def __init__(self) -> None:
        self.steps: queue.Queue[Step] = queue.Queue()
        self._go = threading.Semaphore(0)

    def __call__(self, step: Step) -> None:
        self.steps.put(step)
        if not self._go.acquire(timeout=HANG_GUARD_S):
            raise RuntimeError("test never released the step")

    def next(self) -> Step:
        return self.steps.get(timeout=HANG_GUARD_S)

    def go(self) -> None:
        self._go.release()


def two_pulses(obs: Any) -> tuple[TipPulse, ...]:
    return (TipPulse(2.5, 0.2), TipPulse(3.0, 0.1))


def start(
    *,
    frames: int = 3,
    mode: Mode = Mode.SUPERVISED,
    commands_for: Callable[[Any], tuple[Any, ...]] = two_pulses,
    instrument: FakeInstrument | None = None,
    policy: Any = None,
    hold: bool = True,
) -> tuple[Agent, Controller, FakeInstrument, MemoryRecorder, Holder, threading.Thread]:
    instrument = instrument or FakeInstrument()
    recorder = MemoryRecorder()
    holder = Holder()
    agent = Agent(
        instrument,
        policy or ScriptedPolicy(commands_for=commands_for),
        assessor=ScriptedAssessor(uncertainty=0.07),
        recorder=recorder,
        config=AgentConfig(frames=frames, mode=mode, fault_backoff_s=0.0),
        on_step=holder if hold else None,
        sleep=lambda s: None,
    )
    controller = Controller(agent)
    thread = threading.Thread(target=agent.run, name="test-agent")
    thread.start()
    return agent, controller, instrument, recorder, holder, thread


def finish(holder: Holder, thread: threading.Thread, steps_left: int) -> None:
    for _ in range(steps_left):
        holder.go()
        if _ < steps_left - 1:
            holder.next()
    thread.join(HANG_GUARD_S)
    assert not thread.is_alive()


def operator_events(recorder: MemoryRecorder) -> list[dict[str, Any]]:
    return recorder.kinds("operator")


def refused_events(
    recorder: MemoryRecorder, count: int, timeout_s: float = 5.0
) -> list[dict[str, Any]]:
    """The refused operator events, once ``count`` of them have reached the recorder (events
    travel through the agent's record queue; a running session records them a moment later)."""
    deadline = time.monotonic() + timeout_s
    while True:
        refused = [o for o in operator_events(recorder) if o.get("refused")]
        if len(refused) >= count or time.monotonic() > deadline:
            return refused
        time.sleep(0.01)
