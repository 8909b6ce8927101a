"""Behaviour-cloning warm start of a MaskablePPO actor-critic from an expert (DAgger).

The scan planner trained by PPO alone learns an all-or-nothing policy (docs/benchmarks.md): its
stochastic policy keeps ~60 % of its probability on surveying after a few empty surveys, but
spread over ~30 tiles, so the greedy deployed action is the one zoom into a dark tile, and since
a zoom that detects nothing barely changes the observation it zooms there until the budget is
spent. :func:`warm_start` first teaches the network the rule planner's choices
(:func:`policies.scan_eval.rule_scan_chooser`) in the environment's own action space, then
MaskablePPO fine-tunes it (:func:`policies.training.train_masked_ppo`).

- Round 0 follows the expert; rounds ``1 .. rounds - 1`` follow the learner's greedy action and
  label every state with the expert's choice (DAgger: the network also learns what to do in the
  states its own mistakes lead to). Each round adds ``episodes // rounds`` episodes to one data
  set and fits the actor on all of it (masked cross-entropy) and the value head on the
  discounted returns of the episodes that produced it (mean squared error).
- Episode ``i`` of round ``r`` uses sample seed ``DEMO_SEED0 + 100_000 * seed + 1_000 * r + i``
  (far from the held-out evaluation seeds from 1,000,000); the same seed gives the same network.

Only torch, numpy and attribute access on the SB3 policy (``evaluate_actions``) are used here:
the caller owns the stable-baselines3 import.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from drivers.errors import ConfigError

Chooser = Callable[[Any, np.ndarray, np.ndarray], int]
"""``(env, obs, mask) -> action``; the scan planner's choosers have this signature."""

DEMO_SEED0 = 5_000_000


