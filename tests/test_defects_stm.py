"""The STM defects network (``defects_stm``): committed weights and card, bad weights and
input, detection of simulated defects, the train command's defaults, the CLI's ``--sample``
plumbing and the evaluation's metric and baseline on tiny sets."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from agent.cli import main
from agent.perception.registry import WEIGHTS_DIR, file_sha256, read_card
from agent.perception.tasks import defects_stm
from agent.perception.tasks.defects_stm_data import (
    CLASSES,
    StmDefectRecipe,
    StmDefectSample,
    model_input,
    simulate,
    take,
)
from agent.perception.tasks.defects_stm_eval import LatticeResidualFinder, tuned_baseline
from agent.perception.tasks.stem_metrics import PredictedDefect
from drivers.errors import DataError, ModelError
from drivers.frame import Defect

HELD_OUT_SEED = 8_300_000  # training uses seeds 0-159 and 1_000_003-1_000_018


def _held_out(frames: int = 2, **options: object) -> list[StmDefectSample]:
    recipe = StmDefectRecipe(seed=HELD_OUT_SEED, frames=frames, shape_px=(128, 128), **options)  # type: ignore[arg-type]
    return simulate(recipe, progress=False)


def test_committed_weights_match_their_card_and_are_small() -> None:
    card = read_card("defects_stm")
    weights = WEIGHTS_DIR / "defects_stm.pt"
    assert file_sha256(weights) == card.sha256
    assert weights.stat().st_size <= 2 * 1024 * 1024
    assert card.architecture["classes"] == list(CLASSES)
    assert 0 < card.training["threshold"] < 1
    assert card.training["temperature"] > 0
    assert "held_out" in card.metrics


def test_train_parser_defaults_are_the_cards_recipe() -> None:
    card = read_card("defects_stm")
    parser = argparse.ArgumentParser()
    defects_stm.add_train_arguments(parser)
    args = parser.parse_args([])
    t = card.training
    assert (args.seed, args.val_frames, args.steps, args.batch, args.crop, args.lr) == (
        t["seed"],
        t["val_frames"],
        t["steps"],
        t["batch"],
        t["crop"],
        t["lr"],
    )
    assert t["recipe"] == defects_stm.train_recipe(args.seed, args.frames).to_json()
    assert t["steps_done"] == args.steps and not t["stopped_early"]


def test_finds_the_defects_of_held_out_frames_of_both_surfaces() -> None:
    samples = _held_out(4)
    assert {s.surface for s in samples} == {"au111", "hsi100"}
    found = [defects_stm.find_defects(s.image, s.pixel_size_m * 1e9).defects for s in samples]
    score = defects_stm.score_frames(found, samples)
    assert score.detection.tp + score.detection.fn >= 20  # enough defects to mean something
    assert score.detection.f1() >= 0.8
    assert score.to_json()["macro_f1"] >= 0.6  # type: ignore[operator]


def test_a_planted_adatom_is_found_where_it_was_planted() -> None:
    sample = _held_out(1, defect_density_per_nm2=0.0)[0]
    assert sample.defects == ()
    rows, cols = np.mgrid[0:128, 0:128]
    bump = 1.5e-10 * np.exp(-((rows - 70.0) ** 2 + (cols - 40.0) ** 2) / (2 * 3.0**2))
    before = defects_stm.find_defects(sample.image, 0.06).defects
    after = defects_stm.find_defects(sample.image + bump.astype(np.float32), 0.06).defects
    near = [d for d in after if np.hypot(d.row_px - 70.0, d.col_px - 40.0) < 5.0]
    assert len(near) == 1 and near[0].kind == "adatom"
    assert not [d for d in before if np.hypot(d.row_px - 70.0, d.col_px - 40.0) < 5.0]


def test_resampled_input_reports_positions_in_input_pixels() -> None:
    sample = _held_out(1, pixel_size_m=(0.09e-9, 0.09e-9), defect_density_per_nm2=0.2)[0]
    result = defects_stm.find_defects(sample.image, 0.09)
    assert result.class_map.shape == sample.image.shape
    score = defects_stm.score_frames([result.defects], [sample])
    assert score.detection.tp >= 0.7 * len(sample.defects) > 0


@pytest.mark.parametrize(
    ("image", "pixel_nm", "message"),
    [
        (np.ones((2, 64, 64)), 0.06, "2-D"),
        (np.where(np.eye(64) > 0, np.nan, 1e-10), 0.06, "NaN"),
        (np.ones((64, 64)), 0.5, "outside"),
        (np.random.default_rng(0).normal(0, 50.0, (64, 64)), 0.06, "metres"),
    ],
)
def test_bad_input_raises_data_error(image: np.ndarray, pixel_nm: float, message: str) -> None:
    with pytest.raises(DataError, match=message):
        defects_stm.find_defects(image, pixel_nm)


def test_truncated_or_missing_weights_raise_model_error(tmp_path: Path) -> None:
    shutil.copy(WEIGHTS_DIR / "defects_stm.json", tmp_path / "defects_stm.json")
    blob = (WEIGHTS_DIR / "defects_stm.pt").read_bytes()
    (tmp_path / "defects_stm.pt").write_bytes(blob[: len(blob) // 3])
    with pytest.raises(ModelError):
        defects_stm.load(tmp_path)
    (tmp_path / "defects_stm.pt").unlink()
    with pytest.raises(ModelError, match="missing"):
        defects_stm.load(tmp_path)


def test_levelling_removes_a_plane_and_line_offsets() -> None:
    rows, cols = np.mgrid[0:32, 0:32]
    offsets = np.random.default_rng(1).normal(0, 1e-10, (32, 1))
    tilted = 1e-11 * rows + 3e-12 * cols + offsets
    assert np.abs(model_input(tilted.astype(np.float32))).max() < 1e-3


def test_score_counts_matches_within_the_radius_and_by_class() -> None:
    sample = StmDefectSample(
        image=np.zeros((50, 50), np.float32),
        pixel_size_m=0.06e-9,
        class_mask=np.zeros((50, 50), np.uint8),
        defects=(Defect(0.0, 0.0, "vacancy", 10.0, 10.0), Defect(0.0, 0.0, "adatom", 30.0, 30.0)),
        surface="au111",
    )
    radius_px = defects_stm.MATCH_DISTANCE_M / sample.pixel_size_m  # 1.7 px
    found = [
        PredictedDefect(10.0 + 0.9 * radius_px, 10.0, "vacancy", 0.9),  # inside: right class
        PredictedDefect(30.0, 30.0 + 1.1 * radius_px, "adatom", 0.9),  # outside the radius
    ]
    score = defects_stm.score_frames([found], [sample])
    assert (score.detection.tp, score.detection.fp, score.detection.fn) == (1, 1, 1)
    assert score.per_class["vacancy"].f1() == 1.0
    assert score.per_class["adatom"].f1() == 0.0
    wrong_class = [PredictedDefect(10.0, 10.0, "adatom", 0.9)]
    score = defects_stm.score_frames([wrong_class], [sample])
    assert score.detection.tp == 1 and score.per_class["vacancy"].fn == 1


def test_baseline_tuning_picks_a_finder_that_finds_defects() -> None:
    samples = _held_out(2)
    card = read_card("defects_stm")
    finder, f1 = tuned_baseline(samples, card)
    assert isinstance(finder, LatticeResidualFinder)
    assert 0.3 < f1 <= 1.01


def test_training_command_is_reproducible_by_seed_and_infer_reads_files(tmp_path: Path) -> None:
    args = ["--frames", "2", "--val-frames", "2", "--steps", "3", "--batch", "2", "--threads", "1"]
    for run in ("a", "b"):
        out = tmp_path / run
        command = ["train", "defects", "--sample", "stm", *args, "--out", str(out)]
        assert main([*command, "--plots", str(out)]) == 0
        assert (out / "defects_stm_loss.png").stat().st_size > 0
        assert not (out / "defects.pt").exists()
    a, b = (tmp_path / run / "defects_stm.pt" for run in ("a", "b"))
    assert file_sha256(a) == file_sha256(b)
    sample = take(StmDefectRecipe(seed=HELD_OUT_SEED, frames=1, shape_px=(64, 64)), 0)
    np.save(tmp_path / "f.npy", sample.image)
    result = tmp_path / "r.json"
    command = ["infer", "defects", str(tmp_path / "f.npy"), "--sample", "stm"]
    assert main([*command, "--pixel-size-nm", "0.06", "--out", str(result)]) == 0
    assert json.loads(result.read_text())["model"] == "defects_stm"
    np.save(tmp_path / "bad.npy", np.full((64, 64), np.nan))
    command = ["infer", "defects", str(tmp_path / "bad.npy"), "--sample", "stm"]
    assert main([*command, "--pixel-size-nm", "0.06"]) == 2
