"""Bit-identity check of the STM forward model: one sha256 per scenario, here and in another tree.

    .venv/bin/python bench/stm_frame_hash.py [--against /path/to/other/checkout]

Each scenario scans frames line by line and hashes every line as returned, the frame buffer
(partway and at the end) and the ground truth (clean image, defects with pixel positions, tip
states, damage, ``extra``). Scenarios: 3 seeds x 2 surfaces x 5 initial tip states (2 frames
each), action sequences between lines (pulse, dip, advance, move, bias change, retract and
approach, a double tip with given apexes, back to good) on rotated and non-square regions,
``render_clean``, and 12 consecutive frames of the ``bench/sim_speed.py`` case. With
``--against``, the same scenarios run on that checkout's code in a subprocess and the hashes
are compared (speed work on the simulator should leave them all equal).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _scenarios() -> dict[str, str]:
    import numpy as np

    from drivers.frame import GroundTruth, ScanRegion, TipState
    from simulators.stm import STMConfig, STMSimulator

    Action = Callable[[STMSimulator], object]

    def add_truth(h: hashlib._Hash, truth: GroundTruth) -> None:
        h.update(np.ascontiguousarray(truth.clean).tobytes())
        h.update(repr(truth.defects).encode())
        h.update(repr((truth.tip_state, truth.tip_states, truth.damaged_fraction)).encode())
        h.update(json.dumps(truth.extra, sort_keys=True, default=str).encode())

    def scan(
        sim: STMSimulator,
        h: hashlib._Hash,
        region: ScanRegion,
        shape: tuple[int, int],
        dwell_s: float,
        actions: dict[int, Action] | None = None,
    ) -> None:
        frame = sim.begin_frame(region, shape, dwell_s)
        row = 0
        while not frame.done:
            h.update(frame.next_line().tobytes())
            if actions and row in actions:
                actions[row](sim)
            if row % 50 == 7:
                h.update(frame.data.tobytes())
            row += 1
        h.update(frame.data.tobytes())
        add_truth(h, frame.truth())

    out: dict[str, str] = {}
    square = ScanRegion(0, 0, 16e-9, 16e-9)
    for surface in ("au111", "hsi100"):
        for seed in (1, 2, 7):
            for tip in TipState:
                h = hashlib.sha256()
                sim = STMSimulator(STMConfig(surface=surface, initial_tip=tip), seed=seed)
                n = 256 if tip is TipState.GOOD else 128
                for _ in range(2):
                    scan(sim, h, square, (n, n), 1e-3)
                out[f"{surface}/seed {seed}/{tip}"] = h.hexdigest()[:16]
    actions: dict[int, Action] = {
        10: lambda s: s.pulse(3.0, 0.02),
        40: lambda s: s.advance(30.0),
        60: lambda s: s.dip(0.8e-9, 0.1),
        80: lambda s: s.move_to(2e-9, -3e-9),
        90: lambda s: s.set_bias(-1.0),
        100: lambda s: s.retract(),
        105: lambda s: s.approach(),
        110: lambda s: s.set_tip("multiple", [(0, 0, 0), (1e-9, 0.5e-9, 0.5e-10)]),
        120: lambda s: s.set_tip("good"),
    }
    for seed in (1, 3):
        for surface in ("au111", "hsi100"):
            h = hashlib.sha256()
            config = STMConfig(
                surface=surface, degradation_rate_per_s=1 / 200, bad_tip_change_rate_per_s=1 / 300
            )
            sim = STMSimulator(config, seed=seed)
            rotated = ScanRegion(1e-9, 2e-9, 12e-9, 10e-9, rotation_deg=17.0)
            scan(sim, h, rotated, (128, 96), 5e-4, actions)
            scan(sim, h, square, (256, 256), 1e-3, {5: lambda s: s.pulse(4.0, 0.05)})
            scan(sim, h, ScanRegion(0, 0, 40e-9, 40e-9, rotation_deg=-30.0), (100, 140), 2e-4)
            sim.move_to(300e-9, 200e-9)
            for _ in range(3):
                scan(sim, h, ScanRegion(300e-9, 200e-9, 8e-9, 8e-9), (64, 64), 1e-3)
            clean = sim.render_clean(ScanRegion(5e-9, 0, 30e-9, 30e-9, 45.0), (90, 70))
            h.update(clean.tobytes())
            out[f"actions/{surface}/seed {seed}"] = h.hexdigest()[:16]
    h = hashlib.sha256()
    sim = STMSimulator(seed=1)
    for _ in range(12):
        scan(sim, h, square, (256, 256), 1e-3)
    out["sim_speed case, 12 frames"] = h.hexdigest()[:16]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", type=Path, help="another checkout to compare with")
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(args.root.resolve()))  # this checkout's (or --root's) code
    if args.json:
        print(json.dumps(_scenarios()))
        return
    here = _scenarios()
    there: dict[str, str] = {}
    if args.against is not None:
        other = str(args.against.resolve())
        command = [sys.executable, __file__, "--json", "--root", other]
        result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=other)
        there = json.loads(result.stdout.strip().splitlines()[-1])
    same = 0
    for name, digest in here.items():
        mark = ""
        if there:
            mark = "same" if there.get(name) == digest else f"DIFFERENT ({there.get(name)})"
            same += there.get(name) == digest
        print(f"{name:<32}{digest}  {mark}")
    if there:
        print(f"{same} of {len(here)} scenarios identical")
        if same != len(here):
            sys.exit(1)


if __name__ == "__main__":
    main()