@dataclass(frozen=True)
class BCSettings:
    """Behaviour cloning: ``episodes`` expert-labelled episodes over ``rounds`` DAgger rounds;
    after each round ``epochs`` passes of minibatches of ``batch_size`` (Adam, ``learning_rate``)
    over everything collected; the value loss is weighted by ``value_coef``."""

    episodes: int = 300
    rounds: int = 3
    epochs: int = 20
    batch_size: int = 256
    learning_rate: float = 1e-3
    value_coef: float = 0.5
    gamma: float = 0.97

    def __post_init__(self) -> None:
        for name in ("episodes", "rounds", "epochs", "batch_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"BCSettings.{name} must be an int >= 1, got {value!r}")
        if self.episodes < self.rounds:
            raise ConfigError(
                f"BCSettings.episodes ({self.episodes}) must be >= rounds ({self.rounds})"
            )
        if not (self.learning_rate > 0 and self.value_coef >= 0 and 0 < self.gamma <= 1):
            raise ConfigError(
                "BCSettings needs learning_rate > 0, value_coef >= 0 and gamma in (0, 1], got "
                f"{self.learning_rate!r}, {self.value_coef!r}, {self.gamma!r}"
            )


@dataclass
class Demos:
    """States visited with the expert's label: ``obs (n, obs_dim) float32``, ``masks (n,
    n_actions) bool``, ``actions (n,) int64`` (the expert's), ``returns (n,) float32``
    (discounted return from that state on the trajectory that was followed)."""

    obs: np.ndarray
    masks: np.ndarray
    actions: np.ndarray
    returns: np.ndarray

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    def extend(self, other: Demos) -> Demos:
        return Demos(
            np.concatenate([self.obs, other.obs]),
            np.concatenate([self.masks, other.masks]),
            np.concatenate([self.actions, other.actions]),
            np.concatenate([self.returns, other.returns]),
        )


def greedy_actions(policy: Any, obs: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The SB3 policy's most probable allowed action (what the exported network deploys) for
    each row of ``obs`` ``(n, obs_dim)`` under ``masks`` ``(n, n_actions)``."""
    with torch.no_grad():
        dist = policy.get_distribution(
            torch.as_tensor(obs, dtype=torch.float32), action_masks=masks
        )
        out: np.ndarray = dist.distribution.probs.argmax(dim=1).numpy()
        return out


def greedy_action(policy: Any, obs: np.ndarray, mask: np.ndarray) -> int:
    """:func:`greedy_actions` of one observation."""
    return int(greedy_actions(policy, np.asarray(obs)[None], np.asarray(mask)[None])[0])


def collect(
    env: Any,
    make_expert: Callable[[], Chooser],
    seeds: list[int],
    *,
    gamma: float,
    learner: Chooser | None = None,
    progress: Callable[[], None] | None = None,
) -> tuple[Demos, float]:
    """Run one episode per seed, acting with ``learner`` (None: the expert), label every state
    with the expert's action; returns the demos and the fraction of states where the learner
    (if any) chose what the expert would have."""
    obs_l: list[np.ndarray] = []
    mask_l: list[np.ndarray] = []
    act_l: list[int] = []
    ret_l: list[float] = []
    agree = total = 0
    for seed in seeds:
        expert = make_expert()
        obs, _ = env.reset(seed=seed)
        rewards: list[float] = []
        while True:
            mask = np.asarray(env.action_masks(), dtype=bool)
            label = int(expert(env, obs, mask))
            act = label if learner is None else int(learner(env, obs, mask))
            agree += act == label
            total += 1
            obs_l.append(np.asarray(obs, dtype=np.float32))
            mask_l.append(mask)
            act_l.append(label)
            obs, reward, terminated, truncated, _ = env.step(act)
            rewards.append(float(reward))
            if terminated or truncated:
                break
        g = 0.0
        returns = []
        for r in reversed(rewards):
            g = r + gamma * g
            returns.append(g)
        ret_l += returns[::-1]
        if progress is not None:
            progress()
    demos = Demos(
        np.stack(obs_l),
        np.stack(mask_l),
        np.asarray(act_l, dtype=np.int64),
        np.asarray(ret_l, dtype=np.float32),
    )
    return demos, agree / max(total, 1)


def agreement(policy: Any, demos: Demos) -> float:
    """Fraction of ``demos`` where the policy's greedy allowed action is the expert's."""
    return float(np.mean(greedy_actions(policy, demos.obs, demos.masks) == demos.actions))


def bc_fit(policy: Any, demos: Demos, settings: BCSettings, *, seed: int) -> list[dict[str, float]]:
    """Fit the actor (masked cross-entropy on the expert's actions) and the value head (MSE on
    the returns) for ``settings.epochs`` epochs; returns per-epoch mean losses."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(policy.parameters(), lr=settings.learning_rate)
    obs = torch.as_tensor(demos.obs, dtype=torch.float32)
    actions = torch.as_tensor(demos.actions)
    returns = torch.as_tensor(demos.returns, dtype=torch.float32)
    masks = demos.masks
    history: list[dict[str, float]] = []
    policy.set_training_mode(True)
    for _ in range(settings.epochs):
        order = torch.randperm(len(demos), generator=gen)
        pi_sum = vf_sum = 0.0
        for start in range(0, len(demos), settings.batch_size):
            idx = order[start : start + settings.batch_size]
            values, log_prob, _ = policy.evaluate_actions(
                obs[idx], actions[idx], action_masks=masks[idx.numpy()]
            )
            pi_loss = -log_prob.mean()
            vf_loss = torch.nn.functional.mse_loss(values.flatten(), returns[idx])
            loss = pi_loss + settings.value_coef * vf_loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 0.5)
            opt.step()
            pi_sum += pi_loss.item() * len(idx)
            vf_sum += vf_loss.item() * len(idx)
        history.append({"pi_loss": pi_sum / len(demos), "vf_loss": vf_sum / len(demos)})
    policy.set_training_mode(False)
    return history


def warm_start(
    policy: Any,
    env: Any,
    make_expert: Callable[[], Chooser],
    settings: BCSettings,
    *,
    seed: int,
    progress: bool = True,
) -> dict[str, Any]:
    """DAgger behaviour cloning of ``policy`` (an sb3-contrib maskable actor-critic) from the
    expert on ``env`` (see the module doc). Returns policy-file metadata (strings and numbers):
    ``bc_settings``, ``bc_rounds`` (JSON: per round the states so far, the learner's greedy
    agreement with the expert on the states it visited before the round's fit (round 0: null)
    and the agreement on all data after it), ``bc_agreement`` (the last), ``bc_states``; and
    ``curve``, the per-epoch losses (for the learning-curve plot, not for the file)."""
    from tqdm import tqdm

    per_round = settings.episodes // settings.rounds
    demos: Demos | None = None
    rounds: list[dict[str, float | None]] = []
    curve: list[dict[str, float]] = []
    after = 0.0
    with tqdm(
        total=per_round * settings.rounds, unit="episode", disable=not progress, desc="bc"
    ) as bar:
        for r in range(settings.rounds):
            seeds = [DEMO_SEED0 + 100_000 * seed + 1_000 * r + i for i in range(per_round)]
            learner: Chooser | None = None
            if r > 0:
                learner = lambda env, obs, mask: greedy_action(policy, obs, mask)  # noqa: E731
            new, on_policy = collect(
                env,
                make_expert,
                seeds,
                gamma=settings.gamma,
                learner=learner,
                progress=lambda: bar.update(1),
            )
            demos = new if demos is None else demos.extend(new)
            history = bc_fit(policy, demos, settings, seed=seed * 1_000 + r)
            curve += [{"round": float(r), **h} for h in history]
            after = agreement(policy, demos)
            rounds.append(
                {
                    "round": float(r),
                    "states": float(len(demos)),
                    "learner_agreement_before": None if r == 0 else round(on_policy, 4),
                    "agreement_after": round(after, 4),
                }
            )
            bar.set_postfix(states=len(demos), agree=f"{after:.3f}", refresh=False)
    return {
        "bc_settings": json.dumps(settings.__dict__),
        "bc_rounds": json.dumps(rounds),
        "bc_agreement": round(after, 4),
        "bc_states": len(demos) if demos is not None else 0,
        "curve": curve,
    }
