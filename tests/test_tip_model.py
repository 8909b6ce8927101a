"""The tip-state network: the committed weights, bad input, calibration helpers, the agent's
assessor with its classical fallback, the CLI, and reproducible training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from agent.cli import main
from agent.perception.registry import WEIGHTS_DIR, file_sha256, read_card
from agent.perception.tasks import tip as tip_task
from agent.perception.tip_data import (
    GOOD_INDEX,
    STATES,
    VISIBLE_PIXELS,
    TipRecipe,
    TipSample,
    same_tip_frames,
    sample,
    sample_with_truth,
    shown_per_line,
    simulate,
    state_for,
    stitch,
)
from agent.perception.tip_eval import agent_rule, as_frame, score_votes
from agent.perception.tip_net import (
    TipModel,
    TipNetAssessor,
    expected_calibration_error,
    fit_temperature,
    normalise,
    softmax,
)
from agent.perception.tip_train import BatchMaker, Prepared, TrainConfig, train_model
from drivers.errors import DataError, ModelError
from drivers.frame import TipState
from drivers.observation import TipEstimate

# held-out seeds (training uses 10,000,000 + i), one frame per tip state, Au(111) at 16 nm
HELDOUT = TipRecipe(seeds=(20_500_000, 20_500_010), size_nm=(16.0, 16.0), pairs=False)


@pytest.fixture(scope="module")
def model() -> TipModel:
    return TipModel.load()


@pytest.fixture(scope="module")
def frames() -> list[TipSample]:
    return simulate(HELDOUT, progress=False)


def test_committed_weights_are_small_and_match_their_card() -> None:
    card = read_card("tip")
    weights = WEIGHTS_DIR / "tip.pt"
    assert weights.stat().st_size <= 5 * 1024 * 1024
    assert file_sha256(weights) == card.sha256
    assert card.metrics and card.training["command"].startswith("scopepilot train tip")


def test_committed_weights_classify_held_out_frames(
    model: TipModel, frames: list[TipSample]
) -> None:
    predicted = []
    for s in frames:
        probs, _ = model.probabilities(model.prepare(s.data, s.pixel_size_nm))
        assert probs.sum() == pytest.approx(1.0, abs=1e-5)
        predicted.append(int(np.argmax(probs)))
    truth = [s.label for s in frames]
    assert sorted(set(truth)) == list(range(len(STATES)))  # every state is in the test
    correct = sum(p == t for p, t in zip(predicted, truth, strict=True))
    assert correct >= len(frames) - 1, (truth, predicted)


def test_partial_frame_and_mid_scan_change(model: TipModel, frames: list[TipSample]) -> None:
    good = next(s for s in frames if s.label == STATES.index(TipState.GOOD))
    assessor = TipNetAssessor(model)
    assert assessor.watch(as_frame(good.data, good.pixel_size_nm, 10)) is None  # < 16 lines
    est = assessor.assess(as_frame(good.data, good.pixel_size_nm, 96))
    assert est.state is TipState.GOOD
    crashed = next(s for s in frames if s.label == STATES.index(TipState.CRASHED))
    changed = stitch(good.data, crashed.data, 100)  # different places: a crash looks the same
    seen = assessor.watch(as_frame(changed, good.pixel_size_nm, 100 + 16))
    assert seen is not None and seen.state is TipState.CRASHED


@pytest.mark.parametrize(
    ("image", "pixel_nm", "words"),
    [
        (np.zeros((2, 64, 64)), 0.0625, "2-D"),
        (np.zeros((0, 64)), 0.0625, "empty"),
        (np.full((64, 64), np.nan), 0.0625, "NaN"),
        (np.full((64, 64), np.inf), 0.0625, "infinite"),
        (np.zeros((64, 64)), 0.5, "outside the tip model's range"),
        (np.zeros((64, 64)), float("nan"), "positive and finite"),
        (np.zeros((8, 64)), 0.0625, "at least 16 lines"),
    ],
)
def test_bad_input_is_a_data_error(
    model: TipModel, image: np.ndarray, pixel_nm: float, words: str
) -> None:
    with pytest.raises(DataError, match=words):
        model.predict(image, pixel_nm)


def test_corrupt_or_missing_weights_are_model_errors(tmp_path: Path) -> None:
    shutil.copy(WEIGHTS_DIR / "tip.json", tmp_path / "tip.json")
    raw = bytearray((WEIGHTS_DIR / "tip.pt").read_bytes())
    raw[100] ^= 0x01
    (tmp_path / "tip.pt").write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="corrupt"):
        TipModel.load(tmp_path)
    (tmp_path / "tip.pt").unlink()
    with pytest.raises(ModelError, match="missing"):
        TipModel.load(tmp_path)
    with pytest.raises(ModelError, match="no model card"):
        TipModel.load(tmp_path / "empty")


def test_unsure_network_falls_back_to_classical_and_says_why(
    model: TipModel, frames: list[TipSample]
) -> None:
    strict = TipModel(model.net, model.card)
    strict.reject_uncertainty = 0.0  # every output counts as unsure
    est = TipNetAssessor(strict).assess(as_frame(frames[0].data, frames[0].pixel_size_nm))
    assert est.source.startswith("classical (fallback: tip model unsure")
    assert est.features["tipnet_rejected"] == 1.0 and "tipnet_uncertainty" in est.features
    nan_frame = as_frame(frames[0].data, frames[0].pixel_size_nm)
    nan_frame.data[3, 3] = np.nan
    est = TipNetAssessor(model).assess(nan_frame)
    assert "cannot judge this frame" in est.source and est.features["tipnet_rejected"] == 1.0


def test_temperature_fit_and_ece_known_answers() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=2.0, size=(2000, 5))
    cumulative = np.cumsum(softmax(logits), axis=1)
    labels = np.minimum((rng.random((2000, 1)) > cumulative).sum(axis=1), 4)  # sampled
    assert fit_temperature(3.0 * logits, labels) == pytest.approx(3.0, rel=0.1)
    assert expected_calibration_error(softmax(logits), labels) < 0.03
    assert expected_calibration_error(softmax(5.0 * logits), labels) > 0.1
    sure = np.eye(5)[labels]
    assert expected_calibration_error(sure, labels) == 0.0


def test_infer_cli_on_npy_and_bad_file(
    frames: list[TipSample], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "f.npy", frames[0].data)
    assert main(["infer", "tip", str(tmp_path / "f.npy"), "--pixel-size-nm", "0.0625"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["frame"]["state"] in [str(s) for s in STATES]
    assert set(out["recent_lines"]["probabilities"]) == {str(s) for s in STATES}
    (tmp_path / "g.npy").write_bytes(b"\x93NUMPY broken")
    assert main(["infer", "tip", str(tmp_path / "g.npy"), "--pixel-size-nm", "0.0625"]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["infer", "tip", str(tmp_path / "f.npy")]) == 2
    assert "--pixel-size-nm" in capsys.readouterr().err


def _fake_samples(n: int, seed: int) -> list[TipSample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        data = (rng.normal(size=(200, 200)) * 1e-11 * (1 + i % 5)).astype(np.float32)
        twin = data * 0.5 if i % 5 else None
        out.append(TipSample(data, 0.0625, i % 5, i, "au111", twin))
    return out


def test_training_is_reproducible_by_seed() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # 10 steps: the one length at which OneCycleLR's warm-up would be zero steps long
        config = TrainConfig(steps=10, batch=4, width=4, seed=3)
        train, val = _fake_samples(10, 0), _fake_samples(5, 1)
        calib = _fake_samples(5, 2)
        net_a, card_a, hist_a = train_model(train, val, config, progress=False, calib=calib)
        net_b, _, hist_b = train_model(train, val, config, progress=False, calib=calib)
    finally:
        torch.set_num_threads(threads)
    assert hist_a["loss"] == hist_b["loss"]
    for a, b in zip(net_a.state_dict().values(), net_b.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert card_a.architecture["width"] == 4 and card_a.name == "tip"
    # the frame temperature saw the extra calibration frames, the recent one only val's crops
    assert (hist_a["validation"]["frames"], hist_a["validation"]["extra_frames"]) == (10, 5)
    assert hist_a["train_cpu_s"] > 0


def test_recent_weight_scales_the_last_lines_loss() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train, val = _fake_samples(10, 0), _fake_samples(5, 1)
        hist = {}
        for w in (1.0, 3.0):
            config = TrainConfig(steps=3, batch=4, width=4, seed=3, recent_weight=w)
            hist[w] = train_model(train, val, config, progress=False)[2]
    finally:
        torch.set_num_threads(threads)
    for w, h in hist.items():
        total = np.array(h["frame_loss"]) + w * np.array(h["recent_loss"])
        np.testing.assert_allclose(h["loss"], total, rtol=1e-6)
    # same seed, same first batch and weights: only the weighting differs at step 0
    assert hist[1.0]["recent_loss"][0] == hist[3.0]["recent_loss"][0]
    assert hist[1.0]["loss"][0] != hist[3.0]["loss"][0]


def test_task_parsers_know_their_options() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    tip_task.add_train_arguments(parser)
    args = parser.parse_args(["--steps", "5", "--seed", "2"])
    assert (args.steps, args.seed, args.threads) == (5, 2, 1)
    assert (args.recent_weight, args.change_fraction) == (1.0, 0.35)  # the recipe of 1.2
    args = parser.parse_args(["--recent-weight", "2", "--change-fraction", "0.5"])
    assert (args.recent_weight, args.change_fraction) == (2.0, 0.5)
    parser = argparse.ArgumentParser()
    tip_task.add_evaluate_arguments(parser)
    assert parser.parse_args(["--vote-tips", "0"]).vote_tips == 0
    assert parser.parse_args([]).more_changes == 0


def test_evaluate_passes_the_extra_change_sets_on(monkeypatch, tmp_path: Path) -> None:
    import argparse

    import agent.perception.tip_eval as tip_eval

    seen: dict[str, object] = {}

    def fake_evaluate_all(directory: object, **options: object) -> dict[str, object]:
        seen.update(options)
        return {"summary": {"changes": options["changes"]}}

    monkeypatch.setattr(tip_eval, "evaluate_all", fake_evaluate_all)
    parser = argparse.ArgumentParser()
    tip_task.add_evaluate_arguments(parser)
    args = parser.parse_args(
        ["--changes", "6", "--more-changes", "4", "--vote-tips", "0", "--out-dir", str(tmp_path)]
    )
    assert tip_task.evaluate(args) == 0
    assert (seen["changes"], seen["more_changes"], seen["vote_tips"]) == (6, 4, 0)
    assert (tmp_path / "tip_metrics.json").is_file()


def test_pipeline_builds_the_tipnet_assessor_with_its_options() -> None:
    from agent.pipeline import build_pipeline
    from drivers.errors import ConfigError

    pipe = build_pipeline(
        {"assessor": "tipnet", "assessor_options": {"reject_uncertainty": 0.2, "ghost_at": 0.3}},
        kind="stm",
    )
    assert isinstance(pipe.assessor, TipNetAssessor)
    assert pipe.assessor.model.reject_uncertainty == 0.2
    assert pipe.assessor.fallback.config.ghost_at == 0.3
    assert pipe.versions()["assessor"].startswith("tipnet 1.2+")
    with pytest.raises(ConfigError, match="reject_uncertainty"):
        build_pipeline(
            {"assessor": "tipnet", "assessor_options": {"reject_uncertainty": 2}}, kind="stm"
        )
    with pytest.raises(ConfigError, match="tipnet tip assessor"):
        build_pipeline({"assessor": "tipnet", "assessor_options": {"no_such": 1}}, kind="stm")


def test_run_with_the_tip_network_records_its_estimates(tmp_path: Path) -> None:
    from agent.session import Session

    out = tmp_path / "s.zarr"
    args = ["run", "--assessor", "tipnet", "--frames", "3", "--shape", "128", "--size-nm", "8"]
    assert main([*args, "--seed", "2", "--out", str(out), "--quiet"]) == 0
    session = Session(str(out))
    assert session.versions["assessor"].startswith("tipnet")
    tips = [e["payload"]["tip"] for e in session.events("perception")]
    assert len(tips) == 3 and all(t is not None for t in tips)
    for tip in tips:  # the network's verdict, or the classical one with the reason
        assert tip["source"] == "tipnet" or tip["source"].startswith("classical (fallback:")
        assert "tipnet_rejected" in tip["features"]


def test_a_bad_tip_counts_only_where_it_shows() -> None:
    rng = np.random.default_rng(5)
    good = (rng.normal(size=(64, 160)) * 2e-12).astype(np.float32)
    faint = good + np.float32(1e-12)  # a uniform offset and nothing else: shows nowhere
    ghost = good.copy()
    ghost[40:44, 50:58] += np.float32(20e-12)  # one ghost blob, 32 pixels at 10 sigma
    assert shown_per_line(faint, good, 2e-12).sum() == 0
    shown = shown_per_line(ghost, good, 2e-12)
    assert shown.sum() == 32 and np.flatnonzero(shown).tolist() == [40, 41, 42, 43]
    multiple = STATES.index(TipState.MULTIPLE)
    mask = np.zeros(ghost.shape, dtype=bool)
    mask[40:44, 50:58] = True
    # a pure crop of the bad frame is labelled multiple only when it holds the ghost
    item = Prepared(ghost, good, multiple, mask)
    maker = BatchMaker([item], np.random.default_rng(0), change_fraction=0.0)
    labels: dict[int, int] = {}
    for _ in range(200):
        img, frame_label, recent_label = maker.crop(32)
        assert img.shape == (2, 32, 128)
        labels.setdefault(frame_label, 0)
        labels[frame_label] += 1
        if frame_label == GOOD_INDEX:
            assert recent_label == GOOD_INDEX
    assert set(labels) == {GOOD_INDEX, multiple}  # crops with and without the ghost
    # a change crop: the recent read-out turns bad as soon as the new tip shows
    maker = BatchMaker([item], np.random.default_rng(1), change_fraction=1.0)
    seen: set[int] = set()
    for _ in range(100):
        _, _, recent_label = maker.crop(48)
        seen.add(recent_label)
    assert seen == {GOOD_INDEX, multiple}
    assert VISIBLE_PIXELS <= 32


def test_high_pass_channel_keeps_the_corrugation_next_to_a_step() -> None:
    y, x = np.mgrid[0:128, 0:128]
    lattice = 10e-12 * np.sin(2 * np.pi * x / 4.6) * np.sin(2 * np.pi * y / 4.6)
    step = np.where(x > 64 + 0.3 * y, -240e-12, 0.0)
    flat_in, step_in = normalise(lattice), normalise(lattice + step)
    assert flat_in.shape == step_in.shape == (2, 128, 128)
    far = (slice(20, 100), slice(0, 30))  # away from the edge
    # the levelled channel squeezes the corrugation next to the step; the high-pass one does not
    assert np.std(step_in[0][far]) < 0.5 * np.std(flat_in[0][far])
    assert np.std(step_in[1][far]) > 0.5 * np.std(flat_in[1][far])


def test_watch_needs_the_fitted_bad_probability(model: TipModel, frames: list[TipSample]) -> None:
    assert 0.5 <= model.watch_p_bad < 1.0
    good = next(s for s in frames if s.label == GOOD_INDEX)
    crashed = next(s for s in frames if s.label == STATES.index(TipState.CRASHED))
    changed = stitch(good.data, crashed.data, 100)
    frame = as_frame(changed, good.pixel_size_nm, 100 + 16)
    assert TipNetAssessor(model).watch(frame) is not None
    strict = TipModel(model.net, model.card)
    strict.watch_p_bad = 1.01  # no probability reaches it: never grounds to abort
    assert TipNetAssessor(strict).watch(frame) is None


def test_parallel_simulation_gives_the_same_frames() -> None:
    recipe = TipRecipe(seeds=(20_600_000, 20_600_004), shape_px=(32, 32), size_nm=(2.0, 2.0))
    one = simulate(recipe, progress=False)
    two = simulate(recipe, progress=False, workers=2)
    for a, b in zip(one, two, strict=True):
        assert np.array_equal(a.data, b.data) and (a.label, a.sim_label) == (b.label, b.sim_label)
        assert (a.good_twin is None) == (b.good_twin is None)
    assert [s.sim_label for s in one] == [0, 1, 2, 3]


def test_sample_with_truth_is_the_sample_and_the_apex_geometry() -> None:
    recipe = TipRecipe(seeds=(20_600_000, 20_600_004), shape_px=(32, 32), size_nm=(2.0, 2.0))
    seed = next(s for s in range(*recipe.seeds) if state_for(s) is TipState.MULTIPLE)
    got, truth = sample_with_truth(recipe, seed)
    plain = sample(recipe, seed)
    assert np.array_equal(got.data, plain.data) and np.array_equal(got.good_twin, plain.good_twin)
    assert (got.label, got.sim_label) == (plain.label, plain.sim_label)
    apexes = truth.extra["apexes_m"]
    # the main apex at the origin, then one or two extra apexes 0.4-2.5 nm away
    assert truth.tip_state is TipState.MULTIPLE and apexes[0][:3] == [0.0, 0.0, 0.0]
    assert 2 <= len(apexes) <= 3
    assert all(0.4e-9 <= float(np.hypot(a[0], a[1])) <= 2.5e-9 for a in apexes[1:])


def test_same_tip_frames_scan_one_tip_at_different_places() -> None:
    recipe = TipRecipe(seeds=(25_900_000, 25_900_005), shape_px=(32, 32), size_nm=(2.0, 2.0))
    seed = 25_900_001  # a double tip
    frames = same_tip_frames(recipe, seed, 3)
    assert [s.label for s in frames] == [STATES.index(state_for(seed))] * 3
    assert all(s.seed == seed and s.good_twin is None for s in frames)
    assert not np.array_equal(frames[0].data, frames[1].data)  # another patch of surface
    again = same_tip_frames(recipe, seed, 3)
    assert all(np.array_equal(a.data, b.data) for a, b in zip(frames, again, strict=True))


class _ScriptedAssessor:
    """Says the scripted (state, uncertainty) for each frame in turn."""

    name = "scripted"

    def __init__(self, said: list[tuple[TipState, float]]) -> None:
        self.said = list(said)

    def assess(self, frame: object) -> TipEstimate:
        state, uncertainty = self.said.pop(0)
        probs = {s: (1.0 - uncertainty if s is state else uncertainty / 4) for s in TipState}
        return TipEstimate(state, probs, uncertainty, self.name)


def test_agent_decision_follows_the_rule_policy() -> None:
    k, max_unc = agent_rule()
    assert k >= 1 and 0 < max_unc <= 1
    good, bad = STATES.index(TipState.GOOD), STATES.index(TipState.BLUNT)
    data = np.zeros((32, 32), dtype=np.float32)

    def tip(label: int) -> list[TipSample]:
        return [TipSample(data, 0.0625, label, 0, "au111") for _ in range(3)]

    G, B = TipState.GOOD, TipState.BLUNT
    said = [
        (B, 0.1), (B, 0.1), (G, 0.1),  # bad tip, two bad frames first: acts (right)
        (B, 0.1), (G, 0.1), (B, 0.1),  # bad tip, a good frame breaks the run: no action (wrong)
        (B, 0.9), (B, 0.1), (B, 0.1),  # bad tip, the unsure frame is skipped: acts (right)
        (B, 0.1), (B, 0.1), (B, 0.1),  # good tip read bad twice: acts (wrong)
        (G, 0.1), (B, 0.1), (B, 0.1),  # good tip, first frame good: no action (right)
    ]  # fmt: skip
    scored = score_votes(
        [tip(bad), tip(bad), tip(bad), tip(good), tip(good)],
        _ScriptedAssessor(said),  # type: ignore[arg-type]
        k=2,
        max_uncertainty=0.6,
    )
    assert scored["good_vs_bad_accuracy"] == pytest.approx(3 / 5)
    assert scored["bad_tips_acted_on"] == pytest.approx(2 / 3)
    assert scored["good_tips_acted_on"] == pytest.approx(1 / 2)
    # single frames: 15 verdicts, right when bad on a bad tip or good on a good tip
    assert scored["single_frame_good_vs_bad_accuracy"] == pytest.approx(8 / 15)
    assert scored["undecided_tips"] == 0
