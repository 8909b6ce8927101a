"""Child process of the recorder crash test: appends as fast as it can until it is killed.

Run as ``python -m tests.recorder_child STORE [--close-after N]`` from the repository root. It
prints ``READY`` once the store exists, then ``FRAME i`` / ``EVENT j`` (flushed) right after each
append returns. Frames and events are generated deterministically from their index by
:func:`make_frame` and :func:`make_event`, so the parent can regenerate what was acknowledged.
With ``--close-after N`` it stops after N frames, sets a summary, closes, prints ``CLOSED`` and
waits to be killed. The capacity steps are made small so that kills also land on array growth.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

import agent.recorder as recorder_module
from agent.recorder import SessionRecorder
from drivers.frame import Defect, Frame, GroundTruth, ScanRegion, TipState

SHAPES: tuple[tuple[tuple[int, int], type[np.generic]], ...] = (
    ((128, 128), np.float32),
    ((64, 48), np.uint16),
    ((96, 80), np.float64),
)


def make_frame(i: int) -> Frame:
    """Frame ``i`` of the child's sequence (same output for the same ``i``, in any process)."""
    rng = np.random.default_rng(i)
    shape, dtype = SHAPES[i % len(SHAPES)]
    if np.issubdtype(dtype, np.integer):
        data = rng.integers(0, 60000, size=shape).astype(dtype)
    else:
        data = rng.standard_normal(shape).astype(dtype)
        if i % 5 == 0:
            data[rng.integers(0, shape[0]), :] = np.nan  # a flagged frame
    clean = rng.standard_normal(shape).astype(np.float32) if i % 2 == 0 else None
    truth = GroundTruth(
        tip_state=TipState.GOOD if i % 3 else TipState.MULTIPLE,
        tip_states=(TipState.GOOD,),
        clean=clean,
        defects=tuple(Defect(k * 1e-10, i * 1e-10, "vacancy", float(k), 2.0) for k in range(i % 4)),
        damaged_fraction=(i % 7) / 10,
        extra={"seed": i},
    )
    return Frame(
        data=data,
        channel="topography" if i % 2 else "current",
        pixel_size_m=(1e-10 * (1 + i % 3), 2e-10),
        dwell_s=1e-4,
        scan_region=ScanRegion(center_x_m=i * 1e-9, center_y_m=-i * 1e-9),
        frame_index=i,
        timestamp_s=0.25 * i,
        lines_done=shape[0],
        instrument="sim:stm",
        metadata={"i": i, "label": f"frame-{i}"},
        truth=truth,
    )


def make_event(j: int) -> tuple[str, dict[str, Any], float]:
    """Event ``j``: (kind, payload, t_wall)."""
    kinds = ("perception", "decision", "command", "operator", "fault", "status")
    payload: dict[str, Any] = {"j": j, "text": "é" * (j % 40), "values": [j, j * 0.5, None]}
    if kinds[j % len(kinds)] == "command":
        payload["fate"] = ("issued", "executed", "rejected", "vetoed")[j % 4]
        payload["reason"] = f"reason {j}"
    return kinds[j % len(kinds)], payload, 1_700_000_000.0 + j


def main(argv: list[str]) -> None:
    store = argv[0]
    close_after = int(argv[2]) if len(argv) > 2 and argv[1] == "--close-after" else None
    recorder_module.FRAME_CAPACITY_STEP = 4
    recorder_module.RECORD_CAPACITY_STEP = 48
    rec = SessionRecorder(store, config={"child": True}, versions={"test": "1"})
    print("READY", flush=True)
    i = j = 0
    while close_after is None or i < close_after:
        rec.append_frame(make_frame(i), extra={"latency_s": {"acquire": 0.001 * i}})
        print(f"FRAME {i}", flush=True)
        i += 1
        for _ in range(1 + i % 2):
            kind, payload, t_wall = make_event(j)
            rec.append_event(kind, payload, t_wall=t_wall, t_instrument=0.25 * j)
            print(f"EVENT {j}", flush=True)
            j += 1
    rec.set_summary({"frames": i, "events": j})
    rec.close()
    print("CLOSED", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main(sys.argv[1:])
