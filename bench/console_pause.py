"""Pause through the control API: 1,000 randomized pauses during a fast simulated session.

    /tmp/venv/bin/python bench/console_pause.py --pauses 1000

A sim:stm session (32x32 frames, free-running, autonomous) whose policy asks for a command on
every frame runs while this thread pauses at random moments through
:meth:`agent.control.Controller.pause`, waits a random while, checks how many commands reached
the instrument since the pause was acknowledged (``pause()`` returned), and resumes. Target: zero
commands after any acknowledgement. The worst-case acknowledgement latency is printed too, and
the whole run is repeated with a slow recorder (every event write sleeps ``--slow-record-ms``,
the recorder queue holds one frame): the gate reports fates under its lock, so if reporting
waited for the recorder, the pause would too. Ratio = worst pause latency with the slow recorder
/ with the normal recorder (in memory), same process.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from tqdm import tqdm

from agent.control import Controller
from agent.gate import Mode
from agent.loop import Agent, AgentConfig
from bench._common import machine
from drivers.commands import Command, SetDwell
from drivers.observation import Decision, Observation
from drivers.protocol import CommandResult
from drivers.registry import open_instrument

OUT = Path(__file__).resolve().parent / "out"


class EveryFramePolicy:
    """Asks for a dwell change on every frame (alternating, so each is a real change)."""

    name = "every-frame"
    version = "1"

    def __init__(self) -> None:
        self.n = 0

    def decide(self, observation: Observation) -> Decision:
        self.n += 1
        dwell_s = 1e-4 if self.n % 2 else 2e-4
        return Decision((SetDwell(dwell_s),), reason="bench", policy=self.name)

    def reset(self) -> None:
        self.n = 0


class CountingInstrument:
    """Forwards to ``inner`` and counts executed commands (under a lock)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.executed = 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def execute(self, command: Command) -> CommandResult:
        result = self.inner.execute(command)
        with self._lock:
            self.executed += 1
        return result


class MemoryRecorder:
    def __init__(self, event_sleep_s: float = 0.0) -> None:
        self.frames = 0
        self.events = 0
        self.sleep_s = event_sleep_s

    def append_frame(self, frame: Any, *, problems: Any = (), extra: Any = None) -> int:
        self.frames += 1
        return self.frames - 1

    def append_event(self, kind: str, payload: Any, **_: Any) -> int:
        if self.sleep_s:
            time.sleep(self.sleep_s)
        self.events += 1
        return self.events - 1


def run(pauses: int, seed: int, event_sleep_s: float, label: str) -> dict[str, Any]:
    rng = random.Random(seed)
    inner = open_instrument("sim:stm", seed=seed, shape_px=(32, 32), dwell_s=1e-4)
    instrument = CountingInstrument(inner)
    agent = Agent(
        instrument,  # type: ignore[arg-type]
        EveryFramePolicy(),
        assessor=None,
        recorder=MemoryRecorder(event_sleep_s),
        config=AgentConfig(
            frames=10**9,
            mode=Mode.AUTONOMOUS,
            lockstep=False,
            record_queue_size=1 if event_sleep_s else 64,
        ),
    )
    controller = Controller(agent)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    while instrument.executed < 5:
        time.sleep(0.001)
    t_start = time.perf_counter()
    frames_start = agent.result.frames
    latencies: list[float] = []
    violations = 0
    issued_between: list[int] = []
    for _ in tqdm(range(pauses), desc=label, unit="pause", leave=False):
        before = instrument.executed
        time.sleep(rng.uniform(0.0, 0.02))
        t0 = time.perf_counter()
        controller.pause(origin="bench:pauser")
        latencies.append(time.perf_counter() - t0)
        at_ack = instrument.executed
        issued_between.append(at_ack - before)
        time.sleep(rng.uniform(0.0, 0.01))
        if instrument.executed != at_ack:
            violations += 1
        controller.resume(origin="bench:pauser")
    elapsed = time.perf_counter() - t_start
    frames = agent.result.frames - frames_start
    controller.abort(origin="bench:pauser", reason="bench done")
    thread.join(30)
    inner.close()
    lat = np.asarray(latencies)
    return {
        "label": label,
        "pauses": pauses,
        "violations": violations,
        "commands_executed": instrument.executed,
        "pauses_with_commands_since_resume": int(sum(1 for n in issued_between if n)),
        "frames_per_s": frames / elapsed,
        "pause_latency_s": {
            "worst": float(lat.max()),
            "p99": float(np.percentile(lat, 99)),
            "median": float(np.median(lat)),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pauses", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--slow-record-ms", type=float, default=5.0)
    args = parser.parse_args()
    normal = run(args.pauses, args.seed, 0.0, "normal recorder")
    slow = run(args.pauses, args.seed + 1, args.slow_record_ms * 1e-3, "slow recorder")
    for r in (normal, slow):
        lat = r["pause_latency_s"]
        print(
            f"{r['label']:>16}: {r['pauses']} pauses, {r['violations']} with a command after the "
            f"acknowledgement; {r['commands_executed']} commands issued in all "
            f"({r['pauses_with_commands_since_resume']} pauses landed after a command); "
            f"{r['frames_per_s']:.0f} frames/s; pause latency worst {lat['worst'] * 1e3:.2f} ms, "
            f"p99 {lat['p99'] * 1e3:.2f} ms, median {lat['median'] * 1e3:.3f} ms"
        )
    ratio = slow["pause_latency_s"]["worst"] / normal["pause_latency_s"]["worst"]
    print(
        f"ratio worst pause latency, slow recorder ({args.slow_record_ms} ms per event) / "
        f"normal: {ratio:.2f}"
    )
    print(f"machine: {machine()}")
    OUT.mkdir(exist_ok=True)
    out = OUT / "console_pause.json"
    out.write_text(
        json.dumps({"normal": normal, "slow": slow, "ratio": ratio, "machine": machine()}, indent=2)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
