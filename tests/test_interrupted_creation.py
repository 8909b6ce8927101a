"""A store whose writer was killed while creating it (before the root ``format`` attribute):
``run --out`` says so and suggests ``--overwrite``, ``--overwrite`` replaces it, ``--resume``
and readers name what is missing, and nothing else is mistaken for one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zarr
from zarr.storage import LocalStore

from agent.cli import main
from agent.recorder import SessionRecorder, interrupted_creation
from agent.session import Session
from drivers.errors import ConfigError, DataError

RUN = ["run", "--instrument", "sim:stm", "--shape", "16", "--size-nm", "4", "--quiet"]
ROOT = Path(__file__).resolve().parent.parent
CREATION_WRITES = 5  # root group, frames group, records array, events array, root attributes


class KilledError(Exception):
    """Stands for SIGKILL in-process: not an OSError, so the recorder does not clean up."""


def killed_at(path: Path, write: int, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The store ``SessionRecorder(path)`` leaves when killed just before its ``write``-th key."""
    calls = 0
    original = LocalStore.set

    async def counting_set(self: LocalStore, key: str, value: object) -> None:
        nonlocal calls
        if calls >= write:  # a killed process writes nothing more
            raise KilledError(key)
        calls += 1
        await original(self, key, value)  # type: ignore[arg-type]

    with monkeypatch.context() as patch:
        patch.setattr(LocalStore, "set", counting_set)
        with pytest.raises(KilledError):
            SessionRecorder(path, config={"instrument": "sim:stm", "frames": 3})
    # zarr writes some keys concurrently, each in a worker thread through a temporary
    # ``*.partial`` file; one that started before the "kill" may still be running when the
    # error arrives here. Let it land, so the test compares one settled store.
    deadline = time.monotonic() + 10.0
    seen, quiet_since = listing(path), time.monotonic()
    while any(name.endswith(".partial") for name in seen) or time.monotonic() - quiet_since < 0.3:
        assert time.monotonic() < deadline, "a store write never finished"
        time.sleep(0.01)
        now = listing(path)
        if now != seen:
            seen, quiet_since = now, time.monotonic()
    return path


def listing(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*"))


@pytest.mark.parametrize("write", range(1, CREATION_WRITES))
def test_a_store_killed_during_creation_is_refused_clearly_and_overwritable(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    write: int,
) -> None:
    path = killed_at(tmp_path / "s.zarr", write, monkeypatch)
    missing = interrupted_creation(path)
    assert missing is not None and missing[-1].startswith("the 'format' attribute")
    assert len(missing) == CREATION_WRITES - write
    before = listing(path)

    assert main([*RUN, "--frames", "2", "--out", str(path)]) == 2
    err = capsys.readouterr().err
    assert "creation was interrupted" in err and "--overwrite" in err and str(path) in err
    assert main(["run", "--resume", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "creation was interrupted" in err and "'format' attribute" in err
    assert "--overwrite" in err
    with pytest.raises(DataError, match="not a scopepilot session store yet"):
        Session(path)
    assert listing(path) == before  # refusals write nothing

    assert main([*RUN, "--frames", "2", "--out", str(path), "--overwrite"]) == 0
    session = Session(path)
    assert len(session) == 2 and session.ended


def test_a_partial_temporary_file_alone_is_an_interrupted_creation(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    path.mkdir()
    (path / "zarr.0123abcd.partial").write_bytes(b'{"zarr_fo')  # killed mid-write of zarr.json
    assert interrupted_creation(path) is not None
    SessionRecorder(path, overwrite=True).close()
    assert Session(path).ended


def test_a_real_sigkill_before_the_format_attribute(tmp_path: Path) -> None:
    """The child really dies of SIGKILL on its last creation write (the root attributes)."""
    path = tmp_path / "s.zarr"
    child = f"""
import os, signal
from zarr.storage import LocalStore
from agent.recorder import SessionRecorder
calls, original = 0, LocalStore.set
async def dying_set(self, key, value):
    global calls
    if calls == {CREATION_WRITES - 1}:
        os.kill(os.getpid(), signal.SIGKILL)
    calls += 1
    await original(self, key, value)
LocalStore.set = dying_set
SessionRecorder({str(path)!r}, config={{"frames": 3}})
"""
    proc = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert interrupted_creation(path) == ["the 'format' attribute (written last)"]
    with pytest.raises(ConfigError, match="--overwrite"):
        SessionRecorder(path)
    SessionRecorder(path, overwrite=True, config={"frames": 1}).close()
    assert Session(path).config == {"frames": 1}


def test_other_directories_are_not_taken_for_interrupted_stores(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    foreign = tmp_path / "foreign.zarr"
    group = zarr.create_group(LocalStore(foreign), zarr_format=3)
    group.create_array("images", shape=(2, 2), dtype="u1")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "zarr.json").write_text(json.dumps({"node_type": "group", "zarr_format": 3}))
    (notes / "readme.txt").write_text("mine")
    complete = tmp_path / "done.zarr"
    SessionRecorder(complete).close()
    for path in (empty, foreign, notes, complete, tmp_path / "absent"):
        assert interrupted_creation(path) is None, path
    for path in (foreign, notes):
        with pytest.raises(ConfigError, match="not a scopepilot session store"):
            SessionRecorder(path, overwrite=True)
        assert path.exists()
    os.remove(notes / "readme.txt")  # an empty zarr group is what the first creation write
    assert interrupted_creation(notes) is not None  # leaves: it holds nothing to lose
