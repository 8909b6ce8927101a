"""The crash-safe session recorder: everything an agent session produces, in one zarr v3 store.

Layout of a session store ``S.zarr`` (a directory; see docs/decisions/0001-session-store.md)::

    zarr.json                      root group; attributes: format, started, config, versions,
                                   summary, ended (``format`` is written last at creation)
    frames/records                 (N,) string: one JSON record per frame, in arrival order
    frames/<H>x<W>_<dtype>/data    (n, H, W) <dtype>, chunks (1, H, W): the pixels
    frames/<H>x<W>_<dtype>/clean   (n, H, W) float32: ground-truth clean images (simulators only)
    events                         (M,) string: one JSON record per event
    products/<name>/<H>x<W>_<dtype>/data   (k, H, W): images a perception stage made of a frame
                                   (e.g. ``sr``), each pointed at by the event that carries it

Crash safety (``kill -9`` at any instant): every key is written whole to a temporary file and
renamed over its final name (zarr's ``LocalStore`` does this), and an append writes the pixel
chunks *before* the record that points at them. The record is the commit point: a reader counts
a frame only when its record exists, so a killed writer leaves at most an invisible orphan chunk.

The hot path writes encoded chunks straight into the store (``LocalStore.set_sync``) instead of
going through ``Array.__setitem__``: zarr's async round trip costs ~2 ms per call, which the
250 frames/s target cannot afford. The arrays are created with codecs pinned to the two trivial
encodings this module writes (raw little-endian ``bytes``; uncompressed ``vlen-utf8``), and any
zarr reader reads the result.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import shutil
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer import cpu
from zarr.core.sync import sync
from zarr.storage import LocalStore

from drivers.errors import ConfigError, DataError
from drivers.frame import Frame, frame_problems

log = logging.getLogger(__name__)

FORMAT = "scopepilot-session/1"
"""Value of the root attribute ``format``; a reader refuses any other major version."""

RECORDS_PER_CHUNK = 16
"""Records per chunk of the string arrays: an append rewrites at most this many records."""

RECORD_CAPACITY_STEP = 1024
"""String arrays grow by this many records at a time (a metadata rewrite, not per append)."""

FRAME_CAPACITY_STEP = 256
"""Pixel arrays grow by this many frames at a time; ``close()`` trims them to the frame count."""

FRAMES_GROUP = "frames"
PRODUCTS_GROUP = "products"
RECORDS_ARRAY = "frames/records"
EVENTS_ARRAY = "events"

EVENT_KINDS = ("perception", "decision", "command", "operator", "fault", "status", "early_abort")
"""The event kinds the agent writes (others are accepted, for extensions)."""

_PIXEL_KINDS = frozenset("biufc")  # bool, signed, unsigned, float, complex


def frame_group_name(shape: tuple[int, int], dtype: np.dtype[Any]) -> str:
    """Group name for frames of ``shape`` (H, W) and ``dtype``, e.g. ``256x256_float32``."""
    return f"{shape[0]}x{shape[1]}_{dtype.name}"


def to_json_text(obj: Any, what: str) -> str:
    """``obj`` as compact JSON text; numpy scalars become Python numbers.

    Raises :class:`DataError` naming ``what`` when ``obj`` holds something JSON cannot carry.
    NaN and infinities are written as Python's ``json`` writes them (``NaN``, ``Infinity``),
    so that a flagged value is recorded rather than lost.
    """
    try:
        return json.dumps(obj, default=_json_default, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"{what} is not JSON-able: {exc}; pass plain numbers, strings, lists "
            f"and string-keyed mappings"
        ) from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"object of type {type(obj).__name__} ({obj!r:.60}) is not JSON serializable")


def _product_counts(events: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Per product array, one past the highest slot an event refers to."""
    counts: dict[str, int] = {}
    for event in events:
        refs = (event.get("payload") or {}).get("arrays")
        if not isinstance(refs, Mapping):
            continue
        for ref in refs.values():
            if isinstance(ref, Mapping) and isinstance(ref.get("slot"), int):
                path = str(ref.get("array"))
                counts[path] = max(counts.get(path, 0), ref["slot"] + 1)
    return counts


