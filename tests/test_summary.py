"""Session summaries computed from records alone."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from agent.summary import LatencyStats, conditioning_episodes, format_summary, summarize
from drivers.errors import DataError


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


def test_latency_stats_are_exact_while_the_reservoir_holds_every_sample() -> None:
    values = list(np.random.default_rng(1).exponential(0.01, 500))
    stats = LatencyStats(reservoir_size=500)
    for v in values:
        stats.add(v)
    got = stats.stats_ms()
    assert got["n"] == 500 and "percentile_samples" not in got
    assert got["mean_ms"] == pytest.approx(np.mean(values) * 1e3, rel=1e-12)
    assert got["p95_ms"] == pytest.approx(np.percentile(values, 95) * 1e3, rel=1e-12)
    assert got["max_ms"] == max(values) * 1e3
    # a store written before the statistics were bounded held the plain list: same summary
    assert LatencyStats.coerce(values).stats_ms() == got
    assert stats.recent(3) == values[-3:]


def test_latency_stats_memory_is_bounded_and_summary_fields_stay_meaningful() -> None:
    rng = np.random.default_rng(2)
    values = rng.uniform(0.0, 0.1, 50_000)
    values[12_345] = 0.5  # one slow outlier: the maximum must not be sampled away
    stats = LatencyStats(reservoir_size=1000, recent_size=64)
    for v in values:
        stats.add(float(v))
    assert len(stats.sample_s) == 1000 and len(stats.recent(10_000)) == 64
    got = stats.stats_ms()
    assert got["n"] == 50_000 and got["percentile_samples"] == 1000
    assert got["mean_ms"] == pytest.approx(values.mean() * 1e3, rel=1e-9)
    assert got["max_ms"] == 500.0
    # a uniform sample of all 50,000, not the latest 1,000: p50 near 50 ms, p95 near 95 ms
    assert got["p50_ms"] == pytest.approx(50.0, abs=5.0)
    assert got["p95_ms"] == pytest.approx(95.0, abs=2.0)
    # the JSON form in a store's summary is bounded too and reads back to the same summary
    stored = json.loads(json.dumps(stats.to_json()))
    assert len(stored["sample_s"]) == 1000
    assert LatencyStats.coerce(stored).stats_ms() == pytest.approx(got)
    assert summarize([], [], latencies_s={"gate": stored})["latency"]["gate"] == pytest.approx(got)


@pytest.mark.parametrize(
    "bad", [{"n": 3}, {"n": 2, "mean_s": 0.1, "max_s": 0.2, "sample_s": [0.1, 0.2, 0.3]}, "abc"]
)
def test_malformed_stored_latencies_are_a_data_error(bad: Any) -> None:
    with pytest.raises(DataError, match="latenc"):
        LatencyStats.coerce(bad)
