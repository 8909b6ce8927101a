"""kill -9 the recorder at random instants: what it acknowledged must be there, bit for bit."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from agent.session import Session
from tests.recorder_child import make_event, make_frame

ROOT = Path(__file__).resolve().parents[1]
TRIALS = 24
SEED = 20240611


@dataclass
class Trial:
    index: int
    after_frames: int  # kill once the child has acknowledged this many frames (0: at READY)
    delay_s: float  # ... and then this much later
    close_after: int | None


@dataclass
class Outcome:
    trial: Trial
    store: Path
    frames_acked: int
    events_acked: int
    closed: bool


def _trials() -> list[Trial]:
    """Kill points measured in progress, so that slow and fast machines test the same states.

    They range from "right after the store exists" (group creation, first chunks) to well into
    the run (chunk roll-overs, array growth), plus a random sub-append delay so the kill lands
    anywhere inside an append. Every sixth child closes early on its own, so some kills land in
    or after ``close()``.
    """
    rng = random.Random(SEED)
    trials = []
    for k in range(TRIALS):
        close_after = rng.randint(1, 8) if k % 6 == 5 else None
        after = (
            rng.randint(0, close_after) if close_after else rng.choice([0, 1, 2, 3, 5, 8, 20, 40])
        )
        trials.append(Trial(k, after, rng.uniform(0.0, 0.03), close_after))
    return trials


def _run_and_kill(trial: Trial, base: Path) -> Outcome:
    store = base / f"trial{trial.index}.zarr"
    cmd = [sys.executable, "-m", "tests.recorder_child", str(store)]
    if trial.close_after is not None:
        cmd += ["--close-after", str(trial.close_after)]
    lines: list[bytes] = []
    with (
        tempfile.TemporaryFile() as err,
        subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err) as proc,
    ):
        assert proc.stdout is not None
        try:
            first = proc.stdout.readline()
            if first.strip() != b"READY":
                proc.kill()
                proc.wait()
                err.seek(0)
                pytest.fail(f"child did not start: {first!r} {err.read().decode(errors='replace')}")
            target = f"FRAME {trial.after_frames - 1}".encode()
            while trial.after_frames > 0:
                line = proc.stdout.readline()
                lines.append(line)
                if not line or line.strip() in (target, b"CLOSED"):
                    break
            time.sleep(trial.delay_s)
            os.kill(proc.pid, signal.SIGKILL)
            lines.append(proc.stdout.read())  # what the child printed up to the kill
            proc.wait(timeout=30)
            if proc.returncode != -signal.SIGKILL:  # it died on its own: show why
                err.seek(0)
                pytest.fail(f"child exited with {proc.returncode}: {err.read().decode()}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    frames = events = 0
    closed = False
    for text in b"".join(lines).decode().splitlines():
        word, _, number = text.partition(" ")
        if word == "FRAME":
            assert int(number) == frames, "child acknowledged frames out of order"
            frames += 1
        elif word == "EVENT":
            assert int(number) == events, "child acknowledged events out of order"
            events += 1
        elif word == "CLOSED":
            closed = True
    return Outcome(trial, store, frames, events, closed)


def _check(outcome: Outcome) -> None:
    session = Session(outcome.store)  # must open, whatever instant the kill hit
    where = f"trial {outcome.trial}"
    # Everything acknowledged is there; at most the one append in flight is extra.
    assert outcome.frames_acked <= len(session) <= outcome.frames_acked + 1, where
    records = session.frame_records()
    for row in range(len(session)):
        expected = make_frame(row)
        got = session.frame(row)
        assert got.data.dtype == expected.data.dtype, where
        assert got.data.tobytes() == expected.data.tobytes(), f"{where}: frame {row} pixels"
        assert got.header() == expected.header(), f"{where}: frame {row} header"
        assert got.truth is not None and expected.truth is not None
        assert got.truth.to_json() == expected.truth.to_json(), f"{where}: frame {row} truth"
        if expected.truth.clean is None:
            assert got.truth.clean is None, where
        else:
            assert got.truth.clean is not None, where
            assert got.truth.clean.tobytes() == expected.truth.clean.tobytes(), where
        assert records[row]["extra"] == {"latency_s": {"acquire": 0.001 * row}}, where
        assert bool(records[row]["problems"]) == bool(np.isnan(expected.data).any()), where
    events = session.events()
    assert outcome.events_acked <= len(events) <= outcome.events_acked + 1, where
    for j, event in enumerate(events):
        kind, payload, t_wall = make_event(j)
        assert event == {
            "seq": j,
            "kind": kind,
            "t_wall": t_wall,
            "t_instrument": 0.25 * j,
            "payload": payload,
        }, where
    assert session.config == {"child": True}
    if outcome.closed:
        assert session.ended is not None
        assert session.summary == {"frames": len(session), "events": len(events)}


@pytest.mark.slow
def test_kill_9_at_random_instants_loses_nothing_acknowledged(tmp_path: Path) -> None:
    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(lambda t: _run_and_kill(t, tmp_path), _trials()))
    for outcome in outcomes:
        _check(outcome)
    # The kills must have hit writers mid-stream, not only idle or closed ones.
    assert sum(1 for o in outcomes if not o.closed and o.frames_acked >= 20) >= 3