def _native_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    return dtype.newbyteorder("=") if dtype.byteorder not in ("=", "|") else dtype


def _is_session_root(path: Path) -> bool:
    try:
        meta = json.loads((path / "zarr.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    fmt = attrs.get("format") if isinstance(attrs, dict) else None
    return isinstance(fmt, str) and fmt.startswith("scopepilot-session/")


def _os_reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


_CREATION_STEPS = (
    ("zarr.json", "the root group (zarr.json)"),
    (f"{FRAMES_GROUP}/zarr.json", f"the {FRAMES_GROUP} group"),
    (f"{RECORDS_ARRAY}/zarr.json", f"the {RECORDS_ARRAY} array"),
    (f"{EVENTS_ARRAY}/zarr.json", f"the {EVENTS_ARRAY} array"),
)
"""What :class:`SessionRecorder` writes when it creates a store, in order, before the root
attributes (``format`` last)."""


def interrupted_creation(path: Path) -> list[str] | None:
    """What is missing from a store whose :class:`SessionRecorder` was killed while creating it,
    or ``None`` when ``path`` is not such a store.

    Such a directory holds only a prefix of the keys written at creation (in their order), maybe
    ``*.partial`` temporary files, and no ``format`` attribute. It has no frames or events, so it
    can be neither read nor resumed, and ``--overwrite`` may replace it. An empty directory, or
    one holding anything else, is not one (it may be someone else's).
    """
    if path.is_symlink() or not path.is_dir():
        return None
    steps = [key for key, _ in _CREATION_STEPS]
    folders = {str(Path(key).parent) for key in steps}  # "." for the root
    present: set[str] = set()
    try:
        for entry in path.rglob("*"):
            rel = entry.relative_to(path).as_posix()
            if entry.is_symlink():
                return None
            if entry.is_dir():
                if rel not in folders:
                    return None
            elif rel in steps:
                present.add(rel)
            elif not (entry.name.endswith(".partial") and str(Path(rel).parent) in folders):
                return None
    except OSError:
        return None
    done = 0
    while done < len(steps) and steps[done] in present:
        done += 1
    if present != set(steps[:done]):
        return None  # not a prefix of the creation order: not ours
    if done == 0:
        if not any(path.iterdir()):
            return None  # empty: nothing tells it apart from a directory someone made
    else:
        try:
            meta = json.loads((path / "zarr.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("node_type") != "group":
            return None
        attrs = meta.get("attributes")
        if isinstance(attrs, dict) and attrs.get("format") is not None:
            return None  # complete, or someone else's format
    missing = [what for _, what in _CREATION_STEPS[done:]]
    return [*missing, "the 'format' attribute (written last)"]


class _RecordLog:
    """An append-only (N,) vlen-utf8 zarr array of JSON texts, one atomic chunk write per append.

    The records of the current chunk are kept in memory, so an append re-encodes and rewrites
    that chunk (at most ``RECORDS_PER_CHUNK`` records) without reading anything back.
    """

    def __init__(self, store: LocalStore, array: zarr.Array[Any], key: str) -> None:
        self._store = store
        self._array = array
        self._key = key
        self._capacity = int(array.shape[0])
        self._pending: list[bytes] = []  # length-prefixed items of the current, unfilled chunk
        self.count = 0

    def append(self, text: str) -> int:
        index = self.count
        if index >= self._capacity:
            self._array.resize((self._capacity + RECORD_CAPACITY_STEP,))
            self._capacity += RECORD_CAPACITY_STEP
        raw = text.encode("utf-8")
        items = [*self._pending, struct.pack("<I", len(raw)) + raw]
        padding = b"\x00\x00\x00\x00" * (RECORDS_PER_CHUNK - len(items))  # empty strings
        chunk = struct.pack("<I", RECORDS_PER_CHUNK) + b"".join(items) + padding
        self._store.set_sync(
            f"{self._key}/c/{index // RECORDS_PER_CHUNK}", cpu.Buffer.from_bytes(chunk)
        )
        self._pending = items if len(items) < RECORDS_PER_CHUNK else []
        self.count = index + 1
        return index

    def trim(self) -> None:
        if self._capacity != self.count:
            _shrink(self._array, (self.count,))
            self._capacity = self.count


class _FrameGroup:
    """The pixel arrays of one (H, W, dtype) group and how many slots are committed."""

    def __init__(
        self,
        group: zarr.Group,
        shape: tuple[int, int],
        dtype: np.dtype[Any],
        *,
        existing: bool = False,
    ) -> None:
        self.group = group
        self.shape = shape
        self.dtype = dtype
        self.clean: zarr.Array[Any] | None = None
        if existing:  # a group of a session being resumed: open its arrays as they are
            data = group.get("data")
            clean = group.get("clean")
            if not isinstance(data, zarr.Array) or tuple(data.shape[1:]) != shape:
                raise DataError(f"{group.path}/data is missing or not (N, {shape[0]}, {shape[1]})")
            if data.dtype != dtype or _codec_names(data) != ["bytes"]:
                raise DataError(f"{group.path}/data is not raw {dtype} pixels; cannot append")
            if clean is not None and (
                not isinstance(clean, zarr.Array) or tuple(clean.shape[1:]) != shape
            ):
                raise DataError(f"{group.path}/clean does not match {group.path}/data")
            if clean is not None and clean.shape[0] != data.shape[0]:
                # killed between growing one array and the other: grow the shorter one
                rows = max(int(clean.shape[0]), int(data.shape[0]))
                for array in (data, clean):
                    if array.shape[0] != rows:
                        array.resize((rows, *shape))
            self.data = data
            self.clean = clean
        else:
            self.data = _create_pixel_array(group, "data", shape, dtype)
        self.count = 0
        self.capacity = int(self.data.shape[0])

    def ensure_capacity(self, slot: int, *, with_clean: bool) -> None:
        if with_clean and self.clean is None:
            self.clean = _create_pixel_array(
                self.group, "clean", self.shape, np.dtype(np.float32), capacity=self.capacity
            )
        if slot >= self.capacity:
            capacity = self.capacity + FRAME_CAPACITY_STEP
            self.data.resize((capacity, *self.shape))
            if self.clean is not None:
                self.clean.resize((capacity, *self.shape))
            self.capacity = capacity

    def trim(self, store: LocalStore) -> None:
        if self.capacity != self.count:
            for array in (self.data, self.clean):
                if array is not None:
                    _shrink(array, (self.count, *self.shape))
                    # the pixels of an append that failed before its record, if any
                    store.delete_sync(f"{array.path}/c/{self.count}/0/0")
            self.capacity = self.count


def _shrink(array: zarr.Array[Any], shape: tuple[int, ...]) -> None:
    """Rewrite the array's shape without visiting every chunk key outside it.

    ``Array.resize`` tries to delete each chunk outside the new shape, one store call per
    possible key (~0.5 s for 256 frames of spare capacity); none exist beyond the committed
    rows except the orphan that ``_FrameGroup.trim`` removes.
    """
    sync(array.async_array.resize(shape, delete_outside_chunks=False))


def _create_pixel_array(
    group: zarr.Group,
    name: str,
    shape: tuple[int, int],
    dtype: np.dtype[Any],
    *,
    capacity: int | None = None,
) -> zarr.Array[Any]:
    array = group.create_array(
        name,
        shape=(FRAME_CAPACITY_STEP if capacity is None else capacity, *shape),
        chunks=(1, max(shape[0], 1), max(shape[1], 1)),
        dtype=dtype,
        compressors=None,
        filters=None,
        chunk_key_encoding={"name": "default", "separator": "/"},
        dimension_names=("frame", "y", "x"),
        config={"write_empty_chunks": True},
    )
    codecs = _codec_names(array)
    if codecs != ["bytes"]:  # pragma: no cover - guards against a zarr default changing
        raise DataError(
            f"zarr created {group.path}/{name} with codecs {codecs}; expected ['bytes']"
        )
    return array


def _create_record_array(group: zarr.Group, name: str) -> zarr.Array[Any]:
    array = group.create_array(
        name,
        shape=(RECORD_CAPACITY_STEP,),
        chunks=(RECORDS_PER_CHUNK,),
        dtype=str,
        fill_value="",
        compressors=None,
        filters=None,
        chunk_key_encoding={"name": "default", "separator": "/"},
        dimension_names=("record",),
    )
    codecs = _codec_names(array)
    if codecs != ["vlen-utf8"]:  # pragma: no cover - guards against a zarr default changing
        raise DataError(f"zarr created {name} with codecs {codecs}; expected ['vlen-utf8']")
    return array


def _codec_names(array: zarr.Array[Any]) -> list[str]:
    metadata: dict[str, Any] = dict(array.metadata.to_dict())
    return [codec["name"] for codec in metadata.get("codecs", ())]


def _pixel_buffer(array: np.ndarray, dtype: np.dtype[Any]) -> cpu.Buffer:
    """The ``bytes``-codec encoding of one (1, H, W) chunk: C order, little endian."""
    little = dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype
    contiguous = np.ascontiguousarray(array, dtype=little)
    return cpu.Buffer.from_array_like(contiguous.reshape(-1).view(np.uint8))


class SessionRecorder:
    """Appends frames and events of one agent session to a crash-safe zarr store.

    ``append_frame`` and ``append_event`` may be called from different threads. Once either
    returns, its frame or event survives a ``kill -9`` of the process. Use as a context
    manager, or call ``close()`` (idempotent) at the end.

    >>> with SessionRecorder(tmp / "S.zarr", config={"uri": "sim:stm"}) as rec:  # doctest: +SKIP
    ...     row = rec.append_frame(frame, extra={"latency_s": {"acquire": 0.01}})
    ...     seq = rec.append_event("decision", {"commands": [], "reason": "tip is good"})
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        config: Mapping[str, Any] = {},  # read only, never mutated
        versions: Mapping[str, str] = {},  # read only, never mutated
        record_clean: bool = True,
    ) -> None:
        self.path = Path(path)
        self.record_clean = record_clean
        self._lock = threading.Lock()
        self._closed = False
        self._groups: dict[tuple[tuple[int, int], str], _FrameGroup] = {}
        self._products: dict[str, _FrameGroup] = {}
        self._product_counts: dict[str, int] = {}
        config_json = json.loads(self._config_text(config, "config"))
        versions_json = json.loads(self._config_text(versions, "versions"))
        self._prepare_directory(overwrite)
        started = time.time()
        attributes = {
            "format": FORMAT,
            "started": datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat(),
            "started_unix": started,
            "config": config_json,
            "versions": versions_json,
            "summary": None,
            "ended": None,
        }
        try:
            self._store = LocalStore(self.path)
            self._root = zarr.create_group(self._store, zarr_format=3)
            frames = self._root.create_group(FRAMES_GROUP)
            self._records = _RecordLog(
                self._store, _create_record_array(frames, "records"), RECORDS_ARRAY
            )
            self._events = _RecordLog(
                self._store, _create_record_array(self._root, EVENTS_ARRAY), EVENTS_ARRAY
            )
            self._frames_group = frames
            # Written last: a directory is a session store only once it is complete.
            self._root.update_attributes(attributes)
        except OSError as exc:
            shutil.rmtree(self.path, ignore_errors=True)  # we created it: leave nothing behind
            raise ConfigError(
                f"cannot write the session store {self.path}: {_os_reason(exc)}"
            ) from exc
        log.info("recording session to %s", self.path)

    @classmethod
    def reopen(cls, path: str | os.PathLike[str], *, record_clean: bool = True) -> SessionRecorder:
        """Continue an interrupted session: append to the store at ``path`` after what it holds.

        Every committed frame and event is kept; rows and event numbers continue where they
        stopped; a record or pixel chunk of an append that a kill interrupted is overwritten.
        The root attribute ``resumes`` gains one entry per reopening. Raises
        :class:`DataError` when ``path`` is not a session store, is corrupt, or was closed
        (a complete session is never appended to).
        """
        from agent.session import Session  # the reader decides what is committed

        path = Path(path)
        session = Session(path)
        if session.ended:
            raise DataError(
                f"{path}: the session was closed at {session.ended} (complete); only an "
                f"interrupted session can be resumed: start a new store instead"
            )
        damaged = session.damaged_pixels()
        if damaged:
            more = f" and {len(damaged) - 5} more" if len(damaged) > 5 else ""
            raise DataError(
                f"cannot resume {path}: the store is damaged (pixels of {', '.join(damaged[:5])}"
                f"{more} missing or truncated); export what reads and start a new session"
            )
        records = session.frame_records()
        self = cls.__new__(cls)
        self.path = path
        self.record_clean = record_clean
        self._lock = threading.Lock()
        self._closed = False
        self._groups = {}
        self._products = {}
        # product slots committed by an event; a slot past them is an interrupted append's
        self._product_counts = _product_counts(session.events())
        try:
            self._store = LocalStore(path)
            self._root = zarr.open_group(
                self._store, mode="r+", zarr_format=3, use_consolidated=False
            )
            frames = self._root[FRAMES_GROUP]
            if not isinstance(frames, zarr.Group):
                raise DataError(f"{path}/{FRAMES_GROUP} is not a group")
            self._frames_group = frames
            self._records = self._reopen_log(RECORDS_ARRAY, len(records))
            self._events = self._reopen_log(EVENTS_ARRAY, len(session.events()))
            self._check_orphan_pixels(records)
            for record in records:
                name = record["group"]
                group = self._reopened_group(name)
                if record["slot"] != group.count:
                    raise DataError(
                        f"{path}: frame record {record['row']} points at slot {record['slot']} "
                        f"of {name}; expected {group.count} (records out of order)"
                    )
                group.count += 1
            resumes = self._root.attrs.get("resumes") or []
            if not isinstance(resumes, list):
                raise DataError(f"{path}: attribute 'resumes' is not a list")
            now = time.time()
            entry = {
                "at": datetime.datetime.fromtimestamp(now, datetime.UTC).isoformat(),
                "at_unix": now,
                "frames_before": len(records),
                "events_before": self._events.count,
            }
            self._root.update_attributes({"resumes": [*resumes, entry]})
        except DataError as exc:
            raise DataError(f"cannot resume {path}: {exc}") from None
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise DataError(f"cannot resume {path}: {type(exc).__name__}: {exc}") from exc
        log.info("resuming session %s after %d frames", path, len(records))
        return self

    def _reopen_log(self, key: str, count: int) -> _RecordLog:
        array = self._root[key]
        if (
            not isinstance(array, zarr.Array)
            or array.ndim != 1
            or _codec_names(array) != ["vlen-utf8"]
        ):
            raise DataError(f"{key} is not a 1-D vlen-utf8 array")
        if int(array.chunks[0]) != RECORDS_PER_CHUNK:
            raise DataError(f"{key} has chunks of {array.chunks[0]}, not {RECORDS_PER_CHUNK}")
        log_ = _RecordLog(self._store, array, key)
        start = (count // RECORDS_PER_CHUNK) * RECORDS_PER_CHUNK
        texts = np.asarray(array[start:count]).tolist() if count > start else []
        log_._pending = [
            struct.pack("<I", len(t.encode("utf-8"))) + t.encode("utf-8") for t in texts
        ]
        log_.count = count
        # The recorder writes chunks in order, so none lies past the current one unless records
        # the reader could not use are there: damage, never overwritten or deleted.
        chunk_dir = self.path / key / "c"
        later = [
            name
            for name in (os.listdir(chunk_dir) if chunk_dir.is_dir() else ())
            if name.isdecimal() and int(name) > count // RECORDS_PER_CHUNK
        ]
        if later:
            raise DataError(
                f"{key} holds chunks {sorted(later, key=int)} past its {count} readable records "
                f"(damaged); refusing to write over them"
            )
        return log_

    def _check_orphan_pixels(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Refuse when a frame group holds pixels of more than one frame without a record: a kill
        leaves at most one such slot (the append in flight); more means lost records."""
        committed: dict[str, int] = {}
        for record in records:
            committed[record["group"]] = committed.get(record["group"], 0) + 1
        frames_dir = self.path / FRAMES_GROUP
        for entry in os.listdir(frames_dir) if frames_dir.is_dir() else ():
            slots = frames_dir / entry / "data" / "c"
            if not slots.is_dir():
                continue
            stored = sum(1 for slot in os.listdir(slots) if (slots / slot / "0" / "0").is_file())
            orphans = stored - committed.get(entry, 0)
            if orphans > 1:
                raise DataError(
                    f"{FRAMES_GROUP}/{entry} holds pixels of {orphans} frames that have no record "
                    f"(the record log is damaged); refusing to write over them"
                )

    def _reopened_group(self, name: str) -> _FrameGroup:
        for group in self._groups.values():
            if group.group.basename == name:
                return group
        node = self._frames_group.get(name)
        if not isinstance(node, zarr.Group):
            raise DataError(f"{FRAMES_GROUP}/{name} is missing")
        shape_attr: Any = node.attrs.get("shape")
        dtype_attr = node.attrs.get("dtype")
        try:
            shape = (int(shape_attr[0]), int(shape_attr[1]))
            dtype = np.dtype(str(dtype_attr))
        except (TypeError, ValueError, IndexError) as exc:
            raise DataError(f"{FRAMES_GROUP}/{name} has no valid shape/dtype attributes") from exc
        if frame_group_name(shape, dtype) != name:
            raise DataError(f"{FRAMES_GROUP}/{name} attributes say {shape} {dtype}")
        group = _FrameGroup(node, shape, dtype, existing=True)
        self._groups[(shape, dtype.str)] = group
        return group

    @staticmethod
    def _config_text(mapping: Mapping[str, Any], what: str) -> str:
        if not isinstance(mapping, Mapping):
            raise ConfigError(f"{what} must be a mapping, got {type(mapping).__name__}")
        try:
            return to_json_text(dict(mapping), what)
        except DataError as exc:
            raise ConfigError(str(exc)) from None

    def _prepare_directory(self, overwrite: bool) -> None:
        path = self.path
        if path.exists() or path.is_symlink():
            unfinished = interrupted_creation(path)
            if not overwrite and unfinished is not None:
                raise ConfigError(
                    f"{path} is a session store whose creation was interrupted (the writer was "
                    f"killed before it wrote {', '.join(unfinished)}); it holds no frames or "
                    f"events: pass --overwrite to replace it, or choose another path"
                )
            if not overwrite:
                raise ConfigError(f"{path} exists; pass --overwrite or choose another path")
            if not path.is_dir():
                raise ConfigError(f"{path} exists and is not a directory; refusing to overwrite it")
            if any(path.iterdir()) and not _is_session_root(path) and unfinished is None:
                raise ConfigError(
                    f"{path} exists and is not a scopepilot session store; refusing to delete "
                    f"it (choose another path)"
                )
            try:
                shutil.rmtree(path)
            except OSError as exc:
                raise ConfigError(f"cannot overwrite {path}: {_os_reason(exc)}") from exc
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.mkdir()
        except OSError as exc:
            raise ConfigError(f"cannot create the session store {path}: {_os_reason(exc)}") from exc
        if not os.access(path, os.W_OK | os.X_OK):
            path.rmdir()
            raise ConfigError(f"cannot write the session store {path}: permission denied")

    # -- appends ----------------------------------------------------------------------------

    @property
    def frames_written(self) -> int:
        return self._records.count

    @property
    def events_written(self) -> int:
        return self._events.count

    def append_frame(
        self,
        frame: Frame,
        *,
        problems: Sequence[str] = (),
        extra: Mapping[str, Any] = {},  # read only, never mutated
    ) -> int:
        """Record ``frame`` (complete, or an aborted partial with its ``lines_done``).

        Frames with NaN or other problems are recorded as they are, flagged with ``problems``
        (the caller's plus :func:`drivers.frame.frame_problems`). ``extra`` holds small
        JSON-able facts such as stage latencies. Returns the frame's row in the session
        (0, 1, 2, ...). Raises :class:`DataError` (and writes nothing) for a non-numeric dtype
        or a header, truth or ``extra`` that JSON cannot carry.
        """
        if not isinstance(frame, Frame):
            raise DataError(f"append_frame needs a drivers.frame.Frame, got {type(frame).__name__}")
        data = frame.data
        if data.dtype.kind not in _PIXEL_KINDS:
            raise DataError(
                f"frame {frame.frame_index} has dtype {data.dtype}; the recorder stores numeric "
                f"or bool pixels only"
            )
        dtype = _native_dtype(data.dtype)
        shape = frame.shape
        flagged = list(dict.fromkeys([*map(str, problems), *frame_problems(frame)]))
        clean = None
        truth = frame.truth
        if self.record_clean and truth is not None and truth.clean is not None:
            clean = np.asarray(truth.clean)
            if clean.shape != shape or clean.dtype.kind not in "biuf":
                flagged.append(
                    f"ground-truth clean image {clean.shape} {clean.dtype} does not match the "
                    f"frame {shape}; not stored"
                )
                clean = None
        group_name = frame_group_name(shape, dtype)
        body = to_json_text(  # validated before anything is written
            {
                "group": group_name,
                "clean": clean is not None,
                "recorded_unix": time.time(),
                "header": frame.header(),
                "truth": None if truth is None else truth.to_json(),
                "problems": flagged,
                "extra": dict(extra),
            },
            f"frame {frame.frame_index} record",
        )
        with self._lock:
            self._check_open()
            group = self._group(shape, dtype)
            slot = group.count
            row = self._records.count
            group.ensure_capacity(slot, with_clean=clean is not None)
            # Pixels first, record last: the record is the commit point.
            if data.size:
                key = f"{FRAMES_GROUP}/{group_name}"
                self._store.set_sync(f"{key}/data/c/{slot}/0/0", _pixel_buffer(data, dtype))
                if clean is not None:
                    buffer = _pixel_buffer(clean, np.dtype(np.float32))
                    self._store.set_sync(f"{key}/clean/c/{slot}/0/0", buffer)
            self._records.append(f'{{"row":{row},"slot":{slot},{body[1:]}')
            group.count = slot + 1
            return row

    def _group(self, shape: tuple[int, int], dtype: np.dtype[Any]) -> _FrameGroup:
        key = (shape, dtype.str)
        group = self._groups.get(key)
        if group is None:
            name = frame_group_name(shape, dtype)
            if (self.path / FRAMES_GROUP / name).exists():  # resumed: no committed frame in it
                try:
                    return self._reopened_group(name)
                except Exception:  # half-created when the writer died (reopen checked that it
                    # holds at most the pixels of the append in flight): start it again
                    shutil.rmtree(self.path / FRAMES_GROUP / name)
            zgroup = self._frames_group.create_group(
                name, attributes={"shape": list(shape), "dtype": dtype.name}
            )
            group = _FrameGroup(zgroup, shape, dtype)
            self._groups[key] = group
        return group

    def append_event(
        self,
        kind: str,
        payload: Mapping[str, Any],
        *,
        t_wall: float | None = None,
        t_instrument: float | None = None,
    ) -> int:
        """Record an event (``perception``, ``decision``, ``command``, ``operator``, ``fault``,
        ``status``); returns its sequence number. A command payload carries ``fate``
        (issued/executed/rejected/vetoed/approved/held/failed) and ``reason``.

        Raises :class:`DataError`, writing nothing, when ``payload`` is not JSON-able.
        """
        if not isinstance(kind, str) or not kind:
            raise DataError(f"event kind must be a non-empty string, got {kind!r}")
        if not isinstance(payload, Mapping):
            raise DataError(f"{kind} event payload must be a mapping, got {type(payload).__name__}")
        for name, value in (("t_wall", t_wall), ("t_instrument", t_instrument)):
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise DataError(f"{kind} event {name} must be a finite number, got {value!r}")
        body = to_json_text(  # validated before anything is written
            {
                "kind": kind,
                "t_wall": time.time() if t_wall is None else float(t_wall),
                "t_instrument": None if t_instrument is None else float(t_instrument),
                "payload": dict(payload),
            },
            f"{kind} event payload",
        )
        with self._lock:
            self._check_open()
            return self._events.append(f'{{"seq":{self._events.count},{body[1:]}')

    def append_array(self, name: str, array: np.ndarray) -> dict[str, Any]:
        """Store an ``(H, W)`` numeric image a perception stage made (e.g. the ``sr`` image) in
        ``products/<name>/<H>x<W>_<dtype>`` and return its reference ``{"array", "slot"}``.

        The image is committed by the event that carries the reference (pixels first, the
        event last, as for frames): write the event after this returns. Raises
        :class:`DataError`, writing nothing, for a bad name, a non-numeric or non-2-D array.
        """
        if not isinstance(name, str) or not name.isidentifier():
            raise DataError(f"array name must be an identifier, got {name!r}")
        data = np.asarray(array)
        if data.ndim != 2 or data.dtype.kind not in _PIXEL_KINDS or not data.size:
            raise DataError(
                f"array {name!r} must be a non-empty 2-D numeric image, got {data.shape} "
                f"{data.dtype}"
            )
        dtype = _native_dtype(data.dtype)
        shape = (int(data.shape[0]), int(data.shape[1]))
        path = f"{PRODUCTS_GROUP}/{name}/{frame_group_name(shape, dtype)}"
        with self._lock:
            self._check_open()
            group = self._products.get(path)
            if group is None:
                group = self._product_group(path, shape, dtype)
            slot = group.count
            group.ensure_capacity(slot, with_clean=False)
            self._store.set_sync(f"{path}/data/c/{slot}/0/0", _pixel_buffer(data, dtype))
            group.count = slot + 1
            return {"array": path, "slot": slot}

    def _product_group(
        self, path: str, shape: tuple[int, int], dtype: np.dtype[Any]
    ) -> _FrameGroup:
        attrs = {"shape": list(shape), "dtype": dtype.name}
        node = self._root.get(path)
        if isinstance(node, zarr.Group):  # a resumed session: continue after committed slots
            group = _FrameGroup(node, shape, dtype, existing=True)
            group.count = self._product_counts.get(path, 0)
        else:
            parent = self._root.require_group(path.rsplit("/", 1)[0])
            group = _FrameGroup(
                parent.create_group(path.rsplit("/", 1)[1], attributes=attrs), shape, dtype
            )
        self._products[path] = group
        return group

    def set_summary(self, summary: Mapping[str, Any]) -> None:
        """Store the end-of-session ``summary`` (a JSON-able mapping) as a root attribute."""
        if not isinstance(summary, Mapping):
            raise DataError(f"summary must be a mapping, got {type(summary).__name__}")
        value = json.loads(to_json_text(dict(summary), "session summary"))
        with self._lock:
            self._check_open()
            self._root.update_attributes({"summary": value})

    def close(self) -> None:
        """Trim the arrays to what was written and stamp the end time. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for group in (*self._groups.values(), *self._products.values()):
                group.trim(self._store)
            self._records.trim()
            self._events.trim()
            ended = time.time()
            self._root.update_attributes(
                {
                    "ended": datetime.datetime.fromtimestamp(ended, datetime.UTC).isoformat(),
                    "ended_unix": ended,
                    "frames_written": self._records.count,
                    "events_written": self._events.count,
                }
            )
        log.info(
            "closed session %s: %d frames, %d events",
            self.path,
            self._records.count,
            self._events.count,
        )

    def _check_open(self) -> None:
        if self._closed:
            raise DataError(f"the session recorder for {self.path} is closed")

    def __enter__(self) -> SessionRecorder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"SessionRecorder({str(self.path)!r}, {state}, frames={self.frames_written}, "
            f"events={self.events_written})"
        )
