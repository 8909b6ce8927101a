"""Reading images for ``scopepilot infer``: ``.npy``, ``.tif``/``.tiff`` and, with the optional
``formats`` extra (rosettasciio), the common microscope formats (.dm3, .dm4, .emd, .sxm, ...).

:func:`read_image` returns the 2-D array and, when the file records it, the pixel size in nm.
A file that cannot be read, or holds no 2-D image, raises :class:`~drivers.errors.DataError`;
so does a format that needs the missing extra (the message says what to install).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from drivers.errors import DataError

log = logging.getLogger(__name__)

_NUMPY = {".npy"}
_TIFF = {".tif", ".tiff"}


def read_image(path: str | Path) -> tuple[np.ndarray, float | None]:
    """``(image (H, W), pixel size in nm or None)`` from ``path``.

    A stack with one image (``(1, H, W)``) is squeezed; anything else that is not 2-D is
    refused with a :class:`DataError` naming its shape.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"image file {p} does not exist or is not a file")
    suffix = p.suffix.lower()
    pixel_nm: float | None = None
    if suffix in _NUMPY:
        try:
            data = np.load(p, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"cannot read {p} as a .npy array: {exc}") from None
    elif suffix in _TIFF:
        data, pixel_nm = _read_tiff(p)
    else:
        data, pixel_nm = _read_rosettasciio(p)
    arr = np.asarray(data)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise DataError(f"{p} holds an array of shape {arr.shape}; infer needs one 2-D image")
    return arr, pixel_nm


def _read_tiff(p: Path) -> tuple[np.ndarray, float | None]:
    import tifffile

    try:
        with tifffile.TiffFile(p) as tif:
            data = tif.asarray()
            page = tif.pages[0]
            pixel_nm = _tiff_pixel_nm(page)
    except Exception as exc:  # tifffile raises several types for a damaged file
        raise DataError(f"cannot read {p} as a TIFF image: {exc}") from None
    return np.asarray(data), pixel_nm


def _tiff_pixel_nm(page: Any) -> float | None:
    """Pixel size from the TIFF resolution tags when the unit is centimetre (ImageJ writes
    ``XResolution`` in pixels per unit)."""
    try:
        tags = page.tags
        unit = tags["ResolutionUnit"].value
        num, den = tags["XResolution"].value
    except (KeyError, TypeError, ValueError):
        return None
    if int(unit) != 3 or num <= 0:  # 3 = centimetre
        return None
    return float(den) / float(num) * 1e7  # cm per pixel -> nm


def _read_rosettasciio(p: Path) -> tuple[np.ndarray, float | None]:
    try:
        from rsciio import IO_PLUGINS
    except ImportError:
        raise DataError(
            f"{p.suffix or 'this'} files need the optional reader library: pip install "
            "'scopepilot[formats]' (rosettasciio); .npy and .tif work without it"
        ) from None
    import importlib

    suffix = p.suffix.lower().lstrip(".")
    # Several readers can claim one extension (.hdf5: Delmic, HyperSpy, ...): try each in turn
    # and report every failure when none reads the file.
    failures = []
    for plugin in IO_PLUGINS:
        if suffix not in [e.lower() for e in plugin.get("file_extensions", [])]:
            continue
        try:
            module = importlib.import_module(plugin["api"])
            signals = module.file_reader(str(p))
        except Exception as exc:  # each reader raises its own types (ImportError included)
            failures.append(f"{plugin['name']}: {exc}")
            continue
        if not signals:
            raise DataError(f"{p} holds no data")
        signal = signals[0]
        data = np.asarray(signal["data"])
        return data, _axis_pixel_nm(signal.get("axes", []))
    if failures:
        raise DataError(f"cannot read {p} with rosettasciio ({'; '.join(failures)})")
    raise DataError(f"no reader for {p.suffix!r} files: use .npy, .tif or a rosettasciio format")


def _axis_pixel_nm(axes: list[dict[str, Any]]) -> float | None:
    factors = {"m": 1e9, "µm": 1e3, "um": 1e3, "nm": 1.0, "Å": 0.1, "A": 0.1, "pm": 1e-3}
    for axis in reversed(axes):  # the last axis is x
        unit = str(axis.get("units", ""))
        scale = axis.get("scale")
        if unit in factors and isinstance(scale, (int, float)) and scale > 0:
            return float(scale) * factors[unit]
    return None
