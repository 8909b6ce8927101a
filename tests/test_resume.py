"""scopepilot run --resume: continuing an interrupted store, and the clear refusals."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.resume import RESUME_SEED_STRIDE
from agent.session import Session

RUN = ["run", "--instrument", "sim:stm", "--shape", "32", "--size-nm", "4", "--quiet"]


@pytest.fixture(scope="module")
def complete(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "done.zarr"
    assert main([*RUN, "--policy", "none", "--frames", "5", "--seed", "4", "--out", str(out)]) == 0
    return out


def interrupted(complete: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of the complete store that looks killed (no end stamp), edited by ``edit``."""
    path = tmp_path / "s.zarr"
    shutil.copytree(complete, path)
    meta = json.loads((path / "zarr.json").read_text())
    for key in ("ended", "ended_unix", "frames_written", "events_written"):
        meta["attributes"].pop(key, None)
    edit(meta["attributes"])
    (path / "zarr.json").write_text(json.dumps(meta))
    return path


def test_resume_continues_numbering_into_the_same_store(complete: Path, tmp_path: Path) -> None:
    path = interrupted(complete, tmp_path, lambda a: a["config"].update(frames=9))
    before = Session(path)
    first = [before.frame(i).data.copy() for i in range(5)]
    assert main(["run", "--resume", str(path), "--quiet"]) == 0
    after = Session(path)
    assert len(after) == 9 and after.ended
    assert [r["extra"]["seq"] for r in after.frame_records()] == list(range(9))
    assert all((after.frame(i).data == first[i]).all() for i in range(5))
    decided = [e["payload"]["frame"] for e in after.events("decision")]
    assert decided == list(range(9))
    resumed = [e["payload"] for e in after.events("status") if e["payload"]["state"] == "resumed"]
    assert resumed[0]["frames_before"] == 5 and resumed[0]["frames_left"] == 4
    assert resumed[0]["seed"] == 4 + RESUME_SEED_STRIDE
    assert [e["seq"] for e in after.events()] == list(range(len(after.events())))


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda a: None, "already holds 5 of 5 frames"),
        (
            lambda a: (a["config"].update(frames=8), a["versions"].update(policy="none 0.1")),
            "versions changed",
        ),
        (lambda a: a["config"].pop("instrument"), "lacks ['instrument']"),
        (lambda a: a["config"].update(frames=0), "frames=0"),
    ],
)
def test_resume_refuses_with_a_clear_error(
    complete: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    edit: Callable[[dict[str, Any]], None],
    words: str,
) -> None:
    path = interrupted(complete, tmp_path, edit)
    before = sorted(p.name for p in path.rglob("*"))
    assert main(["run", "--resume", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert words in err and str(path) in err
    assert sorted(p.name for p in path.rglob("*")) == before  # nothing written


def test_resume_refuses_complete_and_foreign_stores(
    complete: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--resume", str(complete)]) == 2
    assert "closed" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    assert main(["run", "--resume", str(tmp_path / "plain")]) == 2
    assert "not a session store" in capsys.readouterr().err
    path = interrupted(complete, tmp_path, lambda a: a["config"].update(frames=9))
    assert main(["run", "--resume", str(path), "--out", str(tmp_path / "x.zarr")]) == 2
    assert "drop --out" in capsys.readouterr().err
    assert main(["run", "--frames", "2"]) == 2
    assert "--out S.zarr" in capsys.readouterr().err


def test_another_instrument_kind_is_refused(complete: Path, tmp_path: Path) -> None:
    from agent.resume import plan_resume
    from drivers.errors import ConfigError

    path = interrupted(complete, tmp_path, lambda a: a["config"].update(frames=8))
    plan = plan_resume(path)
    assert plan.instrument_kind == "stm" and plan.frames_left == 3
    with pytest.raises(ConfigError, match="recorded on a 'stm' instrument"):
        plan.check_compatible("sem", {})
    plan.check_compatible("stm", {"scopepilot": "other", "policy": "none 1"})
