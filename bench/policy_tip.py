"""Tip conditioning: the RL policy against a random policy and the rule ladder (issue 4).

    python bench/policy_tip.py --episodes 200          # held-out seeds 1000000..1000199
    python bench/policy_tip.py --latency-only          # only the decision latency
    python bench/policy_tip.py --oracle --episodes 200 # bounds: acting on the true tip state

Runs :func:`agent.cli_policies.evaluate_tip` (random, rule ladder and the shipped RL network
on the same held-out episodes of ``sim:stm``, all judged by the tip network with its classical
fallback; ``--assessor classical`` for the classical assessor alone), then times the
deployed policy's ``decide`` (the whole decision: observation vector, mask, network, commands)
against the rule policy's on the same observations. Prints each figure as a ratio against its
baseline and writes ``bench/out/policy_tip/results.json`` and ``actions.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.cli_policies import evaluate_tip, plot_tip, tip_env_factory  # noqa: E402
from bench._common import machine  # noqa: E402
from drivers.observation import Observation  # noqa: E402
from policies.rl import RLTipPolicy  # noqa: E402
from policies.rule import RulePolicy  # noqa: E402


def decision_latency(samples: int = 300, assessor: str = "tipnet") -> dict[str, float]:
    """Median and 99th-percentile ``decide`` time (s) of the RL and the rule tip policies."""
    env = tip_env_factory(assessor)()
    observations: list[Observation] = []
    seed = 2_000_000
    while len(observations) < samples:
        env.reset(seed=seed)
        seed += 1
        for _ in range(5):
            inst = env.instrument
            observations.append(
                Observation(
                    frame=env.last_frame,
                    tip=env.estimate,
                    state=inst.state(),
                    info=inst.info(),
                    history=env.history,
                )
            )
            mask = env.action_masks()
            _, _, terminated, truncated, _ = env.step(int(mask.nonzero()[0][-1]))
            if terminated or truncated:
                break
    env.close()
    out: dict[str, float] = {}
    for name, policy in (("rl", RLTipPolicy()), ("rule", RulePolicy.from_options())):
        times = []
        for obs in observations[:samples]:
            policy.reset()
            t0 = time.perf_counter()
            policy.decide(obs)
            times.append(time.perf_counter() - t0)
        times.sort()
        out[f"{name}_median_s"] = statistics.median(times)
        out[f"{name}_p99_s"] = times[int(0.99 * (len(times) - 1))]
    return out


def oracle_bounds(episodes: int, seed: int, assessor: str) -> str:
    """Two oracles that act on the simulator's true tip state (the fastest action per state, and
    the gentle one of the response table's Markov chain) on the held-out seeds."""
    import numpy as np

    from policies.evaluation import (
        ORACLE_FASTEST,
        ORACLE_GENTLE,
        oracle_chooser,
        run_tip_episode,
        summarize_tip,
    )

    env = tip_env_factory(assessor)()
    lines = [f"oracles on the true tip state, {episodes} episodes (seeds {seed}..)"]
    for name, table in (("fastest", ORACLE_FASTEST), ("gentle", ORACLE_GENTLE)):
        choose = oracle_chooser(table)
        runs = [run_tip_episode(env, choose, seed=seed + i, policy=name) for i in range(episodes)]
        s = summarize_tip(runs)
        acts = np.array([e.actions for e in runs])
        lines.append(
            f"oracle {name:8} success {s['success_rate']:.1%}, actions median "
            f"{s['actions']['median']:.1f} (P(<=1) {(acts <= 1).mean():.2f}, P(<=2) "
            f"{(acts <= 2).mean():.2f}, mean {acts.mean():.2f}), damage mean "
            f"{s['damaged_nm2']['mean']:.0f} nm²"
        )
    env.close()
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1_000_000)
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "out" / "policy_tip"))
    parser.add_argument(
        "--latency-only", action="store_true", help="only time the decisions (no episodes)"
    )
    parser.add_argument(
        "--assessor", default="tipnet", choices=("classical", "tipnet"), help="tip perception"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--oracle", action="store_true", help="only the true-state oracles (bounds, no policies)"
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out_dir)
    if args.oracle:
        print(oracle_bounds(args.episodes, args.seed, args.assessor))
        return 0
    if args.latency_only:
        lat = decision_latency(assessor=args.assessor)
        print(
            f"decision latency: rl median {lat['rl_median_s'] * 1e3:.3f} ms, p99 "
            f"{lat['rl_p99_s'] * 1e3:.3f} ms (target <= 2 ms); rule median "
            f"{lat['rule_median_s'] * 1e3:.3f} ms; machine: {machine()}"
        )
        return 0
    report = evaluate_tip(args.episodes, seed=args.seed, assessor=args.assessor)
    latency = decision_latency(assessor=args.assessor)
    report["latency"] = latency
    report["machine"] = machine()
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    plot_tip(report, out / "actions.png")
    print(report["table"])
    rl = report["summary"]["rl"]
    print(f"success within 100 actions: rl {rl['success_rate']:.1%} (target >= 99 %)")
    print(
        f"decision latency: rl median {latency['rl_median_s'] * 1e3:.3f} ms, p99 "
        f"{latency['rl_p99_s'] * 1e3:.3f} ms (target <= 2 ms); rule median "
        f"{latency['rule_median_s'] * 1e3:.3f} ms; ratio rl/rule "
        f"{latency['rl_median_s'] / latency['rule_median_s']:.2f}"
    )
    print(f"machine: {report['machine']}; wall {report['wall_s']:.0f} s; results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
