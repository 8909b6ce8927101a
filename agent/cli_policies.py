"""``scopepilot train-policy`` and ``scopepilot evaluate-policy``: the RL policies' commands.

    scopepilot train-policy tip --steps 16000 --seed 0        # -> policies/weights/rl_tip.pt
    scopepilot train-policy dose --steps 16000 --seed 0       # -> policies/weights/rl_dose.pt
    scopepilot train-policy dose --sr --out F.pt  # + "rely on sr" (26 actions, sr features)
    scopepilot train-policy scan --bc-episodes 300 --steps 16000 --learning-rate 1e-4 --ent-coef 0
        # -> policies/weights/rl_scan.pt: the survey-then-zoom rule cloned (DAgger), then PPO
    scopepilot evaluate-policy tip --episodes 200     # table + plots in bench/out/policy_tip
    scopepilot evaluate-policy dose --sr-weights F.pt  # + the sr-aware policy's row (rl-sr)

The environments live in :mod:`policies` and take their perception from here (policies never
import the agent): the tip environment gets the trained tip network (with its classical fallback
on frames it is unsure of; ``--assessor classical``: the classical assessor alone), the dose
environment the image-quality assessor. The scan-planning
environment needs no perception model (its cheap detector is part of the policy's map,
:mod:`policies.scan_map`); its evaluation lives in :mod:`policies.scan_eval`.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Handler = Callable[[argparse.Namespace], int]
KINDS = ("tip", "dose", "scan")
DEFAULT_OUT_DIR = Path("bench/out")


def register(sub: Any) -> dict[str, Handler]:
    train = sub.add_parser("train-policy", help="train an RL policy in simulation (MaskablePPO)")
    train.add_argument("kind", choices=KINDS)
    train.add_argument("--steps", type=int, default=16000, help="environment steps (default 16000)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--n-envs", type=int, default=4, help="parallel environments (default 4)")
    train.add_argument(
        "--subproc", action="store_true", help="one process per environment (SubprocVecEnv)"
    )
    train.add_argument("--out", help="policy file (default policies/weights/rl_KIND.pt)")
    train.add_argument("--png", help="learning curve (default: the policy file with .png)")
    train.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    train.add_argument("--gamma", type=float, default=0.97, help="discount factor (default 0.97)")
    train.add_argument(
        "--learning-rate", type=float, default=1e-3, help="PPO learning rate (default 1e-3)"
    )
    train.add_argument(
        "--ent-coef", type=float, default=0.01, help="PPO entropy bonus (default 0.01)"
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument(
        "--bc-episodes",
        type=int,
        default=0,
        help="scan only: behaviour-clone the survey-then-zoom rule on this many episodes "
        "(DAgger) before PPO; 0: no warm start (default). With it, --steps may be 0",
    )
    train.add_argument(
        "--bc-rounds", type=int, default=3, help="DAgger rounds of the warm start (default 3)"
    )
    train.add_argument(
        "--bc-epochs", type=int, default=20, help="epochs per warm-start round (default 20)"
    )
    train.add_argument(
        "--assessor",
        default="tipnet",
        choices=("classical", "tipnet"),
        help="tip perception (default tipnet)",
    )
    train.add_argument(
        "--sr",
        action="store_true",
        help="dose only: also choose whether to rely on the sr model's recovered image per "
        "frame (26 actions, sr stage features; run it with the rl-dose option sr=true; "
        "default file policies/weights/rl_dose_sr.pt)",
    )

    evaluate = sub.add_parser(
        "evaluate-policy", help="compare an RL policy with its baselines on held-out episodes"
    )
    evaluate.add_argument("kind", choices=KINDS)
    evaluate.add_argument("--episodes", type=int, default=200, help="episodes per policy")
    evaluate.add_argument("--seed", type=int, default=1_000_000, help="first held-out seed")
    evaluate.add_argument("--weights", help="policy file (default: the shipped one)")
    evaluate.add_argument("--out-dir", help="where the JSON and plots go (bench/out/policy_KIND)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.add_argument(
        "--assessor",
        default="tipnet",
        choices=("classical", "tipnet"),
        help="tip perception (default tipnet)",
    )
    evaluate.add_argument(
        "--sr-weights",
        help="dose only: also evaluate this sr-aware policy file (train-policy dose --sr) on "
        "the same surveys, with the sr stage run on every frame (row rl-sr)",
    )
    return {"train-policy": _cmd_train, "evaluate-policy": _cmd_evaluate}


def make_tip_assessor(name: str = "tipnet") -> Any:
    """The tip assessor the environment judges frames with: ``classical`` or ``tipnet`` (the
    trained network of :mod:`agent.perception.tip_net`, with its classical fallback and the
    defect-pair cue, as in a session)."""
    from drivers.errors import ConfigError

    if name == "classical":
        from agent.perception.classical import ClassicalTipAssessor

        return ClassicalTipAssessor()
    if name == "tipnet":
        from agent.perception.tip_net import TipNetAssessor
        from agent.perception.tip_pairs import PairSettings

        # with the defect-pair cue, as the agent's ``tipnet`` assessor runs (ADR 0014)
        return TipNetAssessor(baseline=False, pairs=PairSettings())
    raise ConfigError(f"unknown tip assessor {name!r}; choose 'classical' or 'tipnet'")


def tip_env_factory(assessor: str = "tipnet") -> Callable[[], Any]:
    from policies.env_tip import TipConditioningEnv

    make_tip_assessor(assessor)  # fail early on a bad name or missing weights
    return lambda: TipConditioningEnv(make_tip_assessor(assessor))


def dose_env_factory(*, sr: bool = False) -> Callable[[], Any]:
    """The dose environment with the image-quality assessor; with ``sr`` also the "rely on sr"
    choice, fed by the agent's own ``sr`` frame stage (:class:`~agent.perception.stages.SrStage`,
    the recovered image kept as a session records it)."""
    from agent.perception.quality import ImageQualityAssessor
    from policies.env_dose import DoseControlEnv, DoseEnvConfig

    if not sr:
        return lambda: DoseControlEnv(ImageQualityAssessor())
    from agent.perception.stages import SrStage

    SrStage()  # fail early on missing sr weights
    return lambda: DoseControlEnv(ImageQualityAssessor(), DoseEnvConfig(sr=True), sr=SrStage())


def scan_env_factory() -> Callable[[], Any]:
    from policies.env_scan import ScanPlanningEnv

    return ScanPlanningEnv


def scan_warm_start(
    episodes: int, *, rounds: int, epochs: int, gamma: float, seed: int, progress: bool
) -> Callable[[Any], dict[str, Any]]:
    """The scan policy's warm start: behaviour cloning of the survey-then-zoom rule
    (:func:`policies.imitation.warm_start`) on its own environment."""
    from policies.env_scan import ScanPlanningEnv
    from policies.imitation import BCSettings, warm_start
    from policies.scan_eval import rule_scan_chooser

    settings = BCSettings(episodes=episodes, rounds=rounds, epochs=epochs, gamma=gamma)

    def run(policy: Any) -> dict[str, Any]:
        env = ScanPlanningEnv()
        try:
            info = warm_start(
                policy, env, rule_scan_chooser, settings, seed=seed, progress=progress
            )
        finally:
            env.close()
        return {**info, "bc_expert": "scan_eval.rule_scan_chooser (bright_min 3, misses 3)"}

    return run


def _cmd_train(args: argparse.Namespace) -> int:
    from drivers.errors import ConfigError
    from policies.dose_features import DOSE_OBS_DIM, MARGINS
    from policies.rl_net import WEIGHTS_DIR
    from policies.scan_map import scan_n_actions, scan_obs_dim
    from policies.tip_actions import N_ACTIONS, OBS_DIM
    from policies.training import PPOSettings, train_masked_ppo

    if args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    if not 0 < args.gamma <= 1:
        raise ConfigError(f"--gamma must be in (0, 1], got {args.gamma}")
    if not (args.learning_rate > 0 and args.ent_coef >= 0):
        raise ConfigError(
            f"--learning-rate must be > 0 and --ent-coef >= 0, got {args.learning_rate}, "
            f"{args.ent_coef}"
        )
    if args.sr and args.kind != "dose":
        raise ConfigError("--sr is only available for the dose policy (the rely-on-sr choice)")
    if args.bc_episodes and args.kind != "scan":
        raise ConfigError("--bc-episodes is only available for the scan policy (its rule expert)")
    if args.bc_episodes < 0 or args.steps < (0 if args.bc_episodes else 1):
        raise ConfigError(
            f"--steps must be >= 1 (>= 0 with --bc-episodes) and --bc-episodes >= 0, got "
            f"--steps {args.steps}, --bc-episodes {args.bc_episodes}"
        )
    name = "rl_dose_sr" if args.sr else f"rl_{args.kind}"
    out = Path(args.out) if args.out else WEIGHTS_DIR / f"{name}.pt"
    png = Path(args.png) if args.png else out.with_suffix(".png")
    warm_start = None
    if args.kind == "tip":
        make, obs_dim, n_actions = tip_env_factory(args.assessor), OBS_DIM, N_ACTIONS
        assessor = make_tip_assessor(args.assessor)
        meta: dict[str, Any] = {"perception": f"{assessor.name} {assessor.version}"}
    elif args.kind == "scan":
        from policies.env_scan import ScanEnvConfig

        scan = ScanEnvConfig()
        grid = scan.grid
        make, obs_dim, n_actions = scan_env_factory(), scan_obs_dim(grid), scan_n_actions(grid)
        meta = {
            "perception": "scan_map.detect_dopants 1",
            "grid": grid,
            "tile_m": scan.tile_m,
            "budget": scan.budget,
            "time_scale_s": scan.time_scale_s,
            "env": json.dumps(scan.__dict__),
        }
        if args.bc_episodes:
            warm_start = scan_warm_start(
                args.bc_episodes,
                rounds=args.bc_rounds,
                epochs=args.bc_epochs,
                gamma=args.gamma,
                seed=args.seed,
                progress=not args.quiet,
            )
    elif not args.sr:
        make, obs_dim, n_actions = dose_env_factory(), DOSE_OBS_DIM, len(MARGINS)
        meta = {"perception": "snr quality assessor 1", "target_snr": 5.0}
    else:
        from agent.perception.stages import SrStage
        from policies.dose_features import DOSE_SR_OBS_DIM, SR_FEATURES_VERSION, SR_N_ACTIONS

        make, obs_dim, n_actions = dose_env_factory(sr=True), DOSE_SR_OBS_DIM, SR_N_ACTIONS
        meta = {
            "perception": "snr quality assessor 1",
            "target_snr": 5.0,
            "sr": 1,
            "sr_features": SR_FEATURES_VERSION,
            "sr_model": SrStage().version,
            "actions": "13 margins x {raw frame, sr image}",
        }
    result = train_masked_ppo(
        args.kind,
        make,
        obs_dim=obs_dim,
        n_actions=n_actions,
        steps=args.steps,
        seed=args.seed,
        out=out,
        n_envs=args.n_envs,
        subproc=args.subproc,
        settings=PPOSettings(
            gamma=args.gamma, learning_rate=args.learning_rate, ent_coef=args.ent_coef
        ),
        curve_png=png,
        progress=not args.quiet,
        meta=meta,
        checkpoint_every=2000,
        threads=args.threads,
        warm_start=warm_start,
    )
    print(
        f"trained {args.kind} policy: {result.steps} steps, {len(result.episodes)} episodes, "
        f"{result.wall_s:.0f} s; weights {result.policy_path} (sha256 {result.sha256[:12]}); "
        f"learning curve {result.curve_path}"
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from drivers.errors import ConfigError

    if args.episodes < 1:
        raise ConfigError(f"--episodes must be >= 1, got {args.episodes}")
    if args.sr_weights and args.kind != "dose":
        raise ConfigError("--sr-weights is only available for the dose policy")
    out_dir = Path(args.out_dir) if args.out_dir else DEFAULT_OUT_DIR / f"policy_{args.kind}"
    if args.kind == "scan":
        from policies.scan_eval import evaluate_scan, plot_scan

        report = evaluate_scan(
            args.episodes, seed=args.seed, weights=args.weights, progress=not args.quiet
        )
    elif args.kind == "tip":
        report = evaluate_tip(
            args.episodes,
            seed=args.seed,
            weights=args.weights,
            progress=not args.quiet,
            assessor=args.assessor,
        )
    else:
        report = evaluate_dose(
            args.episodes,
            seed=args.seed,
            weights=args.weights,
            progress=not args.quiet,
            sr_weights=args.sr_weights,
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(report, indent=2))
    print(report["table"])
    if args.kind == "scan":
        plot_scan(report, out_dir / "found.png")
    elif args.kind == "tip":
        plot_tip(report, out_dir / "actions.png")
    else:
        plot_dose(report, out_dir / "dose.png")
    print(f"results: {out_dir / 'results.json'}; plots in {out_dir}")
    return 0


def evaluate_tip(
    episodes: int,
    *,
    seed: int,
    weights: str | None = None,
    progress: bool = True,
    assessor: str = "tipnet",
) -> dict[str, Any]:
    """Random, rule ladder and RL on the same ``episodes`` held-out seeds; see
    :mod:`policies.evaluation`."""
    from tqdm import tqdm

    from policies.evaluation import (
        net_chooser,
        random_chooser,
        rule_chooser,
        run_tip_episode,
        summarize_tip,
    )
    from policies.rl import TIP_WEIGHTS
    from policies.rl_net import load_policy
    from policies.tip_actions import N_ACTIONS, OBS_DIM

    net, meta = load_policy(
        weights or TIP_WEIGHTS, kind="tip", obs_dim=OBS_DIM, n_actions=N_ACTIONS
    )
    env = tip_env_factory(assessor)()
    perception = f"{env.assessor.name} {env.assessor.version}"
    rule, rule_reset = rule_chooser()
    choosers = {"random": random_chooser(seed), "rule": rule, "rl": net_chooser(net)}
    runs: dict[str, list[Any]] = {name: [] for name in choosers}
    start = time.perf_counter()
    with tqdm(total=episodes * len(choosers), unit="episode", disable=not progress) as bar:
        for i in range(episodes):
            for name, choose in choosers.items():
                if name == "rule":
                    rule_reset()
                runs[name].append(run_tip_episode(env, choose, seed=seed + i, policy=name))
                bar.update(1)
    env.close()
    summary = {name: summarize_tip(eps) for name, eps in runs.items()}
    rl, rnd, rul = summary["rl"], summary["random"], summary["rule"]
    ratios = {
        "median_actions_random_over_rl": rnd["actions"]["median"]
        / max(rl["actions"]["median"], 1e-9),
        "median_actions_rule_over_rl": rul["actions"]["median"]
        / max(rl["actions"]["median"], 1e-9),
        "mean_damage_rule_over_rl": rul["damaged_nm2"]["mean"]
        / max(rl["damaged_nm2"]["mean"], 1e-9),
    }
    lines = [
        f"tip conditioning, {episodes} held-out episodes per policy "
        f"(seeds {seed}..{seed + episodes - 1}); tip assessor {perception}; rl trained with "
        f"{meta.get('perception', '?')}",
        f"{'policy':8} {'success':>8} {'actions median':>15} {'p25-p75':>9} {'p90':>5} "
        f"{'mean':>6} {'frames med':>10} {'damage nm² mean':>16} {'median':>8}",
    ]
    for name, s in summary.items():
        a = s["actions"]
        lines.append(
            f"{name:8} {s['success_rate']:8.1%} {a['median']:15.1f} "
            f"{a['p25']:4.0f}-{a['p75']:<4.0f} {a['p90']:5.0f} {a['mean']:6.2f} "
            f"{s['frames']['median']:10.1f} {s['damaged_nm2']['mean']:16.0f} "
            f"{s['damaged_nm2']['median']:8.0f}"
        )
    lines.append(
        "ratios: median actions random/rl = {median_actions_random_over_rl:.2f} (target >= 2), "
        "rule/rl = {median_actions_rule_over_rl:.2f} (target >= 1.3); mean damage rule/rl = "
        "{mean_damage_rule_over_rl:.2f} (target > 1)".format(**ratios)
    )
    return {
        "kind": "tip",
        "episodes": episodes,
        "seed": seed,
        "weights_sha256": meta["sha256"],
        "assessor": perception,
        "trained_with": meta.get("perception", "?"),
        "wall_s": time.perf_counter() - start,
        "summary": summary,
        "ratios": ratios,
        "per_episode": {name: [e.__dict__ for e in eps] for name, eps in runs.items()},
        "table": "\n".join(lines),
    }


def evaluate_dose(
    episodes: int,
    *,
    seed: int,
    weights: str | None = None,
    progress: bool = True,
    sr_weights: str | None = None,
) -> dict[str, Any]:
    """The RL policy, the SNR rule and fixed dwells (bisected for the shortest that meets the
    target in >= 95 % of frames: the best fixed dwell) on the same held-out survey episodes;
    with ``sr_weights`` also that sr-aware policy (row ``rl-sr``) on the same surveys with the
    sr stage run on every frame (its frames judged on sr's image when it relied on sr)."""
    from tqdm import tqdm

    from policies.dose_features import DOSE_OBS_DIM, DWELL_LEVELS_S, MARGINS
    from policies.evaluation import (
        dose_net_chooser,
        dose_rule_chooser,
        dose_sr_net_chooser,
        fixed_dwell_chooser,
        run_dose_episode,
        summarize_dose,
    )
    from policies.rl import DOSE_WEIGHTS, load_dose_policy
    from policies.rl_net import load_policy

    net, meta = load_policy(
        weights or DOSE_WEIGHTS, kind="dose", obs_dim=DOSE_OBS_DIM, n_actions=len(MARGINS)
    )
    sr_net, sr_meta = load_dose_policy(sr_weights, sr=True) if sr_weights else (None, {})
    env = dose_env_factory()()
    target = float(env.config.target_snr)
    start = time.perf_counter()
    summary: dict[str, Any] = {}

    def run(name: str, choose: Any, bar: Any) -> dict[str, Any]:
        eps = []
        for i in range(episodes):
            eps.append(run_dose_episode(env, choose, seed=seed + i, policy=name))
            bar.update(1)
        return summarize_dose(eps)

    with tqdm(unit="episode", disable=not progress) as bar:
        summary["rl"] = run("rl", dose_net_chooser(net), bar)
        if sr_net is not None:
            raw_env, env = env, dose_env_factory(sr=True)()
            summary["rl-sr"] = run("rl-sr", dose_sr_net_chooser(sr_net), bar)
            env.close()
            env = raw_env
        summary["rule"] = run("rule", dose_rule_chooser(target_snr=target), bar)
        # the fraction of frames meeting the target rises with the dwell: bisect for the
        # shortest fixed dwell that meets it in >= 95 % of frames
        best: str | None = None
        low, high = -1, len(DWELL_LEVELS_S)  # invariant: low misses (or none), high meets
        while high - low > 1:
            level = (low + high) // 2
            name = f"fixed {DWELL_LEVELS_S[level] * 1e6:.3g} us"
            summary[name] = run(name, fixed_dwell_chooser(level), bar)
            if summary[name]["met_fraction"] >= 0.95:
                high, best = level, name
            else:
                low = level
    env.close()
    rl = summary["rl"]
    ratios: dict[str, float] = {}
    if best is not None:
        ratios["dose_best_fixed_over_rl"] = (
            summary[best]["dose_per_frame_As"] / rl["dose_per_frame_As"]
        )
    ratios["dose_rule_over_rl"] = summary["rule"]["dose_per_frame_As"] / rl["dose_per_frame_As"]
    with_sr = "rl-sr" in summary
    lines = [
        f"dose control, {episodes} held-out surveys x {env.config.frames} frames per policy, "
        f"target true SNR >= {target:g} (seeds {seed}..{seed + episodes - 1})",
        f"{'policy':16} {'target met':>10} {'electrons/px/frame':>19} {'mean dwell µs':>14}"
        + (f" {'on sr':>6}" if with_sr else ""),
    ]
    fixed = sorted(
        (n for n in summary if n.startswith("fixed")), key=lambda n: -float(n.split()[1])
    )
    summary = {n: summary[n] for n in ("rl", *(["rl-sr"] if with_sr else []), "rule", *fixed)}
    for name, s in summary.items():
        mark = "  <- best fixed dwell (>= 95 % met)" if name == best else ""
        on_sr = ""
        if with_sr:  # only the sr-aware policy can rely on sr
            on_sr = f" {s['sr_fraction']:6.1%}" if name == "rl-sr" else f" {'-':>6}"
        lines.append(
            f"{name:16} {s['met_fraction']:10.1%} {s['electrons_per_px_per_frame']:19.1f} "
            f"{s['mean_dwell_s'] * 1e6:14.3g}{on_sr}{mark}"
        )
    if best is not None:
        lines.append(
            f"ratio: dose best fixed / rl = {ratios['dose_best_fixed_over_rl']:.2f} (target >= 2, "
            f"with >= 95 % met: rl {rl['met_fraction']:.1%})"
        )
    else:
        lines.append("no fixed dwell meets the target in 95 % of frames")
    if with_sr:
        ratios["dose_rl_over_rl_sr"] = (
            rl["dose_per_frame_As"] / summary["rl-sr"]["dose_per_frame_As"]
        )
        lines.append(
            f"rl-sr ({sr_meta['sha256'][:12]}): relies on sr in "
            f"{summary['rl-sr']['sr_fraction']:.1%} of frames; dose rl / rl-sr = "
            f"{ratios['dose_rl_over_rl_sr']:.2f}"
        )
    return {
        "kind": "dose",
        "episodes": episodes,
        "seed": seed,
        "weights_sha256": meta["sha256"],
        **({"sr_weights_sha256": sr_meta["sha256"]} if with_sr else {}),
        "wall_s": time.perf_counter() - start,
        "best_fixed": best,
        "summary": summary,
        "ratios": ratios,
        "table": "\n".join(lines),
    }


def plot_tip(report: dict[str, Any], path: Path) -> None:
    """Cumulative success against actions, and damage per episode, per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = list(report["per_episode"])
    for name in names:
        eps = report["per_episode"][name]
        actions = np.array([e["actions"] for e in eps if e["success"]])
        xs = np.arange(0, 101)
        ax1.plot(xs, [(actions <= x).sum() / len(eps) for x in xs], label=name)
    ax1.set_xscale("symlog", linthresh=10)
    ax1.set_xlabel("conditioning actions")
    ax1.set_ylabel("fraction of episodes with a confirmed good tip")
    ax1.legend()
    ax2.boxplot(
        [[e["damaged_nm2"] for e in report["per_episode"][n]] for n in names], tick_labels=names
    )
    ax2.set_ylabel("damaged area per episode (nm²)")
    fig.suptitle(f"tip conditioning, {report['episodes']} held-out episodes per policy")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_dose(report: dict[str, Any], path: Path) -> None:
    """Dose per frame and fraction of frames meeting the target, per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["summary"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax1.bar(names, [report["summary"][n]["electrons_per_px_per_frame"] for n in names])
    ax1.set_ylabel("electrons / pixel / frame")
    ax2.bar(names, [report["summary"][n]["met_fraction"] for n in names])
    ax2.axhline(0.95, color="k", ls="--", lw=1)
    ax2.set_ylabel("frames meeting the target SNR")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.suptitle(f"dose control, {report['episodes']} held-out surveys per policy")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
