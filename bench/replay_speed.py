"""Replay speed: re-deciding a recorded session vs the time the instrument took to record it.

    .venv/bin/python bench/replay_speed.py --frames 1000 --shape 64

Records a ``--frames`` session of ``sim:stm`` with the real agent (rule policy, classical tip
assessor, SNR quality; failed conditioning episodes do not end it), then replays it twice with
:func:`agent.replay.replay_session`: once with the recorded configuration (which must reproduce
every recorded decision) and once with a changed threshold. The baseline is the time the
instrument spent scanning the recorded frames, in simulated real time: dwell x pixels of each
frame (the simulator's scan time; flyback, moves and conditioning settle times not counted, so
the ratio is conservative). The instrument clock's whole span (with those) is printed too.
Issue 7 target: replay of a 1,000-frame session at least 10x faster than it took to record.
``--assessor NAME`` replays with another registered tip assessor (e.g. a neural model) instead.

Outputs ``bench/out/replay_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tqdm import tqdm

from agent.gate import Mode
from agent.loop import AgentConfig, Step
from agent.pipeline import build_pipeline
from agent.recorder import SessionRecorder
from agent.replay import canonical_decision, diff_sessions, replay_session, session_instrument
from agent.session import Session
from bench._common import machine
from drivers.commands import Scan
from drivers.frame import ScanRegion
from drivers.registry import open_instrument

OUT = Path(__file__).resolve().parent / "out"


def record(store: Path, frames: int, shape: int, size_nm: float, seed: int) -> dict[str, Any]:
    instrument = open_instrument("sim:stm", seed=seed)
    instrument.execute(
        Scan(
            region=ScanRegion(0.0, 0.0, size_nm * 1e-9, size_nm * 1e-9),
            shape_px=(shape, shape),
            source="console",
            reason="bench settings",
        )
    )
    config = {
        "instrument": "sim:stm",
        "policy": "rule",
        "policy_options": {"max_failed_episodes": 1_000_000},
        "assessor": "classical",
        "assessor_options": {},
        "quality": "snr",
        "frames": frames,
        "seed": seed,
        "lockstep": True,
    }
    pipeline = build_pipeline(config, kind="stm")
    t_start_sim = instrument.state().time_s
    bar = tqdm(total=frames, desc="record", unit="frame", dynamic_ncols=True)
    with SessionRecorder(store, config=config, versions=pipeline.versions()) as recorder:

        def on_step(_step: Step) -> None:
            bar.update(1)

        agent = pipeline.agent(
            instrument,
            recorder=recorder,
            config=AgentConfig(frames=frames, mode=Mode.AUTONOMOUS, lockstep=True),
            on_step=on_step,
        )
        t0 = time.perf_counter()
        result = agent.run()
        wall_s = time.perf_counter() - t0
    bar.close()
    clock_s = instrument.state().time_s - t_start_sim
    instrument.close()
    return {"frames": result.frames, "wall_s": wall_s, "instrument_clock_s": clock_s}


def replay(source: Path, out: Path, overrides: dict[str, Any], desc: str) -> dict[str, Any]:
    n = len(Session(source))
    with tqdm(total=n, desc=desc, unit="frame", dynamic_ncols=True) as bar:
        result = replay_session(
            source, out, overrides=overrides, on_frame=lambda _row: bar.update(1)
        )
    return {
        "frames": result.frames,
        "seconds": result.seconds,
        "scan_s": result.recorded_scan_s,
        "stage_s": result.per_stage_s,
        "stop_reason": result.stop_reason,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--shape", type=int, default=64, help="frame size in pixels (square)")
    parser.add_argument("--size-nm", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--assessor", help="replay with this tip assessor (default: recorded)")
    parser.add_argument("--dir", help="where to write the stores (default: a temporary folder)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="scopepilot-replay-", dir=args.dir))
    try:
        source = root / "S.zarr"
        rec = record(source, args.frames, args.shape, args.size_nm, args.seed)
        same: dict[str, Any] = {} if args.assessor is None else {"assessor": args.assessor}
        r_same = replay(source, root / "R_same.zarr", same, "replay (same)")
        changed = {
            **same,
            "policy_options": {"max_failed_episodes": 1_000_000, "bad_frames_to_act": 3},
        }
        r_changed = replay(source, root / "R_changed.zarr", changed, "replay (threshold)")
        recorded = {
            e["payload"]["frame"]: canonical_decision(e["payload"])
            for e in Session(source).events("decision")
        }
        replayed = {
            e["payload"]["frame"]: canonical_decision(e["payload"])
            for e in Session(root / "R_same.zarr").events("decision")
        }
        identical = sum(recorded.get(k) == v for k, v in replayed.items())
        diff = diff_sessions(source, root / "R_changed.zarr")
        kind = session_instrument(Session(source)).kind
    finally:
        shutil.rmtree(root, ignore_errors=True)
    scan_s = r_same["scan_s"]
    report = {
        "args": vars(args),
        "machine": machine(),
        "kind": kind,
        "record": rec,
        "replay_same": r_same,
        "replay_changed": r_changed,
        "identical_decisions": identical,
        "changed_actions": len(diff.differences),
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "replay_speed.json").write_text(json.dumps(report, indent=1))
    print(
        f"{rec['frames']} frames of {args.shape}x{args.shape} sim:stm, {args.size_nm:g} nm; "
        f"machine: {machine()}"
    )
    print(
        f"  instrument scan time (baseline: dwell x pixels)  {scan_s:9.1f} s "
        f"({scan_s / 3600:.2f} h); instrument clock span {rec['instrument_clock_s']:.1f} s; "
        f"recording took {rec['wall_s']:.1f} s of wall time here"
    )
    for label, r in (("same config", r_same), ("changed threshold", r_changed)):
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in r["stage_s"].items())
        print(
            f"  replay, {label:<18} {r['seconds']:9.1f} s  ({stages}; rest: reading and "
            f"recording)  -> {r['scan_s'] / r['seconds']:.0f}x faster than the scan "
            f"(target >= 10x)"
        )
    what = "the recorded config" if args.assessor is None else f"assessor {args.assessor}"
    print(
        f"  replay with {what}: {identical} of {len(replayed)} decisions identical to the "
        f"recorded ones; the changed threshold changed the action on {len(diff.differences)} "
        f"frames"
    )
    print(f"  details: {OUT / 'replay_speed.json'}")


if __name__ == "__main__":
    main()
