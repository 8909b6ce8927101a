"""agent.perception.registry and files: model cards, checked weights loading, input checks,
resampling, tiled inference, image files."""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from torch import nn

from agent.cli_perception import task_module
from agent.perception.files import read_image
from agent.perception.registry import (
    ModelCard,
    check_image,
    file_sha256,
    load_model,
    read_card,
    resample_to_pixel_size,
    run_batches,
    save_model,
    tiled_inference,
)
from drivers.errors import DataError, ModelError


def _card(**changes: object) -> ModelCard:
    card = ModelCard(
        name="demo",
        version="2.1",
        task="test",
        pixel_size_range_nm=(0.05, 0.2),
        trained_pixel_size_nm=0.1,
        channels=("z",),
        input_size=(32, 32),
        architecture={"out": 3},
    )
    return dataclasses.replace(card, **changes) if changes else card


def _build(card: ModelCard) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, int(card.architecture["out"]), 3, padding=1), nn.ReLU())


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    save_model(_build(_card()), _card(), tmp_path)
    return tmp_path


def test_round_trip_fills_hash_and_restores_weights(saved: Path) -> None:
    card = read_card("demo", saved)
    assert card.sha256 == file_sha256(saved / "demo.pt") and card.created
    assert ModelCard.from_json(json.loads((saved / "demo.json").read_text())) == card
    module, loaded = load_model("demo", _build, saved, version="2.1", device="cpu")
    torch.manual_seed(0)
    reference = _build(_card())
    for a, b in zip(module.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not module.training and loaded.version == "2.1"


def test_corrupt_weights_are_refused(saved: Path) -> None:
    raw = bytearray((saved / "demo.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (saved / "demo.pt").write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="corrupt or replaced"):
        load_model("demo", _build, saved)


def test_unreadable_weights_with_matching_hash_are_refused(saved: Path) -> None:
    (saved / "demo.pt").write_bytes(b"not a torch file")
    card = json.loads((saved / "demo.json").read_text())
    card["sha256"] = file_sha256(saved / "demo.pt")
    (saved / "demo.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="cannot be read"):
        load_model("demo", _build, saved)


def test_mismatched_shapes_version_and_missing_files(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="wrong shape"):
        load_model("demo", lambda c: _build(_card(architecture={"out": 5})), saved)
    with pytest.raises(ModelError, match="missing tensors"):
        load_model("demo", lambda c: nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), saved)
    with pytest.raises(ModelError, match=r"version '2\.1'"):
        load_model("demo", _build, saved, version="3.0")
    with pytest.raises(ModelError, match="no model card"):
        load_model("other", _build, saved)
    (saved / "demo.pt").unlink()
    with pytest.raises(ModelError, match="missing"):
        load_model("demo", _build, saved)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ModelError, match="not readable JSON"):
        read_card("bad", tmp_path)


def test_card_validation() -> None:
    with pytest.raises(ModelError, match="trained"):
        _card(trained_pixel_size_nm=0.5)
    with pytest.raises(ModelError, match="identifier"):
        _card(name="my model")
    with pytest.raises(ModelError, match="unknown keys"):
        ModelCard.from_json({**_card().to_json(), "colour": "red"})


@pytest.mark.parametrize(
    ("image", "words"),
    [
        (np.zeros((2, 8, 8)), "2-D"),
        (np.zeros(8), "2-D"),
        (np.zeros((0, 8)), "empty"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), "NaN"),
        (np.array([[1.0, np.inf], [0.0, 1.0]]), "infinite"),
        (np.array([["a", "b"], ["c", "d"]]), "numbers"),
        (np.ones((4, 4), dtype=bool), "numbers"),
    ],
)
def test_check_image_names_the_problem(image: np.ndarray, words: str) -> None:
    with pytest.raises(DataError, match=words):
        check_image(image)


def test_check_image_allows_nan_only_when_asked() -> None:
    arr = np.ones((4, 4))
    arr[0, 0] = np.nan
    assert check_image(arr, allow_nan=True).dtype == np.float32
    with pytest.raises(DataError, match="no finite pixel"):
        check_image(np.full((4, 4), np.nan), allow_nan=True)


def test_resample_to_trained_pixel_size() -> None:
    card = _card()
    image = np.random.default_rng(0).normal(size=(64, 48)).astype(np.float32)
    assert resample_to_pixel_size(image, 0.101, card) is not None
    assert resample_to_pixel_size(image, 0.101, card).shape == (64, 48)  # within 2 %: as is
    assert resample_to_pixel_size(image, 0.05, card).shape == (32, 24)
    assert resample_to_pixel_size(image, (0.2, 0.1), card).shape == (128, 48)
    ramp = np.tile(np.arange(64, dtype=np.float32), (8, 1))
    coarse = resample_to_pixel_size(ramp, 0.05, card)
    assert np.allclose(coarse[:, 4:-4], coarse[:, 4:-4].mean(axis=0))  # rows stay a ramp
    assert 30 < float(coarse.mean()) < 33
    with pytest.raises(DataError, match="outside the demo model's range"):
        resample_to_pixel_size(image, 0.5, card)
    with pytest.raises(DataError, match="positive"):
        resample_to_pixel_size(image, -0.1, card)


def test_tiled_inference_matches_whole_image() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 2, 3, padding=1))
    net.eval()
    image = np.random.default_rng(1).normal(size=(90, 70)).astype(np.float32)
    with torch.no_grad():
        whole = net(torch.from_numpy(image)[None, None])[0].numpy()
    tiled = tiled_inference(net, image, tile=32, overlap=12, batch_size=3)
    assert tiled.shape == (2, 90, 70)
    assert np.abs(tiled - whole).max() < 1e-3
    small = tiled_inference(net, image[:20, :25], tile=32)
    assert small.shape == (2, 20, 25)
    out = run_batches(net, np.zeros((5, 1, 8, 8), dtype=np.float32), batch_size=2)
    assert out.shape == (5, 2, 8, 8)
    with pytest.raises(DataError, match="N, C, H, W"):
        run_batches(net, np.zeros((8, 8), dtype=np.float32))


