"""The console's HTTP/websocket API and the `scopepilot ctl` client, against a real uvicorn
server on a free loopback port (no network beyond loopback)."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.sync.client import connect

from agent.cli import main
from agent.console.app import decode_frame, encode_frame
from agent.console.server import ConsoleServer, is_loopback, read_or_create_token
from drivers.errors import ConfigError
from drivers.frame import Frame, ScanRegion
from tests.console_support import finish, operator_events, refused_events, start

TOKEN = "t0ken-for-tests"


@pytest.fixture
def held(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A supervised session held after its first frame, with a console (token) in front."""
    agent, controller, inst, rec, holder, thread = start(frames=2)
    holder.next()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with (
        ConsoleServer(controller, host="127.0.0.1", port=0, token=TOKEN) as server,
        httpx.Client(base_url=server.base_url, timeout=10.0) as http,
    ):
        yield {
            "agent": agent,
            "controller": controller,
            "inst": inst,
            "rec": rec,
            "holder": holder,
            "server": server,
            "http": http,
            "token_file": str(token_file),
        }
    if thread.is_alive():
        finish(holder, thread, 2)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def ctl(args: list[str], held: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> Any:
    code = main(
        ["ctl", *args, "--connect", held["server"].base_url, "--token-file", held["token_file"]]
    )
    out, err = capsys.readouterr()
    return code, out, err


def test_wrong_or_missing_token_is_refused_recorded_and_changes_nothing(
    held: dict[str, Any],
) -> None:
    http = held["http"]
    missing = http.post("/api/pause", json={"operator": "mallory"})
    wrong = http.post("/api/pause", json={}, headers={"Authorization": "Bearer nope"})
    status = http.get("/api/status?token=nope")
    for reply in (missing, wrong, status):
        assert reply.status_code == 401 and reply.json()["kind"] == "AuthError"
    assert "no access token" in missing.json()["error"]
    assert "wrong access token" in wrong.json()["error"]
    assert not held["agent"].gate.paused
    refused = refused_events(held["rec"], 3)
    assert [(o["action"], o["origin"]) for o in refused] == [
        ("pause", "http:127.0.0.1"),
        ("pause", "http:127.0.0.1"),
        ("status", "http:127.0.0.1"),
    ]


def test_approve_over_http_veto_and_pause_with_ctl(
    held: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    http = held["http"]
    first, second = http.get("/api/status", headers=auth()).json()["pending"]
    reply = http.post(
        "/api/approve",
        json={"operator": "alice", "via": "console", "id": first["id"]},
        headers=auth(),
    )
    assert reply.status_code == 200 and reply.json()["fate"] == "executed"
    code, out, _ = ctl(["status"], held, capsys)
    assert code == 0 and "mode supervised" in out and second["id"] in out and first["id"] not in out
    code, out, _ = ctl(
        ["veto", second["id"], "--operator", "bob", "--reason", "wrong spot"], held, capsys
    )
    assert code == 0 and out.startswith("veto: vetoed")
    code, out, _ = ctl(["pause", "--operator", "bob"], held, capsys)
    assert code == 0 and held["agent"].gate.paused
    assert [c.id for c in held["inst"].executed] == [first["id"]]
    got = [(o["action"], o["origin"]) for o in operator_events(held["rec"])]
    assert got == [("approve", "console:alice"), ("veto", "ctl:bob"), ("pause", "ctl:bob")]


def test_ctl_reports_bad_requests_clearly_and_they_are_recorded(
    held: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = ctl(["approve", "gone123"], held, capsys)
    assert code == 2 and "no pending command with id 'gone123'" in err
    code, _, err = ctl(["send", '{"type": "Teleport", "x_m": 1}'], held, capsys)
    assert code == 2 and "malformed command" in err and "Teleport" in err
    code, _, err = ctl(["send", "{not json"], held, capsys)
    assert code == 2 and "not valid JSON" in err
    code, out, _ = ctl(["send", '{"type": "MoveTo", "x_m": 5e-6, "y_m": 0}'], held, capsys)
    assert code == 1 and out.startswith("send: rejected") and "outside the stage range" in out
    code, _, err = ctl(["mode", "turbo"], held, capsys)
    assert code == 2 and "unknown mode 'turbo'" in err
    code, _, err = ctl(["lock", "--operator", "alice"], held, capsys)
    assert code == 0
    code, _, err = ctl(["resume", "--operator", "bob"], held, capsys)
    assert code == 2 and "'alice' holds the control lock" in err
    code = main(["ctl", "pause", "--connect", held["server"].base_url])
    assert code == 2 and "no access token" in capsys.readouterr().err
    assert held["inst"].executed == []
    refused = [(o["action"], o["origin"]) for o in refused_events(held["rec"], 6)]
    user = [r for r in refused if r[1].startswith("ctl:")]
    assert [a for a, _ in user] == ["approve", "submit", "submit", "mode", "resume"]
    assert refused[-1] == ("pause", "http:127.0.0.1")


def test_malformed_request_bodies_are_refused_and_recorded(held: dict[str, Any]) -> None:
    http = held["http"]
    not_json = http.post(
        "/api/approve", content=b"{{{", headers={**auth(), "Content-Type": "application/json"}
    )
    assert not_json.status_code == 400 and "not JSON" in not_json.json()["error"]
    no_id = http.post("/api/approve", json={"operator": "alice"}, headers=auth())
    assert no_id.status_code == 400 and "needs 'id'" in no_id.json()["error"]
    bad_name = http.post("/api/pause", json={"operator": "a b<script>"}, headers=auth())
    assert bad_name.status_code == 400 and "operator must be" in bad_name.json()["error"]
    unknown = http.post("/api/teleport", json={}, headers=auth())
    assert unknown.status_code == 400 and "unknown action 'teleport'" in unknown.json()["error"]
    assert held["inst"].executed == [] and not held["agent"].gate.paused
    refused = [o["action"] for o in refused_events(held["rec"], 4)]
    assert refused == ["approve", "approve", "pause", "teleport"]


def test_lock_fight_over_http_answers_409(held: dict[str, Any]) -> None:
    http = held["http"]
    take = http.post("/api/lock", json={"operator": "alice"}, headers=auth())
    assert take.status_code == 200
    fight = http.post("/api/lock", json={"operator": "bob"}, headers=auth())
    assert fight.status_code == 409 and fight.json()["kind"] == "ControlLocked"
    assert "'alice' holds the control lock" in fight.json()["error"]
    pending = held["controller"].status()["pending"][0]["id"]
    sneak = http.post("/api/approve", json={"operator": "bob", "id": pending}, headers=auth())
    assert sneak.status_code == 409 and held["inst"].executed == []


def test_websocket_pushes_status_and_frames(held: dict[str, Any]) -> None:
    url = held["server"].base_url.replace("http://", "ws://") + f"/ws?token={TOKEN}"
    with connect(url, open_timeout=10) as ws:
        messages = [ws.recv(timeout=10), ws.recv(timeout=10)]
    texts = [json.loads(m) for m in messages if isinstance(m, str)]
    frames = [decode_frame(m) for m in messages if isinstance(m, bytes)]
    assert texts[0]["type"] == "status" and texts[0]["status"]["mode"] == "supervised"
    header, pixels = frames[0]
    assert header["seq"] == 0 and pixels.shape == (32, 32) and pixels.dtype == np.uint8
    assert header["tip"]["state"] == "good"


def test_websocket_with_a_wrong_token_gets_an_error_and_is_recorded(held: dict[str, Any]) -> None:
    url = held["server"].base_url.replace("http://", "ws://") + "/ws?token=bad"
    with connect(url, open_timeout=10) as ws:
        message = json.loads(ws.recv(timeout=10))
    assert message["type"] == "error" and "wrong access token" in message["error"]
    refused = refused_events(held["rec"], 1)
    assert [(o["action"], o["origin"]) for o in refused] == [("connect", "ws:127.0.0.1")]


def test_page_and_script_are_served_without_a_build_step(held: dict[str, Any]) -> None:
    page = held["http"].get("/")
    assert page.status_code == 200 and '<canvas id="frame"' in page.text
    script = held["http"].get("/console.js")
    assert script.status_code == 200 and "new WebSocket" in script.text


def test_non_loopback_bind_needs_a_token(held: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"refusing to serve the console on '0\.0\.0\.0'"):
        ConsoleServer(held["controller"], host="0.0.0.0", port=0)
    ConsoleServer(held["controller"], host="0.0.0.0", port=0, token="x")  # allowed (not started)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")


def test_token_file_is_created_private_and_bad_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "token"
    token = read_or_create_token(path)
    assert len(token) >= 24 and read_or_create_token(path) == token
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="must hold one token"):
        read_or_create_token(tmp_path / "empty")
    with pytest.raises(ConfigError, match="does not exist"):
        read_or_create_token(tmp_path / "missing", create=False)


def test_frame_encoding_stretches_contrast_and_blanks_unscanned_lines() -> None:
    data = np.tile(np.linspace(0.0, 1.0, 64, dtype=np.float32), (64, 1))
    data[40:] = np.nan  # a partial frame: lines not scanned yet
    frame = Frame(
        data=data,
        channel="topography",
        pixel_size_m=(1e-10, 1e-10),
        dwell_s=1e-4,
        scan_region=ScanRegion(),
        frame_index=7,
        timestamp_s=1.0,
        lines_done=40,
        instrument="test",
    )
    header, pixels = decode_frame(encode_frame(3, frame, {"defects": [{"row_px": 1.0}]}))
    assert header["seq"] == 3 and header["frame_index"] == 7 and header["lines_done"] == 40
    assert header["defects"] == [{"row_px": 1.0}]
    assert pixels[:40, 0].max() == 0 and pixels[:40, -1].min() == 255  # 1st..99th percentile
    assert np.all(np.diff(pixels[0].astype(int)) >= 0)  # monotone ramp stays monotone
    assert np.all(pixels[40:] == 0)


def test_run_with_console_serves_and_refuses_an_open_bind_without_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["run", "--instrument", "sim:stm", "--frames", "2", "--shape", "32", "--quiet"]
    code = main([*base, "--out", str(tmp_path / "a.zarr"), "--console", "--console-port", "0"])
    err = capsys.readouterr().err
    assert code == 0 and "operator console: http://127.0.0.1:" in err
    code = main(
        [*base, "--out", str(tmp_path / "b.zarr"), "--console", "--console-host", "0.0.0.0"]
    )
    assert code == 2 and "without a token" in capsys.readouterr().err


def test_ctl_takes_the_token_from_the_environment_like_remote_instruments(
    held: dict[str, Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCOPEPILOT_TOKEN", TOKEN)
    monkeypatch.delenv("SCOPEPILOT_TOKEN_FILE", raising=False)
    code = main(["ctl", "status", "--json", "--connect", held["server"].base_url])
    assert code == 0 and json.loads(capsys.readouterr().out)["mode"] == "supervised"


def test_requests_from_another_site_are_refused(held: dict[str, Any]) -> None:
    """A page elsewhere cannot drive the console through the operator's browser."""
    http = held["http"]
    evil = {**auth(), "Origin": "http://evil.example"}
    forged = http.post("/api/abort", json={}, headers=evil)
    assert forged.status_code == 401 and "another site" in forged.json()["error"]
    plain = http.post("/api/abort", content=b"{}", headers={**auth(), "Content-Type": "text/plain"})
    assert plain.status_code == 400 and "application/json" in plain.json()["error"]
    assert not held["agent"].gate.aborted
    refused = [o["action"] for o in refused_events(held["rec"], 2)]
    assert refused == ["abort", "abort"]


def test_without_a_token_only_loopback_host_names_are_served(held: dict[str, Any]) -> None:
    """DNS rebinding: a name that resolves to 127.0.0.1 must not open a tokenless console."""
    with (
        ConsoleServer(held["controller"], port=0) as open_server,
        httpx.Client(base_url=open_server.base_url, timeout=10.0) as http,
    ):
        assert http.get("/api/status").status_code == 200
        port = open_server.port
        rebound = http.get("/api/status", headers={"Host": f"evil.example:{port}"})
        assert rebound.status_code == 401 and "not a loopback name" in rebound.json()["error"]


class InvertingSr:
    """A frame stage standing in for the sr and defects models: the image upside down, one
    defect at (3, 4)."""

    name = "sr"
    version = "test"

    def run(self, frame: Frame) -> Any:
        from agent.perception.stages import StageOutput

        defect = {"row_px": 3.0, "col_px": 4.0, "class": "vacancy", "confidence": 0.9}
        summary = {"ran": True, "reject": False, "reason": "", "counts": {"vacancy": 1}}
        return StageOutput(
            {"sr": {"ran": True, "reject": False}, "defects": [defect], "defects_summary": summary},
            {"sr": np.ascontiguousarray(frame.data[::-1])},
        )


def test_websocket_pushes_the_sr_view_with_the_defects_of_its_frame() -> None:
    from agent.control import Controller
    from agent.loop import Agent, AgentConfig
    from tests.console_support import HANG_GUARD_S, Holder
    from tests.fakes import FakeInstrument, MemoryRecorder, ScriptedAssessor, ScriptedPolicy

    holder = Holder()
    agent = Agent(
        FakeInstrument(),
        ScriptedPolicy(),
        assessor=ScriptedAssessor(),
        stages=[InvertingSr()],
        recorder=MemoryRecorder(),
        config=AgentConfig(frames=1),
        on_step=holder,
    )
    controller = Controller(agent)
    import threading

    thread = threading.Thread(target=agent.run)
    thread.start()
    holder.next()  # frame 0 perceived: its sr image is with the controller
    try:
        with ConsoleServer(controller, port=0, token=TOKEN) as server:
            url = server.base_url.replace("http://", "ws://") + f"/ws?token={TOKEN}"
            with connect(url, open_timeout=10) as ws:
                messages = [ws.recv(timeout=10) for _ in range(3)]
            status = controller.status()
    finally:
        holder.go()
        thread.join(HANG_GUARD_S)
    frames = {
        h["view"]: (h, p) for h, p in (decode_frame(m) for m in messages if isinstance(m, bytes))
    }
    raw, sr = frames["raw"], frames["sr"]
    assert raw[0]["seq"] == sr[0]["seq"] == 0
    # the stage's image (upside down), not the frame again; contrast stretches differ a little
    same = np.corrcoef(sr[1].ravel(), raw[1][::-1].ravel())[0, 1]
    other = np.corrcoef(sr[1].ravel(), raw[1].ravel())[0, 1]
    assert same > 0.99 and abs(other) < 0.5
    assert sr[0]["defects"] == [
        {"row_px": 3.0, "col_px": 4.0, "class": "vacancy", "confidence": 0.9}
    ]
    assert status["frame"]["defects_summary"]["counts"] == {"vacancy": 1}
