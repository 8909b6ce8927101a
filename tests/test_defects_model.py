"""The defects network: committed weights, bad input, and detection on held-out simulated
frames against a trivial baseline and the classical peak finder."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from agent.cli import main
from agent.perception.registry import WEIGHTS_DIR, file_sha256, read_card
from agent.perception.tasks import defects
from agent.perception.tasks.stem_baselines import PeakDefectFinder
from agent.perception.tasks.stem_data import DEFECT_CLASSES, defect_class
from agent.perception.tasks.stem_metrics import DetectionScore
from drivers.errors import DataError, ModelError
from drivers.frame import Frame, ScanRegion
from drivers.registry import open_instrument

PIXEL_NM = 0.025
HELD_OUT_SEEDS = (7_200_001, 7_200_002)


def _frame(seed: int, size_px: int = 192) -> Frame:
    side_m = size_px * PIXEL_NM * 1e-9
    inst = open_instrument(
        "sim:stem",
        seed=seed,
        region=ScanRegion(0.0, 0.0, side_m, side_m),
        shape_px=(size_px, size_px),
        dwell_s=2e-6,
        defect_density_scale=2.0,
    )
    try:
        return inst.acquire()
    finally:
        inst.close()


def test_committed_weights_match_their_card_and_are_small() -> None:
    card = read_card("defects")
    weights = WEIGHTS_DIR / "defects.pt"
    assert file_sha256(weights) == card.sha256
    assert weights.stat().st_size <= 5 * 1024 * 1024
    assert card.architecture["classes"] == list(DEFECT_CLASSES)
    assert 0 < card.training["threshold"] < 1
    assert "held_out" in card.metrics


def test_detection_on_held_out_frames_beats_the_classical_finder() -> None:
    net, classical = DetectionScore(DEFECT_CLASSES[1:]), DetectionScore(DEFECT_CLASSES[1:])
    for seed in HELD_OUT_SEEDS:
        frame = _frame(seed)
        assert frame.truth is not None
        truth = frame.truth.defects
        classes = [defect_class(d.kind) for d in truth]
        found = defects.find_defects(frame.data, PIXEL_NM)
        assert found.class_map.shape == frame.data.shape
        net.add(found.defects, truth, classes, 4.0)
        classical.add(PeakDefectFinder().find(frame.data), truth, classes, 4.0)
    assert net.detection.tp + net.detection.fn >= 20  # enough defects to mean something
    assert net.detection.f1() >= 0.8
    assert net.detection.f1() > classical.detection.f1()


def test_infer_is_json_with_positions_classes_and_confidence() -> None:
    frame = _frame(HELD_OUT_SEEDS[0], 128)
    out = defects.infer(frame.data, PIXEL_NM)
    again = json.loads(json.dumps(out))
    assert again["model"] == "defects"
    assert sum(again["counts"].values()) == len(again["defects"]) > 0
    for d in again["defects"]:
        assert d["class"] in DEFECT_CLASSES[1:]
        assert 0.0 <= d["confidence"] <= 1.0
        assert d["x_nm"] == pytest.approx(d["col_px"] * PIXEL_NM, abs=1e-3)


def test_resampled_input_reports_positions_in_input_pixels() -> None:
    frame = _frame(HELD_OUT_SEEDS[1], 192)
    assert frame.truth is not None
    # the same frame binned 2x2 is at 0.5 Å pixels: positions come back in the binned grid
    binned = frame.data.reshape(96, 2, 96, 2).mean(axis=(1, 3))
    found = defects.find_defects(binned, 2 * PIXEL_NM)
    full = defects.find_defects(frame.data, PIXEL_NM)
    assert found.class_map.shape == binned.shape
    assert len(found.defects) > 0
    for d in found.defects:
        nearest = min(
            np.hypot(2 * d.row_px + 0.5 - f.row_px, 2 * d.col_px + 0.5 - f.col_px)
            for f in full.defects
        )
        assert nearest < 6.0


@pytest.mark.parametrize(
    ("image", "pixel_nm", "message"),
    [
        (np.ones((2, 64, 64)), PIXEL_NM, "2-D"),
        (np.where(np.eye(64) > 0, np.nan, 1.0), PIXEL_NM, "NaN"),
        (np.where(np.eye(64) > 0, np.inf, 1.0), PIXEL_NM, "infinite"),
        (np.ones((64, 64)), 0.001, "outside"),
        (-np.ones((64, 64)), PIXEL_NM, "mean"),
        (np.ones((64, 0)), PIXEL_NM, "empty"),
        (np.array([["a", "b"], ["c", "d"]]), PIXEL_NM, "numbers"),
    ],
)
def test_bad_input_raises_data_error(image: np.ndarray, pixel_nm: float, message: str) -> None:
    with pytest.raises(DataError, match=message):
        defects.find_defects(image, pixel_nm)


def test_truncated_weights_raise_model_error(tmp_path: Path) -> None:
    shutil.copy(WEIGHTS_DIR / "defects.json", tmp_path / "defects.json")
    blob = (WEIGHTS_DIR / "defects.pt").read_bytes()
    (tmp_path / "defects.pt").write_bytes(blob[: len(blob) // 3])
    with pytest.raises(ModelError):
        defects.load(tmp_path)
    (tmp_path / "defects.pt").unlink()
    with pytest.raises(ModelError, match="missing"):
        defects.load(tmp_path)


def test_training_command_is_reproducible_by_seed_and_infer_reads_files(tmp_path: Path) -> None:
    args = ["--frames", "3", "--val-frames", "2", "--steps", "3", "--batch", "2", "--threads", "1"]
    for run in ("a", "b"):
        out = tmp_path / run
        assert main(["train", "defects", *args, "--out", str(out), "--plots", str(out)]) == 0
        assert (out / "defects_loss.png").stat().st_size > 0
    assert file_sha256(tmp_path / "a" / "defects.pt") == file_sha256(tmp_path / "b" / "defects.pt")
    frame = _frame(HELD_OUT_SEEDS[0], 64)
    np.save(tmp_path / "f.npy", frame.data)
    assert main(["infer", "defects", str(tmp_path / "f.npy"), "--pixel-size-nm", "0.025"]) == 0
    np.save(tmp_path / "bad.npy", np.full((64, 64), np.nan))
    assert main(["infer", "defects", str(tmp_path / "bad.npy"), "--pixel-size-nm", "0.025"]) == 2


def test_training_on_other_specimens_is_recorded_in_the_card(tmp_path: Path) -> None:
    args = ["--frames", "2", "--val-frames", "2", "--steps", "2", "--batch", "2", "--threads", "1"]
    out = tmp_path / "w"
    cmd = ["train", "defects", *args, "--specimens", "srtio3,graphene", "--out", str(out)]
    assert main([*cmd, "--plots", str(out)]) == 0
    training = read_card("defects", out).training
    assert training["command"].endswith("--threads 1 --specimens srtio3,graphene")
    assert training["recipe"]["specimens"] == ["srtio3", "graphene"]
    assert main(["train", "defects", *args, "--specimens", "mos3", "--out", str(out)]) == 2


def test_evaluation_on_other_specimens_does_not_write_the_card(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.perception.tasks.defects_eval import heldout_recipe

    assert heldout_recipe(1, 2, 2e-6, {}, ("srtio3",)).specimens == ("srtio3",)
    args = ["evaluate", "defects", "--specimens", "graphene", "--update-card"]
    assert main([*args, "--weights", str(tmp_path), "--out", str(tmp_path)]) != 0
    assert "leave --specimens out" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_the_default_training_command_is_the_recipe_of_the_committed_model() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    defects.add_train_arguments(parser)
    args = parser.parse_args([])
    card = read_card("defects")
    assert defects.training_command(args) == card.training["command"]
    assert card.training["recipe"]["specimens"] == list(defects.TRAIN_SPECIMENS)


def test_a_frame_unlike_the_training_frames_is_rejected_with_the_reason() -> None:
    frame = _frame(HELD_OUT_SEEDS[1])
    plain = defects.find_defects(frame.data, PIXEL_NM)
    assert not plain.reject and plain.reason == ""
    # a large constant background (a thick specimen, a detector offset): the same columns on a
    # pedestal twice the mean; the network may still answer, but the frame is marked
    pedestal = frame.data + 2.0 * float(np.mean(frame.data))
    marked = defects.find_defects(pedestal, PIXEL_NM)
    assert marked.reject and "unlike the training frames" in marked.reason
    assert "background" in marked.reason
    _, card = defects.load()
    ranges = card.training["input_range"]
    assert ranges["background"][0] < 0.1 < ranges["background"][1] < 1.0
    x = defects.model_input(pedestal)
    assert defects.outside_input_range(x, card)
    # a card without the range (before session 9): no check
    training = {k: v for k, v in card.training.items() if k != "input_range"}
    assert defects.outside_input_range(x, dataclasses.replace(card, training=training)) == ""


def test_input_range_is_the_training_range_widened_by_the_margin() -> None:
    inputs = [np.linspace(lo, hi, 10_001)[None] for lo, hi in ((0.0, 4.0), (0.5, 9.0))]
    ranges = defects.input_range(inputs)
    # 1st / 99th percentiles: 0.04 and 0.585 (background), 3.96 and 8.915 (peaks)
    pad_b, pad_p = 0.1 * (0.585 - 0.04), 0.1 * (8.915 - 3.96)
    assert ranges["background"] == pytest.approx([0.04 - pad_b, 0.585 + pad_b], abs=1e-3)
    assert ranges["peaks"] == pytest.approx([3.96 - pad_p, 8.915 + pad_p], abs=1e-3)
