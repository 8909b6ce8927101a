"""Session summaries computed from records alone."""

from __future__ import annotations

from typing import Any

from agent.summary import conditioning_episodes, format_summary, summarize


def ev(kind: str, **payload: Any) -> dict[str, Any]:
    return {"kind": kind, "payload": payload}


def perceived(frame: int, state: str | None) -> dict[str, Any]:
    return ev("perception", frame=frame, tip={"state": state} if state else None, problems=[])


def executed(frame: int, kind: str, fate: str = "executed") -> dict[str, Any]:
    return ev("command", frame=frame, fate=fate, command={"type": kind}, reason="")


EVENTS = [
    perceived(0, "good"),
    perceived(1, "blunt"),
    executed(1, "TipDip"),
    executed(1, "MoveTo"),
    perceived(2, "blunt"),
    executed(2, "TipDip"),
    executed(2, "TipPulse", fate="rejected"),
    perceived(3, None),
    perceived(4, "good"),
    perceived(5, "multiple"),
    executed(5, "TipPulse"),
    perceived(6, "multiple"),
    ev("status", state="stopped", reason="completed 7 frames", stale_skipped=0),
]


def test_episodes_run_from_first_action_to_next_good_frame() -> None:
    episodes = conditioning_episodes(EVENTS)
    assert episodes == [
        {"start_frame": 1, "actions": 2, "end_frame": 4, "recovered": True},
        {"start_frame": 5, "actions": 1, "end_frame": None, "recovered": False},
    ]


def test_summary_counts_usable_frames_commands_and_fates() -> None:
    records = [
        {"truth": {"usable": u, "tip_state": s}, "problems": p, "header": {"timestamp_s": 10.0 * i}}
        for i, (u, s, p) in enumerate(
            [
                (True, "good", []),
                (False, "blunt", []),
                (False, "blunt", []),
                (False, "good", ["NaN"]),
                (True, "good", []),
                (False, "multiple", []),
                (False, "multiple", []),
            ]
        )
    ]
    summary = summarize(records, EVENTS)
    assert summary["frames"] == 7 and summary["usable_frames"] == 2
    assert summary["usable_fraction"] == 2 / 7
    assert summary["flagged_frames"] == 1
    assert summary["commands_executed_by_kind"] == {"TipDip": 2, "MoveTo": 1, "TipPulse": 1}
    assert summary["command_fates"] == {"executed": 4, "rejected": 1}
    assert summary["episode_lengths"] == [2, 1] and summary["episodes_recovered"] == 1
    assert summary["assessed_tip_states"]["not assessed"] == 1
    assert summary["stop_reason"] == "completed 7 frames"
    text = format_summary(summary)
    assert "usable frames     2/7 = 28.6%" in text
    assert "2 episodes, 1 recovered; lengths [2, 1]" in text
