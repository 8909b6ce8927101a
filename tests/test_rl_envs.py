"""The RL environments: gymnasium contract, seeding, action masking, bad input, training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from agent.perception.classical import ClassicalTipAssessor
from agent.perception.quality import ImageQualityAssessor
from drivers.errors import CommandRejected, ConfigError, DataError
from drivers.frame import TipState
from drivers.limits import Limits
from drivers.observation import TipEstimate
from policies.dose_features import (
    DOSE_OBS_DIM,
    DWELL_LEVELS_S,
    FIRST_LEVEL,
    MARGINS,
    dose_observation,
    level_for_action,
)
from policies.env_dose import DoseControlEnv, DoseEnvConfig
from policies.env_tip import TipConditioningEnv, TipEnvConfig
from policies.evaluation import ORACLE_FASTEST, ORACLE_GENTLE, oracle_chooser
from policies.tip_actions import (
    CONDITIONING_ACTIONS,
    N_ACTIONS,
    NM,
    OBS_DIM,
    SiteMap,
    footprint_m,
    tip_observation,
)


@pytest.fixture(scope="module")
def tip_env() -> TipConditioningEnv:
    return TipConditioningEnv(ClassicalTipAssessor())


def test_the_action_set_is_deepspm_s() -> None:
    pulses = sorted(s.bias_V for s in CONDITIONING_ACTIONS if s.action == "pulse")
    dips = sorted(s.depth_m for s in CONDITIONING_ACTIONS if s.action == "dip")
    assert N_ACTIONS == 12
    assert pulses == [-8.0, -4.0, -2.5, 2.5, 4.0, 8.0]
    assert all(s.duration_s == 0.2 for s in CONDITIONING_ACTIONS if s.action == "pulse")
    assert min(dips) == pytest.approx(0.8 * NM) and max(dips) == pytest.approx(5 * NM)
    # the strongest actions need the most free surface
    assert footprint_m(CONDITIONING_ACTIONS[4]) > footprint_m(CONDITIONING_ACTIONS[0])


def test_tip_env_passes_the_gymnasium_checker(tip_env: TipConditioningEnv) -> None:
    check_env(tip_env, skip_render_check=True)


def test_tip_env_same_seed_same_episode(tip_env: TipConditioningEnv) -> None:
    other = TipConditioningEnv(ClassicalTipAssessor())

    def rollout(env: TipConditioningEnv) -> list[np.ndarray]:
        obs, _ = env.reset(seed=7)
        seen = [obs]
        for action in (4, 11, 2):
            obs, _, terminated, truncated, _ = env.step(action)
            seen.append(obs)
            if terminated or truncated:
                break
        return seen

    first, second = rollout(tip_env), rollout(other)
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    other.close()


def test_tip_env_rewards_and_ground_truth(tip_env: TipConditioningEnv) -> None:
    obs, info = tip_env.reset(seed=3, options={"tip": "blunt"})
    assert obs.shape == (OBS_DIM,) and obs.dtype == np.float32
    assert info["tip_state"] == "blunt" and info["actions"] == 0
    total, steps = 0.0, 0
    while True:
        mask = tip_env.action_masks()
        obs, reward, terminated, truncated, info = tip_env.step(int(np.flatnonzero(mask)[-1]))
        steps += 1
        total += reward
        if terminated or truncated:
            break
    assert info["actions"] == steps
    assert info["damaged_nm2"] > 0
    # -1 per step, minus the damage penalty per nm² damaged, +10 once when good
    penalty = tip_env.config.damage_penalty_per_nm2 * info["damaged_nm2"]
    assert penalty > 0
    if terminated:
        assert total == pytest.approx(10 - steps - penalty)
        assert info["p_good"] >= 0.9
    else:
        assert total == pytest.approx(-steps - penalty) and steps == 100


def test_masked_action_raises_and_changes_nothing(tip_env: TipConditioningEnv) -> None:
    tip_env.reset(seed=5)
    x, y = tip_env.instrument.state().position_m
    sites = tip_env._sites
    assert sites is not None
    sites.add_damage(x + 30 * NM, y, 15 * NM)  # leaves 15 nm free: strong actions do not fit
    mask = tip_env.action_masks()
    assert mask[0] and not mask[4] and not mask[11]
    before = tip_env.info()
    with pytest.raises(CommandRejected, match="masked out"):
        tip_env.step(4)
    after = tip_env.info()
    assert after["actions"] == before["actions"] and after["frames"] == before["frames"]
    assert after["damaged_nm2"] == before["damaged_nm2"]


@pytest.mark.parametrize("action", [-1, 12, 2.5, "4", None])
def test_out_of_range_actions_are_rejected(tip_env: TipConditioningEnv, action: object) -> None:
    tip_env.reset(seed=1)
    with pytest.raises(CommandRejected, match=r"integer 0\.\.11"):
        tip_env.step(action)


def test_env_needs_an_assessor() -> None:
    with pytest.raises(ConfigError, match="assess"):
        TipConditioningEnv(object())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_actions"):
        TipEnvConfig(max_actions=0)
    with pytest.raises(ConfigError, match="damage_penalty_per_nm2"):
        TipEnvConfig(damage_penalty_per_nm2=-1e-3)


def test_site_map_moves_clear_of_damage() -> None:
    limits = Limits()
    sites = SiteMap((0.0, 0.0), limits)
    position = (0.0, 0.0)
    strongest = max(footprint_m(s) for s in CONDITIONING_ACTIONS)
    for _ in range(30):
        sites.add_damage(*position, strongest)
        target = sites.next_site(position)
        assert target is not None
        assert sites.free_radius_m(*target) >= min(footprint_m(s) for s in CONDITIONING_ACTIONS)
        position = target
    assert sites.mask(position).any()


def _reference_next_sites(
    limits: Limits, damage: list[float], *, area_m: float, calls: int
) -> list[tuple[float, float] | None]:
    """The site choice with an unbounded visited set (every position ever passed), as SiteMap
    chose before its visited set was bounded to the current approach area."""
    sites = SiteMap((0.0, 0.0), limits, area_m=area_m)
    visited: set[tuple[float, float]] = set()
    strongest = max(footprint_m(s) for s in CONDITIONING_ACTIONS)
    weakest = min(footprint_m(s) for s in CONDITIONING_ACTIONS)
    position = (0.0, 0.0)
    out: list[tuple[float, float] | None] = []
    for radius in damage[:calls]:
        sites.add_damage(*position, radius)
        visited.add((round(position[0], 12), round(position[1], 12)))
        target = None
        while target is None:
            grid = sites.sites()
            for need in (strongest, weakest):
                free = [
                    (math.hypot(x - position[0], y - position[1]), (x, y))
                    for x, y in grid
                    if sites.free_radius_m(x, y) >= need
                    and (round(x, 12), round(y, 12)) not in visited
                ]
                if free:
                    target = min(free)[1]
                    break
            if target is None:
                sites._area = next(sites._areas)
        visited.add((round(target[0], 12), round(target[1], 12)))
        out.append(target)
        position = target
    return out


def test_site_map_visited_set_stays_bounded_and_choices_unchanged() -> None:
    limits = Limits()
    area_m = 120 * NM  # 4 x 4 sites of 30 nm per area: many area moves in a short test
    rng = np.random.default_rng(3)
    damage = [footprint_m(CONDITIONING_ACTIONS[int(i)]) for i in rng.integers(0, 12, 120)]
    expected = _reference_next_sites(limits, damage, area_m=area_m, calls=len(damage))
    sites = SiteMap((0.0, 0.0), limits, area_m=area_m)
    position = (0.0, 0.0)
    chosen: list[tuple[float, float] | None] = []
    for radius in damage:
        sites.add_damage(*position, radius)
        target = sites.next_site(position)
        assert target is not None
        assert sites.visited_count <= len(sites.sites()) <= 16
        chosen.append(target)
        position = target
    assert sites.area_moves >= 5  # the bound was exercised across several areas
    assert chosen == expected
    assert len(set(chosen)) == len(chosen)  # no site is used twice


def test_oracle_acts_on_the_true_state_and_waits_on_a_good_tip(
    tip_env: TipConditioningEnv,
) -> None:
    gentle = oracle_chooser(ORACLE_GENTLE)
    fastest = oracle_chooser(ORACLE_FASTEST)
    obs, _ = tip_env.reset(seed=4, options={"tip": "blunt"})
    mask = tip_env.action_masks()
    assert gentle(tip_env, obs, mask) == 8  # 2.5 nm dip
    assert fastest(tip_env, obs, mask) == 11  # 5 nm dip
    tip_env.reset(seed=4, options={"tip": "unstable"})
    assert gentle(tip_env, obs, mask) == 0 and fastest(tip_env, obs, mask) == 4  # pulses
    tip_env.instrument.simulator.set_tip("good")
    assert gentle(tip_env, obs, mask) is None  # truly good: rescan, do not act
    with pytest.raises(ConfigError, match="crashed"):
        oracle_chooser({s: 0 for s in ORACLE_GENTLE if s is not TipState.CRASHED})


def _estimate(p_good: float, uncertainty: float = 0.1) -> TipEstimate:
    rest = (1 - p_good) / 4
    probs = {s: (p_good if s is TipState.GOOD else rest) for s in TipState}
    return TipEstimate(TipState.BLUNT, probs, uncertainty, "test")


def test_tip_observation_layout_and_nan() -> None:
    obs = tip_observation(
        _estimate(0.2),
        [_estimate(0.1), _estimate(0.3)],
        last_action=4,
        free_radius_m=math.inf,
        actions_taken=2,
        max_actions=100,
    )
    assert obs.shape == (OBS_DIM,)
    assert obs[0] == pytest.approx(0.2)  # P(good) first
    assert obs[6] == pytest.approx(0.3)  # most recent history entry next
    assert obs[24 + 4] == 1.0 and obs[24:36].sum() == 1.0
    bad = _estimate(0.2, uncertainty=math.nan)
    with pytest.raises(DataError, match="non-finite"):
        tip_observation(
            bad, [], last_action=None, free_radius_m=1.0, actions_taken=0, max_actions=1
        )


def test_dose_env_passes_the_checker_and_is_seeded() -> None:
    env = DoseControlEnv(ImageQualityAssessor(), DoseEnvConfig(frames=3))
    check_env(env, skip_render_check=True)
    runs = []
    for _ in range(2):
        obs, _ = env.reset(seed=11)
        seen = [obs]
        for action in (12, 6, 0):
            obs, reward, terminated, _, _info = env.step(action)
            seen.append(np.append(obs, reward))
        assert terminated
        runs.append(seen)
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)
    env.close()


def test_dose_env_longer_dwell_gives_higher_true_snr_and_more_dose() -> None:
    env = DoseControlEnv(ImageQualityAssessor(), DoseEnvConfig(frames=2, specimens=("ws2",)))
    env.reset(seed=2)
    _, r_short, _, _, short = env.step_level(0)
    _, _r_long, _, _, long = env.step_level(len(DWELL_LEVELS_S) - 1)
    assert long["true_snr"] > 4 * short["true_snr"]  # 64x the dwell: ~8x the shot-noise SNR
    assert long["dose_As"] == pytest.approx(64 * short["dose_As"])
    assert long["met"] and not short["met"]
    assert r_short < -1.9  # missed the target


def test_dose_observation_rejects_nan() -> None:
    assert dose_observation(None, None, None, 0, 20, target_snr=5.0).shape == (DOSE_OBS_DIM,)
    with pytest.raises(DataError, match="NaN"):
        dose_observation(math.nan, 1e-6, 10.0, 1, 20, target_snr=5.0)
    with pytest.raises(DataError, match="mean signal"):
        dose_observation(5.0, 1e-6, math.nan, 1, 20, target_snr=5.0)


@pytest.mark.slow
def test_training_is_reproducible_by_seed(tmp_path: object) -> None:
    from pathlib import Path

    from policies.rl_net import load_policy
    from policies.training import PPOSettings, train_masked_ppo

    out = Path(str(tmp_path))
    settings = PPOSettings(n_steps=16, batch_size=16, n_epochs=1, hidden=(8,))
    nets = []
    for name in ("a.pt", "b.pt"):
        result = train_masked_ppo(
            "dose",
            lambda: DoseControlEnv(ImageQualityAssessor(), DoseEnvConfig(frames=4, shape_px=32)),
            obs_dim=DOSE_OBS_DIM,
            n_actions=len(MARGINS),
            steps=32,
            seed=3,
            out=out / name,
            n_envs=2,
            settings=settings,
            curve_png=out / "curve.png",
            progress=False,
        )
        assert result.steps == 32
        nets.append(load_policy(out / name, kind="dose", obs_dim=DOSE_OBS_DIM, n_actions=13)[0])
    for (k, a), (_, b) in zip(
        nets[0].state_dict().items(), nets[1].state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k
    assert (out / "curve.png").stat().st_size > 0


def test_dose_action_is_a_margin_over_the_sqrt_law() -> None:
    assert level_for_action(0, None, None, target_snr=5.0) == FIRST_LEVEL
    # SNR 2.5 at level 8 (4 µs): reaching 5 needs 4x the dwell = 4 levels up, so level 12
    zero = MARGINS.index(0)
    assert level_for_action(zero, 2.5, DWELL_LEVELS_S[8], target_snr=5.0) == 12
    assert level_for_action(zero - 2, 2.5, DWELL_LEVELS_S[8], target_snr=5.0) == 10
    # SNR 20 at level 8: a quarter of the SNR is enough, 1/16 of the dwell = 8 levels down
    assert level_for_action(zero, 20.0, DWELL_LEVELS_S[8], target_snr=5.0) == 0
    with pytest.raises(DataError, match=r"integer 0\.\.12"):
        level_for_action(13, 2.5, 1e-6, target_snr=5.0)
    with pytest.raises(DataError, match="NaN"):
        level_for_action(0, math.nan, 1e-6, target_snr=5.0)
