"""kill -9 whole ``scopepilot run`` sessions at random instants, check the store, ``--resume``.

Each trial SIGKILLs an agent session (acquisition, decision and recorder threads, store creation
or reopening included) at a random instant, then checks what a user relies on: the store opens;
every committed frame reads back whole, in order, numbered without a gap; every event that
refers to a frame refers to a recorded one; nothing committed before the kill changed; and
``scopepilot run --resume`` continues the same store until the session is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.replay import diff_sessions, format_diff, replay_session
from agent.resume import plan_resume
from agent.session import Session
from drivers.errors import ScopePilotError

ROOT = Path(__file__).resolve().parents[1]
SEED = 7_2026
KILLS_PER_SESSION = 7
SESSIONS = 3  # 21 kill trials
FRAMES = 30
RUN = ["--instrument", "sim:stm", "--shape", "32", "--size-nm", "4", "--quiet"]


class Forker:
    """Talks to ``tests.run_kill_child``: start a session, kill it, collect its exit status."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.run_kill_child"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._line() == "READY"

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def run(
        self,
        argv: list[str],
        kill_after_s: float | None,
        wait_for: Callable[[], bool] = lambda: True,
    ) -> int:
        """Run ``scopepilot argv``; once ``wait_for()`` holds (or after 10 s), wait
        ``kill_after_s`` and SIGKILL it (unless it ended first). ``kill_after_s=None`` lets it
        finish. Returns its exit code, -9 when killed."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(argv) + "\n")
        self.proc.stdin.flush()
        pid = int(self._line().split()[1])
        if kill_after_s is not None:
            deadline = time.monotonic() + 10.0
            while not wait_for() and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(kill_after_s)
            with contextlib.suppress(ProcessLookupError):  # it ended on its own
                os.kill(pid, signal.SIGKILL)
        return int(self._line().split()[1])

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def forker() -> Iterator[Forker]:
    f = Forker()
    yield f
    f.close()


def pixel_chunks(store: Path) -> int:
    """Frames whose pixels are on disk (cheap to poll: one directory listing)."""
    total = 0
    for group in (store / "frames").glob("*x*_*"):
        chunks = group / "data" / "c"
        total += len(os.listdir(chunks)) if chunks.is_dir() else 0
    return total


def frame_hashes(session: Session) -> list[str]:
    return [hashlib.sha1(session.frame(i).data.tobytes()).hexdigest() for i in range(len(session))]


def check_consistent(path: Path, before: list[str], events_before: int) -> tuple[list[str], int]:
    """The store after a kill: readable, gap-free, unchanged before, events point at frames."""
    session = Session(path)
    records = session.frame_records()
    for row, record in enumerate(records):
        assert record["row"] == row
        assert record["extra"]["seq"] == row, "frame numbering must continue across resumes"
        frame = session.frame(row)
        assert frame.data.shape == (32, 32) and np.isfinite(frame.data).all()
    hashes = frame_hashes(session)
    assert hashes[: len(before)] == before, "a committed frame changed after a kill"
    events = session.events()
    assert len(events) >= events_before
    for event in events:
        frame = event["payload"].get("frame")
        if event["kind"] in ("perception", "decision") and frame is not None:
            assert 0 <= frame < len(records), f"event {event['seq']} names unrecorded frame {frame}"
    decided = [e["payload"]["frame"] for e in session.events("decision")]
    assert decided == sorted(set(decided)), "decisions out of order or repeated"
    return hashes, len(events)


@pytest.mark.slow
@pytest.mark.parametrize("session_index", range(SESSIONS))
def test_sigkill_at_random_points_then_resume(
    forker: Forker, tmp_path: Path, session_index: int
) -> None:
    rng = random.Random(SEED + session_index)
    store = tmp_path / "s.zarr"
    seed = str(session_index)
    start = ["run", *RUN, "--frames", str(FRAMES), "--seed", seed, "--out", str(store)]
    hashes: list[str] = []
    events = 0
    kills = resumes = 0
    argv = start
    while kills < KILLS_PER_SESSION:
        # A third of the kills land in the first 60 ms (store creation or reopening, instrument
        # start); the others 1 to 5 frames into the run, anywhere inside a frame's work.
        if rng.random() < 1 / 3:
            code = forker.run(argv, rng.uniform(0.0, 0.06))
        else:
            target = len(hashes) + rng.randint(1, 5)
            code = forker.run(
                argv,
                rng.uniform(0.0, 0.08),
                wait_for=lambda target=target: pixel_chunks(store) >= target,
            )
        if code != -9:
            assert code == 0, f"{argv[:3]} exited with {code}"
            break  # it finished before the kill
        kills += 1
        try:
            plan_resume(store)
        except ScopePilotError as exc:
            # killed before the store was a session (or it holds every frame): a clear error
            assert "session" in str(exc) or "complete" in str(exc) or "no session" in str(exc)
            assert not hashes, "a store that held frames became unreadable"
            shutil.rmtree(store, ignore_errors=True)
            argv = start
            continue
        hashes, events = check_consistent(store, hashes, events)
        argv = ["run", "--resume", str(store)]
        resumes += 1
    while True:  # let it finish
        code = forker.run(argv, None)
        assert code == 0
        session = Session(store)
        if session.ended:
            break
    hashes, events = check_consistent(store, hashes, events)
    assert kills == KILLS_PER_SESSION, "sessions finished before the planned kills"
    session = Session(store)
    stopped = session.events("status")[-1]["payload"]
    assert stopped["state"] == "stopped"
    # complete, or ended by the rule policy (it stops when conditioning keeps failing)
    assert len(session) == FRAMES or stopped["reason"].startswith("policy rule stopped")
    resumed = [e for e in session.events("status") if e["payload"]["state"] == "resumed"]
    assert 1 <= len(resumed) <= resumes + 1
    assert session.config["seed"] == session_index
    assert forker.run(["run", "--resume", str(store)], None) == 2  # complete: refused
    if session_index == 0:
        # Replay re-decides the pieced-together session exactly: each resume seam restarts the
        # policy, as the resumed run did.
        replay_session(store, tmp_path / "r.zarr")
        diff = diff_sessions(store, tmp_path / "r.zarr")
        assert diff.frames_compared >= len(session) - kills
        assert diff.same == diff.frames_compared, format_diff(diff)
