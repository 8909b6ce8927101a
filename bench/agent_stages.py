"""What the recorded perception stages and the mid-scan tip watch cost the agent loop.

    .venv/bin/python bench/agent_stages.py --frames 20 --repeats 3

Two pairs of sessions, each pair run alternately ``--repeats`` times in this process (same
seeds, same frames), recorded to zarr as ``scopepilot run`` does:

- STEM (256², 0.025 nm pixels, rule policy with dose control): no stages vs ``sr`` + ``defects``
  (sr image recorded as float16). Reports the agent's overhead per frame (wall time minus the
  time inside the simulated instrument), the sr/defects stage latencies and the ratio.
- STM (256², tipnet assessor): ``early_abort`` off vs on, with no tip change (the watch runs
  every 16 lines and never aborts): the cost of watching.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from agent.loop import AgentConfig
from agent.pipeline import build_pipeline
from agent.recorder import SessionRecorder
from bench._common import TimedInstrument, machine
from drivers.registry import open_instrument


def session(uri: str, config: dict[str, Any], frames: int, workdir: Path) -> dict[str, float]:
    options: dict[str, Any] = {"seed": 11}
    if uri == "sim:stm":
        options["lines_per_chunk"] = 16
    instrument = TimedInstrument(open_instrument(uri, **options))
    kind = instrument.info().kind
    pipeline = build_pipeline(config, kind=kind)
    store = workdir / "s.zarr"
    with SessionRecorder(store, overwrite=True, config=config) as recorder:
        agent = pipeline.agent(instrument, recorder=recorder, config=AgentConfig(frames=frames))
        t0 = time.perf_counter()
        result = agent.run()
        wall_s = time.perf_counter() - t0
    instrument.close()
    out = {"overhead_ms": (wall_s - instrument.seconds) / result.frames * 1e3}
    for stage in ("sr", "defects", "watch", "perceive"):
        stats = result.latencies_s.get(stage)
        if stats is not None and len(stats):
            out[f"{stage}_ms"] = stats.mean_s * 1e3
            out[f"{stage}_per_frame_ms"] = stats.total_s / result.frames * 1e3
    shutil.rmtree(store, ignore_errors=True)
    return out


def pair(
    label: str, uri: str, base: dict[str, Any], new: dict[str, Any], args: argparse.Namespace
) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="scopepilot-bench-"))
    runs: dict[str, list[dict[str, float]]] = {"base": [], "new": []}
    session(uri, new, 2, workdir)  # warm-up: model loading, first-call costs
    for _ in range(args.repeats):
        runs["base"].append(session(uri, base, args.frames, workdir))
        runs["new"].append(session(uri, new, args.frames, workdir))
    shutil.rmtree(workdir, ignore_errors=True)
    b = median(r["overhead_ms"] for r in runs["base"])
    n = median(r["overhead_ms"] for r in runs["new"])
    print(f"{label}: {args.frames} frames x {args.repeats} alternating runs each")
    print(f"  agent overhead per frame, baseline   {b:9.1f} ms (median of runs)")
    print(f"  agent overhead per frame, with       {n:9.1f} ms")
    print(f"  ratio with / baseline                {n / b:9.2f}")
    for key in sorted(runs["new"][0]):
        if key != "overhead_ms":
            print(f"  {key:<36}{median(r[key] for r in runs['new']):9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}, torch threads {args.threads}")
    stem = {"policy": "rule", "policy_options": {"target_snr": 5.0}}
    pair(
        "STEM, sr + defects stages vs none",
        "sim:stem",
        stem,
        {**stem, "perception": ["sr", "defects"]},
        args,
    )
    stm = {"policy": "rule", "assessor": "tipnet"}
    pair("STM tipnet, early_abort on vs off", "sim:stm", stm, {**stm, "early_abort": True}, args)


if __name__ == "__main__":
    main()
