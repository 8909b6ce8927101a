"""Session recorder, reader and OME-TIFF export: round trips, errors that change nothing."""

from __future__ import annotations

import datetime
import json
import math
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zarr.core.buffer import cpu
from zarr.storage import LocalStore

import agent.recorder as recorder_module
from agent.export import export_ome_tiff
from agent.recorder import SessionRecorder
from agent.session import Session
from drivers.errors import ConfigError, DataError
from drivers.frame import Defect, Frame, GroundTruth, ScanRegion, TipState


def make_frame(
    i: int,
    shape: tuple[int, int] = (6, 5),
    dtype: Any = np.float32,
    *,
    clean: bool = True,
    lines_done: int | None = None,
    pixel_size_m: tuple[float, float] = (1e-10, 2e-10),
    channel: str = "topography",
) -> Frame:
    rng = np.random.default_rng(i)
    dt = np.dtype(dtype).newbyteorder("=")
    if dt.kind == "b":
        data = rng.random(shape) > 0.5
    elif dt.kind in "iu":
        info = np.iinfo(dt)
        data = rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dt)
    elif dt.kind == "c":
        data = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dt)
    else:
        data = rng.standard_normal(shape).astype(dt)
    data = data.astype(np.dtype(dtype))  # may be big-endian
    done = shape[0] if lines_done is None else lines_done
    if done < shape[0]:
        data[done:] = np.nan
    truth = GroundTruth(
        tip_state=TipState.MULTIPLE,
        tip_states=(TipState.GOOD, TipState.MULTIPLE),
        clean=rng.standard_normal(shape).astype(np.float32) if clean else None,
        defects=(Defect(1e-9, 2e-9, "vacancy", 1.5, 2.5), Defect(3e-9, 4e-9, "adatom")),
        damaged_fraction=0.25,
        extra={"lattice": "graphite"},
    )
    return Frame(
        data=data,
        channel=channel,
        pixel_size_m=pixel_size_m,
        dwell_s=1e-4,
        scan_region=ScanRegion(center_x_m=1e-9 * i, width_m=8e-9, rotation_deg=10.0),
        frame_index=i,
        timestamp_s=0.5 * i,
        lines_done=done,
        instrument="sim:stm",
        metadata={"bias_V": 0.1, "i": i},
        truth=truth,
    )


def assert_same_frame(got: Frame, expected: Frame, *, clean: bool = True) -> None:
    assert got.data.dtype == expected.data.dtype.newbyteorder("=")
    assert got.data.shape == expected.data.shape
    native = expected.data.astype(expected.data.dtype.newbyteorder("="))
    assert got.data.tobytes() == native.tobytes()  # bit-identical, NaN included
    header, expected_header = got.header(), expected.header()
    expected_header["dtype"] = str(got.data.dtype)
    assert header == expected_header
    assert (got.truth is None) == (expected.truth is None)
    if got.truth is not None and expected.truth is not None:
        assert got.truth.to_json() == expected.truth.to_json()
        assert [d.to_json() for d in got.truth.defects] == [
            d.to_json() for d in expected.truth.defects
        ]
        assert got.truth.tip_states == expected.truth.tip_states
        if clean and expected.truth.clean is not None:
            assert got.truth.clean is not None
            assert got.truth.clean.tobytes() == expected.truth.clean.tobytes()
        else:
            assert got.truth.clean is None


