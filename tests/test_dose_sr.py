"""The dose policy's optional "rely on sr" choice: environment, masks, policy files, sessions."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from agent.perception.quality import ImageQualityAssessor
from agent.perception.stages import SrStage
from agent.pipeline import build_pipeline
from drivers.errors import CommandRejected, ConfigError, DataError, ModelError
from drivers.frame import Frame, ScanRegion
from drivers.registry import open_instrument
from policies.dose_features import (
    DOSE_OBS_DIM,
    DOSE_SR_OBS_DIM,
    MARGINS,
    SR_FEATURES_VERSION,
    SR_N_ACTIONS,
    split_sr_action,
    sr_action_mask,
    sr_features,
)
from policies.env_dose import DoseControlEnv, DoseEnvConfig
from policies.rl import RLDosePolicy, load_dose_policy
from policies.rl_net import PolicyNet, save_policy
from tests.fakes import MemoryRecorder


@dataclass
class _Output:
    fields: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


class TruthStage:
    """A stand-in sr stage with a known answer: the frame's noise-free image, or a rejection."""

    name = "sr"
    version = "truth 1"

    def __init__(self, *, reject: bool = False) -> None:
        self.reject = reject

    def run(self, frame: Frame) -> _Output:
        fields = {"model": self.version, "ran": True, "reject": self.reject}
        fields["relative_uncertainty"] = 0.2 if self.reject else 0.01
        fields["reason"] = "too uncertain" if self.reject else ""
        assert frame.truth is not None and frame.truth.clean is not None
        return _Output({"sr": fields}, {"sr": np.asarray(frame.truth.clean, np.float16)})


def _env(stage: Any, **config: Any) -> DoseControlEnv:
    cfg = DoseEnvConfig(sr=True, frames=3, specimens=("ws2",), **config)
    return DoseControlEnv(ImageQualityAssessor(), cfg, sr=stage)


def _sr_file(path: Path, *, favour: int, sr_features_version: int = SR_FEATURES_VERSION) -> Path:
    """An sr-aware policy file whose network always prefers action ``favour``."""
    net = PolicyNet(DOSE_SR_OBS_DIM, SR_N_ACTIONS, (8,))
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        last = net.layers[-1]
        assert isinstance(last, torch.nn.Linear)
        last.bias[favour] = 5.0
    meta = {"target_snr": 5.0, "sr": 1, "sr_features": sr_features_version, "sr_model": "x"}
    save_policy(path, "dose", net, meta)
    return path


def test_sr_env_passes_the_checker_and_is_seeded() -> None:
    env = _env(SrStage(record="float16"))
    assert env.observation_space.shape == (DOSE_SR_OBS_DIM,)
    assert env.action_space == gym.spaces.Discrete(SR_N_ACTIONS) and SR_N_ACTIONS == 26
    check_env(env, skip_render_check=True)
    runs = []
    for _ in range(2):
        obs, _ = env.reset(seed=5)
        seen = [obs]
        for action in (12 + 13, 6, 0 + 13):
            obs, reward, terminated, _, info = env.step(action)
            seen.append(np.append(obs, [reward, info["sr_true_snr"]]))
        assert terminated
        runs.append(seen)
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)
    assert runs[0][1][DOSE_OBS_DIM] == 1.0 and runs[0][2][DOSE_OBS_DIM] == 0.0  # relied last
    env.close()


def test_relying_on_sr_judges_the_frame_on_the_sr_image() -> None:
    env = _env(TruthStage())
    env.reset(seed=2)
    _, raw_reward, _, _, raw = env.step_level(0)  # 0.25 µs: the raw frame misses SNR 5
    assert not raw["met"] and not raw["sr"] and raw_reward < -2.9
    _, sr_reward, _, _, on_sr = env.step_level(0, sr=True)  # the noise-free image: met
    assert on_sr["sr"] and on_sr["met"] and on_sr["true_snr"] == on_sr["sr_true_snr"] > 100
    assert sr_reward == pytest.approx(-0.25 / 16)
    assert on_sr["dose_As"] == pytest.approx(raw["dose_As"])  # sr costs no dose


def test_sr_half_is_masked_after_sr_rejects_and_a_rejected_frame_is_judged_raw() -> None:
    env = _env(TruthStage(reject=True))
    env.reset(seed=2)
    assert env.action_masks().all()  # before the first frame sr is allowed
    _, _, _, _, info = env.step(13)  # relied on sr, sr rejected the frame: the raw one counts
    assert info["sr_chosen"] and not info["sr"] and math.isnan(info["sr_true_snr"])
    mask = env.action_masks()
    assert mask[:13].all() and not mask[13:].any()
    with pytest.raises(CommandRejected, match="masked"):
        env.step(13)
    env.step(0)  # raw actions stay valid
    np.testing.assert_array_equal(mask, sr_action_mask({"ran": True, "reject": True}))
    assert sr_action_mask({"ran": True, "reject": False}).all()


