"""The sr and defects stages in the agent loop (issue 8 item 7): run on every STEM frame, their
outputs recorded (defect list and counts, sr image and uncertainty summary), rejected where the
models do not apply, summarised, and replayed deterministically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.cli import main
from agent.loop import AgentConfig
from agent.perception.stages import build_stages, default_stages
from agent.pipeline import build_pipeline
from agent.recorder import SessionRecorder
from agent.replay import diff_sessions, replay_session
from agent.session import Session
from agent.summary import format_summary, summarize
from drivers.commands import Scan
from drivers.errors import ConfigError, DataError
from drivers.frame import ScanRegion
from drivers.registry import open_instrument

STEM_CONFIG = {"policy": "rule", "perception": ["sr", "defects"], "quality": "snr"}


def record_session(path: Path, uri: str, config: dict[str, Any], frames: int = 2) -> Session:
    instrument = open_instrument(uri, seed=7)
    # 96 pixels of 0.025 nm on STEM (the models' trained pixel size); the SEM keeps its field
    size_m = 96 * 0.025e-9 if uri == "sim:stem" else None
    region = ScanRegion(0.0, 0.0, size_m, size_m) if size_m else None
    instrument.execute(
        Scan(region=region, shape_px=(96, 96), source="console", reason="small test frames")
    )
    kind = instrument.info().kind
    pipeline = build_pipeline(config, kind=kind)
    with SessionRecorder(path, config=config, versions=pipeline.versions()) as recorder:
        pipeline.agent(instrument, recorder=recorder, config=AgentConfig(frames=frames)).run()
    instrument.close()
    return Session(path)


@pytest.fixture(scope="module")
def stem_session(tmp_path_factory: pytest.TempPathFactory) -> Session:
    return record_session(tmp_path_factory.mktemp("stem") / "s.zarr", "sim:stem", STEM_CONFIG)


def test_stem_frames_get_a_defect_list_and_an_sr_image(stem_session: Session) -> None:
    perception = [e["payload"] for e in stem_session.events("perception")]
    assert len(perception) == len(stem_session) == 2
    for row, p in enumerate(perception):
        frame = stem_session.frame(row)
        truth = frame.truth
        assert truth is not None
        summary = p["defects_summary"]
        assert summary["ran"] and not summary["reject"]
        assert sum(summary["counts"].values()) == len(p["defects"])
        # the list is the model's, on this frame: most true defects have a detection nearby
        found = np.array([(d["row_px"], d["col_px"]) for d in p["defects"]])
        near = [np.min(np.hypot(*(found - (t.row_px, t.col_px)).T)) < 4 for t in truth.defects]
        assert truth.defects and np.mean(near) >= 0.6
        for d in p["defects"]:
            assert d["class"] in summary["counts"] and 0 <= d["confidence"] <= 1
            assert d["x_nm"] == pytest.approx(d["col_px"] * frame.pixel_size_m[1] * 1e9, abs=1e-3)
        sr = p["sr"]
        assert sr["ran"] and not sr["reject"] and sr["recorded"] == "float16"
        image = stem_session.array(p["arrays"]["sr"])
        assert image.shape == frame.shape and image.dtype == np.float16
        # the recovered image is nearer the noise-free truth than the raw frame is
        clean = truth.clean
        assert clean is not None
        raw_err = np.sqrt(np.mean((frame.data - clean) ** 2))
        sr_err = np.sqrt(np.mean((image.astype(np.float32) - clean) ** 2))
        assert sr_err < raw_err
        assert 0 < sr["relative_uncertainty"] < 0.05 and sr["sigma_p95"] >= sr["sigma_median"]


def test_stage_latencies_are_reported_like_the_others(stem_session: Session) -> None:
    for e in stem_session.events("decision"):
        latency = e["payload"]["latency_s"]
        assert list(latency) == ["perceive_s", "sr_s", "defects_s", "decide_s", "gate_s"]
        assert latency["sr_s"] > 0 and latency["defects_s"] > 0
    summary = summarize(stem_session.frame_records(), stem_session.events())
    assert {"sr", "defects"} <= set(summary["latency"])


def test_the_summary_counts_defects_per_class_and_sr_stats(stem_session: Session) -> None:
    summary = summarize(stem_session.frame_records(), stem_session.events())
    perception = [e["payload"] for e in stem_session.events("perception")]
    expected: dict[str, int] = {}
    for p in perception:
        for kind, n in p["defects_summary"]["counts"].items():
            expected[kind] = expected.get(kind, 0) + n
    assert summary["defects"]["per_class"] == expected
    assert summary["defects"]["frames"] == 2 and summary["defects"]["rejected_frames"] == 0
    assert summary["sr"]["recovered"] == 2 and summary["sr"]["images_recorded"] == 2
    text = format_summary(summary)
    assert "defects " in text and "vacancy" in text and "2/2 frames recovered" in text


def test_replay_runs_the_stages_again_and_deterministically(
    stem_session: Session, tmp_path: Path
) -> None:
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    replay_session(stem_session.path, a)
    replay_session(stem_session.path, b)
    assert diff_sessions(stem_session.path, a).same == 2
    ra, rb = Session(a), Session(b)
    recorded = [e["payload"] for e in stem_session.events("perception")]
    for sa, sb, rec in zip(ra.events("perception"), rb.events("perception"), recorded, strict=True):
        pa, pb = sa["payload"], sb["payload"]
        assert pa["defects"] == pb["defects"] == rec["defects"]
        assert pa["sr"] == pb["sr"]
        image_a, image_b = ra.array(pa["arrays"]["sr"]), rb.array(pb["arrays"]["sr"])
        assert np.array_equal(image_a, image_b)
        assert np.array_equal(image_a, stem_session.array(rec["arrays"]["sr"]))


def test_sem_frames_are_rejected_with_the_reason_and_not_recorded(tmp_path: Path) -> None:
    """The models are trained on HAADF-STEM at 0.0125-0.05 nm pixels; a SEM frame (nm pixels)
    is outside their range: recorded as rejected, no image stored, the session goes on."""
    session = record_session(tmp_path / "sem.zarr", "sim:sem", {**STEM_CONFIG}, frames=1)
    (p,) = [e["payload"] for e in session.events("perception")]
    assert p["sr"]["reject"] and not p["sr"]["ran"] and "outside" in p["sr"]["reason"]
    assert p["defects"] == [] and p["defects_summary"]["reject"]
    assert "arrays" not in p
    summary = summarize(session.frame_records(), session.events())
    assert summary["sr"]["rejected_frames"] == 1 and summary["defects"]["rejected_frames"] == 1
    assert summary["stop_reason"] == "completed 1 frames"


def test_the_sr_image_can_be_left_out(tmp_path: Path) -> None:
    config = {**STEM_CONFIG, "perception_options": {"sr": {"record": "none"}}}
    session = record_session(tmp_path / "small.zarr", "sim:stem", config, frames=1)
    (p,) = [e["payload"] for e in session.events("perception")]
    assert p["sr"]["ran"] and p["sr"]["recorded"] is None and "arrays" not in p
    assert not (session.path / "products").exists()


def test_bad_stage_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown perception stage 'srr'; known: defects, sr"):
        build_stages(["srr"], {})
    with pytest.raises(ConfigError, match="repeat"):
        build_stages(["sr", "sr"], {})
    with pytest.raises(ConfigError, match="without those stages"):
        build_stages(["defects"], {"sr": {"record": "none"}})
    with pytest.raises(ConfigError, match="record must be"):
        build_stages(["sr"], {"sr": {"record": "jpeg"}})
    with pytest.raises(ConfigError, match="perception stage 'defects'"):
        build_stages(["defects"], {"defects": {"colour": "red"}})
    with pytest.raises(ConfigError, match="list of stage names"):
        build_pipeline({"perception": "sr"}, kind="stem")
    assert default_stages("stem") == ("sr", "defects") and default_stages("stm") == ()
    assert build_pipeline({}, kind="stem").stages == ()  # stores without the key: unchanged


def test_recorded_images_survive_a_resume_and_bad_references_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "r.zarr"
    first = np.arange(12, dtype=np.float16).reshape(3, 4)
    recorder = SessionRecorder(path)
    ref = recorder.append_array("sr", first)
    recorder.append_event("perception", {"frame": 0, "arrays": {"sr": ref}})
    orphan = recorder.append_array("sr", first + 1)  # killed before its event: not committed
    assert orphan["slot"] == 1
    del recorder  # never closed, as after a kill
    again = SessionRecorder.reopen(path)
    ref2 = again.append_array("sr", first + 2)
    assert ref2 == {"array": "products/sr/3x4_float16", "slot": 1}  # the orphan slot reused
    again.append_event("perception", {"frame": 1, "arrays": {"sr": ref2}})
    again.close()
    session = Session(path)
    assert np.array_equal(session.array(ref), first)
    assert np.array_equal(session.array(ref2), first + 2)
    for bad in ({"array": "frames/x", "slot": 0}, {"array": ref["array"], "slot": 5}, {}):
        with pytest.raises(DataError):
            session.array(bad)
    with pytest.raises(DataError, match="2-D numeric"):
        SessionRecorder(tmp_path / "x.zarr").append_array("sr", np.zeros(3))


def test_run_on_stem_records_the_stages_by_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli.zarr"
    argv = ["run", "--instrument", "sim:stem", "--frames", "1", "--shape", "64", "--size-nm", "1.6"]
    argv.append("--quiet")
    assert main([*argv, "--out", str(out), "--no-sr-image"]) == 0
    printed = capsys.readouterr().out
    assert "defects " in printed and "1/1 frames recovered" in printed
    session = Session(out)
    assert session.config["perception"] == ["sr", "defects"]
    assert session.config["perception_options"] == {
        "sr": {"record": "none"},
        "defects": {"sample": "stem"},  # the model for the kind, stored (see recorded_config)
    }
    assert {"sr", "defects"} <= set(session.versions)
    none = tmp_path / "none.zarr"
    assert main([*argv, "--out", str(none), "--perception", "none"]) == 0
    assert "sr" not in Session(none).events("perception")[0]["payload"]
