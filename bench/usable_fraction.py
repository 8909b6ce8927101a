"""Usable-frame fraction: rule policy vs no policy on the same seeds (spontaneously degrading tip).

    .venv/bin/python bench/usable_fraction.py --frames 500 --seeds 11 12 13

A frame is usable when the simulator's ground truth says the tip was good for the whole frame and
the area was not damaged by conditioning. Prints per-seed fractions and the ratio rule / none.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tqdm import tqdm

from agent.loop import Agent, AgentConfig, Step
from agent.perception.classical import ClassicalTipAssessor
from bench._common import machine
from drivers.registry import open_instrument
from policies.base import make_policy


def run_session(policy_name: str, seed: int, frames: int, surface: str) -> dict[str, float]:
    instrument = open_instrument("sim:stm", seed=seed, surface=surface)
    usable: list[bool] = []
    actions = 0
    bar = tqdm(total=frames, desc=f"{policy_name:>5} seed {seed}", unit="frame", leave=False)

    def on_step(step: Step) -> None:
        nonlocal actions
        usable.append(bool(step.frame.truth and step.frame.truth.usable))
        actions += sum(
            1
            for f in step.fates
            if f.fate == "executed" and f.command.kind in ("TipPulse", "TipDip")
        )
        bar.update(1)

    agent = Agent(
        instrument,
        make_policy(policy_name),
        assessor=ClassicalTipAssessor(),
        config=AgentConfig(frames=frames),
        on_step=on_step,
    )
    result = agent.run()
    bar.close()
    instrument.close()
    # frames the session did not reach (policy gave up) count as unusable
    fraction = sum(usable) / frames
    return {
        "usable_fraction": fraction,
        "frames_run": result.frames,
        "conditioning_actions": actions,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[11, 12, 13])
    parser.add_argument("--surface", default="au111")
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        none = run_session("none", seed, args.frames, args.surface)
        rule = run_session("rule", seed, args.frames, args.surface)
        rows.append({"seed": seed, "none": none, "rule": rule})
        print(
            f"seed {seed}: none {none['usable_fraction']:.3f}  rule {rule['usable_fraction']:.3f} "
            f"({rule['conditioning_actions']} conditioning actions, "
            f"{rule['frames_run']} frames run)"
        )
    mean_none = sum(r["none"]["usable_fraction"] for r in rows) / len(rows)
    mean_rule = sum(r["rule"]["usable_fraction"] for r in rows) / len(rows)
    ratio = mean_rule / mean_none if mean_none > 0 else float("inf")
    print(
        f"\nusable-frame fraction over {args.frames}-frame sessions, seeds {args.seeds}, "
        f"surface {args.surface}"
    )
    print(f"  no policy (baseline): {mean_none:.3f}")
    print(f"  rule policy:          {mean_rule:.3f}")
    print(f"  ratio rule / none:    {ratio:.2f}x   (target >= 2x)")
    print(f"  machine: {machine()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
