"""agent.pipeline: perception and policy rebuilt from a session's plain config mapping."""

from __future__ import annotations

import pytest

from agent.pipeline import build_pipeline, default_assessor, default_policy_options
from drivers.errors import ConfigError


def test_defaults_per_instrument_kind() -> None:
    stm = build_pipeline({"policy": "rule"}, kind="stm")
    assert stm.assessor is not None and stm.assessor.name == "classical"
    assert stm.quality is not None and stm.quality.name == "snr"
    stem = build_pipeline({"policy": "none"}, kind="stem")
    assert stem.assessor is None and stem.policy.name == "none"
    assert default_assessor("afm") == "classical" and default_assessor("sem") == "none"
    # the trained tip policies get the assessor whose outputs they were trained on
    assert (
        default_assessor("stm", "rl-tip") == "tipnet" and default_assessor("stm", "rl") == "tipnet"
    )
    assert default_assessor("stem", "rl") == "none"
    rl = build_pipeline({"policy": "rl-tip"}, kind="stm")
    assert rl.assessor is not None and rl.assessor.name == "tipnet"
    assert stem.versions() == {"policy": "none 1", "assessor": "none", "quality": "snr 1"}


def test_options_reach_the_parts() -> None:
    pipe = build_pipeline(
        {
            "policy": "rule",
            "policy_options": {"target_snr": 7.0, "bad_frames_to_act": 3},
            "assessor": "classical",
            "assessor_options": {"ghost_at": 0.3},
            "quality": "none",
        },
        kind="stm",
    )
    assert pipe.policy.config.target_snr == 7.0  # type: ignore[attr-defined]
    assert pipe.policy.config.bad_frames_to_act == 3  # type: ignore[attr-defined]
    assert pipe.assessor.config.ghost_at == 0.3  # type: ignore[union-attr]
    assert pipe.quality is None


def test_run_policy_options_match_dose_control_defaults() -> None:
    assert default_policy_options("rule", "stm", None) == {"target_snr": None}
    assert default_policy_options("rule", "stem", None) == {"target_snr": 5.0}
    assert default_policy_options("rule", "sem", 0.0) == {"target_snr": None}
    assert default_policy_options("rule", "stm", 3.0) == {"target_snr": 3.0}
    assert default_policy_options("none", "stem", 3.0) == {}


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"policy": "magic"}, ["unknown policy 'magic'"]),
        ({"assessor": "neural9"}, ["unknown tip assessor 'neural9'", "classical"]),
        ({"assessor_options": {"no_such": 1}}, ["classical tip assessor", "no_such"]),
        ({"assessor_options": {"ghost_at": "x"}}, ["ghost_at"]),
        ({"assessor": "none", "assessor_options": {"ghost_at": 1}}, ["without a tip assessor"]),
        ({"policy_options": [1, 2]}, ["'policy_options' must be a mapping"]),
        ({"quality": 3}, ["'quality' must be a name"]),
        ({"quality": "psnr"}, ["unknown quality assessor 'psnr'"]),
    ],
)
def test_bad_config_names_the_key(config: dict[str, object], words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        build_pipeline(config, kind="stm")
    for word in words:
        assert word in str(info.value)


def test_a_tip_policy_fed_by_another_tip_model_is_flagged(tmp_path) -> None:
    from policies.rl import TIP_WEIGHTS, tip_policy_perception
    from policies.rl_net import load_policy, save_policy
    from policies.tip_actions import N_ACTIONS, OBS_DIM

    shipped = tip_policy_perception()
    assert shipped is not None and shipped.startswith("tipnet ")
    pipe = build_pipeline({"policy": "rl-tip"}, kind="stm")
    used = f"{pipe.assessor.name} {pipe.assessor.version}"
    assert pipe.versions()["policy_trained_on"] == shipped
    assert bool(pipe.warnings()) == (shipped != used)

    # the same network, its meta saying it learnt from the tip model this session uses: no warning
    net, meta = load_policy(TIP_WEIGHTS, kind="tip", obs_dim=OBS_DIM, n_actions=N_ACTIONS)
    matched = tmp_path / "matched.pt"
    save_policy(matched, "tip", net, {**meta, "perception": used})
    same = build_pipeline(
        {"policy": "rl", "policy_options": {"tip_weights": str(matched)}}, kind="stm"
    )
    assert same.policy_trained_on == used and same.warnings() == []

    other = tmp_path / "other.pt"
    save_policy(other, "tip", net, {**meta, "perception": "tipnet 0.9+00000000"})
    flagged = build_pipeline(
        {"policy": "rl-tip", "policy_options": {"weights": str(other)}}, kind="stm"
    )
    (warning,) = flagged.warnings()
    assert "tipnet 0.9+00000000" in warning and used in warning
    # no tip, no tip policy pairing to check; the rule policy is not a trained one
    assert build_pipeline({"policy": "rl"}, kind="stem").policy_trained_on is None
    assert build_pipeline({"policy": "rule"}, kind="stm").warnings() == []


def test_the_tip_watch_detector_is_recorded_with_the_versions() -> None:
    from agent.perception import tip_watch
    from agent.perception.registry import WEIGHTS_DIR

    detector = tip_watch.load(WEIGHTS_DIR)
    assert detector is not None
    versions = build_pipeline({"assessor": "tipnet"}, kind="stm").versions()
    assert versions["tip_watch"] == detector.label
    assert "tip_watch" not in build_pipeline({}, kind="stm").versions()  # classical: no watch
