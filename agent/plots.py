"""Session overview figure: frame thumbnails with tip states, and a timeline of commands."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

STATE_COLORS = {
    "good": "#2ca02c",
    "multiple": "#ff7f0e",
    "blunt": "#9467bd",
    "unstable": "#d62728",
    "crashed": "#000000",
}
STATE_ORDER = ["good", "multiple", "blunt", "unstable", "crashed"]


def plot_session_overview(
    session: Any,
    out_path: str | os.PathLike[str],
    *,
    thumbnails: int = 12,
    title: str = "",
) -> None:
    """Write a PNG: a row of evenly spaced frame thumbnails (titled with assessed and true tip
    state) above a timeline of true/assessed tip states and executed commands per frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = session.frame_records()
    events = session.events()
    n = len(records)
    assessed = _assessed_states(events, n)
    true_states = [(r.get("truth") or {}).get("tip_state") for r in records]
    picks: list[int] = (
        sorted({int(i) for i in np.linspace(0, n - 1, min(thumbnails, n))}) if n else []
    )
    cols = max(len(picks), 1)
    fig = plt.figure(figsize=(max(12, 1.4 * cols), 6.5), layout="constrained")
    grid = fig.add_gridspec(2, cols, height_ratios=[1.2, 1])
    for k, i in enumerate(picks):
        ax = fig.add_subplot(grid[0, k])
        frame = session.frame(int(i))
        image = np.asarray(frame.done_data, dtype=float)
        finite = image[np.isfinite(image)]
        if finite.size:
            lo, hi = np.percentile(finite, [1, 99])
            ax.imshow(np.nan_to_num(image, nan=lo), cmap="afmhot", vmin=lo, vmax=hi)
        ax.set_xticks([])
        ax.set_yticks([])
        label = assessed[i] or "-"
        color = STATE_COLORS.get(str(true_states[i]), "gray")
        ax.set_title(f"#{i}\n{label}", fontsize=8, color=color)
    ax = fig.add_subplot(grid[1, :])
    _timeline(ax, n, true_states, assessed, events)
    fig.suptitle(title or f"session {os.fspath(session.path) if hasattr(session, 'path') else ''}")
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def _assessed_states(events: Sequence[Mapping[str, Any]], n: int) -> list[str | None]:
    out: list[str | None] = [None] * n
    for e in events:
        if e["kind"] == "perception":
            i = e["payload"].get("frame")
            tip = e["payload"].get("tip")
            if isinstance(i, int) and 0 <= i < n:
                out[i] = tip.get("state") if tip else "flagged"
    return out


def _timeline(
    ax: Any,
    n: int,
    true_states: Sequence[Any],
    assessed: Sequence[str | None],
    events: Sequence[Mapping[str, Any]],
) -> None:
    y_of = {s: k for k, s in enumerate(STATE_ORDER)}
    xs = np.arange(n)
    truth_y = [y_of.get(str(s), np.nan) for s in true_states]
    ax.step(xs, truth_y, where="mid", color="0.6", lw=2, label="true tip state")
    ay = [y_of.get(str(s), np.nan) for s in assessed]
    ax.scatter(
        xs, ay, s=6, c=[STATE_COLORS.get(str(s), "gray") for s in assessed], label="assessed"
    )
    markers = {
        "TipPulse": ("^", "tab:red"),
        "TipDip": ("v", "tab:blue"),
        "MoveTo": ("x", "tab:gray"),
    }
    seen: set[str] = set()
    for e in events:
        payload = e["payload"]
        if e["kind"] != "command" or payload.get("fate") != "executed":
            continue
        kind = payload.get("command", {}).get("type")
        frame = payload.get("frame")
        if kind in markers and isinstance(frame, int):
            marker, color = markers[kind]
            ax.scatter(
                [frame],
                [len(STATE_ORDER) + 0.3],
                marker=marker,
                color=color,
                s=30,
                label=kind if kind not in seen else None,
            )
            seen.add(kind)
    ax.set_yticks(range(len(STATE_ORDER) + 1), [*STATE_ORDER, "commands"])
    ax.set_xlabel("frame")
    ax.set_xlim(-0.5, max(n - 0.5, 0.5))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), fontsize=7, ncols=6, frameon=False)
