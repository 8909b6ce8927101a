"""CPU time per STM frame, this checkout against another one, frame by frame in lockstep.

    git worktree add /tmp/stm_base <commit>
    .venv/bin/python bench/stm_paired_cpu.py --old /tmp/stm_base [--frames 60] [--rounds 3]

Two worker processes, one per checkout, scan the same frame sequence as ``bench/sim_speed.py``
(seed 1, 16 nm at 256², 1 ms dwell, ground truth every frame), one frame at a time and
alternately (which one goes first swaps every frame), so both see the same load on a shared
machine. Each reports the CPU time of its frame (``time.process_time``). Printed per round:
medians over good-tip frames and over the rest (the tip is free to change), and the median of
the per-frame old/new ratios. Wall-clock frames/s is left to ``bench/sim_speed.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_WORKER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from drivers.frame import ScanRegion
from simulators.stm import STMSimulator
sim = STMSimulator(seed=1)
region = ScanRegion(0, 0, 16e-9, 16e-9)
for _ in sys.stdin:
    t0 = time.process_time()
    scan = sim.begin_frame(region, (256, 256), 1e-3)
    while not scan.done:
        scan.next_line()
    truth = scan.truth()
    good = truth.extra["lines_per_state"] == {"good": 256}
    print(f"{(time.process_time() - t0) * 1e3:.4f} {int(good)}", flush=True)
"""


class _Worker:
    def __init__(self, root: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if self.proc.stdin is None or self.proc.stdout is None:
            raise RuntimeError("worker pipes were not opened")
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout

    def frame(self) -> tuple[float, bool]:
        """CPU milliseconds of the worker's next frame and whether its tip was good throughout."""
        self.stdin.write("next\n")
        self.stdin.flush()
        ms, good = self.stdout.readline().split()
        return float(ms), good == "1"

    def close(self) -> None:
        self.stdin.close()
        self.proc.wait()


def _round(old_root: Path, new_root: Path, frames: int) -> None:
    workers = {"old": _Worker(old_root), "new": _Worker(new_root)}
    for w in workers.values():
        w.frame()  # warm-up frame (imports, caches)
    rows: list[tuple[float, float, bool]] = []
    for i in range(frames):
        order = ("old", "new") if i % 2 == 0 else ("new", "old")
        got = {name: workers[name].frame() for name in order}
        if got["old"][1] != got["new"][1]:
            raise SystemExit("the two checkouts' tips diverged: not the same frame sequence")
        rows.append((got["old"][0], got["new"][0], got["old"][1]))
    for w in workers.values():
        w.close()
    for label, keep in (("good tip", True), ("other", False)):
        sel = [r for r in rows if r[2] == keep]
        if not sel:
            continue
        old = statistics.median(r[0] for r in sel)
        new = statistics.median(r[1] for r in sel)
        ratio = statistics.median(r[0] / r[1] for r in sel)
        print(
            f"  {label:<9} {len(sel):3d} frames: old {old:6.2f} ms, new {new:6.2f} ms, "
            f"median old/new {ratio:.3f}"
        )
    ratio = statistics.median(r[0] / r[1] for r in rows)
    print(f"  all       {len(rows):3d} frames: median old/new {ratio:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="baseline checkout")
    parser.add_argument("--new", type=Path, default=ROOT, help="default: this checkout")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for r in range(args.rounds):
        load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
        print(f"round {r + 1}, load average {load}")
        _round(args.old.resolve(), args.new.resolve(), args.frames)


if __name__ == "__main__":
    main()
