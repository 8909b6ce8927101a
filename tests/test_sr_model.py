"""The sr network: committed weights, bad input, and recovery on held-out simulated frames
against trivial baselines (the raw frame, linear interpolation)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from agent.cli import main
from agent.perception.registry import WEIGHTS_DIR, file_sha256, read_card
from agent.perception.tasks import sr
from agent.perception.tasks.stem_baselines import interpolate_sparse
from agent.perception.tasks.stem_metrics import relative_rms
from drivers.commands import Scan, SetScanPattern
from drivers.errors import DataError, ModelError
from drivers.frame import Frame, ScanRegion
from drivers.registry import open_instrument

PIXEL_NM = 0.025
HELD_OUT_SEEDS = (7_100_001, 7_100_002)  # training uses seeds drawn from generator seed 0


def _frame(
    seed: int, dwell_s: float, pattern: str = "raster", fraction: float = 1.0, size_px: int = 128
) -> Frame:
    inst = open_instrument(
        "sim:stem",
        seed=seed,
        region=ScanRegion(0.0, 0.0, size_px * PIXEL_NM * 1e-9, size_px * PIXEL_NM * 1e-9),
        shape_px=(size_px, size_px),
        dwell_s=dwell_s,
    )
    try:
        inst.execute(Scan(dwell_s=dwell_s))
        inst.execute(SetScanPattern(pattern, fraction))
        return inst.acquire()
    finally:
        inst.close()


def test_committed_weights_match_their_card_and_are_small() -> None:
    card = read_card("sr")
    weights = WEIGHTS_DIR / "sr.pt"
    assert file_sha256(weights) == card.sha256
    assert weights.stat().st_size <= 5 * 1024 * 1024
    assert card.version == sr.VERSION
    assert card.training["temperature"] > 0
    assert card.training["align_lines"] is True
    assert card.training["align_sparse_lines"] is True
    assert "held_out" in card.metrics


@pytest.mark.parametrize("seed", HELD_OUT_SEEDS)
def test_quarter_dose_recovery_beats_the_raw_frame(seed: int) -> None:
    frame = _frame(seed, 0.5e-6)
    assert frame.truth is not None and frame.truth.clean is not None
    clean = frame.truth.clean
    result = sr.recover(frame.data, PIXEL_NM)
    assert result.image.shape == frame.data.shape
    assert relative_rms(result.image, clean) < 0.5 * relative_rms(frame.data, clean)
    # the uncertainty is on the scale of the actual error (calibrated within a factor of 2)
    error = float(np.sqrt(np.mean((result.image - clean) ** 2)))
    assert 0.5 * error < float(np.sqrt(np.mean(result.sigma**2))) < 2.0 * error


@pytest.mark.parametrize("seed", HELD_OUT_SEEDS)
def test_aligning_the_scan_lines_brings_the_recovery_closer_to_the_truth(seed: int) -> None:
    frame = _frame(seed, 0.5e-6)
    assert frame.truth is not None and frame.truth.clean is not None
    clean = frame.truth.clean
    aligned = sr.recover(frame.data, PIXEL_NM)  # the committed card turns alignment on
    straight = sr.recover(frame.data, PIXEL_NM, align=False)
    # 10-14 % lower RMS error on these two 128² frames (the bench's 256² areas: ~22 %, 2.1 dB)
    assert relative_rms(aligned.image, clean) < 0.95 * relative_rms(straight.image, clean)
    assert np.array_equal(sr.recover(frame.data, PIXEL_NM, align=True).image, aligned.image)


@pytest.mark.parametrize("pattern", ["random", "spiral"])
def test_aligning_sparse_lines_brings_partial_scans_closer_to_the_truth(pattern: str) -> None:
    frame = _frame(HELD_OUT_SEEDS[1], 2e-6, pattern, 0.05, size_px=256)  # ~13 samples a line
    assert frame.truth is not None and frame.truth.clean is not None
    clean = frame.truth.clean
    model, card = sr.load()
    aligned = sr.recover(frame.data, PIXEL_NM)  # the committed card aligns sparse lines too
    no_sparse = dataclasses.replace(card, training={**card.training, "align_sparse_lines": False})
    straight = sr.recover(frame.data, PIXEL_NM, model=model, card=no_sparse)
    assert np.array_equal(straight.image, sr.recover(frame.data, PIXEL_NM, align=False).image)
    # 12 % (random) and 9 % (spiral) lower RMS error on this 256² frame (the bench's: 11-13 %)
    assert relative_rms(aligned.image, clean) < 0.95 * relative_rms(straight.image, clean)


@pytest.mark.parametrize("pattern", ["random", "spiral"])
def test_partial_scan_recovery_beats_linear_interpolation(pattern: str) -> None:
    frame = _frame(HELD_OUT_SEEDS[0], 2e-6, pattern, 0.05)
    assert frame.truth is not None and frame.truth.clean is not None
    result = sr.recover(frame.data, PIXEL_NM)
    assert np.isfinite(result.image).all()
    assert relative_rms(result.image, frame.truth.clean) < relative_rms(
        interpolate_sparse(frame.data), frame.truth.clean
    )


def test_infer_is_json_and_flags_noise_as_uncertain() -> None:
    frame = _frame(HELD_OUT_SEEDS[1], 2e-6)
    out = sr.infer(frame.data, PIXEL_NM)
    text = json.dumps(out)
    assert json.loads(text)["model"] == "sr"
    assert np.asarray(out["image"]).shape == (128, 128)
    assert out["reject"] is False
    # pure noise of the same mean holds no lattice: the model must not be confident about it
    noise = np.random.default_rng(0).poisson(0.3, (128, 128)).astype(np.float32) + 0.01
    assert sr.recover(noise, PIXEL_NM).reject


@pytest.mark.parametrize(
    ("image", "pixel_nm", "message"),
    [
        (np.ones((4, 64, 64)), PIXEL_NM, "2-D"),
        (np.ones(64), PIXEL_NM, "2-D"),
        (np.full((64, 64), np.nan), PIXEL_NM, "no finite"),
        (np.where(np.eye(64) > 0, np.inf, 1.0), PIXEL_NM, "infinite"),
        (np.ones((64, 64)), 0.5, "outside"),
        (np.zeros((64, 64)), PIXEL_NM, "mean"),
        (np.ones((0, 64)), PIXEL_NM, "empty"),
    ],
)
def test_bad_input_raises_data_error(image: np.ndarray, pixel_nm: float, message: str) -> None:
    with pytest.raises(DataError, match=message):
        sr.recover(image, pixel_nm)


def test_corrupt_weights_raise_model_error(tmp_path: Path) -> None:
    shutil.copy(WEIGHTS_DIR / "sr.json", tmp_path / "sr.json")
    blob = bytearray((WEIGHTS_DIR / "sr.pt").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (tmp_path / "sr.pt").write_bytes(bytes(blob))
    with pytest.raises(ModelError, match="corrupt"):
        sr.load(tmp_path)


def test_a_card_for_another_architecture_raises_model_error(tmp_path: Path) -> None:
    card = json.loads((WEIGHTS_DIR / "sr.json").read_text())
    card["architecture"]["widths"] = [8, 8, 8, 8]
    (tmp_path / "sr.json").write_text(json.dumps(card))
    shutil.copy(WEIGHTS_DIR / "sr.pt", tmp_path / "sr.pt")
    with pytest.raises(ModelError, match=r"wrong shape|does not match"):
        sr.load(tmp_path)


def test_the_stage_version_says_whether_sparse_lines_are_aligned(tmp_path: Path) -> None:
    from agent.perception.stages import SrStage

    card = json.loads((WEIGHTS_DIR / "sr.json").read_text())
    shipped = SrStage(record="none").version
    assert shipped == f"{card['version']}+{card['sha256'][:8]}+sparse"
    card["training"]["align_sparse_lines"] = False  # the card as sessions before ADR 0017 had it
    (tmp_path / "sr.json").write_text(json.dumps(card))
    shutil.copy(WEIGHTS_DIR / "sr.pt", tmp_path / "sr.pt")
    assert SrStage(record="none", weights_dir=str(tmp_path)).version == shipped[: -len("+sparse")]


def test_the_default_training_command_is_the_recipe_of_the_committed_model() -> None:
    """With no options, ``scopepilot train sr`` trains the committed model from scratch or, when
    that was fine-tuned (``--init``, maybe more than once), the model the chain started from;
    the card records every command of the chain."""
    parser = argparse.ArgumentParser()
    sr.add_train_arguments(parser)
    defaults = parser.parse_args([])
    card = read_card("sr")
    assert not card.training["stopped_early"]
    step = card.training
    while "init" in step:
        tuned = parser.parse_args(step["command"].split()[3:])
        assert tuned.init and sr.training_command(tuned) == step["command"]
        assert tuned.steps == step["steps_done"]
        assert len(step["init"]["sha256"]) == 64
        step = step["init"]
    assert sr.training_command(defaults) == step["command"]
    assert step["steps_done"] == defaults.steps


def test_training_command_is_reproducible_by_seed(tmp_path: Path) -> None:
    args = ["--frames", "3", "--val-frames", "2", "--steps", "3", "--batch", "2", "--threads", "1"]
    for run in ("a", "b"):
        out = tmp_path / run
        assert main(["train", "sr", *args, "--out", str(out), "--plots", str(out)]) == 0
        assert (out / "sr_loss.png").stat().st_size > 0
    assert file_sha256(tmp_path / "a" / "sr.pt") == file_sha256(tmp_path / "b" / "sr.pt")
    other = tmp_path / "c"
    assert (
        main(["train", "sr", *args, "--seed", "1", "--out", str(other), "--plots", str(other)]) == 0
    )
    assert file_sha256(other / "sr.pt") != file_sha256(tmp_path / "a" / "sr.pt")


def test_infer_cli_shows_array_shapes_and_saves_whole_arrays(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frame = _frame(HELD_OUT_SEEDS[0], 2e-6)
    np.save(tmp_path / "f.npy", frame.data)
    out = tmp_path / "r.json"
    args = ["infer", "sr", str(tmp_path / "f.npy"), "--pixel-size-nm", str(PIXEL_NM)]
    assert main([*args, "--out", str(out)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["image"] == f"<128x128 array: in {out}>"
    saved = json.loads(out.read_text())
    assert np.asarray(saved["image"]).shape == (128, 128)
    assert np.asarray(saved["sigma"]).shape == (128, 128)
    assert main(args) == 0
    assert "pass --out" in json.loads(capsys.readouterr().out)["sigma"]


def test_fine_tuning_starts_from_the_given_weights_and_records_them(tmp_path: Path) -> None:
    args = ["--frames", "3", "--val-frames", "2", "--batch", "2", "--threads", "1"]
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    assert (
        main(["train", "sr", *args, "--steps", "3", "--out", str(base), "--plots", str(base)]) == 0
    )
    # learning rate 0: the fine-tuned weights must be exactly the starting ones
    fine = ["--steps", "1", "--lr", "0", "--seed", "5", "--init", str(base)]
    assert main(["train", "sr", *args, *fine, "--out", str(tuned), "--plots", str(tuned)]) == 0
    start = torch.load(base / "sr.pt", weights_only=True)
    end = torch.load(tuned / "sr.pt", weights_only=True)
    assert all(torch.equal(start[k], end[k]) for k in start)
    card = read_card("sr", tuned)
    assert card.training["init"]["sha256"] == read_card("sr", base).sha256
    assert card.training["command"].endswith(f"--init {base}")
    # fine-tuning the fine-tuned model records the whole chain
    again = tmp_path / "again"
    fine = ["--steps", "1", "--lr", "0", "--seed", "6", "--init", str(tuned)]
    assert main(["train", "sr", *args, *fine, "--out", str(again), "--plots", str(again)]) == 0
    chain = read_card("sr", again).training["init"]
    assert chain["sha256"] == card.sha256 and chain["command"] == card.training["command"]
    assert chain["init"] == card.training["init"]


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_beta_sets_how_the_mean_error_is_weighted_by_the_predicted_variance(beta: float) -> None:
    """d(β-NLL)/d(mean) = (mean - y) / var^(1-β) / N: β = 1 is the squared error's gradient."""
    out = torch.zeros(1, 2, 4, 4)
    out[:, 0] = torch.linspace(-1.0, 1.0, 16).reshape(4, 4)
    out[:, 1] = torch.linspace(-2.0, 2.0, 16).reshape(4, 4)  # log-variance
    out.requires_grad_(True)
    y = torch.full((1, 4, 4), 0.25)
    sr.beta_nll(torch.nn.Identity(), (out, y), beta=beta).backward()
    assert out.grad is not None
    var = out.detach()[:, 1].exp()
    expected = (out.detach()[:, 0] - y) / var ** (1.0 - beta) / y.numel()
    torch.testing.assert_close(out.grad[:, 0], expected)


