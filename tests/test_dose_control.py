"""Image-quality estimate, the dose rule, and dose control end to end on sim:sem."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agent.loop import Agent, AgentConfig
from agent.perception.quality import ImageQualityAssessor
from drivers.commands import Capability, SetDwell
from drivers.frame import Frame, ScanRegion, frame_problems
from drivers.limits import Limits
from drivers.observation import Observation, QualityEstimate
from drivers.protocol import InstrumentInfo, InstrumentState
from drivers.registry import open_instrument
from policies.dose import dose_command
from policies.rule import RulePolicy
from tests.fakes import MemoryRecorder


def frame_of(data: np.ndarray, **metadata: object) -> Frame:
    return Frame(
        data.astype(np.float32),
        "se",
        (1e-9, 1e-9),
        1e-6,
        ScanRegion(),
        0,
        0.0,
        data.shape[0],
        "test",
        metadata=metadata,
    )


def poisson_image(dose: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:256, 0:256]
    clean = 500.0 + 100.0 * np.sin(x / 20.0) * np.cos(y / 25.0)
    rng = np.random.default_rng(seed)
    return rng.poisson(clean * dose) / dose, clean


def test_noise_and_signal_match_the_known_poisson_image() -> None:
    image, clean = poisson_image(1.0)
    q = ImageQualityAssessor().assess(frame_of(image))
    assert q.noise_std == pytest.approx(math.sqrt(500.0), rel=0.05)
    assert q.signal_std == pytest.approx(float(np.std(clean)), rel=0.05)


def test_snr_grows_as_the_square_root_of_dose() -> None:
    low = ImageQualityAssessor().assess(frame_of(poisson_image(1.0)[0])).snr
    high = ImageQualityAssessor().assess(frame_of(poisson_image(4.0)[0])).snr
    assert high / low == pytest.approx(2.0, rel=0.1)


def test_sparse_scan_nan_is_ignored_not_flagged() -> None:
    image, _ = poisson_image(1.0)
    sparse = image.copy()
    sparse[np.random.default_rng(1).random(image.shape) > 0.5] = np.nan
    frame = frame_of(sparse, pattern="random", fraction=0.5)
    assert frame_problems(frame) == []
    q = ImageQualityAssessor().assess(frame)
    assert math.isfinite(q.snr) and q.noise_std > 0
    too_empty = np.full(image.shape, np.nan)
    too_empty[0, :10] = 1.0
    assert "only 10 of" in frame_problems(frame_of(too_empty, pattern="random", fraction=0.5))[0]
    with_inf = sparse.copy()
    with_inf[5, 5] = np.inf
    assert "infinite" in frame_problems(frame_of(with_inf, pattern="random", fraction=0.5))[0]
    assert "NaN" in frame_problems(frame_of(sparse))[0]  # a raster scan with holes is corrupt


def observation(snr: float | None, dwell_s: float, limits: Limits) -> Observation:
    info = InstrumentInfo("sem", "test", ("se",), frozenset({Capability.SCAN}), limits)
    state = InstrumentState((0.0, 0.0), ScanRegion(), (64, 64), dwell_s, False, 0.0, 0)
    quality = None if snr is None else QualityEstimate(snr, 1.0, snr)
    return Observation(frame_of(np.ones((64, 64))), None, state, info, quality=quality)


@pytest.mark.parametrize(
    ("snr", "dwell_s", "expected"),
    [
        (2.0, 1e-6, 2e-6),
        (2.0, 8e-6, 1e-5),
        (20.0, 1e-6, 5e-7),
        (20.0, 1e-7, None),
        (5.0, 1e-6, None),
        (None, 1e-6, None),
        (float("nan"), 1e-6, None),
    ],
)
def test_dose_rule_steps_within_limits(
    snr: float | None, dwell_s: float, expected: float | None
) -> None:
    limits = Limits(dwell_s=(1e-7, 1e-5))
    command, why = dose_command(
        observation(snr, dwell_s, limits), target_snr=5.0, tolerance=1.5, dwell_step=2.0
    )
    if expected is None:
        assert command is None and why
    else:
        assert isinstance(command, SetDwell) and command.dwell_s == pytest.approx(expected)


def test_rule_policy_adds_dwell_changes_only_when_dose_control_is_on() -> None:
    obs = observation(2.0, 1e-6, Limits(dwell_s=(1e-7, 1e-5)))
    assert RulePolicy.from_options().decide(obs).commands == ()
    decision = RulePolicy.from_options(target_snr=5.0).decide(obs)
    assert [type(c) for c in decision.commands] == [SetDwell]
    assert decision.commands[0].source == "rule"
    assert "no tip to condition" in decision.reason and "dose:" in decision.reason


def test_dose_control_brings_a_noisy_sem_session_into_the_target_band() -> None:
    inst = open_instrument("sim:sem", seed=3, shape_px=(64, 64), dwell_s=1e-7)
    recorder = MemoryRecorder()
    agent = Agent(
        inst,
        RulePolicy.from_options(target_snr=8.0),
        assessor=None,
        quality=ImageQualityAssessor(),
        recorder=recorder,
        config=AgentConfig(frames=10),
    )
    agent.run()
    snrs = [p["quality"]["snr"] for p in recorder.kinds("perception")]
    executed = [
        c["command"]["dwell_s"] for c in recorder.kinds("command") if c["fate"] == "executed"
    ]
    assert executed == sorted(executed) and len(executed) >= 2  # only ever lengthened here
    assert snrs[0] < 8.0 / 1.5
    assert 8.0 / 1.5 <= snrs[-1] <= 8.0 * 1.5


def test_shipped_dose_policy_is_the_validation_pick_the_docs_describe() -> None:
    from pathlib import Path

    from policies.dose_features import DOSE_OBS_DIM, MARGINS
    from policies.rl import DOSE_WEIGHTS
    from policies.rl_net import load_policy

    _net, meta = load_policy(
        DOSE_WEIGHTS, kind="dose", obs_dim=DOSE_OBS_DIM, n_actions=len(MARGINS)
    )
    assert meta["seed"] == 1 and meta["steps"] == 16128
    assert "validation surveys 2000000-2000199" in meta["selected"]
    sha = meta["sha256"][:12]
    assert sha == "e4452fd13ab5"
    docs = (Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md").read_text()
    assert f"sha256 `{sha}" in docs
