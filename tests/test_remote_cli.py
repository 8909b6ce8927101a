"""End to end: ``scopepilot serve`` / ``serve-nanonis`` as real processes, ``scopepilot run``
against ``pyro:`` and ``nanonis:`` URIs, and the agent riding out a connection dropped mid-frame
with a session record that neither loses nor repeats a frame."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli import main
from agent.gate import Mode
from agent.loop import Agent, AgentConfig, Step
from agent.recorder import SessionRecorder
from agent.session import Session
from drivers.registry import open_instrument
from drivers.remote import InstrumentServer, RemoteInstrument
from drivers.sim import SimulatedSTM
from policies.base import make_policy
from tests.remote_support import CuttingRelay

REPO = Path(__file__).resolve().parents[1]
TOKEN = "cli-test-token-42"


def _start(*args: str) -> tuple[subprocess.Popen[str], str]:
    """Start ``scopepilot ARGS`` and return it with the URI it announces."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"((?:pyro|nanonis):127\.0\.0\.1:\d+)", line)
    if match is None:
        proc.kill()
        raise AssertionError(
            f"no URI announced: {line!r} {proc.stderr.read() if proc.stderr else ''}"
        )
    return proc, match.group(1)


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _err = proc.communicate(timeout=30)
    assert proc.returncode == 0, _err
    return out


@pytest.fixture
def token_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    monkeypatch.delenv("SCOPEPILOT_TOKEN", raising=False)
    monkeypatch.setenv("SCOPEPILOT_TOKEN_FILE", str(path))
    yield path


def _frame_indices(store: Path) -> list[int]:
    return [r["header"]["frame_index"] for r in Session(store).frame_records()]


def test_run_against_scopepilot_serve(tmp_path: Path, token_file: Path) -> None:
    limits = tmp_path / "limits.json"
    limits.write_text('{"pulse_bias_V": [-3.0, 3.0]}')
    proc, uri = _start(
        "serve",
        "--port",
        "0",
        "--token-file",
        str(token_file),
        "--seed",
        "3",
        "--shape",
        "64",
        "--limits",
        str(limits),
    )
    try:
        with open_instrument(uri, role="observe") as watcher:  # type: ignore[attr-defined]
            assert watcher.info().limits.pulse_bias_V == (-3.0, 3.0)  # the operator's narrowing
        out = tmp_path / "remote.zarr"
        code = main(["run", "--instrument", uri, "--frames", "5", "--out", str(out), "--quiet"])
        assert code == 0
        session = Session(out)
        assert len(session) == 5
        assert _frame_indices(out) == [0, 1, 2, 3, 4]
        assert session.frame(0).instrument == "sim:stm"  # frames come from the served instrument
        assert session.config["instrument"] == uri
    finally:
        assert "stopped" in _stop(proc)


def test_run_against_scopepilot_serve_nanonis(tmp_path: Path) -> None:
    proc, uri = _start("serve-nanonis", "--port", "0", "--seed", "2", "--line-ms", "0.2")
    try:
        out = tmp_path / "nanonis.zarr"
        code = main(
            [
                "run",
                "--instrument",
                uri,
                "--frames",
                "3",
                "--shape",
                "64",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        assert code == 0
        assert _frame_indices(out) == [0, 1, 2]
        frame = Session(out).frame(2)
        assert frame.shape == (64, 64) and frame.instrument == uri
    finally:
        assert "stopped" in _stop(proc)


def test_serve_refuses_a_public_address_without_a_token(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SCOPEPILOT_TOKEN", raising=False)
    monkeypatch.delenv("SCOPEPILOT_TOKEN_FILE", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "without a token" in capsys.readouterr().err
    assert main(["serve-nanonis", "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "no authentication" in capsys.readouterr().err


def test_agent_rides_out_a_drop_mid_frame_without_losing_or_repeating_frames(
    tmp_path: Path,
) -> None:
    instrument = SimulatedSTM(seed=9, shape_px=(64, 64), lines_per_chunk=8, dwell_s=1e-4)
    with InstrumentServer(instrument, token=TOKEN) as server:
        relay = CuttingRelay(server.port)
        remote = RemoteInstrument("127.0.0.1", relay.port, token=TOKEN, sleep=lambda s: None)
        out = tmp_path / "fault.zarr"
        recorder = SessionRecorder(out, config={"test": "drop"}, versions={})

        def cut_during_the_next_scan(step: Step) -> None:
            if step.seq == 2:  # the next scan's line chunks are 2 KiB each: cut inside one
                relay.cut_after(5000)

        agent = Agent(
            remote,
            make_policy("none"),
            assessor=None,
            recorder=recorder,
            config=AgentConfig(
                frames=6, mode=Mode.AUTONOMOUS, pause_after_faults=1, fault_backoff_s=0.01
            ),
            on_step=cut_during_the_next_scan,
        )
        try:
            result = agent.run()
        finally:
            recorder.close()
            remote.close()
            relay.close()
    assert relay.cuts == 1 and remote.reconnects == 1
    assert result.frames == 6 and result.faults == 1
    session = Session(out)
    assert _frame_indices(out) == [0, 1, 2, 3, 4, 5]  # nothing lost, nothing twice
    assert all(r["problems"] == [] for r in session.frame_records())
    faults = session.events("fault")
    assert len(faults) == 1 and "CommunicationError" in faults[0]["payload"]["error"]
    assert "stream_next" in faults[0]["payload"]["error"]  # it struck mid-frame
    actions = [(e["payload"]["action"], e["payload"]["origin"]) for e in session.events("operator")]
    assert actions == [("pause", "agent"), ("resume", "agent")]
