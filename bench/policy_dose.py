"""Dose control: the RL dwell policy against the best fixed dwell and the SNR rule (issue 4).

    python bench/policy_dose.py --episodes 200         # held-out seeds 1000000..1000199
    python bench/policy_dose.py --episodes 200 --sr-weights F.pt   # + an sr-aware policy

Runs :func:`agent.cli_policies.evaluate_dose` on ``sim:stem`` surveys (20 frames each, beam
current and specimen drawn per survey): the shipped RL network, the rule of
:mod:`policies.dose`, and fixed dwells, bisected for the shortest that meets the target in at
least 95 % of frames (the *best fixed dwell*). With ``--sr-weights`` (a file of
``scopepilot train-policy dose --sr``) also that policy, row ``rl-sr``, with the sr stage run on
every frame and the share of frames it relied on sr for.
Prints the dose ratio and writes ``bench/out/policy_dose/results.json`` and ``dose.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.cli_policies import evaluate_dose, plot_dose  # noqa: E402
from bench._common import machine  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1_000_000)
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "out" / "policy_dose"))
    parser.add_argument("--sr-weights", help="also this sr-aware policy file (row rl-sr)")
    args = parser.parse_args()
    out = Path(args.out_dir)
    report = evaluate_dose(args.episodes, seed=args.seed, sr_weights=args.sr_weights)
    report["machine"] = machine()
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    plot_dose(report, out / "dose.png")
    print(report["table"])
    print(f"machine: {report['machine']}; wall {report['wall_s']:.0f} s; results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