def snapshot(path: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``path`` with its mode and bytes (and every directory)."""
    out: dict[str, tuple[int, bytes]] = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        out[rel] = (p.stat().st_mode, p.read_bytes() if p.is_file() else b"<dir>")
    return out


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "S.zarr"


# -- round trips ------------------------------------------------------------------------------


def test_frames_truth_events_config_and_summary_round_trip(store: Path) -> None:
    frames = [
        make_frame(0),
        make_frame(1, (4, 7), np.uint16, clean=False),
        make_frame(2),
        make_frame(3, (3, 3), ">i4", clean=False),  # big-endian input is stored natively
        make_frame(4, (5, 2), np.complex64, clean=False),
        make_frame(5, (6, 5), np.float32, lines_done=2),  # aborted partial frame
        make_frame(6, (2, 8), np.bool_, clean=False),
        make_frame(7, (4, 7), np.uint16, clean=False),
    ]
    config = {"instrument": "sim:stm", "policy": {"name": "rule", "k": 3}}
    versions = {"scopepilot": "0.1.0", "tip_model": "sha256:abc"}
    with SessionRecorder(store, config=config, versions=versions) as rec:
        rows = [
            rec.append_frame(f, extra={"latency_s": {"acquire": 0.01 * k}})
            for k, f in enumerate(frames)
        ]
        seqs = [
            rec.append_event("perception", {"tip": {"state": "good", "p": 0.9}}, t_instrument=1.5),
            rec.append_event("decision", {"commands": [], "reason": "tip good", "confidence": 0.8}),
            rec.append_event("command", {"fate": "rejected", "reason": "bias 12 V > 10 V limit"}),
            rec.append_event("operator", {"action": "approve", "command_id": "abc"}, t_wall=12.0),
        ]
        rec.set_summary({"frames": 8, "stop_reason": "done"})
        assert (rec.frames_written, rec.events_written) == (8, 4)
    assert rows == list(range(8))
    assert seqs == [0, 1, 2, 3]

    session = Session(store)
    assert len(session) == 8
    assert session.config == config
    assert session.versions == versions
    assert session.summary == {"frames": 8, "stop_reason": "done"}
    assert datetime.datetime.fromisoformat(session.started).tzinfo is not None
    assert session.ended is not None
    for k, expected in enumerate(frames):
        assert_same_frame(session.frame(k), expected)
    assert [f.frame_index for f in session.iter_frames()] == list(range(8))
    assert session.frame(-1).frame_index == 7
    records = session.frame_records()
    assert records[3]["extra"] == {"latency_s": {"acquire": 0.03}}
    assert records[5]["header"]["lines_done"] == 2
    assert records[5]["problems"] == []  # NaN only in the unscanned lines: not a problem

    events = session.events()
    assert [e["seq"] for e in events] == [0, 1, 2, 3]
    assert events[0]["t_instrument"] == 1.5 and events[1]["t_instrument"] is None
    assert events[3]["t_wall"] == 12.0
    assert session.events("command") == [events[2]]
    assert events[2]["payload"] == {"fate": "rejected", "reason": "bias 12 V > 10 V limit"}


def test_nan_frame_is_recorded_as_is_and_flagged(store: Path) -> None:
    frame = make_frame(0)
    frame.data[2, 3] = np.nan
    with SessionRecorder(store) as rec:
        rec.append_frame(frame, problems=["frame arrived late"])
    session = Session(store)
    got = session.frame(0)
    assert np.isnan(got.data[2, 3])
    assert_same_frame(got, frame)
    problems = session.frame_records()[0]["problems"]
    assert problems[0] == "frame arrived late"
    assert any("NaN" in p for p in problems)


def test_record_clean_false_keeps_truth_but_not_the_clean_image(store: Path) -> None:
    with SessionRecorder(store, record_clean=False) as rec:
        rec.append_frame(make_frame(0))
    got = Session(store).frame(0)
    assert got.truth is not None and got.truth.clean is None
    assert got.truth.tip_state is TipState.MULTIPLE
    assert not (store / "frames" / "6x5_float32" / "clean").exists()


def test_mismatched_clean_image_is_flagged_not_fatal(store: Path) -> None:
    frame = make_frame(0)
    bad = Frame(**{**frame.__dict__, "truth": GroundTruth(TipState.GOOD, clean=np.zeros((2, 2)))})
    with SessionRecorder(store) as rec:
        rec.append_frame(bad)
    session = Session(store)
    assert session.frame(0).truth is not None and session.frame(0).truth.clean is None  # type: ignore[union-attr]
    assert "does not match" in session.frame_records()[0]["problems"][-1]


def test_frames_of_many_shapes_grow_their_arrays(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recorder_module, "FRAME_CAPACITY_STEP", 3)
    monkeypatch.setattr(recorder_module, "RECORD_CAPACITY_STEP", 32)
    shapes = [(4, 4), (4, 6), (1, 9)]
    frames = [make_frame(i, shapes[i % 3], clean=i % 2 == 0) for i in range(40)]
    with SessionRecorder(store) as rec:
        for f in frames:
            rec.append_frame(f)
        for j in range(70):
            rec.append_event("status", {"j": j})
        # readable while the writer is still open (arrays not trimmed yet)
        live = Session(store)
        assert len(live) == 40 and len(live.events()) == 70
    session = Session(store)
    for i, f in enumerate(frames):
        assert_same_frame(session.frame(i), f)
    assert [e["payload"]["j"] for e in session.events()] == list(range(70))
    # close() trims every array to what was written
    assert zarr.open_array(store / "frames/4x6_float32/data", mode="r").shape == (13, 4, 6)
    assert zarr.open_array(store / "frames/records", mode="r").shape == (40,)
    assert zarr.open_array(store / "events", mode="r").shape == (70,)


def test_empty_frame_and_empty_session(store: Path) -> None:
    empty = make_frame(0, (0, 4), clean=False)
    with SessionRecorder(store) as rec:
        assert len(Session(store)) == 0
        assert Session(store).events() == []
        rec.append_frame(empty)
    got = Session(store).frame(0)
    assert got.data.shape == (0, 4)
    assert "no completed lines" in Session(store).frame_records()[0]["problems"]


def test_store_is_plain_zarr(store: Path) -> None:
    """Chunks the recorder encodes itself read back through zarr's own codecs."""
    frames = [make_frame(i, (5, 3), np.int16, clean=False) for i in range(20)]
    with SessionRecorder(store) as rec:
        for f in frames:
            rec.append_frame(f)
    root = zarr.open_group(store, mode="r")
    assert root.attrs["format"] == "scopepilot-session/1"
    data = zarr.open_array(store / "frames/5x3_int16/data", mode="r")
    np.testing.assert_array_equal(data[:], [f.data for f in frames])
    texts = np.asarray(zarr.open_array(store / "frames/records", mode="r")[:]).tolist()
    assert [json.loads(t)["header"]["frame_index"] for t in texts] == list(range(20))


def test_localstore_writes_every_key_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The crash safety rests on this zarr behaviour: temp file, then rename over the key."""
    renames: list[tuple[str, str]] = []
    original = Path.replace

    def spy(self: Path, target: Any) -> Any:
        renames.append((self.name, Path(target).name))
        return original(self, target)

    monkeypatch.setattr(Path, "replace", spy)
    store = LocalStore(tmp_path)
    store.set_sync("a/c/0", cpu.Buffer.from_bytes(b"first"))
    store.set_sync("a/c/0", cpu.Buffer.from_bytes(b"second"))
    assert [dst for _, dst in renames] == ["0", "0"]
    assert all(src.startswith("0.") and src.endswith(".partial") for src, _ in renames)
    assert (tmp_path / "a/c/0").read_bytes() == b"second"
    assert not list(tmp_path.rglob("*.partial"))


def test_leftover_partial_files_do_not_break_reading(store: Path) -> None:
    frames = [make_frame(i) for i in range(3)]
    with SessionRecorder(store) as rec:
        for f in frames:
            rec.append_frame(f)
        rec.append_event("fault", {"what": "dropped line"})
    for leftover in (
        "zarr.0123abcd.partial",
        "frames/records/c/0.0123abcd.partial",
        "frames/records/c/1.0123abcd.partial",
        "events/c/0.deadbeef.partial",
        "frames/6x5_float32/data/c/3/0/0.0123abcd.partial",
    ):
        (store / leftover).parent.mkdir(parents=True, exist_ok=True)
        (store / leftover).write_bytes(b"\x00garbage")
    session = Session(store)
    assert len(session) == 3
    assert_same_frame(session.frame(2), frames[2])
    assert session.events()[0]["payload"] == {"what": "dropped line"}


def test_pixels_without_their_record_stay_invisible(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that dies between the pixel chunk and the record leaves nothing visible."""
    rec = SessionRecorder(store)
    rec.append_frame(make_frame(0))
    real_append = recorder_module._RecordLog.append

    def die(self: Any, text: str) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(recorder_module._RecordLog, "append", die)
    with pytest.raises(OSError):
        rec.append_frame(make_frame(1))
    assert (store / "frames/6x5_float32/data/c/1/0/0").exists()  # the orphan chunk
    assert len(Session(store)) == 1 and rec.frames_written == 1
    monkeypatch.setattr(recorder_module._RecordLog, "append", real_append)
    assert rec.append_frame(make_frame(2)) == 1  # the slot is reused
    monkeypatch.setattr(recorder_module._RecordLog, "append", die)
    with pytest.raises(OSError):
        rec.append_frame(make_frame(3))
    assert (store / "frames/6x5_float32/data/c/2/0/0").exists()
    rec.close()  # trims the arrays and removes the orphan
    assert not (store / "frames/6x5_float32/data/c/2/0/0").exists()
    assert zarr.open_array(store / "frames/6x5_float32/data", mode="r").shape == (2, 6, 5)
    session = Session(store)
    assert len(session) == 2
    assert_same_frame(session.frame(1), make_frame(2))


def test_appends_from_several_threads(store: Path) -> None:
    n_threads, n_each = 4, 25
    with SessionRecorder(store) as rec:

        def events(t: int) -> None:
            for k in range(n_each):
                rec.append_event("status", {"thread": t, "k": k})

        def frames() -> None:
            for k in range(n_each):
                rec.append_frame(make_frame(k, clean=False))

        threads = [threading.Thread(target=events, args=(t,)) for t in range(n_threads)]
        threads.append(threading.Thread(target=frames))
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    session = Session(store)
    got = sorted((e["payload"]["thread"], e["payload"]["k"]) for e in session.events())
    assert got == [(t, k) for t in range(n_threads) for k in range(n_each)]
    assert [e["seq"] for e in session.events()] == list(range(n_threads * n_each))
    assert [f.frame_index for f in session.iter_frames()] == list(range(n_each))


def test_close_is_idempotent_and_final(store: Path) -> None:
    rec = SessionRecorder(store)
    rec.close()
    rec.close()
    with pytest.raises(DataError, match="closed"):
        rec.append_event("status", {})
    with pytest.raises(DataError, match="closed"):
        rec.append_frame(make_frame(0))
    assert len(Session(store)) == 0


def test_frame_index_out_of_range(store: Path) -> None:
    with SessionRecorder(store) as rec:
        rec.append_frame(make_frame(0))
    with pytest.raises(IndexError, match="1 frames"):
        Session(store).frame(1)


# -- errors change nothing --------------------------------------------------------------------


def test_existing_store_is_not_touched_without_overwrite(store: Path) -> None:
    with SessionRecorder(store) as rec:
        rec.append_frame(make_frame(0))
    before = snapshot(store)
    with pytest.raises(ConfigError, match="exists; pass --overwrite"):
        SessionRecorder(store)
    assert snapshot(store) == before
    assert len(Session(store)) == 1


def test_overwrite_replaces_a_session_store(store: Path) -> None:
    with SessionRecorder(store) as rec:
        rec.append_frame(make_frame(0))
    with SessionRecorder(store, overwrite=True, config={"run": 2}):
        pass
    session = Session(store)
    assert len(session) == 0 and session.config == {"run": 2}


def test_overwrite_refuses_to_delete_what_is_not_a_session(tmp_path: Path) -> None:
    precious = tmp_path / "data"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    before = snapshot(precious)
    with pytest.raises(ConfigError, match="not a scopepilot session store"):
        SessionRecorder(precious, overwrite=True)
    assert snapshot(precious) == before
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    with pytest.raises(ConfigError, match="exists"):
        SessionRecorder(a_file)
    with pytest.raises(ConfigError, match="not a directory"):
        SessionRecorder(a_file, overwrite=True)
    assert a_file.read_text() == "keep me"


def test_unwritable_path_names_the_path_and_the_reason(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be")
    target = blocker / "sub" / "S.zarr"
    with pytest.raises(ConfigError) as info:
        SessionRecorder(target)
    assert str(target) in str(info.value)
    assert "Not a directory" in str(info.value) or "File exists" in str(info.value)
    assert blocker.read_text() == "a file where a directory should be"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_permission_denied_is_a_config_error(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="Permission denied") as info:
            SessionRecorder(locked / "S.zarr")
        assert str(locked / "S.zarr") in str(info.value)
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_created_parents(tmp_path: Path) -> None:
    with SessionRecorder(tmp_path / "a" / "b" / "S.zarr"):
        pass
    assert len(Session(tmp_path / "a" / "b" / "S.zarr")) == 0


@pytest.mark.parametrize(
    "payload",
    [{"array": np.zeros(3)}, {"obj": object()}, {"set": {1, 2}}, {"bytes": b"raw"}],
    ids=["ndarray", "object", "set", "bytes"],
)
def test_non_json_payload_is_a_data_error_and_writes_nothing(
    store: Path, payload: dict[str, Any]
) -> None:
    rec = SessionRecorder(store)
    rec.append_event("status", {"ok": True})
    before = snapshot(store)
    with pytest.raises(DataError, match="not JSON-able"):
        rec.append_event("perception", payload)
    with pytest.raises(DataError, match="not JSON-able"):
        rec.append_frame(make_frame(0), extra=payload)
    assert snapshot(store) == before
    assert rec.events_written == 1 and rec.frames_written == 0
    assert rec.append_event("status", {"ok": False}) == 1  # the recorder carries on
    rec.close()
    assert [e["payload"] for e in Session(store).events()] == [{"ok": True}, {"ok": False}]


def test_numpy_scalars_in_payloads_are_accepted(store: Path) -> None:
    with SessionRecorder(store) as rec:
        rec.append_event(
            "perception", {"p": np.float32(0.5), "n": np.int64(3), "b": np.bool_(True)}
        )
    assert Session(store).events()[0]["payload"] == {"p": 0.5, "n": 3, "b": True}


def test_bad_config_and_event_arguments(store: Path) -> None:
    with pytest.raises(ConfigError, match="config is not JSON-able"):
        SessionRecorder(store, config={"callback": print})
    assert not store.exists()
    with SessionRecorder(store) as rec:
        with pytest.raises(DataError, match="kind"):
            rec.append_event("", {})
        with pytest.raises(DataError, match="mapping"):
            rec.append_event("status", [1, 2])  # type: ignore[arg-type]
        with pytest.raises(DataError, match="t_wall"):
            rec.append_event("status", {}, t_wall=math.nan)
        with pytest.raises(DataError, match="dtype"):
            rec.append_frame(Frame(**{**make_frame(0).__dict__, "data": np.full((6, 5), "x")}))
        with pytest.raises(DataError, match="not JSON-able"):
            rec.set_summary({"fn": print})
        assert rec.events_written == 0 and rec.frames_written == 0


def _garbage_stores(tmp_path: Path) -> list[tuple[Path, str]]:
    missing = tmp_path / "missing.zarr"
    a_file = tmp_path / "file.zarr"
    a_file.write_bytes(b"not a store")
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    bad_json = tmp_path / "bad_json.zarr"
    bad_json.mkdir()
    (bad_json / "zarr.json").write_text("{ nope")
    plain = tmp_path / "plain.zarr"
    zarr.create_group(plain)
    other = tmp_path / "other.zarr"
    zarr.create_group(other, attributes={"format": "scopepilot-session/99"})
    half = tmp_path / "half.zarr"
    zarr.create_group(half, attributes={"format": "scopepilot-session/1"})
    corrupt = tmp_path / "corrupt.zarr"
    with SessionRecorder(corrupt) as rec:
        rec.append_event("status", {})
    (corrupt / "events/c/0").write_bytes(b"\x01\x00\x00\x00\x03\x00\x00\x00{x}")
    return [
        (missing, "does not exist"),
        (a_file, "not a session store"),
        (empty, "no zarr.json"),
        (bad_json, "corrupt zarr.json"),
        (plain, "not a scopepilot session"),
        (other, "not supported"),
        (half, "not a complete session store"),
        (corrupt, "event"),
    ]


def test_session_on_garbage_is_a_data_error_naming_the_path(tmp_path: Path) -> None:
    for path, reason in _garbage_stores(tmp_path):
        with pytest.raises(DataError) as info:
            Session(path)
        assert str(path) in str(info.value), path
        assert reason in str(info.value), (path, str(info.value))


# -- OME-TIFF ---------------------------------------------------------------------------------


def test_export_ome_tiff_with_physical_pixel_sizes(store: Path, tmp_path: Path) -> None:
    frames = [make_frame(i, (8, 6), np.uint16, clean=False) for i in range(5)]
    other = make_frame(9, (4, 4), np.float32, pixel_size_m=(5e-10, 5e-10), channel="current")
    with SessionRecorder(store) as rec:
        for f in frames[:3]:
            rec.append_frame(f)
        rec.append_frame(other)
        for f in frames[3:]:
            rec.append_frame(f)
    out = tmp_path / "session.ome.tif"
    assert export_ome_tiff(store, out) == 6
    with tifffile.TiffFile(out) as tif:
        assert tif.is_ome
        assert len(tif.series) == 2
        np.testing.assert_array_equal(tif.series[0].asarray(), np.stack([f.data for f in frames]))
        np.testing.assert_array_equal(tif.series[1].asarray(), other.data)
        images = tifffile.xml2dict(tif.ome_metadata or "")["OME"]["Image"]
    pixels = [image["Pixels"] for image in images]
    assert pixels[0]["PhysicalSizeX"] == pytest.approx(0.2)  # x = 2e-10 m
    assert pixels[0]["PhysicalSizeY"] == pytest.approx(0.1)
    assert pixels[0]["PhysicalSizeXUnit"] == pixels[0]["PhysicalSizeYUnit"] == "nm"
    assert pixels[1]["PhysicalSizeX"] == pytest.approx(0.5)
    assert images[1]["Name"].startswith("current")

    before = out.read_bytes()
    with pytest.raises(ConfigError, match="exists"):
        export_ome_tiff(store, out)
    assert out.read_bytes() == before
    assert export_ome_tiff(store, out, overwrite=True) == 6
    assert not list(tmp_path.glob("*.partial"))


def test_export_refuses_empty_or_missing_sessions(store: Path, tmp_path: Path) -> None:
    with SessionRecorder(store):
        pass
    with pytest.raises(DataError, match="no frames"):
        export_ome_tiff(store, tmp_path / "x.ome.tif")
    with pytest.raises(DataError, match="does not exist"):
        export_ome_tiff(tmp_path / "nowhere.zarr", tmp_path / "x.ome.tif")
    assert not (tmp_path / "x.ome.tif").exists()


# -- property: random append sequences read back identically ----------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=5)
DTYPES = ["float32", "float64", "uint16", "int8", "uint8", "bool", "complex64", ">f4"]
frame_ops = st.tuples(
    st.just("frame"),
    st.integers(0, 2**31),
    st.tuples(st.integers(1, 5), st.integers(1, 5)),
    st.sampled_from(DTYPES),
    st.booleans(),  # clean image
    json_objects,  # extra
)
event_ops = st.tuples(
    st.just("event"),
    st.sampled_from(["perception", "decision", "command", "operator", "fault", "status"]),
    json_objects,
    st.one_of(st.none(), st.floats(0, 1e9)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.one_of(frame_ops, event_ops), max_size=25), close=st.booleans())
def test_random_append_sequences_read_back_identically(
    ops: list[tuple[Any, ...]], close: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "S.zarr"
        rec = SessionRecorder(path)
        frames: list[tuple[Frame, dict[str, Any]]] = []
        events: list[dict[str, Any]] = []
        for op in ops:
            if op[0] == "frame":
                _, seed, shape, dtype, clean, extra = op
                frame = make_frame(seed % 1000, shape, dtype, clean=clean)
                assert rec.append_frame(frame, extra=extra) == len(frames)
                frames.append((frame, extra))
            else:
                _, kind, payload, t_instrument = op
                seq = rec.append_event(kind, payload, t_instrument=t_instrument)
                assert seq == len(events)
                events.append(
                    {"seq": seq, "kind": kind, "t_instrument": t_instrument, "payload": payload}
                )
        if close:
            rec.close()
        session = Session(path)
        assert len(session) == len(frames)
        records = session.frame_records()
        for i, (frame, extra) in enumerate(frames):
            assert_same_frame(session.frame(i), frame)
            assert records[i]["extra"] == extra
        got = session.events()
        for e in got:
            assert isinstance(e.pop("t_wall"), float)
        assert got == events
        if not close:
            rec.close()
