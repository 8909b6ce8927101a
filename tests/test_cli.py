"""End-to-end: the scopepilot CLI against sim:stm, its bad-input errors, and a SIGKILL mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from agent.cli import main
from agent.session import Session
from drivers.errors import DataError

SMALL = ["--shape", "64", "--size-nm", "8", "--instrument", "sim:stm"]


def run_cli(*args: str) -> int:
    return main([*args])


def test_run_records_every_frame_and_prints_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "s.zarr"
    png = tmp_path / "s.png"
    code = run_cli(
        "run",
        *SMALL,
        "--frames",
        "12",
        "--seed",
        "2",
        "--out",
        str(out),
        "--quiet",
        "--png",
        str(png),
    )
    assert code == 0
    text = capsys.readouterr().out
    for word in ("frames", "usable frames", "commands executed", "conditioning", "stage latency"):
        assert word in text
    session = Session(out)
    assert len(session) == 12
    assert session.config["seed"] == 2 and session.config["policy"] == "rule"
    kinds = {e["kind"] for e in session.events()}
    assert {"status", "perception", "decision"} <= kinds
    assert png.stat().st_size > 10_000

    assert run_cli("summary", str(out), "--png", str(tmp_path / "again.png")) == 0
    assert "usable frames" in capsys.readouterr().out

    tiff = tmp_path / "s.ome.tif"
    assert run_cli("export", str(out), "--tiff", str(tiff)) == 0
    import tifffile

    with tifffile.TiffFile(tiff) as tif:
        assert tif.series[0].shape[0] == 12


def test_same_seed_same_frames_and_decisions(tmp_path: Path) -> None:
    stores = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.zarr"
        assert (
            run_cli("run", *SMALL, "--frames", "10", "--seed", "4", "--out", str(out), "--quiet")
            == 0
        )
        stores.append(Session(out))
    a, b = stores
    for i in range(10):
        np.testing.assert_array_equal(a.frame(i).data, b.frame(i).data)

    def decisions(s: Session) -> list[tuple[str, tuple[str, ...]]]:
        return [
            (e["payload"]["reason"], tuple(c["type"] for c in e["payload"]["commands"]))
            for e in s.events("decision")
        ]

    assert decisions(a) == decisions(b)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--instrument", "bogus:thing"], "unknown instrument scheme 'bogus'"),
        (["--instrument", "sim:tem"], "unknown simulated instrument 'sim:tem'"),
        (["--frames", "0"], "--frames must be >= 1"),
        (["--dwell-us", "500000"], "dwell_s"),
        (["--sim", "surface=graphite"], "graphite"),
    ],
)
def test_bad_input_gets_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    out = tmp_path / "s.zarr"
    code = run_cli("run", "--shape", "64", "--out", str(out), "--quiet", *args)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_existing_store_is_not_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "s.zarr"
    assert run_cli("run", *SMALL, "--frames", "3", "--out", str(out), "--quiet") == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    capsys.readouterr()
    assert run_cli("run", *SMALL, "--frames", "3", "--out", str(out), "--quiet") == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert len(Session(out)) == 3


def test_unwritable_output_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = run_cli("run", *SMALL, "--frames", "2", "--out", str(blocker / "s.zarr"), "--quiet")
    assert code == 2
    assert str(blocker) in capsys.readouterr().err


@pytest.mark.slow
def test_sigkill_mid_session_keeps_every_completed_frame(tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    cmd = [
        sys.executable,
        "-m",
        "agent.cli",
        "run",
        *SMALL,
        "--frames",
        "100000",
        "--seed",
        "9",
        "--out",
        str(out),
        "--quiet",
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            if len(Session(out)) >= 20:
                break
        except DataError:  # not created yet
            continue
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    session = Session(out)
    n = len(session)
    assert n >= 10
    records = session.frame_records()
    for i in range(n):
        frame = session.frame(i)
        assert frame.complete and np.all(np.isfinite(frame.data))
        assert records[i]["header"]["frame_index"] == i
    assert session.events("status")[0]["payload"]["state"] == "started"
    decided = {e["payload"]["frame"] for e in session.events("decision")}
    assert decided and max(decided) < n + 1


def test_run_policy_options_reach_the_session_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "s.zarr"
    args = ("run", *SMALL, "--frames", "2", "--out", str(out), "--quiet")
    assert run_cli(*args, "--policy-option", "bad_frames_to_act=4") == 0
    assert Session(out).config["policy_options"]["bad_frames_to_act"] == 4
    capsys.readouterr()
    bad = tmp_path / "bad.zarr"
    assert run_cli("run", *SMALL, "--out", str(bad), "--quiet", "--policy-option", "oops") == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert run_cli("run", "--resume", str(out), "--quiet", "--policy-option", "x=1") == 2
    assert "drop --policy-option" in capsys.readouterr().err