def test_read_image_files(tmp_path: Path) -> None:
    image = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.save(tmp_path / "a.npy", image)
    data, pixel = read_image(tmp_path / "a.npy")
    assert np.array_equal(data, image) and pixel is None
    tifffile.imwrite(tmp_path / "a.tif", image, resolution=(1e7 / 0.5, 1e7 / 0.5), resolutionunit=3)
    data, pixel = read_image(tmp_path / "a.tif")
    assert np.array_equal(data, image) and pixel == pytest.approx(0.5)
    (tmp_path / "b.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read"):
        read_image(tmp_path / "b.npy")
    (tmp_path / "c.tif").write_bytes(b"garbage")
    with pytest.raises(DataError, match="TIFF"):
        read_image(tmp_path / "c.tif")
    np.save(tmp_path / "d.npy", np.zeros((2, 3, 4)))
    with pytest.raises(DataError, match="one 2-D image"):
        read_image(tmp_path / "d.npy")
    with pytest.raises(DataError, match="does not exist"):
        read_image(tmp_path / "nothing.npy")


def _fake_reader(data: np.ndarray | None) -> types.ModuleType:
    """A rosettasciio reader module whose ``file_reader`` returns ``data`` (None: it fails)."""
    module = types.ModuleType("fake_reader")

    def file_reader(path: str) -> list[dict[str, object]]:
        if data is None:
            raise OSError("not my format")
        axes = [{"scale": 0.02, "units": "nm"}, {"scale": 0.02, "units": "nm"}]
        return [{"data": data, "axes": axes}]

    module.file_reader = file_reader  # type: ignore[attr-defined]
    return module


def test_rosettasciio_tries_every_reader_of_an_extension(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # .hdf5 is claimed by several readers (Delmic, HyperSpy, ...): the first that reads the file
    # wins; when none does, every reader's failure is named.
    image = np.arange(6, dtype=np.float32).reshape(2, 3)
    monkeypatch.setitem(sys.modules, "fake_first", _fake_reader(None))
    monkeypatch.setitem(sys.modules, "fake_second", _fake_reader(image))
    plugins = [
        {"name": "First", "api": "fake_first", "file_extensions": ["hdf5"]},
        {"name": "Other", "api": "fake_unused", "file_extensions": ["dm3"]},
        {"name": "Second", "api": "fake_second", "file_extensions": ["HDF5", "hspy"]},
    ]
    monkeypatch.setitem(sys.modules, "rsciio", types.SimpleNamespace(IO_PLUGINS=plugins))
    path = tmp_path / "a.hdf5"
    path.write_bytes(b"anything")
    data, pixel = read_image(path)
    assert np.array_equal(data, image) and pixel == pytest.approx(0.02)
    plugins[2]["api"] = "fake_first"
    with pytest.raises(DataError, match=r"First: not my format; Second: not my format"):
        read_image(path)
    with pytest.raises(DataError, match=r"no reader for '\.xyz'"):
        (tmp_path / "a.xyz").write_bytes(b"x")
        read_image(tmp_path / "a.xyz")
    monkeypatch.setitem(sys.modules, "rsciio", None)  # not installed
    with pytest.raises(DataError, match=r"scopepilot\[formats\]"):
        read_image(path)


def test_unknown_task_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="unknown perception task"):
        task_module("colour")