def test_sr_option_needs_the_stage_and_the_default_env_is_unchanged() -> None:
    with pytest.raises(ConfigError, match="needs the sr frame stage"):
        DoseControlEnv(ImageQualityAssessor(), DoseEnvConfig(sr=True))
    with pytest.raises(ConfigError, match="sr is False"):
        DoseControlEnv(ImageQualityAssessor(), DoseEnvConfig(), sr=TruthStage())
    env = DoseControlEnv(ImageQualityAssessor(), DoseEnvConfig(frames=2))
    assert env.observation_space.shape == (DOSE_OBS_DIM,)
    assert env.action_space == gym.spaces.Discrete(len(MARGINS))
    env.reset(seed=1)
    with pytest.raises(CommandRejected, match="needs DoseEnvConfig"):
        env.step_level(3, sr=True)
    with pytest.raises(CommandRejected, match=r"0\.\.12"):
        env.step(13)
    assert "sr" not in env.step(0)[4]


def test_sr_features_and_actions() -> None:
    assert sr_features(None, False).tolist() == [0.0, 0.0, 0.0]
    good = {"ran": True, "reject": False, "relative_uncertainty": 0.02}
    np.testing.assert_allclose(sr_features(good, True), [1.0, 0.4, 1.0], rtol=1e-6)
    failed = {"ran": False, "reject": True, "reason": "DataError: pixel size"}
    assert sr_features(failed, False).tolist() == [0.0, 10.0, 0.0]
    assert split_sr_action(0) == (0, False) and split_sr_action(25) == (12, True)
    with pytest.raises(DataError, match=r"0\.\.25"):
        split_sr_action(26)
    with pytest.raises(DataError, match="mapping"):
        sr_features([0.02], False)


def test_sr_policy_file_loads_only_into_an_sr_aware_run(tmp_path: Path) -> None:
    sr_file = _sr_file(tmp_path / "sr.pt", favour=13)
    net, meta = load_dose_policy(sr_file, sr=True)
    assert (net.obs_dim, net.n_actions, meta["sr_features"]) == (10, 26, SR_FEATURES_VERSION)
    with pytest.raises(ModelError, match=r"sr-aware dose policy.*option sr=true"):
        RLDosePolicy(sr_file)
    raw_file = tmp_path / "raw.pt"
    save_policy(raw_file, "dose", PolicyNet(DOSE_OBS_DIM, len(MARGINS), (8,)), {})
    assert load_dose_policy(raw_file, sr=False)[0].n_actions == len(MARGINS)
    with pytest.raises(ModelError, match="raw-only dose policy"):
        RLDosePolicy(raw_file, sr=True)
    old = _sr_file(tmp_path / "old.pt", favour=13, sr_features_version=0)
    with pytest.raises(ModelError, match="sr feature layout 0"):
        RLDosePolicy(old, sr=True)
    odd = tmp_path / "odd.pt"
    save_policy(odd, "dose", PolicyNet(DOSE_SR_OBS_DIM, len(MARGINS), (8,)), {})
    for sr in (False, True):
        with pytest.raises(ModelError, match="network shape obs_dim=10, n_actions=13"):
            RLDosePolicy(odd, sr=sr)
    with pytest.raises(ConfigError, match="must be true or false"):
        RLDosePolicy(sr_file, sr="yes")  # type: ignore[arg-type]


def _small_ws2() -> Any:
    """A small WS2 sim:stem (64² over 2 nm, 1 µs) for the sessions below."""
    return open_instrument(
        "sim:stem",
        seed=4,
        shape_px=(64, 64),
        region=ScanRegion(0.0, 0.0, 2e-9, 2e-9),
        dwell_s=1e-6,
        lines_per_chunk=64,
        specimen="ws2",
    )


def _stem_session(config: dict[str, Any], frames: int) -> MemoryRecorder:
    from agent.loop import AgentConfig

    instrument = _small_ws2()
    recorder = MemoryRecorder()
    pipeline = build_pipeline(config, kind="stem")
    try:
        pipeline.agent(instrument, recorder=recorder, config=AgentConfig(frames=frames)).run()
    finally:
        instrument.close()
    return recorder


