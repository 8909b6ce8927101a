"""Behaviour-cloning warm start of the scan planner from the survey-then-zoom rule (DAgger),
on tiny scan-planning environments."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from agent.cli import main
from drivers.errors import ConfigError
from policies.env_scan import ScanEnvConfig, ScanPlanningEnv
from policies.imitation import BCSettings, agreement, bc_fit, collect, warm_start
from policies.rl_net import load_policy
from policies.scan_eval import rule_scan_chooser
from policies.scan_map import scan_n_actions, scan_obs_dim

SMALL = ScanEnvConfig(grid=3, budget=12, patch_density_per_um2=60.0)


def _fresh_policy(env: ScanPlanningEnv, seed: int = 0) -> Any:
    from sb3_contrib import MaskablePPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    torch.manual_seed(seed)
    model = MaskablePPO(
        "MlpPolicy",
        DummyVecEnv([lambda: env]),
        n_steps=16,
        batch_size=16,
        seed=seed,
        device="cpu",
        policy_kwargs={"net_arch": {"pi": [32], "vf": [32]}, "activation_fn": torch.nn.Tanh},
    )
    return model.policy


def test_collect_labels_every_state_with_the_rule_and_discounts_the_returns() -> None:
    env = ScanPlanningEnv(SMALL)
    demos, agree = collect(env, rule_scan_chooser, [5, 6], gamma=0.5)
    assert agree == 1.0  # the expert followed itself
    assert demos.obs.shape == (len(demos), scan_obs_dim(3))
    assert demos.masks.shape == (len(demos), scan_n_actions(3))
    assert all(demos.masks[i, a] for i, a in enumerate(demos.actions))  # labels are valid
    # replaying the first episode's labels reproduces its rewards; returns are discounted sums
    env.reset(seed=5)
    rewards = []
    for a in demos.actions:
        _, r, terminated, _, _ = env.step(int(a))
        rewards.append(r)
        if terminated:
            break
    g = 0.0
    for r in reversed(rewards):
        g = r + 0.5 * g
    assert demos.returns[0] == pytest.approx(g, rel=1e-5)
    env.close()


@pytest.mark.slow
def test_behaviour_cloning_raises_agreement_with_the_rule() -> None:
    env = ScanPlanningEnv(SMALL)
    policy = _fresh_policy(env)
    demos, _ = collect(env, rule_scan_chooser, list(range(10, 18)), gamma=0.97)
    before = agreement(policy, demos)
    history = bc_fit(
        policy, demos, BCSettings(episodes=8, epochs=50, batch_size=32, learning_rate=3e-3), seed=1
    )
    after = agreement(policy, demos)
    assert history[-1]["pi_loss"] < 0.5 * history[0]["pi_loss"]
    assert history[-1]["vf_loss"] < history[0]["vf_loss"]
    assert after >= 0.9 and after > before + 0.2, (before, after)
    held_out, _ = collect(env, rule_scan_chooser, list(range(40, 44)), gamma=0.97)
    assert agreement(policy, held_out) >= 0.85  # it learnt the rule, not the samples
    env.close()


def test_warm_start_is_reproducible_and_records_dagger_rounds() -> None:
    settings = BCSettings(episodes=4, rounds=2, epochs=3, batch_size=32)
    results, weights = [], []
    for _ in range(2):
        env = ScanPlanningEnv(SMALL)
        policy = _fresh_policy(env)
        results.append(warm_start(policy, env, rule_scan_chooser, settings, seed=7, progress=False))
        weights.append({k: v.clone() for k, v in policy.state_dict().items()})
        env.close()
    for k, v in weights[0].items():
        assert torch.equal(v, weights[1][k]), k
    info = results[0]
    rounds = json.loads(info["bc_rounds"])
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[0]["learner_agreement_before"] is None
    assert 0 <= rounds[1]["learner_agreement_before"] <= 1
    assert rounds[1]["states"] > rounds[0]["states"]  # DAgger aggregates
    assert info["bc_agreement"] == rounds[-1]["agreement_after"]
    assert len(info["curve"]) == settings.rounds * settings.epochs
    assert json.loads(info["bc_settings"])["episodes"] == 4


def test_bc_settings_reject_bad_values() -> None:
    with pytest.raises(ConfigError, match="episodes"):
        BCSettings(episodes=0)
    with pytest.raises(ConfigError, match="rounds"):
        BCSettings(episodes=2, rounds=3)
    with pytest.raises(ConfigError, match="learning_rate"):
        BCSettings(learning_rate=0.0)


def test_train_policy_rejects_bc_for_other_kinds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train-policy", "dose", "--bc-episodes", "3", "--quiet"]) == 2
    assert "only available for the scan policy" in capsys.readouterr().err
    assert main(["train-policy", "scan", "--steps", "0", "--quiet"]) == 2
    assert main(["train-policy", "scan", "--ent-coef", "-1", "--quiet"]) == 2
    assert "--ent-coef" in capsys.readouterr().err


@pytest.mark.slow
def test_train_with_warm_start_writes_a_loadable_policy_and_curve(tmp_path: Path) -> None:
    from policies.imitation import warm_start as bc
    from policies.training import PPOSettings, train_masked_ppo

    settings = BCSettings(episodes=2, rounds=1, epochs=2, batch_size=32)

    def start(policy: Any) -> dict[str, Any]:
        env = ScanPlanningEnv(SMALL)
        try:
            return bc(policy, env, rule_scan_chooser, settings, seed=0, progress=False)
        finally:
            env.close()

    obs_dim, n_actions = scan_obs_dim(3), scan_n_actions(3)
    for steps in (0, 16):
        out = tmp_path / f"scan{steps}.pt"
        result = train_masked_ppo(
            "scan",
            lambda: ScanPlanningEnv(SMALL),
            obs_dim=obs_dim,
            n_actions=n_actions,
            steps=steps,
            seed=0,
            out=out,
            n_envs=1,
            settings=PPOSettings(n_steps=16, batch_size=16, n_epochs=1, hidden=(16,)),
            curve_png=tmp_path / f"curve{steps}.png",
            progress=False,
            warm_start=start,
        )
        assert result.steps == steps
        net, meta = load_policy(out, kind="scan", obs_dim=obs_dim, n_actions=n_actions)
        assert meta["algorithm"].startswith("behaviour cloning (DAgger)")
        assert ("MaskablePPO" in meta["algorithm"]) == (steps > 0)
        assert 0 <= meta["bc_agreement"] <= 1 and "curve" not in meta
        assert (tmp_path / f"curve{steps}.png").stat().st_size > 0
        mask = np.zeros(n_actions, dtype=bool)
        mask[:9] = True
        assert net.act(np.zeros(obs_dim, dtype=np.float32), mask)[0] < 9


def test_shipped_scan_network_keeps_surveying_past_dark_tiles() -> None:
    """The PPO-only network zoomed into a dark tile after five empty surveys and stayed there
    (found nothing on these samples); the warm-started one surveys on until a tile is bright."""
    from policies.scan_policy import SCAN_WEIGHTS

    net, meta = load_policy(
        SCAN_WEIGHTS, kind="scan", obs_dim=scan_obs_dim(6), n_actions=scan_n_actions(6)
    )
    assert meta["algorithm"].startswith("behaviour cloning (DAgger)")
    assert meta["bc_agreement"] >= 0.95
    env = ScanPlanningEnv()
    found = {}
    for seed in (2001, 2002):
        obs, _ = env.reset(seed=seed)
        while True:
            mask = env.action_masks()
            action = net.act(obs, mask)[0]
            mag, tile = divmod(action, 36)
            if mag == 1 and mask[:36].any():  # a zoom while tiles are left to survey
                assert env.scan_map.tiles[tile].bright >= 3, (seed, tile)
            obs, _, terminated, _, info = env.step(action)
            if terminated:
                break
        found[seed] = info["found_total"]
    env.close()
    assert found[2001] > 100  # a patch in the 5th tile of the serpentine order
