"""Session summaries: the numbers a microscopist asks for after a run, from the record alone.

:func:`summarize` works on the frame records and events of a session store (what
:class:`agent.session.Session` returns), so ``scopepilot run`` and ``scopepilot summary S.zarr``
print the same thing.
"""

from __future__ import annotations

import math
import random
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from drivers.errors import DataError

CONDITIONING = ("TipPulse", "TipDip")

RESERVOIR_SIZE = 2048
"""Latency samples kept per stage for percentiles (all of them up to this many frames)."""
RECENT_SIZE = 256
"""Latest latencies kept per stage, in order, for the console."""


class LatencyStats:
    """One stage's latencies in bounded memory, however long the session runs.

    Count, mean and maximum are exact (streaming). Percentiles come from a uniform reservoir
    of :data:`RESERVOIR_SIZE` samples (Vitter's algorithm R, seeded, so a run's summary is
    reproducible): exact while the stage has seen no more samples than that, an unbiased
    sample of all of them after. :meth:`recent` gives the latest :data:`RECENT_SIZE` in order.
    Seconds throughout.
    """

    def __init__(
        self, *, reservoir_size: int = RESERVOIR_SIZE, recent_size: int = RECENT_SIZE
    ) -> None:
        if reservoir_size < 1 or recent_size < 1:
            raise ValueError(
                f"LatencyStats sizes must be >= 1, got {reservoir_size=}, {recent_size=}"
            )
        self.n = 0
        self.total_s = 0.0
        self.max_s = -math.inf
        self.sample_s: list[float] = []
        self._reservoir_size = reservoir_size
        self._recent: deque[float] = deque(maxlen=recent_size)
        self._rng = random.Random(0)

    def add(self, seconds: float) -> None:
        value = float(seconds)
        self.n += 1
        self.total_s += value
        self.max_s = max(self.max_s, value)
        self._recent.append(value)
        if len(self.sample_s) < self._reservoir_size:
            self.sample_s.append(value)
        else:
            slot = self._rng.randrange(self.n)
            if slot < self._reservoir_size:
                self.sample_s[slot] = value

    def __len__(self) -> int:
        return self.n

    @property
    def mean_s(self) -> float:
        return self.total_s / self.n if self.n else math.nan

    def recent(self, last: int) -> list[float]:
        """The latest ``min(last, RECENT_SIZE)`` latencies, oldest first."""
        if last <= 0:
            return []
        return list(self._recent)[-last:]

    def stats_ms(self) -> dict[str, float]:
        """``n``, ``mean_ms``, ``p50_ms``, ``p95_ms``, ``max_ms`` (``{}`` when empty); when the
        percentiles come from a sample of the latencies, ``percentile_samples`` says how many."""
        if self.n == 0:
            return {}
        arr = np.asarray(self.sample_s, dtype=float)
        out = {
            "n": self.n,
            "mean_ms": self.mean_s * 1e3,
            "p50_ms": float(np.percentile(arr, 50) * 1e3),
            "p95_ms": float(np.percentile(arr, 95) * 1e3),
            "max_ms": self.max_s * 1e3,
        }
        if arr.size < self.n:
            out["percentile_samples"] = int(arr.size)
        return out

    def to_json(self) -> dict[str, Any]:
        """The JSON form written into a session's summary (bounded: at most the reservoir)."""
        return {"n": self.n, "mean_s": self.mean_s, "max_s": self.max_s, "sample_s": self.sample_s}

    @classmethod
    def coerce(cls, value: LatencyStats | Sequence[float] | Mapping[str, Any]) -> LatencyStats:
        """A :class:`LatencyStats` from itself, a list of seconds (stores written before the
        statistics were bounded) or :meth:`to_json`'s form; :class:`DataError` otherwise."""
        if isinstance(value, LatencyStats):
            return value
        if isinstance(value, Mapping):
            try:
                n, mean_s, max_s = int(value["n"]), float(value["mean_s"]), float(value["max_s"])
                sample = [float(v) for v in value["sample_s"]]
            except (KeyError, TypeError, ValueError) as exc:
                raise DataError(
                    f"latency statistics need n, mean_s, max_s and sample_s, got {value!r}"
                ) from exc
            if n < len(sample) or (n and not sample):
                raise DataError(f"latency statistics count {n} does not fit {len(sample)} samples")
            stats = cls(reservoir_size=max(len(sample), 1))
            stats.n, stats.total_s, stats.max_s = n, mean_s * n, max_s
            stats.sample_s = sample
            stats._recent.extend(sample[-RECENT_SIZE:])
            return stats
        if isinstance(value, (str, bytes)):
            raise DataError(f"latencies must be numbers, got {value!r}")
        stats = cls(reservoir_size=max(len(value), 1))
        try:
            for v in value:
                stats.add(v)
        except (TypeError, ValueError) as exc:
            raise DataError(f"latencies must be numbers, got {value!r}") from exc
        return stats


def _latency_stats(values: LatencyStats | Sequence[float] | Mapping[str, Any]) -> dict[str, float]:
    return LatencyStats.coerce(values).stats_ms()