def test_sr_aware_rl_dose_runs_a_stem_session_and_says_when_it_relies_on_sr(
    tmp_path: Path,
) -> None:
    weights = _sr_file(tmp_path / "sr.pt", favour=13 + MARGINS.index(2))
    config = {
        "policy": "rl-dose",
        "policy_options": {"weights": str(weights), "sr": True},
        "perception": ["sr"],
    }
    recorder = _stem_session(config, frames=3)
    perception = recorder.kinds("perception")
    decisions = recorder.kinds("decision")
    assert len(decisions) == 3 and all(p["sr"]["ran"] for p in perception)
    for p, d in zip(perception, decisions, strict=True):
        assert d["policy"] == "rl-dose"
        if p["sr"]["reject"]:  # the sr half is masked: raw frame, and the reason says why
            assert "raw frame (sr unusable on this frame" in d["reason"]
        else:
            assert "rely on sr: the next frame's product is sr's recovered image" in d["reason"]
    assert any("rely on sr" in d["reason"] for d in decisions)
    commands = [c["command"] for c in recorder.kinds("command") if c["fate"] == "executed"]
    assert commands and all(c["type"] == "SetDwell" for c in commands)
    assert any("rely on sr" in c["reason"] for c in commands)  # the command says so too
    # the features the policy saw are the env's: the same stage fields, recorded per frame
    stage = SrStage(record="none")
    assert set(perception[0]["sr"]) == set(stage.run(_blank_frame()).fields["sr"])
    without = _stem_session({**config, "perception": []}, frames=1)
    reason = without.kinds("decision")[0]["reason"]
    assert "needs perception 'sr'" in reason and not without.kinds("command")


def _blank_frame() -> Frame:
    rng = np.random.default_rng(0)
    data = 100.0 + rng.poisson(50.0, (64, 64)).astype(np.float32)
    return Frame(data, "haadf", (3.1e-11, 3.1e-11), 1e-6, ScanRegion(), 0, 0.0, 64, "test")


@pytest.mark.slow
def test_train_and_evaluate_an_sr_aware_dose_policy_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from agent.cli import main

    weights = tmp_path / "sr.pt"
    code = main(
        [
            "train-policy", "dose", "--sr", "--steps", "64", "--n-envs", "1",
            "--out", str(weights), "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    net, meta = load_dose_policy(weights, sr=True)
    assert meta["sr"] == 1 and meta["sr_model"] == SrStage().version and net.n_actions == 26
    assert main(["train-policy", "tip", "--sr", "--steps", "1", "--quiet"]) == 2
    assert "--sr is only available for the dose policy" in capsys.readouterr().err
    out = tmp_path / "eval"
    code = main(
        [
            "evaluate-policy", "dose", "--episodes", "1", "--sr-weights", str(weights),
            "--out-dir", str(out), "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    rows = report["summary"]
    assert list(rows)[:2] == ["rl", "rl-sr"] and rows["rl-sr"]["frames"] == 20
    assert 0.0 <= rows["rl-sr"]["sr_fraction"] <= 1.0 and rows["rl"]["sr_fraction"] == 0.0
    assert "on sr" in report["table"] and "relies on sr in" in report["table"]


def test_rl_passes_the_sr_option_to_its_dose_policy(tmp_path: Path) -> None:
    from policies.base import make_policy

    weights = _sr_file(tmp_path / "sr.pt", favour=13)
    recorder = _stem_session(
        {
            "policy": "rl",
            "policy_options": {"dose_weights": str(weights), "dose_sr": True},
            "perception": ["sr"],
        },
        frames=1,
    )
    assert "rely on sr" in recorder.kinds("decision")[0]["reason"]
    with pytest.raises(ConfigError, match="no options"):
        make_policy("rl", dose_srr=True)


def test_no_sr_aware_policy_ships_and_rl_dose_says_so() -> None:
    with pytest.raises(ConfigError, match="none ships"):
        RLDosePolicy(sr=True)


def test_a_session_with_the_sr_aware_policy_replays_to_the_same_decisions(tmp_path: Path) -> None:
    from agent.loop import AgentConfig
    from agent.recorder import SessionRecorder
    from agent.replay import canonical_decision, replay_session
    from agent.session import Session

    weights = _sr_file(tmp_path / "sr.pt", favour=13 + MARGINS.index(2))
    config = {
        "instrument": "sim:stem",
        "policy": "rl-dose",
        "policy_options": {"weights": str(weights), "sr": True},
        "quality": "snr",
        "perception": ["sr"],
        "perception_options": {"sr": {"record": "none"}},
    }
    instrument = _small_ws2()
    pipeline = build_pipeline(config, kind="stem")
    store = tmp_path / "s.zarr"
    recorder = SessionRecorder(store, config=config, versions=pipeline.versions())
    try:
        pipeline.agent(instrument, recorder=recorder, config=AgentConfig(frames=3)).run()
    finally:
        recorder.close()
        instrument.close()
    replay_session(store, tmp_path / "r.zarr")

    def decisions(path: Path) -> list[dict[str, object]]:
        return [canonical_decision(e["payload"]) for e in Session(path).events("decision")]

    original = decisions(store)
    assert len(original) == 3 and any("rely on sr" in str(d) for d in original)
    assert decisions(tmp_path / "r.zarr") == original
