"""Agent overhead per frame vs the simulated acquisition time of that frame, and simulator speed.

    .venv/bin/python bench/agent_overhead.py --frames 100 --shape 256

Overhead = wall time of the whole session (acquisition, recording to a zarr store, perception,
decision, gate) minus the wall time spent inside the simulated instrument. The acquisition time a
real STM needs for the same frame is its simulated scan time (trace + retrace at the given dwell;
1 ms dwell on 16 nm lines = 62.5 nm/s, a typical STM scan speed). Target ratio < 0.01.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from tqdm import tqdm

from agent.loop import Agent, AgentConfig, Step
from agent.perception.classical import ClassicalTipAssessor
from agent.recorder import SessionRecorder
from bench._common import TimedInstrument, machine
from drivers.frame import ScanRegion
from drivers.registry import open_instrument
from policies.base import make_policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--shape", type=int, default=256)
    parser.add_argument("--dwell-ms", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    inner = open_instrument(
        "sim:stm",
        seed=args.seed,
        shape_px=(args.shape, args.shape),
        dwell_s=args.dwell_ms * 1e-3,
        region=ScanRegion(0, 0, 16e-9, 16e-9),
    )
    instrument = TimedInstrument(inner)
    workdir = Path(tempfile.mkdtemp(prefix="scopepilot-bench-"))
    recorder = SessionRecorder(workdir / "s.zarr")
    bar = tqdm(total=args.frames, unit="frame", leave=False)
    sim_times: list[float] = []

    def on_step(step: Step) -> None:
        sim_times.append(step.frame.timestamp_s)
        bar.update(1)

    agent = Agent(
        instrument,
        make_policy("rule"),
        assessor=ClassicalTipAssessor(),
        recorder=recorder,
        config=AgentConfig(frames=args.frames),
        on_step=on_step,
    )
    t0 = time.perf_counter()
    result = agent.run()
    total_s = time.perf_counter() - t0
    bar.close()
    recorder.close()
    shutil.rmtree(workdir, ignore_errors=True)
    frames = result.frames
    overhead_s = (total_s - instrument.seconds) / frames
    frame_time_s = 2 * args.shape * args.shape * args.dwell_ms * 1e-3
    print(
        f"{frames} frames of {args.shape}x{args.shape}, dwell {args.dwell_ms} ms, rule policy, "
        f"classical assessor, zarr recording"
    )
    print(f"  session wall time              {total_s:8.2f} s")
    print(
        f"  inside the simulator           {instrument.seconds:8.2f} s  "
        f"({frames / instrument.seconds:.1f} simulated frames/s)"
    )
    print(f"  agent overhead per frame       {overhead_s * 1e3:8.2f} ms")
    for stage in ("perceive", "decide", "gate", "record"):
        stats = result.latencies_s.get(stage)
        values = np.asarray(stats.sample_s if stats is not None else [0.0])
        print(
            f"    {stage:<10} mean {values.mean() * 1e3:7.2f} ms   p95 "
            f"{np.percentile(values, 95) * 1e3:7.2f} ms"
        )
    print(f"  simulated acquisition / frame  {frame_time_s:8.1f} s (trace + retrace)")
    print(f"  ratio overhead / acquisition   {overhead_s / frame_time_s:.2e}   (target < 0.01)")
    print(f"  machine: {machine()}")


if __name__ == "__main__":
    main()
