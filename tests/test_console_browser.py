"""The web console end to end in a real headless browser (Debian's chromium via Playwright).

A simulated supervised STM session runs with the console in front of it; the browser watches the
frame update, approves one pending command, vetoes another, pauses and resumes, and then the
session store must hold exactly those four operator actions, with their effects.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from agent.console.server import ConsoleServer
from agent.control import Controller
from agent.gate import Mode
from agent.loop import Agent, AgentConfig
from agent.recorder import SessionRecorder
from agent.session import Session
from drivers.commands import MoveTo, Scan, TipPulse
from drivers.registry import open_instrument
from tests.console_support import HANG_GUARD_S, Holder, finish, operator_events, start
from tests.fakes import ScriptedAssessor, ScriptedPolicy

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 20_000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="/usr/bin/chromium is not installed (apt-get install chromium; .ci/run does)",
    ),
]


def pulse_and_move(obs: Any) -> tuple[TipPulse, MoveTo]:
    return (TipPulse(2.0, 0.1), MoveTo(20e-9, 10e-9))


def test_supervised_session_in_the_browser(tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    instrument = open_instrument("sim:stm", seed=3)
    instrument.execute(Scan(shape_px=(64, 64), source="console", reason="small frames for a test"))
    store = tmp_path / "browser.zarr"
    recorder = SessionRecorder(store, config={"test": "browser"}, versions={})
    holder = Holder()
    agent = Agent(
        instrument,
        ScriptedPolicy(commands_for=pulse_and_move),
        assessor=ScriptedAssessor(),
        recorder=recorder,
        config=AgentConfig(frames=4, mode=Mode.SUPERVISED),
        on_step=holder,
    )
    controller = Controller(agent)
    thread = threading.Thread(target=agent.run, name="browser-test-agent")
    with ConsoleServer(controller, port=0, token="browser-token") as server:
        thread.start()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
            )
            try:
                page = browser.new_page()
                page.set_default_timeout(TIMEOUT_MS)
                page.goto(server.url)
                info = page.locator("#frame-info")
                # The live frame updates: frame 0, then frame 1 once the session moves on.
                holder.next()
                expect(info).to_have_attribute("data-seq", "0")
                holder.go()
                step = holder.next()
                expect(info).to_have_attribute("data-seq", "1")
                assert step.seq == 1
                expect(page.locator("#pending-count")).to_have_text("2")
                pending = {c.kind: c.id for c in agent.gate.pending()}
                page.click(f"button.approve[data-id='{pending['TipPulse']}']")
                expect(page.locator("#pending-count")).to_have_text("1")
                page.click(f"button.veto[data-id='{pending['MoveTo']}']")
                expect(page.locator("#pending-count")).to_have_text("0")
                page.click("#pause")
                expect(page.locator("#state")).to_have_attribute("data-state", "paused")
                page.click("#resume")
                expect(page.locator("#state")).to_have_attribute("data-state", "running")
                expect(page.locator("#decisions")).to_contain_text("TipPulse executed")
                expect(page.locator("#decisions")).to_contain_text("MoveTo vetoed")
                # The canvas shows real pixels, not a blank.
                drawn = page.evaluate(
                    "() => { const c = document.getElementById('frame');"
                    " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                    " let lo = 255, hi = 0; for (let i = 0; i < d.length; i += 4)"
                    " { lo = Math.min(lo, d[i]); hi = Math.max(hi, d[i]); }"
                    " return [c.width, hi - lo]; }"
                )
                assert drawn[0] == 64 and drawn[1] > 100
                # The tip-state overlay is drawn over the grey image: a coloured corner.
                page.wait_for_function(
                    "() => { const d = document.getElementById('frame').getContext('2d')"
                    ".getImageData(1, 1, 1, 1).data; return d[0] !== d[1] || d[1] !== d[2]; }"
                )
                for _ in range(2):  # frames 2 and 3 finish the session
                    holder.go()
                    holder.next()
                holder.go()
                thread.join(HANG_GUARD_S)
                assert not thread.is_alive()
                expect(page.locator("#state")).to_have_attribute("data-state", "stopped")
            finally:
                browser.close()
    recorder.close()
    instrument.close()

    session = Session(store)
    operator = [e["payload"] for e in session.events("operator")]
    assert [(o["action"], o["origin"]) for o in operator] == [
        ("approve", "console:operator"),
        ("veto", "console:operator"),
        ("pause", "console:operator"),
        ("resume", "console:operator"),
    ]
    assert operator[0]["command_id"] == pending["TipPulse"]
    assert operator[1]["command_id"] == pending["MoveTo"]
    assert all(e["t_wall"] > 0 for e in session.events("operator"))
    fates = {
        (e["payload"]["command"]["id"], e["payload"]["fate"]) for e in session.events("command")
    }
    assert (pending["TipPulse"], "executed") in fates
    assert (pending["MoveTo"], "vetoed") in fates
    assert (pending["MoveTo"], "executed") not in fates


def test_the_page_shows_refusals_clearly(tmp_path: Path) -> None:
    """A wrong token, a malformed manual command and a lock held by someone else: the page
    says why, nothing is executed, and each refusal is recorded."""
    from playwright.sync_api import expect, sync_playwright

    _agent, controller, inst, rec, holder, thread = start(frames=1)
    holder.next()
    try:
        with (
            ConsoleServer(controller, port=0, token="right") as server,
            sync_playwright() as pw,
        ):
            browser = pw.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
            )
            try:
                page = browser.new_page()
                page.set_default_timeout(TIMEOUT_MS)
                page.goto(server.base_url + "/?token=wrong")
                expect(page.locator("#error")).to_contain_text("wrong access token")
                expect(page.locator("#token-box")).to_be_visible()
                page.fill("#token", "right")
                page.click("#token-set")
                expect(page.locator("#pending-count")).to_have_text("2")
                page.fill("#command", '{"type": "Teleport"}')
                page.click("#send")
                expect(page.locator("#error")).to_contain_text("unknown command type 'Teleport'")
                controller.take_lock(origin="ctl:alice")
                page.locator("button.approve").first.click()
                expect(page.locator("#error")).to_contain_text("'alice' holds the control lock")
                expect(page.locator("#lock-holder")).to_have_text("control held by alice")
            finally:
                browser.close()
    finally:
        finish(holder, thread, 1)
    assert inst.executed == []
    refused = [(o["action"], o["origin"]) for o in operator_events(rec) if o.get("refused")]
    assert refused == [
        ("connect", "ws:127.0.0.1"),
        ("submit", "console:operator"),
        ("approve", "console:operator"),
    ]


def test_stem_session_shows_the_sr_view_and_the_defect_overlay(tmp_path: Path) -> None:
    """A STEM session with the sr and defects stages: the page enables the sr view toggle, shows
    the recovered image when it is ticked, and circles the recorded defects of that frame."""
    from playwright.sync_api import expect, sync_playwright

    from agent.pipeline import build_pipeline

    instrument = open_instrument("sim:stem", seed=4)
    instrument.execute(Scan(shape_px=(128, 128), source="console", reason="small frames"))
    store = tmp_path / "stem.zarr"
    recorder = SessionRecorder(store, config={"test": "browser-stem"}, versions={})
    pipeline = build_pipeline(
        {"policy": "none", "perception": ["sr", "defects"], "quality": "none"}, kind="stem"
    )
    holder = Holder()
    agent = pipeline.agent(
        instrument, recorder=recorder, config=AgentConfig(frames=2), on_step=holder
    )
    controller = Controller(agent)
    thread = threading.Thread(target=agent.run, name="browser-test-stem")
    with ConsoleServer(controller, port=0, token="browser-token") as server:
        thread.start()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
            )
            try:
                page = browser.new_page()
                page.set_default_timeout(TIMEOUT_MS)
                page.goto(server.url)
                holder.next()  # frame 0 perceived and decided; the session waits here
                expect(page.locator("#frame-info")).to_have_attribute("data-seq", "0")
                toggle = page.locator("#show-sr")
                expect(toggle).to_be_enabled()
                toggle.check()
                frame = page.locator("#frame")
                expect(frame).to_have_attribute("data-view", "sr")
                expect(page.locator("#frame-info")).to_contain_text("sr view")
                expect(page.locator("#perception-info")).to_contain_text("defects:")
                drawn = int(frame.get_attribute("data-defects-drawn") or 0)
                toggle.uncheck()
                expect(frame).to_have_attribute("data-view", "raw")
                page.locator("#show-defects").uncheck()
                expect(frame).to_have_attribute("data-defects-drawn", "0")
                holder.go()
                holder.next()
                holder.go()
                thread.join(HANG_GUARD_S)
                assert not thread.is_alive()
            finally:
                browser.close()
    recorder.close()
    instrument.close()

    session = Session(store)
    first = session.events("perception")[0]["payload"]
    assert drawn == len(first["defects"]) > 0  # the circles are the recorded list
    sr_image = session.array(first["arrays"]["sr"])
    assert sr_image.shape == (128, 128) and sr_image.dtype.name == "float16"