def conditioning_episodes(events: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Runs of executed conditioning actions, each ended by the next frame assessed good.

    Returns ``[{"start_frame", "end_frame", "actions", "recovered"}]``; ``recovered`` is False for
    an episode still open when the session ended.
    """
    episodes: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for event in events:
        payload = event["payload"]
        if event["kind"] == "command":
            command = payload.get("command", {})
            if payload.get("fate") == "executed" and command.get("type") in CONDITIONING:
                if current is None:
                    current = {"start_frame": payload.get("frame"), "actions": 0}
                current["actions"] += 1
        elif event["kind"] == "perception" and current is not None:
            tip = payload.get("tip")
            if tip is not None and tip.get("state") == "good":
                current.update(end_frame=payload.get("frame"), recovered=True)
                episodes.append(current)
                current = None
    if current is not None:
        current.update(end_frame=None, recovered=False)
        episodes.append(current)
    return episodes


def summarize(
    frame_records: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    *,
    latencies_s: Mapping[str, LatencyStats | Sequence[float] | Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Everything ``scopepilot summary`` prints, as a JSON-able dict.

    ``latencies_s`` maps each stage to its :class:`LatencyStats` (a running agent), their
    :meth:`LatencyStats.to_json` form (a store's summary) or a list of seconds; without it the
    latencies are read from the decision events and frame records.
    """
    n = len(frame_records)
    truths = [r.get("truth") for r in frame_records]
    known = [t for t in truths if t]
    usable = sum(1 for t in known if t.get("usable"))
    flagged = sum(1 for r in frame_records if r.get("problems"))
    true_states = Counter(t.get("tip_state") for t in known)
    assessed = Counter(
        (e["payload"].get("tip") or {}).get("state", "not assessed")
        for e in events
        if e["kind"] == "perception"
    )
    fates: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()
    rejected: list[str] = []
    for e in events:
        if e["kind"] != "command":
            continue
        payload = e["payload"]
        fates[payload.get("fate", "?")] += 1
        if payload.get("fate") == "executed":
            by_kind[payload.get("command", {}).get("type", "?")] += 1
        if payload.get("fate") == "rejected":
            rejected.append(payload.get("reason", ""))
    episodes = conditioning_episodes(events)
    lengths = [ep["actions"] for ep in episodes]
    if latencies_s is None:
        collected: dict[str, list[float]] = {}
        for e in events:
            if e["kind"] == "decision":
                for stage, value in (e["payload"].get("latency_s") or {}).items():
                    collected.setdefault(stage.removesuffix("_s"), []).append(value)
        for r in frame_records:
            value = (r.get("extra") or {}).get("acquire_s")
            if value is not None:
                collected.setdefault("acquire", []).append(value)
        latencies_s = collected
    stops = [
        e["payload"]
        for e in events
        if e["kind"] == "status" and e["payload"].get("state") == "stopped"
    ]
    sim_time = [r["header"]["timestamp_s"] for r in frame_records if r.get("header")]
    perception = [e["payload"] for e in events if e["kind"] == "perception"]
    return {
        "frames": n,
        "frames_with_truth": len(known),
        "usable_frames": usable,
        "usable_fraction": usable / len(known) if known else None,
        "flagged_frames": flagged,
        "true_tip_states": dict(true_states),
        "assessed_tip_states": dict(assessed),
        "commands_executed_by_kind": dict(by_kind),
        "command_fates": dict(fates),
        "rejections": rejected[:20],
        "conditioning_episodes": len(episodes),
        "episode_lengths": lengths,
        "episodes_recovered": sum(1 for ep in episodes if ep["recovered"]),
        "mean_episode_length": float(np.mean(lengths)) if lengths else None,
        "operator_actions": sum(1 for e in events if e["kind"] == "operator"),
        "faults": sum(1 for e in events if e["kind"] == "fault"),
        "stop_reason": stops[-1].get("reason", "") if stops else "session did not stop cleanly",
        "stale_frames_skipped": stops[-1].get("stale_skipped", 0) if stops else None,
        "instrument_time_s": float(max(sim_time)) if sim_time else 0.0,
        "latency": {stage: _latency_stats(v) for stage, v in latencies_s.items()},
        "defects": _defect_counts(perception),
        "sr": _sr_stats(perception),
        "early_aborts": sum(1 for e in events if e["kind"] == "early_abort"),
        "scans_aborted_early": sum(
            1
            for e in events
            if e["kind"] == "early_abort" and e["payload"].get("fate") == "executed"
        ),
    }


def _defect_counts(perception: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Defects found per class over the frames the defects stage judged (None: it never ran).

    ``per_class`` counts defects on frames whose result was not rejected and whose tip the tip
    assessor did not judge bad; ``rejected`` frames (model unsure, pixel size out of range, ...)
    are counted apart, and so are frames with a bad tip verdict (``bad_tip_frames``, with
    ``bad_tip_defects`` found on them): a multiple tip images each defect more than once and a
    blunt or crashed one hides them, so those lists say more about the tip than the sample.
    """
    judged = [p for p in perception if isinstance(p.get("defects_summary"), dict)]
    if not judged:
        return None
    per_class: Counter[str] = Counter()
    rejected = bad_frames = bad_defects = uncertain = 0
    for p in judged:
        s = p["defects_summary"]
        if s.get("reject"):
            rejected += 1
            continue
        counts = {k: int(v) for k, v in (s.get("counts") or {}).items()}
        tip = p.get("tip")
        if isinstance(tip, Mapping) and tip.get("state", "good") != "good":
            bad_frames += 1
            bad_defects += sum(counts.values())
            continue
        per_class.update(counts)
        uncertain += int(s.get("uncertain", 0))
    counted = len(judged) - rejected - bad_frames
    return {
        "frames": len(judged),
        "rejected_frames": rejected,
        "bad_tip_frames": bad_frames,
        "bad_tip_defects": bad_defects,
        "per_class": dict(per_class),
        "uncertain": uncertain,
        "per_frame_mean": sum(per_class.values()) / counted if counted else None,
    }


def _sr_stats(perception: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The sr stage's outputs over the session (None: it never ran): how many frames it
    recovered, rejected (and the first reasons), and its relative uncertainty (median σ over the
    intensity range) across the recovered frames."""
    runs = [p["sr"] for p in perception if isinstance(p.get("sr"), dict)]
    if not runs:
        return None
    ran = [r for r in runs if r.get("ran")]
    rel = np.asarray([float(r["relative_uncertainty"]) for r in ran], dtype=float)
    rejected = [r for r in runs if r.get("reject")]
    return {
        "frames": len(runs),
        "recovered": len(ran),
        "rejected_frames": len(rejected),
        "reject_reasons": sorted({str(r.get("reason", "")) for r in rejected})[:5],
        "images_recorded": sum(1 for r in ran if r.get("recorded")),
        "relative_uncertainty_median": float(np.median(rel)) if rel.size else None,
        "relative_uncertainty_max": float(rel.max()) if rel.size else None,
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """A readable multi-line report of :func:`summarize`'s output."""
    lines = [
        f"frames            {summary['frames']}  "
        f"(flagged, not acted on: {summary['flagged_frames']})"
    ]
    if summary.get("usable_fraction") is not None:
        lines.append(
            f"usable frames     {summary['usable_frames']}/{summary['frames_with_truth']} = "
            f"{summary['usable_fraction']:.1%}  (good tip, undamaged area; simulator ground truth)"
        )
        lines.append(f"true tip states   {_fmt_counts(summary['true_tip_states'])}")
    lines.append(f"assessed states   {_fmt_counts(summary['assessed_tip_states'])}")
    lines.append(f"commands executed {_fmt_counts(summary['commands_executed_by_kind']) or 'none'}")
    lines.append(f"command fates     {_fmt_counts(summary['command_fates']) or 'none'}")
    lengths = summary["episode_lengths"]
    shown = str(lengths) if len(lengths) <= 12 else str(lengths[:12])[:-1] + ", ...]"
    lines.append(
        f"conditioning      {summary['conditioning_episodes']} episodes, "
        f"{summary['episodes_recovered']} recovered; lengths {shown}"
    )
    lines.append(f"operator actions  {summary['operator_actions']}    faults {summary['faults']}")
    lines.append(
        f"instrument time   {summary['instrument_time_s'] / 3600:.2f} h (simulated for sim: URIs)"
    )
    defects = summary.get("defects")
    if defects:
        shown = _fmt_counts(defects["per_class"]) or "none"
        lines.append(
            f"defects           {shown}  ({defects['frames']} frames judged, "
            f"{defects['rejected_frames']} rejected; {defects['uncertain']} uncertain)"
        )
        if defects.get("bad_tip_frames"):
            lines.append(
                f"                  not counted: {defects['bad_tip_defects']} found on "
                f"{defects['bad_tip_frames']} frames with a bad tip verdict"
            )
    sr = summary.get("sr")
    if sr:
        median = sr["relative_uncertainty_median"]
        lines.append(
            f"sr                {sr['recovered']}/{sr['frames']} frames recovered, "
            f"{sr['rejected_frames']} rejected; median uncertainty "
            + (f"{median:.3f} of the intensity range" if median is not None else "n/a")
        )
    if summary.get("early_aborts"):
        lines.append(
            f"early aborts      {summary['scans_aborted_early']} scans aborted on a tip change "
            f"({summary['early_aborts']} detected)"
        )
    lines.append(f"stopped because   {summary['stop_reason']}")
    lat = summary.get("latency") or {}
    if lat:
        lines.append("stage latency     stage       mean ms    p95 ms    max ms")
        for stage, stats in lat.items():
            if stats:
                lines.append(
                    f"                  {stage:<10}{stats['mean_ms']:>9.2f}{stats['p95_ms']:>10.2f}"
                    f"{stats['max_ms']:>10.2f}"
                )
    return "\n".join(lines)


def _fmt_counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
