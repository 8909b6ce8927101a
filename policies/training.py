"""Training of the RL policies with sb3-contrib's MaskablePPO over vectorized environments.

:func:`train_masked_ppo` trains on ``n_envs`` copies of an environment (``DummyVecEnv`` in one
process, or ``SubprocVecEnv`` for parallel rollouts), shows a tqdm progress bar, exports the
actor as a plain state_dict (:mod:`policies.rl_net`) and draws the learning curve. The same
seed gives the same network on the same machine and library versions (with the same number
of torch threads, one by default).

gymnasium, stable-baselines3 and sb3-contrib are imported here only; deployment
(:mod:`policies.rl`) needs none of them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from drivers.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PPOSettings:
    """MaskablePPO hyper-parameters (SB3 names). Simulated steps are slow (tens of ms), so the
    defaults make many small updates per sample: 64 steps per environment between updates,
    10 epochs of minibatches of 64, learning rate 1e-3."""

    n_steps: int = 64
    batch_size: int = 64
    n_epochs: int = 10
    learning_rate: float = 1e-3
    gamma: float = 0.97
    gae_lambda: float = 0.95
    ent_coef: float = 0.01
    hidden: tuple[int, ...] = (64, 64)


@dataclass
class TrainingResult:
    """What a training run produced: the policy file, the curve, and the episode log."""

    policy_path: Path
    curve_path: Path | None
    sha256: str
    steps: int
    wall_s: float
    episodes: list[dict[str, float]] = field(default_factory=list)


def train_masked_ppo(
    kind: str,
    make_env: Callable[[], Any],
    *,
    obs_dim: int,
    n_actions: int,
    steps: int,
    seed: int,
    out: str | Path,
    n_envs: int = 4,
    subproc: bool = False,
    settings: PPOSettings | None = None,
    curve_png: str | Path | None = None,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
    checkpoint_every: int = 0,
    threads: int = 1,
    warm_start: Callable[[Any], dict[str, Any]] | None = None,
) -> TrainingResult:
    """Train a ``kind`` policy and write it to ``out`` (and the learning curve to ``curve_png``).

    ``make_env()`` builds one environment with an ``action_masks()`` method. With
    ``checkpoint_every`` > 0 the network so far (and the learning curve so far) is also written
    every that many steps, so a long run that is stopped leaves a usable policy and its curve.

    ``warm_start(policy)``, when given, is called on the fresh sb3-contrib policy before PPO
    (e.g. behaviour cloning, :mod:`policies.imitation`); the dict it returns goes into the
    policy file's ``meta`` and, if it holds a ``curve`` of per-epoch losses, into the learning
    curve. With a warm start ``steps`` may be 0 (no PPO).
    """
    import torch
    from sb3_contrib import MaskablePPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv
    from tqdm import tqdm

    from policies.rl_net import net_from_sb3, save_policy

    if steps < (0 if warm_start is not None else 1) or n_envs < 1:
        raise ConfigError(f"steps and n_envs must be >= 1, got steps={steps}, n_envs={n_envs}")
    cfg = settings or PPOSettings()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    vec_cls = SubprocVecEnv if subproc and n_envs > 1 else DummyVecEnv
    env = vec_cls([lambda: Monitor(make_env()) for _ in range(n_envs)])
    env.seed(seed)
    episodes: list[dict[str, float]] = []
    recipe: dict[str, Any] = {
        "algorithm": "MaskablePPO (sb3-contrib)",
        "seed": int(seed),
        "n_envs": int(n_envs),
        "settings": json.dumps(cfg.__dict__),
        **(meta or {}),
    }

    class _Progress(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.bar = tqdm(total=steps, unit="step", disable=not progress, desc=f"train {kind}")

        def _on_step(self) -> bool:
            self.bar.update(self.training_env.num_envs)
            if (
                checkpoint_every
                and self.num_timesteps % checkpoint_every < self.training_env.num_envs
            ):
                partial = net_from_sb3(self.model.policy, obs_dim, n_actions)
                save_policy(
                    out,
                    kind,
                    partial,
                    {**recipe, "steps": int(self.num_timesteps), "checkpoint": 1},
                )
                if curve_png is not None and episodes:
                    plot_learning_curve(
                        episodes,
                        Path(curve_png),
                        title=f"{kind} policy, MaskablePPO, seed {seed} "
                        f"(checkpoint at {self.num_timesteps} steps)",
                    )
            for info in self.locals.get("infos", ()):
                ep = info.get("episode")
                if ep is not None:
                    episodes.append(
                        {
                            "timestep": float(self.num_timesteps),
                            "return": float(ep["r"]),
                            "length": float(ep["l"]),
                            "success": float(bool(info.get("success", False))),
                        }
                    )
            if episodes:
                recent = episodes[-50:]
                self.bar.set_postfix(
                    ret=f"{np.mean([e['return'] for e in recent]):.2f}",
                    len=f"{np.mean([e['length'] for e in recent]):.1f}",
                    refresh=False,
                )
            return True

        def _on_training_end(self) -> None:
            self.bar.close()

    model = MaskablePPO(
        "MlpPolicy",
        env,
        n_steps=cfg.n_steps,
        batch_size=cfg.batch_size,
        n_epochs=cfg.n_epochs,
        learning_rate=cfg.learning_rate,
        gamma=cfg.gamma,
        gae_lambda=cfg.gae_lambda,
        ent_coef=cfg.ent_coef,
        seed=seed,
        device="cpu",
        policy_kwargs={
            "net_arch": {"pi": list(cfg.hidden), "vf": list(cfg.hidden)},
            "activation_fn": torch.nn.Tanh,
        },
        verbose=0,
    )
    start = time.perf_counter()
    bc_curve: list[dict[str, float]] = []
    if warm_start is not None:
        warm = warm_start(model.policy)
        bc_curve = list(warm.pop("curve", []))
        recipe.update(warm)
        recipe["algorithm"] = "behaviour cloning (DAgger)" + (
            ", then MaskablePPO (sb3-contrib)" if steps > 0 else ""
        )
    if steps > 0:
        model.learn(total_timesteps=steps, callback=_Progress())
    wall = time.perf_counter() - start
    env.close()
    net = net_from_sb3(model.policy, obs_dim, n_actions)
    info = {
        **recipe,
        "steps": int(model.num_timesteps),
        "episodes": len(episodes),
        "wall_s": round(wall, 1),
    }
    sha = save_policy(out, kind, net, info)
    curve: Path | None = None
    if curve_png is not None and (episodes or bc_curve):
        curve = Path(curve_png)
        title = f"{kind} policy, MaskablePPO, seed {seed}"
        if bc_curve:
            title = f"{kind} policy, {recipe['algorithm']}, seed {seed}"
        plot_learning_curve(episodes, curve, title=title, bc_curve=bc_curve)
    logger.info("trained %s policy: %s (%d steps, %.0f s)", kind, out, model.num_timesteps, wall)
    return TrainingResult(Path(out), curve, sha, int(model.num_timesteps), wall, episodes)


def plot_learning_curve(
    episodes: list[dict[str, float]],
    path: Path,
    *,
    title: str,
    bc_curve: list[dict[str, float]] | None = None,
) -> None:
    """Episode return and length against training steps (raw and a 50-episode running mean);
    with ``bc_curve`` (per-epoch ``pi_loss`` / ``vf_loss`` of a behaviour-cloning warm start) a
    first panel of those losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.array([e["timestep"] for e in episodes])
    panels = (1 if bc_curve else 0) + (2 if episodes else 0)
    fig, all_axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6), squeeze=False)
    axes = all_axes[0, 1:] if bc_curve else all_axes[0]
    if bc_curve:
        _plot_bc_curve(all_axes[0, 0], bc_curve)
    for ax, key in zip(axes, ("return", "length") if episodes else (), strict=True):
        y = np.array([e[key] for e in episodes])
        ax.plot(t, y, ".", ms=2, alpha=0.3, color="tab:blue")
        k = min(50, len(y))
        smooth = np.convolve(y, np.ones(k) / k, mode="valid")
        ax.plot(t[k - 1 :], smooth, color="tab:red", label=f"mean of {k} episodes")
        ax.set_xlabel("training steps")
        ax.set_ylabel(f"episode {key}")
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_bc_curve(ax: Any, bc_curve: list[dict[str, float]]) -> None:
    epochs = np.arange(1, len(bc_curve) + 1)
    ax.plot(
        epochs, [e["pi_loss"] for e in bc_curve], color="tab:blue", label="actor (cross-entropy)"
    )
    ax.set_xlabel("behaviour-cloning epoch (all rounds)")
    ax.set_ylabel("actor loss")
    ax.set_yscale("log")
    vf = ax.twinx()
    vf.plot(epochs, [e["vf_loss"] for e in bc_curve], color="tab:orange", label="value (MSE)")
    vf.set_ylabel("value loss")
    vf.set_yscale("log")
    rounds = [e["round"] for e in bc_curve]
    for i in range(1, len(rounds)):
        if rounds[i] != rounds[i - 1]:
            ax.axvline(i + 0.5, color="grey", lw=0.8, ls=":")
    ax.legend(loc="upper right", fontsize=8)
    vf.legend(loc="lower left", fontsize=8)
