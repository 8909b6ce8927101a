"""Export a recorded session's frames to OME-TIFF for Fiji, napari, QuPath and friends."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from agent.session import Session
from drivers.errors import ConfigError, DataError

log = logging.getLogger(__name__)

_BIGTIFF_BYTES = 2**31  # classic TIFF offsets stop at 4 GiB; leave room for the metadata


def export_ome_tiff(
    session_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> int:
    """Write every frame of a session to one OME-TIFF file; returns the number of frames written.

    Frames are grouped into one OME image series per (channel, shape, dtype, pixel size), in
    order of first appearance; each series is ``(T, Y, X)`` with ``PhysicalSizeX/Y`` in nm.
    The file appears whole or not at all (written to ``<out>.partial`` and renamed).

    Raises :class:`ConfigError` when ``out_path`` exists and ``overwrite`` is False or cannot be
    written, and :class:`DataError` when the session cannot be read or has no frames.
    """
    out = Path(out_path)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite or choose another path")
    if out.is_dir():
        raise ConfigError(f"{out} is a directory; give a file name such as session.ome.tif")
    session = Session(session_path)
    series = _series(session)
    if not series:
        raise DataError(f"{session.path}: the session has no frames to export")
    total_bytes = sum(
        len(rows) * int(np.prod(key[1])) * np.dtype(key[2]).itemsize for key, rows in series.items()
    )
    tmp = out.with_name(out.name + ".partial")
    try:
        with tifffile.TiffWriter(tmp, ome=True, bigtiff=total_bytes > _BIGTIFF_BYTES) as tif:
            for (channel, shape, dtype, pixel_size_m), rows in series.items():
                tif.write(
                    _planes(session, rows),
                    shape=(len(rows), *shape),
                    dtype=_tiff_dtype(dtype),
                    photometric="minisblack",
                    metadata=_ome_metadata(channel, shape, dtype, pixel_size_m),
                )
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {out}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    n = sum(len(rows) for rows in series.values())
    log.info("exported %d frames in %d series from %s to %s", n, len(series), session.path, out)
    return n


SeriesKey = tuple[str, tuple[int, int], str, tuple[float, float]]


def _series(session: Session) -> dict[SeriesKey, list[int]]:
    groups: dict[SeriesKey, list[int]] = {}
    for row, record in enumerate(session.frame_records()):
        header = record["header"]
        key = (
            str(header["channel"]),
            (int(header["shape"][0]), int(header["shape"][1])),
            np.dtype(header["dtype"]).name,  # the store holds native byte order
            (float(header["pixel_size_m"][0]), float(header["pixel_size_m"][1])),
        )
        groups.setdefault(key, []).append(row)
    return groups


def _planes(session: Session, rows: list[int]) -> Iterator[np.ndarray]:
    for row in rows:
        data = session.frame(row).data
        yield data.astype(np.uint8) if data.dtype == np.bool_ else np.ascontiguousarray(data)


def _tiff_dtype(dtype: str) -> np.dtype[Any]:
    return np.dtype(np.uint8) if np.dtype(dtype) == np.bool_ else np.dtype(dtype)


def _ome_metadata(
    channel: str, shape: tuple[int, int], dtype: str, pixel_size_m: tuple[float, float]
) -> dict[str, Any]:
    name = f"{channel} {shape[0]}x{shape[1]} {np.dtype(dtype).name}"
    return {
        "axes": "TYX",
        "Name": name.encode("ascii", "replace").decode("ascii"),
        "PhysicalSizeX": pixel_size_m[1] * 1e9,
        "PhysicalSizeXUnit": "nm",
        "PhysicalSizeY": pixel_size_m[0] * 1e9,
        "PhysicalSizeYUnit": "nm",
        "Channel": {"Name": channel.encode("ascii", "replace").decode("ascii")},
    }
