"""Held-out evaluation of the RL policies against baselines, episode by episode.

Every policy runs on the same environments with the same seeds (``seed0 + episode``), so the
comparison is paired. Tip conditioning: ``random`` (uniform over valid actions), ``rule`` (the
rule policy's escalation ladder, :class:`policies.rule.RulePolicy`, fed the same observations)
and ``rl`` (the exported network, greedy over valid actions). Dose control: every fixed dwell
level, ``rule`` (:func:`policies.dose.dose_command`) and ``rl``.

Success of a tip episode = the assessor's P(good) >= threshold confirmed by a second frame, and
the simulator's ground-truth tip really good at that moment, within ``max_actions`` actions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from drivers.commands import SetDwell, TipDip, TipPulse
from drivers.errors import ConfigError
from drivers.frame import TipState
from drivers.observation import Observation, QualityEstimate
from policies.dose_features import DWELL_LEVELS_S, FIRST_LEVEL, split_sr_action
from policies.env_dose import DoseControlEnv
from policies.env_tip import BAD_STATES, TipConditioningEnv
from policies.rl_net import PolicyNet
from policies.rule import LadderStep, RulePolicy
from policies.tip_actions import CONDITIONING_ACTIONS, action_index

TipChooser = Callable[[TipConditioningEnv, np.ndarray, np.ndarray], int | None]


@dataclass(frozen=True)
class TipEpisode:
    """One tip-conditioning episode's outcome (ground truth from the simulator)."""

    policy: str
    seed: int
    success: bool
    actions: int
    frames: int
    damaged_nm2: float
    time_s: float
    final_state: str


def random_chooser(seed: int) -> TipChooser:
    rng = np.random.default_rng(seed)

    def choose(env: TipConditioningEnv, obs: np.ndarray, mask: np.ndarray) -> int:
        return int(rng.choice(np.flatnonzero(mask)))

    return choose


def net_chooser(net: PolicyNet) -> TipChooser:
    def choose(env: TipConditioningEnv, obs: np.ndarray, mask: np.ndarray) -> int:
        return net.act(obs, mask)[0]

    return choose


def rule_chooser(**options: Any) -> tuple[TipChooser, Callable[[], None]]:
    """The rule ladder as a chooser: its pulse/dip becomes the same action of the set (or, if
    the map forbids it there, the valid action of the same kind closest in strength); an empty
    decision means "rescan" (None)."""
    policy = RulePolicy.from_options(**options)

    def choose(env: TipConditioningEnv, obs: np.ndarray, mask: np.ndarray) -> int | None:
        instrument = env.instrument
        observation = Observation(
            frame=env.last_frame,
            tip=env.estimate,
            state=instrument.state(),
            info=instrument.info(),
            history=env.history,
        )
        decision = policy.decide(observation)
        for command in decision.commands:
            if isinstance(command, TipPulse):
                step = LadderStep.pulse(command.bias_V, command.duration_s)
            elif isinstance(command, TipDip):
                step = LadderStep.dip(command.depth_m, command.bias_V)
            else:
                continue
            index = action_index(step)
            if index is not None and mask[index]:
                return index
            same = [
                i for i in np.flatnonzero(mask) if CONDITIONING_ACTIONS[i].action == step.action
            ]
            pool = same or list(np.flatnonzero(mask))
            return int(
                min(pool, key=lambda i: abs(CONDITIONING_ACTIONS[i].strength - step.strength))
            )
        return None

    return choose, policy.reset


ORACLE_FASTEST: dict[TipState, int] = {
    TipState.MULTIPLE: 4,  # pulse +8 V
    TipState.UNSTABLE: 4,
    TipState.BLUNT: 11,  # dip 5 nm
    TipState.CRASHED: 11,
}
"""Per true state the action most likely to fix it (``conditioning_probabilities``)."""
ORACLE_GENTLE: dict[TipState, int] = {
    TipState.MULTIPLE: 0,  # pulse +2.5 V
    TipState.UNSTABLE: 0,
    TipState.BLUNT: 8,  # dip 2.5 nm
    TipState.CRASHED: 8,
}
"""Per true state the action that minimises actions + 0.002 x damage (nm²) in the Markov chain
of the response table (perfect perception)."""


def oracle_chooser(table: dict[TipState, int]) -> TipChooser:
    """A bound, not a policy: acts on the simulator's *true* tip state with ``table[state]``
    (or, where the map forbids it, the valid action of the same kind closest in strength) and
    rescans while the tip is truly good until perception confirms it."""
    missing = set(BAD_STATES) - set(table)
    if missing:
        raise ConfigError(f"oracle table needs an action for {sorted(s.value for s in missing)}")

    def choose(env: TipConditioningEnv, obs: np.ndarray, mask: np.ndarray) -> int | None:
        state = env.instrument.simulator.tip_state
        if state is TipState.GOOD:
            return None
        index = table[state]
        if mask[index]:
            return index
        step = CONDITIONING_ACTIONS[index]
        same = [i for i in np.flatnonzero(mask) if CONDITIONING_ACTIONS[i].action == step.action]
        pool = same or list(np.flatnonzero(mask))
        return int(min(pool, key=lambda i: abs(CONDITIONING_ACTIONS[i].strength - step.strength)))

    return choose


def run_tip_episode(
    env: TipConditioningEnv, choose: TipChooser, *, seed: int, policy: str, max_frames: int = 400
) -> TipEpisode:
    """One episode: ``choose`` returns an action index, or None to rescan without acting."""
    obs, info = env.reset(seed=seed)
    threshold = env.config.good_threshold
    success = False
    while True:
        if env.estimate.p_good >= threshold and info["frames"] < max_frames:
            # a baseline that declined to act on a good-looking frame: confirm it like the env does
            env.rescan()
            info = env.info()
            if env.estimate.p_good >= threshold:
                success = info["tip_state"] == "good"
                break
            obs = env.observation()
        if info["actions"] >= env.config.max_actions or info["frames"] >= max_frames:
            break
        mask = env.action_masks()
        action = choose(env, obs, mask)
        if action is None:
            env.rescan()
            info = env.info()
            obs = env.observation()
            continue
        obs, _, terminated, truncated, info = env.step(action)
        if terminated:
            success = bool(info["success"])
            break
        if truncated:
            break
    return TipEpisode(
        policy,
        seed,
        success,
        int(info["actions"]),
        int(info["frames"]),
        float(info["damaged_nm2"]),
        float(info["time_s"]),
        str(info["tip_state"]),
    )


def distribution(values: Sequence[float]) -> dict[str, float]:
    """mean, median, quartiles, 90th percentile, max of ``values``."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {}
    return {
        "mean": float(a.mean()),
        "median": float(np.median(a)),
        "p25": float(np.percentile(a, 25)),
        "p75": float(np.percentile(a, 75)),
        "p90": float(np.percentile(a, 90)),
        "max": float(a.max()),
    }


def summarize_tip(episodes: Sequence[TipEpisode]) -> dict[str, Any]:
    """Success rate and the distributions of actions, frames and damage per episode."""
    if not episodes:
        raise ConfigError("no episodes to summarize")
    return {
        "episodes": len(episodes),
        "success_rate": float(np.mean([e.success for e in episodes])),
        "actions": distribution([e.actions for e in episodes]),
        "actions_successful": distribution([e.actions for e in episodes if e.success]),
        "frames": distribution([e.frames for e in episodes]),
        "damaged_nm2": distribution([e.damaged_nm2 for e in episodes]),
        "time_s": distribution([e.time_s for e in episodes]),
    }


# -- dose -----------------------------------------------------------------------------------------

DoseChooser = Callable[[DoseControlEnv, np.ndarray, dict[str, Any]], int | tuple[int, bool]]
"""``(env, observation, last step's info) -> dwell level`` of the next frame, or ``(level,
rely on sr)`` on an environment with the sr choice."""


@dataclass(frozen=True)
class DoseEpisode:
    policy: str
    seed: int
    frames: int
    met: int
    dose_As: float
    dwell_s: float
    sr_frames: int = 0
    """Frames judged on sr's recovered image (the policy relied on sr and sr accepted it)."""