def test_beta_and_extra_rasters_are_in_the_training_command_only_when_not_default() -> None:
    parser = argparse.ArgumentParser()
    sr.add_train_arguments(parser)
    default = sr.training_command(parser.parse_args([]))
    assert "--beta" not in default and "--extra-rasters" not in default
    tuned = parser.parse_args(["--beta", "1.0", "--init", "w", "--extra-rasters", "3"])
    assert sr.training_command(tuned).endswith("--init w --beta 1.0 --extra-rasters 3")
    again = parser.parse_args(sr.training_command(tuned).split()[3:])
    assert (again.beta, again.extra_rasters) == (1.0, 3)
    patterns = sr.train_recipe(0, 5, extra_rasters=3).patterns
    assert patterns[3:] == sr.TRAIN_PATTERNS
    assert [p for p, _ in patterns].count("raster") == 6 and len(patterns) == 13
    from drivers.errors import ConfigError

    with pytest.raises(ConfigError, match="--extra-rasters must be 0 or more"):
        sr.train(parser.parse_args(["--extra-rasters", "-1", "--out", "unused"]))


def test_specimens_are_checked_and_in_the_command_only_when_not_default() -> None:
    from drivers.errors import ConfigError

    parser = argparse.ArgumentParser()
    sr.add_train_arguments(parser)
    assert "--specimens" not in sr.training_command(parser.parse_args([]))
    wide = parser.parse_args(["--specimens", "mos2, ws2,srtio3,graphene"])
    assert sr.training_command(wide).endswith("--specimens mos2,ws2,srtio3,graphene")
    again = parser.parse_args(sr.training_command(wide).split()[3:])
    assert sr.parse_specimens(again.specimens) == ("mos2", "ws2", "srtio3", "graphene")
    recipe = sr.train_recipe(0, 5, specimens=("srtio3", "graphene"))
    assert recipe.specimens == ("srtio3", "graphene")
    assert sr.train_recipe(0, 5).specimens == sr.HELD_OUT_SPECIMENS
    with pytest.raises(ConfigError, match="specimen='mos3' is unknown"):
        sr.parse_specimens("mos2,mos3")
    with pytest.raises(ConfigError, match="one or more"):
        sr.parse_specimens(" , ")


def test_evaluate_on_other_specimens_does_not_write_the_card(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["evaluate", "sr", "--areas", "1", "--specimens", "srtio3", "--out", str(tmp_path)]
    assert main([*args, "--update-card", "--weights", str(tmp_path)]) != 0
    assert "leave --specimens out" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_evaluation_areas_cycle_through_the_given_specimens() -> None:
    from agent.perception.tasks.sr_eval import area_frames

    rng = np.random.default_rng(0)
    frames = [area_frames(rng, area, {}, ("srtio3", "graphene")) for area in range(2)]
    assert [f["full"].truth.extra["specimen"] for f in frames] == ["srtio3", "graphene"]
