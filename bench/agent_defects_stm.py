"""What the STM defects model costs a ``sim:stm`` session when the ``defects`` stage runs.

    nice -n 10 .venv/bin/python bench/agent_defects_stm.py --frames 20 --repeats 3

CPU time, not wall time (the shared VM's wall clock is meaningless under load): ``sim:stm``
sessions of the default frames (256², 16 nm: 0.0625 nm pixels, inside the STM model's
0.03–0.12 nm), rule policy, classical assessor, recorded to zarr as ``scopepilot run`` does,
without stages and with ``defects`` (the STM model, chosen by the instrument kind), run
alternately ``--repeats`` times in this process with the same seed (the same frames and
decisions: the policy does not read the defect list). Reports the process CPU time per frame of
each, the difference and ratio, and the stage's own CPU time per frame (``time.thread_time``
around :meth:`DefectsStage.run` on the same frames, outside the loop).

``--accuracy-seeds 0 1 --accuracy-frames 100`` also runs those default sessions through
``scopepilot run --perception defects`` and scores the recorded defect lists against the
simulator's true defects (match within 1 Å), by the tip assessor's verdict and by the true tip
state, with the frames over damaged area (ground truth) apart.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from agent.loop import AgentConfig
from agent.perception.stages import DefectsStage
from agent.perception.tasks.stem_metrics import match_positions
from agent.pipeline import build_pipeline
from agent.recorder import SessionRecorder
from agent.session import Session
from bench._common import machine
from drivers.registry import open_instrument

SEED = 11


def session_cpu_s(config: dict[str, Any], frames: int, workdir: Path) -> float:
    """Process CPU seconds per frame of one recorded session."""
    instrument = open_instrument("sim:stm", seed=SEED)
    pipeline = build_pipeline(config, kind=instrument.info().kind)
    store = workdir / "s.zarr"
    c0 = time.process_time()
    with SessionRecorder(store, overwrite=True, config=config) as recorder:
        agent = pipeline.agent(instrument, recorder=recorder, config=AgentConfig(frames=frames))
        result = agent.run()
    cpu_s = time.process_time() - c0
    instrument.close()
    shutil.rmtree(store, ignore_errors=True)
    return cpu_s / result.frames


def stage_cpu_s(frames: int) -> tuple[float, str]:
    """Median thread CPU seconds of the defects stage on ``frames`` default sim:stm frames, and
    the stage's version."""
    instrument = open_instrument("sim:stm", seed=SEED)
    shots = [instrument.acquire() for _ in range(frames)]
    instrument.close()
    stage = DefectsStage(sample="stm")
    stage.run(shots[0])  # first-call costs
    times = []
    for frame in shots:
        c0 = time.thread_time()
        out = stage.run(frame)
        times.append(time.thread_time() - c0)
        if out.fields["defects_summary"]["reject"]:
            raise SystemExit(f"the stage rejected a default frame: {out.fields}")
    return median(times), stage.version


def accuracy(seed: int, frames: int, workdir: Path) -> None:
    """Score the defect lists of a default ``scopepilot run`` on sim:stm with the stage on."""
    from agent.cli import main as cli

    store = workdir / f"acc{seed}.zarr"
    argv = ["run", "--instrument", "sim:stm", "--frames", str(frames), "--seed", str(seed)]
    if cli([*argv, "--perception", "defects", "--quiet", "--out", str(store)]) != 0:
        raise SystemExit("scopepilot run failed")
    session = Session(store)
    perception = {e["payload"]["frame"]: e["payload"] for e in session.events("perception")}
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # frames, tp, fp, fn
    for row in range(len(session)):
        frame, p = session.frame(row), perception.get(row)
        if p is None or "defects_summary" not in p or frame.truth is None:
            continue
        h, w = frame.shape
        truth = [
            d for d in frame.truth.defects if 0 <= d.row_px <= h - 1 and 0 <= d.col_px <= w - 1
        ]
        tp = len(
            match_positions(
                np.array([(f["row_px"], f["col_px"]) for f in p["defects"]]),
                np.array([(d.row_px, d.col_px) for d in truth]),
                0.1e-9 / frame.pixel_size_m[1],
            )
        )
        verdict = (p.get("tip") or {}).get("state", "none")
        true_state = str(frame.truth.tip_state)
        damaged = frame.truth.damaged_fraction > 0
        keys = [f"verdict {verdict}", f"true {true_state}"]
        keys.append(f"true {true_state}, {'damaged' if damaged else 'undamaged'} area")
        for key in keys:
            g = groups[key]
            g[0] += 1
            g[1] += tp
            g[2] += len(p["defects"]) - tp
            g[3] += len(truth) - tp
    print(f"sim:stm default session, seed {seed}, {frames} frames: defects matched within 1 Å")
    for key in sorted(groups):
        n, tp, fp, fn = groups[key]
        precision = tp / (tp + fp) if tp + fp else float("nan")
        recall = tp / (tp + fn) if tp + fn else float("nan")
        print(
            f"  {key:<34} frames {n:3d}  TP {tp:4d} FP {fp:4d} FN {fn:4d}  "
            f"precision {precision:.2f} recall {recall:.2f}"
        )
    shutil.rmtree(store, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--accuracy-seeds", type=int, nargs="*", default=[])
    parser.add_argument("--accuracy-frames", type=int, default=100)
    parser.add_argument("--skip-cost", action="store_true", help="only the accuracy sessions")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}, torch threads {args.threads}")
    base = {"policy": "rule", "assessor": "classical"}
    new = {**base, "perception": ["defects"]}
    workdir = Path(tempfile.mkdtemp(prefix="scopepilot-bench-"))
    for seed in args.accuracy_seeds:
        accuracy(seed, args.accuracy_frames, workdir)
    if args.skip_cost:
        shutil.rmtree(workdir, ignore_errors=True)
        return
    session_cpu_s(new, 2, workdir)  # warm-up: model loading, first-call costs
    runs: dict[str, list[float]] = {"base": [], "new": []}
    for _ in range(args.repeats):
        runs["base"].append(session_cpu_s(base, args.frames, workdir))
        runs["new"].append(session_cpu_s(new, args.frames, workdir))
    shutil.rmtree(workdir, ignore_errors=True)
    b, n = median(runs["base"]), median(runs["new"])
    stage_s, version = stage_cpu_s(args.frames)
    print(f"sim:stm 256² at 0.0625 nm: {args.frames} frames x {args.repeats} alternating runs")
    print("  runs, CPU ms per frame, without: " + ", ".join(f"{v * 1e3:.1f}" for v in runs["base"]))
    print("  runs, CPU ms per frame, with:    " + ", ".join(f"{v * 1e3:.1f}" for v in runs["new"]))
    print(f"  session CPU per frame, without defects   {b * 1e3:9.1f} ms (median of runs)")
    print(f"  session CPU per frame, with defects      {n * 1e3:9.1f} ms")
    print(f"  added CPU per frame                      {(n - b) * 1e3:9.1f} ms")
    print(f"  ratio with / without                     {n / b:9.2f}")
    print(f"  defects stage alone ({version}), thread CPU per frame {stage_s * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