def fixed_dwell_chooser(level: int) -> DoseChooser:
    if not 0 <= level < len(DWELL_LEVELS_S):
        raise ConfigError(f"dwell level must be in 0..{len(DWELL_LEVELS_S) - 1}, got {level}")
    return lambda env, obs, info: level


def dose_net_chooser(net: PolicyNet) -> DoseChooser:
    def choose(env: DoseControlEnv, obs: np.ndarray, info: dict[str, Any]) -> int:
        return env.level_for(net.act(obs)[0])

    return choose


def dose_sr_net_chooser(net: PolicyNet) -> DoseChooser:
    """An sr-aware network (26 actions) on an environment with ``DoseEnvConfig(sr=True)``:
    greedy over the environment's action mask."""

    def choose(env: DoseControlEnv, obs: np.ndarray, info: dict[str, Any]) -> tuple[int, bool]:
        margin, rely = split_sr_action(net.act(obs, env.action_masks())[0])
        return env.level_for(margin), rely

    return choose


def dose_rule_chooser(*, target_snr: float, start_level: int = FIRST_LEVEL) -> DoseChooser:
    """:func:`policies.dose.dose_command` on the quality assessor's SNR estimate of the last
    frame, its dwell rounded to the nearest level (the rule steps the dwell by x2 = 2 levels)."""
    from policies.dose import dose_command

    state = {"level": start_level}

    def choose(env: DoseControlEnv, obs: np.ndarray, info: dict[str, Any]) -> int:
        if "snr_estimate" not in info:  # first frame of an episode
            state["level"] = start_level
            return start_level
        instrument = env.instrument
        observation = Observation(
            frame=env.last_frame,
            tip=None,
            state=instrument.state(),
            info=instrument.info(),
            quality=QualityEstimate(float(info["snr_estimate"]), math.nan, math.nan),
        )
        command, _ = dose_command(observation, target_snr=target_snr, tolerance=1.5, dwell_step=2.0)
        if isinstance(command, SetDwell):
            state["level"] = int(
                np.argmin([abs(math.log(d / command.dwell_s)) for d in DWELL_LEVELS_S])
            )
        return state["level"]

    return choose


def run_dose_episode(
    env: DoseControlEnv, choose: DoseChooser, *, seed: int, policy: str
) -> DoseEpisode:
    obs, _ = env.reset(seed=seed)
    frames = met = on_sr = 0
    dose = dwell = 0.0
    info: dict[str, Any] = {}
    while True:
        action = choose(env, obs, info)
        if isinstance(action, tuple):
            obs, _, terminated, _, info = env.step_level(action[0], sr=action[1])
        else:
            obs, _, terminated, _, info = env.step_level(action)
        frames += 1
        met += int(info["met"])
        on_sr += int(bool(info.get("sr", False)))
        dose += float(info["dose_As"])
        dwell += float(info["dwell_s"])
        if terminated:
            break
    return DoseEpisode(policy, seed, frames, met, dose, dwell, on_sr)


def summarize_dose(episodes: Sequence[DoseEpisode]) -> dict[str, Any]:
    frames = sum(e.frames for e in episodes)
    if frames == 0:
        raise ConfigError("no frames to summarize")
    return {
        "episodes": len(episodes),
        "frames": frames,
        "met_fraction": sum(e.met for e in episodes) / frames,
        "dose_per_frame_As": sum(e.dose_As for e in episodes) / frames,
        "electrons_per_px_per_frame": sum(e.dose_As for e in episodes) / frames / 1.602176634e-19,
        "mean_dwell_s": sum(e.dwell_s for e in episodes) / frames,
        "sr_fraction": sum(e.sr_frames for e in episodes) / frames,
    }
