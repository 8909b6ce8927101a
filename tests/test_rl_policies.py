"""Deployed RL policies: weights files, the Policy protocol, fallback, bad input, the agent."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from agent.cli import main
from drivers.commands import Capability, MoveTo, SetDwell, TipDip, TipPulse
from drivers.errors import ConfigError, DataError, ModelError
from drivers.frame import TipState
from drivers.observation import Decision, Observation, QualityEstimate, TipEstimate
from policies.base import Policy, known_policies, make_policy
from policies.dose_features import DOSE_OBS_DIM, DWELL_LEVELS_S, MARGINS
from policies.rl import DOSE_WEIGHTS, TIP_WEIGHTS, FallbackPolicy, RLDosePolicy, RLTipPolicy
from policies.rl_net import FORMAT, PolicyNet, load_policy, save_policy
from policies.rule import RulePolicy
from policies.tip_actions import CONDITIONING_ACTIONS, N_ACTIONS, OBS_DIM, SiteMap
from tests.fakes import FakeInstrument

ROOT = Path(__file__).resolve().parents[1]


def _estimate(state: TipState, p_state: float, uncertainty: float = 0.1) -> TipEstimate:
    rest = (1 - p_state) / 4
    probs = {s: (p_state if s is state else rest) for s in TipState}
    return TipEstimate(state, probs, uncertainty, "test")


def _observation(
    tip: TipEstimate | None,
    *,
    instrument: FakeInstrument | None = None,
    quality: QualityEstimate | None = None,
    problems: tuple[str, ...] = (),
    advisory: bool = False,
) -> Observation:
    inst = instrument or FakeInstrument()
    return Observation(
        frame=inst.acquire(),
        tip=tip,
        state=inst.state(),
        info=inst.info(),
        problems=problems,
        quality=quality,
        advisory=advisory,
    )


# -- weights files ---------------------------------------------------------------------------


def test_shipped_weights_load_with_weights_only_and_carry_their_recipe() -> None:
    for path, kind, obs_dim, n in (
        (TIP_WEIGHTS, "tip", OBS_DIM, N_ACTIONS),
        (DOSE_WEIGHTS, "dose", DOSE_OBS_DIM, len(MARGINS)),
    ):
        payload = torch.load(path, weights_only=True)
        assert payload["format"] == FORMAT and payload["kind"] == kind
        _net, meta = load_policy(path, kind=kind, obs_dim=obs_dim, n_actions=n)
        assert meta["algorithm"].startswith("MaskablePPO") and meta["steps"] > 0
        assert len(meta["sha256"]) == 64
        assert path.stat().st_size < 200_000  # small enough to ship
    # the tip policy learnt from the perception its environment uses by default (the tip network)
    _net, meta = load_policy(TIP_WEIGHTS, kind="tip", obs_dim=OBS_DIM, n_actions=N_ACTIONS)
    assert meta["perception"].startswith("tipnet ")


def test_wrong_kind_shape_version_or_garbage_is_a_clear_error(tmp_path: Path) -> None:
    net = PolicyNet(OBS_DIM, N_ACTIONS, (8,))
    good = tmp_path / "tip.pt"
    save_policy(good, "tip", net)
    with pytest.raises(ModelError, match="not a 'dose' policy"):
        load_policy(good, kind="dose", obs_dim=OBS_DIM, n_actions=N_ACTIONS)
    with pytest.raises(ModelError, match="obs_dim=38"):
        load_policy(good, kind="tip", obs_dim=40, n_actions=N_ACTIONS)
    payload = torch.load(good, weights_only=True)
    payload["version"] = 99
    torch.save(payload, tmp_path / "v99.pt")
    with pytest.raises(ModelError, match="version 99"):
        load_policy(tmp_path / "v99.pt", kind="tip", obs_dim=OBS_DIM, n_actions=N_ACTIONS)
    payload["version"] = 1
    payload["state_dict"] = {"layers.0.weight": torch.zeros(3, 3)}
    torch.save(payload, tmp_path / "shape.pt")
    with pytest.raises(ModelError, match="do not fit"):
        load_policy(tmp_path / "shape.pt", kind="tip", obs_dim=OBS_DIM, n_actions=N_ACTIONS)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ModelError, match="not a readable torch"):
        load_policy(tmp_path / "junk.pt", kind="tip", obs_dim=OBS_DIM, n_actions=N_ACTIONS)
    with pytest.raises(ConfigError, match="does not exist"):
        load_policy(tmp_path / "missing.pt", kind="tip", obs_dim=OBS_DIM, n_actions=N_ACTIONS)
    with pytest.raises(ModelError, match="not a 'dose' policy"):
        make_policy("rl-dose", weights=str(good))


def test_network_rejects_nan_observations_and_respects_the_mask() -> None:
    net = PolicyNet(OBS_DIM, N_ACTIONS, (8,))
    obs = np.zeros(OBS_DIM, dtype=np.float32)
    obs[3] = np.nan
    with pytest.raises(DataError, match="non-finite values at indices \\[3\\]"):
        net.act(obs)
    with pytest.raises(DataError, match="shape"):
        net.act(np.zeros(5, dtype=np.float32))
    with pytest.raises(DataError, match="allows no action"):
        net.act(np.zeros(OBS_DIM, dtype=np.float32), np.zeros(N_ACTIONS, dtype=bool))
    mask = np.zeros(N_ACTIONS, dtype=bool)
    mask[[1, 7]] = True
    for seed in range(20):
        x = np.random.default_rng(seed).uniform(0, 1, OBS_DIM).astype(np.float32)
        action, probs = net.act(x, mask)
        assert action in (1, 7)
        assert probs[~mask].sum() == 0 and probs.sum() == pytest.approx(1)


@pytest.mark.slow
def test_deployment_imports_neither_gymnasium_nor_stable_baselines() -> None:
    code = (
        "import sys; from policies.base import make_policy; "
        "make_policy('rl-tip'); make_policy('rl-dose'); "
        "bad = [m for m in ('gymnasium', 'stable_baselines3', 'sb3_contrib') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr


# -- the Policy protocol ---------------------------------------------------------------------


def test_rl_policies_are_registered_policies() -> None:
    assert {"rl", "rl-tip", "rl-dose"} <= set(known_policies())
    for name in ("rl", "rl-tip", "rl-dose"):
        assert isinstance(make_policy(name), Policy)
    with pytest.raises(ConfigError, match="no options"):
        make_policy("rl-tip", bogus=1)


def test_tip_policy_conditions_a_bad_tip_then_moves_to_a_fresh_site() -> None:
    policy = RLTipPolicy()
    decision = policy.decide(_observation(_estimate(TipState.BLUNT, 0.9)))
    kinds = [type(c) for c in decision.commands]
    assert kinds[0] in (TipPulse, TipDip) and kinds[1] is MoveTo
    assert decision.policy == "rl-tip" and 0 < decision.confidence <= 1
    assert "network p=" in decision.reason
    target = decision.commands[1]
    assert isinstance(target, MoveTo) and math.hypot(target.x_m, target.y_m) > 0
    # a good tip: keep scanning
    good = policy.decide(_observation(_estimate(TipState.GOOD, 0.95)))
    assert good.commands == () and "keep scanning" in good.reason


def test_tip_policy_advice_in_manual_mode_changes_nothing() -> None:
    def action(decision: Decision) -> dict[str, object]:
        body = decision.commands[0].to_json()
        return {k: v for k, v in body.items() if k not in ("id", "source", "reason")}

    policy = RLTipPolicy()
    bad = _estimate(TipState.BLUNT, 0.9)
    advised = [policy.decide(_observation(bad, advisory=True)) for _ in range(5)]
    assert all("advice only (manual mode)" in d.reason for d in advised)
    assert all(len(d.commands) == 1 for d in advised)  # no move: advice uses up no site
    assert all(action(d) == action(advised[0]) for d in advised)  # no history built up
    acted = policy.decide(_observation(bad))  # as a fresh policy would: the same first action
    assert action(acted) == action(advised[0])
    assert isinstance(acted.commands[1], MoveTo)


def test_tip_policy_never_issues_an_action_outside_the_mask() -> None:
    policy = RLTipPolicy()
    inst = FakeInstrument()
    sites = SiteMap(inst.position, inst.limits)
    policy._sites = sites
    sites.add_damage(30e-9, 0.0, 15e-9)  # 15 nm free at the origin: only gentle actions fit
    allowed = {CONDITIONING_ACTIONS[i] for i in np.flatnonzero(sites.mask(inst.position))}
    assert 0 < len(allowed) < N_ACTIONS
    for state in (TipState.BLUNT, TipState.MULTIPLE, TipState.CRASHED, TipState.UNSTABLE):
        decision = policy.decide(_observation(_estimate(state, 0.9), instrument=inst))
        command = decision.commands[0]
        step = next(s for s in CONDITIONING_ACTIONS if s.command(source="", reason="") == command)
        assert step in allowed
        policy._sites = sites = SiteMap(inst.position, inst.limits)
        sites.add_damage(30e-9, 0.0, 15e-9)


def test_tip_policy_errors_clearly_on_a_nan_estimate() -> None:
    nan = _estimate(TipState.BLUNT, 0.9, uncertainty=math.nan)
    with pytest.raises(DataError, match="non-finite"):
        RLTipPolicy().decide(_observation(nan))


def test_tip_policy_does_not_act_on_flagged_frames_or_tipless_instruments() -> None:
    policy = RLTipPolicy()
    flagged = policy.decide(_observation(_estimate(TipState.BLUNT, 0.9), problems=("NaN",)))
    assert flagged.commands == () and "not acted on" in flagged.reason
    stem = FakeInstrument(capabilities=frozenset({Capability.SCAN, Capability.STAGE}))
    tipless = policy.decide(_observation(_estimate(TipState.BLUNT, 0.9), instrument=stem))
    assert tipless.commands == () and "no tip" in tipless.reason


# -- fallback --------------------------------------------------------------------------------


def test_fallback_rescans_when_perception_is_uncertain() -> None:
    policy = make_policy("rl-tip")
    uncertain = _estimate(TipState.BLUNT, 0.4, uncertainty=0.8)
    decision = policy.decide(_observation(uncertain))
    assert decision.commands == ()
    assert "fallback: perception uncertainty 0.80 > 0.60" in decision.reason


def test_fallback_hands_low_confidence_decisions_to_the_rule_policy() -> None:
    rule = RulePolicy.from_options(bad_frames_to_act=1)
    policy = FallbackPolicy(RLTipPolicy(), rule, min_confidence=1.0)  # never confident enough
    decision = policy.decide(_observation(_estimate(TipState.BLUNT, 0.9)))
    assert decision.reason.startswith("fallback to rule: rl-tip confidence")
    assert isinstance(decision.commands[0], TipDip)  # the rule's blunt ladder begins with a dip
    assert policy.fallbacks["low_confidence"] == 1
    operator = FallbackPolicy(RLTipPolicy(), None, min_confidence=1.0)
    asked = operator.decide(_observation(_estimate(TipState.BLUNT, 0.9)))
    assert asked.commands == () and "operator attention" in asked.reason


# -- dose ------------------------------------------------------------------------------------


def test_dose_policy_sets_a_dwell_level_inside_the_limits() -> None:
    policy = RLDosePolicy()
    inst = FakeInstrument(capabilities=frozenset({Capability.SCAN, Capability.STAGE}))
    inst.dwell_s = 1e-6
    frame_obs = _observation(None, instrument=inst, quality=QualityEstimate(1.0, 1.0, 1.0))
    decision = policy.decide(frame_obs)
    for command in decision.commands:
        assert isinstance(command, SetDwell)
        assert any(math.isclose(command.dwell_s, d) for d in DWELL_LEVELS_S)
    no_quality = policy.decide(_observation(None, instrument=inst))
    assert no_quality.commands == () and "no image-quality" in no_quality.reason


# -- the agent -------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_with_the_rl_policy_against_sim_stm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "rl.zarr"
    code = main(
        [
            "run", "--instrument", "sim:stm", "--policy", "rl", "--frames", "6",
            "--out", str(store), "--seed", "3", "--shape", "64", "--size-nm", "6.4",
            "--sim", "initial_tip=blunt", "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    from agent.session import Session

    session = Session(str(store))
    decisions = [e["payload"] for e in session.events("decision")]
    assert decisions and all(d["policy"] == "rl-tip" for d in decisions)
    issued = [c for d in decisions for c in d["commands"]]
    assert any(c["type"] in ("TipPulse", "TipDip") for c in issued)


# -- evaluation ------------------------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_policy_compares_with_baselines(tmp_path: Path) -> None:
    net = PolicyNet(OBS_DIM, N_ACTIONS, (8,))
    weights = tmp_path / "tip.pt"
    save_policy(weights, "tip", net, {"algorithm": "untrained", "steps": 0})
    out = tmp_path / "eval"
    code = main(
        [
            "evaluate-policy", "tip", "--episodes", "2", "--weights", str(weights),
            "--out-dir", str(out), "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    import json

    report = json.loads((out / "results.json").read_text())
    assert set(report["summary"]) == {"random", "rule", "rl"}
    assert report["assessor"].startswith("tipnet ")  # the tip network judges every frame
    for name, episodes in report["per_episode"].items():
        assert [e["seed"] for e in episodes] == [1_000_000, 1_000_001], name
        for e in episodes:
            assert 0 <= e["actions"] <= 100 and e["frames"] >= 1
            if e["success"]:
                assert e["final_state"] == "good"
    assert (out / "actions.png").stat().st_size > 0
