"""Read-only view of a session store written by :class:`agent.recorder.SessionRecorder`.

Works on a store whose writer is still running or was killed: a frame counts only when its
record exists and its slot lies inside its pixel array (the recorder writes pixels first and the
record last), so what a reader sees is always a prefix of what the writer acknowledged, plus at
most the one append in flight. Leftover ``*.partial`` temporary files are ignored.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore

from agent.recorder import EVENTS_ARRAY, FORMAT, FRAMES_GROUP, PRODUCTS_GROUP, RECORDS_ARRAY
from drivers.errors import DataError
from drivers.frame import Defect, Frame, GroundTruth, ScanRegion, TipState

_GROUP_NAME = re.compile(r"^[0-9]+x[0-9]+_[a-z0-9]+$")
_PRODUCT_PATH = re.compile(rf"^{PRODUCTS_GROUP}/[A-Za-z_][A-Za-z0-9_]*/[0-9]+x[0-9]+_[a-z0-9]+$")


class Session:
    """A recorded session: configuration, versions, frames, per-frame records and events.

    Raises :class:`DataError` naming the path and the problem when ``path`` is missing, is not a
    session store or is corrupt.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        attrs = self._read_root_attributes()
        try:
            store = LocalStore(self.path, read_only=True)
            self._root = zarr.open_group(store, mode="r", zarr_format=3, use_consolidated=False)
        except Exception as exc:  # zarr raises several types for a broken store
            raise DataError(f"{self.path}: cannot open the session store: {exc}") from exc
        self.config: dict[str, Any] = dict(attrs.get("config") or {})
        self.versions: dict[str, Any] = dict(attrs.get("versions") or {})
        self.started: str = str(attrs.get("started", ""))
        self.ended: str | None = attrs.get("ended")
        summary = attrs.get("summary")
        self.summary: dict[str, Any] | None = (
            dict(summary) if isinstance(summary, Mapping) else None
        )
        self._arrays: dict[str, tuple[zarr.Array[Any], zarr.Array[Any] | None]] = {}
        self._records = self._committed_frames(self._read_log(RECORDS_ARRAY, "frame record"))
        self._events = self._read_log(EVENTS_ARRAY, "event")
        for seq, event in enumerate(self._events):
            if event.get("seq") != seq or not isinstance(event.get("payload"), dict):
                raise DataError(f"{self.path}: event {seq} is malformed: {event!r:.200}")

    # -- opening ----------------------------------------------------------------------------

    def _read_root_attributes(self) -> dict[str, Any]:
        if not self.path.exists():
            raise DataError(f"{self.path}: no session store there (the path does not exist)")
        if not self.path.is_dir():
            raise DataError(f"{self.path}: not a session store (a file, not a zarr directory)")
        try:
            meta = json.loads((self.path / "zarr.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{self.path}: not a session store (no zarr.json)") from None
        except (OSError, ValueError) as exc:
            raise DataError(f"{self.path}: corrupt zarr.json: {exc}") from None
        attrs = meta.get("attributes") if isinstance(meta, dict) else None
        fmt = attrs.get("format") if isinstance(attrs, dict) else None
        if not isinstance(attrs, dict) or fmt is None:
            from agent.recorder import interrupted_creation

            unfinished = interrupted_creation(self.path)
            if unfinished is not None:
                raise DataError(
                    f"{self.path}: not a scopepilot session store yet: its creation was "
                    f"interrupted (the writer was killed before it wrote {', '.join(unfinished)})"
                    f"; it holds no frames or events, so there is nothing to read or resume. "
                    f"Start again in its place with scopepilot run --out {self.path} --overwrite"
                )
            raise DataError(
                f"{self.path}: a zarr store but not a scopepilot session (no 'format' attribute; "
                f"a store whose writer died while creating it looks like this too)"
            )
        if fmt != FORMAT:
            raise DataError(f"{self.path}: session format {fmt!r} is not supported (need {FORMAT})")
        return attrs

    def _node(self, key: str, missing: str, *, damaged: str | None = None) -> Any:
        """``self._root[key]``; :class:`DataError` saying ``missing`` when it is absent, or that
        ``damaged`` (default ``key``) is damaged when zarr cannot read its metadata."""
        try:
            return self._root[key]
        except KeyError:
            raise DataError(f"{self.path}: {missing}") from None
        except Exception as exc:  # damaged metadata: zarr raises several types
            raise DataError(
                f"{self.path}: {damaged or key} is damaged: {type(exc).__name__}: {exc}"
            ) from None

    def _read_log(self, name: str, what: str) -> list[dict[str, Any]]:
        """The committed JSON records of a string array: the leading non-empty entries."""
        array = self._node(name, f"not a complete session store (no {name})")
        if not isinstance(array, zarr.Array) or array.ndim != 1:
            raise DataError(f"{self.path}: {name} is not a 1-D array")
        chunk_dir = self.path / name / "c"
        # Chunk keys are decimal names; leftovers of a killed write end in ".partial".
        written = sorted(int(n) for n in _list_dir(chunk_dir) if n.isdecimal())
        if not written:
            return []
        if written != list(range(len(written))):  # chunks are written in order: a gap is damage
            missing = sorted(set(range(written[-1] + 1)) - set(written))
            raise DataError(
                f"{self.path}: {name} is damaged: chunk {missing[0]} is missing while later "
                f"chunks exist (records {missing[0] * int(array.chunks[0])}.. lost)"
            )
        stop = min((max(written) + 1) * int(array.chunks[0]), int(array.shape[0]))
        try:
            texts = array[:stop]
        except Exception as exc:
            raise DataError(f"{self.path}: cannot read {name}: {exc}") from exc
        records: list[dict[str, Any]] = []
        for index, text in enumerate(np.asarray(texts).tolist()):
            if not text:
                break  # the first never-written slot ends the log
            try:
                record = json.loads(text)
            except ValueError as exc:
                raise DataError(f"{self.path}: {what} {index} is not JSON: {exc}") from None
            if not isinstance(record, dict):
                raise DataError(f"{self.path}: {what} {index} is not a JSON object")
            records.append(record)
        return records

    def _committed_frames(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        committed: list[dict[str, Any]] = []
        for row, record in enumerate(records):
            group, slot = record.get("group"), record.get("slot")
            if (
                record.get("row") != row
                or not isinstance(group, str)
                or not _GROUP_NAME.match(group)
                or not isinstance(slot, int)
                or not isinstance(record.get("header"), dict)
            ):
                raise DataError(f"{self.path}: frame record {row} is malformed: {record!r:.200}")
            data, clean = self._group_arrays(group)
            if slot >= data.shape[0] or (record.get("clean") and clean is None):
                break  # pixels not in place: not a committed frame
            committed.append(record)
        return committed

    def _group_arrays(self, group: str) -> tuple[zarr.Array[Any], zarr.Array[Any] | None]:
        if group not in self._arrays:
            try:
                node = self._root[f"{FRAMES_GROUP}/{group}"]
                data = node["data"] if isinstance(node, zarr.Group) else None
                clean = node["clean"] if isinstance(node, zarr.Group) and "clean" in node else None
            except KeyError:
                data = clean = None
            except Exception as exc:  # damaged metadata: zarr raises several types
                raise DataError(
                    f"{self.path}: frames/{group} is damaged: {type(exc).__name__}: {exc}"
                ) from None
            if not isinstance(data, zarr.Array) or data.ndim != 3:
                raise DataError(f"{self.path}: frames/{group}/data is missing or not (N, H, W)")
            if clean is not None and not isinstance(clean, zarr.Array):
                raise DataError(f"{self.path}: frames/{group}/clean is not an array")
            self._arrays[group] = (data, clean)
        return self._arrays[group]

    # -- reading ----------------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of committed frames."""
        return len(self._records)

    def frame_records(self) -> list[dict[str, Any]]:
        """Per-frame records: ``row``, ``group``, ``slot``, ``clean``, ``recorded_unix``,
        ``header`` (:meth:`Frame.header`), ``truth`` (:meth:`GroundTruth.to_json` or None),
        ``problems`` (empty unless flagged) and ``extra``."""
        return copy.deepcopy(self._records)

    def frame(self, i: int) -> Frame:
        """Frame ``i`` (0-based row; negative counts from the end), truth included if recorded."""
        n = len(self._records)
        if not -n <= i < n:
            raise IndexError(f"frame {i} out of range: {self.path} holds {n} frames")
        record = self._records[i % n]
        data_array, clean_array = self._group_arrays(record["group"])
        slot = record["slot"]
        data = self._pixels(data_array, slot, i % n, "pixels")
        header = record["header"]
        truth = record.get("truth")
        try:
            clean = None
            if record.get("clean") and clean_array is not None:
                clean = self._pixels(clean_array, slot, i % n, "ground-truth clean image")
            return Frame(
                data=data,
                channel=header["channel"],
                pixel_size_m=(float(header["pixel_size_m"][0]), float(header["pixel_size_m"][1])),
                dwell_s=header["dwell_s"],
                scan_region=ScanRegion.from_json(header["scan_region"]),
                frame_index=header["frame_index"],
                timestamp_s=header["timestamp_s"],
                lines_done=header["lines_done"],
                instrument=header["instrument"],
                metadata=header.get("metadata", {}),
                truth=None if truth is None else _truth_from_json(truth, clean),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise DataError(f"{self.path}: frame record {i} is malformed: {exc!r}") from None

    def _pixels(self, array: zarr.Array[Any], slot: int, row: int, what: str) -> np.ndarray:
        """One (H, W) slot of a pixel array. The recorder writes every chunk, even an all-zero
        one, so a missing chunk file is damage (zarr would silently read the fill value)."""
        if array.shape[1] and array.shape[2]:
            chunk = self.path / array.path / "c" / str(slot) / "0" / "0"
            if not chunk.is_file():
                raise DataError(
                    f"{self.path}: the {what} of frame {row} are missing ({chunk.name} chunk of "
                    f"{array.path}, slot {slot}, was deleted or never written)"
                )
        try:
            return np.asarray(array[slot])
        except Exception as exc:  # zarr raises several types for a damaged chunk
            raise DataError(f"{self.path}: cannot read the {what} of frame {row}: {exc}") from exc

    def damaged_pixels(self) -> list[str]:
        """Committed frames whose pixel (or clean-image) chunk file is missing or has the wrong
        size, found without reading any pixels: empty for an intact store."""
        damaged = []
        for record in self._records:
            data, clean = self._group_arrays(record["group"])
            arrays = [("pixels", data)]
            if record.get("clean") and clean is not None:
                arrays.append(("clean image", clean))
            for what, array in arrays:
                size = int(array.shape[1]) * int(array.shape[2]) * array.dtype.itemsize
                if size:
                    chunk = self.path / array.path / "c" / str(record["slot"]) / "0" / "0"
                    try:
                        ok = chunk.stat().st_size == size
                    except OSError:
                        ok = False
                    if not ok:
                        damaged.append(f"frame {record['row']} {what}")
        return damaged

    def array(self, ref: Mapping[str, Any]) -> np.ndarray:
        """The ``(H, W)`` image an event refers to (``payload["arrays"][NAME]``, a reference
        ``{"array", "slot"}`` written by :meth:`SessionRecorder.append_array`), e.g. the sr image
        of a frame's ``perception`` event. :class:`DataError` for a malformed reference or
        missing pixels."""
        path = ref.get("array") if isinstance(ref, Mapping) else None
        slot = ref.get("slot") if isinstance(ref, Mapping) else None
        if (
            not isinstance(path, str)
            or not _PRODUCT_PATH.match(path)
            or not isinstance(slot, int)
            or slot < 0
        ):
            raise DataError(f"{self.path}: malformed array reference {ref!r:.200}")
        array = self._node(f"{path}/data", f"{path} is missing", damaged=path)
        if not isinstance(array, zarr.Array) or array.ndim != 3 or slot >= array.shape[0]:
            raise DataError(f"{self.path}: {path} holds no slot {slot}")
        return self._pixels(array, slot, slot, f"{path} image")

    def iter_frames(self) -> Iterator[Frame]:
        for i in range(len(self._records)):
            yield self.frame(i)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Events in order, each ``{"seq", "kind", "t_wall", "t_instrument", "payload"}``;
        only those of ``kind`` when given."""
        return [copy.deepcopy(e) for e in self._events if kind is None or e.get("kind") == kind]

    def __repr__(self) -> str:
        state = "closed" if self.ended else "not closed (running or killed)"
        return (
            f"Session({str(self.path)!r}, {len(self)} frames, {len(self._events)} events, "
            f"started {self.started}, {state})"
        )


def _truth_from_json(obj: Mapping[str, Any], clean: np.ndarray | None) -> GroundTruth:
    defects = tuple(
        Defect(
            x_m=d["x_m"],
            y_m=d["y_m"],
            kind=d["kind"],
            row_px=math.nan if d.get("row_px") is None else d["row_px"],
            col_px=math.nan if d.get("col_px") is None else d["col_px"],
        )
        for d in obj.get("defects", ())
    )
    return GroundTruth(
        tip_state=TipState(obj["tip_state"]),
        tip_states=tuple(TipState(s) for s in obj.get("tip_states", ())),
        clean=clean,
        defects=defects,
        damaged_fraction=float(obj.get("damaged_fraction", 0.0)),
        extra=dict(obj.get("extra", {})),
    )


def _list_dir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []
