"""Reader for Gaussian cube files, the volumetric format DFT codes write (GPAW, Quantum
ESPRESSO ``pp.x``, VASP via ase, CP2K, Gaussian).

Layout (all numbers whitespace separated):

1. two free comment lines;
2. ``natoms  ox oy oz  [nval]``: number of atoms (negative: orbital indices follow the atoms)
   and the grid origin;
3. three lines ``n_i  vx vy vz``: the number of points along axis ``i`` and the step vector
   between neighbouring points. A positive count means Bohr, a negative count Ångström
   (lengths of the origin and atoms follow the sign of the first count);
4. ``natoms`` lines ``Z  charge  x y z``;
5. (negative ``natoms`` only) ``m  id_1 .. id_m`` orbital indices;
6. ``n_1 * n_2 * n_3`` values with the third index fastest.

>>> import io
>>> text = "c\\nc\\n1 0 0 0\\n1 1 0 0\\n1 0 1 0\\n2 0 0 1\\n1 0 0 0 0\\n0.5 0.25\\n"
>>> cube = parse_cube(text, name="demo")
>>> cube.data.shape, float(cube.data[0, 0, 1])
((1, 1, 2), 0.25)

Every malformed file raises :class:`~drivers.errors.DataError` naming the file, the offending
value and what was expected; nothing is half-read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from drivers.errors import DataError

BOHR_M = 0.529177210903e-10
"""Bohr radius in metres (CODATA 2018), the length unit of a cube with positive counts."""
ANGSTROM_M = 1e-10
MAX_POINTS_PER_AXIS = 4096
MAX_POINTS = 256 * 1024 * 1024  # 2 GiB of float64: refuse anything larger before allocating


@dataclass(frozen=True, eq=False)
class CubeData:
    """A volumetric grid read from a cube file; lengths in metres.

    ``origin_m``: ``(3,)`` position of grid point ``(0, 0, 0)``; ``axes_m``: ``(3, 3)``, row
    ``i`` the step between neighbouring points along index ``i``; ``data``: ``(n1, n2, n3)``
    float64, the values as written (e.g. electrons / Å³ or an LDOS in the code's units);
    ``atomic_numbers``: ``(natoms,)`` int64; ``positions_m``: ``(natoms, 3)`` float64.
    """

    origin_m: np.ndarray
    axes_m: np.ndarray
    data: np.ndarray
    atomic_numbers: np.ndarray
    positions_m: np.ndarray
    comment: tuple[str, str] = ("", "")
    source: str = "<cube>"

    @property
    def shape(self) -> tuple[int, int, int]:
        n1, n2, n3 = self.data.shape
        return int(n1), int(n2), int(n3)

    @property
    def cell_m(self) -> np.ndarray:
        """``(3, 3)`` periodic cell spanned by the grid: row ``i`` is ``n_i * axes_m[i]``."""
        return self.axes_m * np.array(self.shape, dtype=np.float64)[:, None]


def read_cube(path: str | Path) -> CubeData:
    """Read the cube file at ``path``.

    Raises :class:`DataError` (unreadable file, bad header, wrong grid, truncated or
    non-finite data), naming the file and the value.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="ascii", errors="strict")
    except FileNotFoundError:
        raise DataError(f"cube file {str(p)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cube file {str(p)!r} cannot be read as ASCII text: {exc}") from None
    return parse_cube(text, name=str(p))


def parse_cube(text: str, *, name: str = "<cube>") -> CubeData:
    """Parse the text of a cube file (``name`` is used in error messages)."""
    lines = text.splitlines()
    if len(lines) < 6:
        raise DataError(
            f"cube file {name!r} has {len(lines)} lines; expected at least 6 "
            "(2 comments, natoms/origin, 3 grid axes)"
        )
    comment = (lines[0].strip(), lines[1].strip())
    head = _numbers(lines[2], name, 3, "natoms and origin")
    if len(head) < 4:
        raise DataError(
            f"cube file {name!r} line 3 {lines[2].strip()!r}: expected 'natoms ox oy oz'"
        )
    natoms_signed = _as_int(head[0], name, 3, "natoms")
    natoms = abs(natoms_signed)
    counts: list[int] = []
    axes = np.zeros((3, 3))
    for i in range(3):
        row = _numbers(lines[3 + i], name, 4 + i, f"grid axis {i + 1}")
        if len(row) != 4:
            raise DataError(
                f"cube file {name!r} line {4 + i} {lines[3 + i].strip()!r}: expected "
                f"'n{i + 1} vx vy vz' (4 numbers), got {len(row)}"
            )
        n = _as_int(row[0], name, 4 + i, f"n{i + 1}")
        if n == 0:
            raise DataError(
                f"cube file {name!r}: grid count n{i + 1}=0 on line {4 + i}; expected a "
                "non-zero number of points (positive: Bohr, negative: Ångström)"
            )
        counts.append(n)
        axes[i] = row[1:]
    signs = {c > 0 for c in counts}
    if len(signs) != 1:
        raise DataError(
            f"cube file {name!r}: grid counts {counts} mix signs; expected all positive "
            "(Bohr) or all negative (Ångström)"
        )
    unit_m = BOHR_M if counts[0] > 0 else ANGSTROM_M
    shape = tuple(abs(c) for c in counts)
    for i, n in enumerate(shape):
        if n > MAX_POINTS_PER_AXIS:
            raise DataError(
                f"cube file {name!r}: grid count n{i + 1}={n} exceeds {MAX_POINTS_PER_AXIS}"
            )
    total = shape[0] * shape[1] * shape[2]
    if total > MAX_POINTS:
        raise DataError(f"cube file {name!r}: grid {shape} has {total} points, over {MAX_POINTS}")
    if not np.all(np.isfinite(axes)):
        raise DataError(f"cube file {name!r}: grid axes {axes.tolist()} are not all finite")
    lengths = np.linalg.norm(axes, axis=1)
    for i in range(3):
        if lengths[i] <= 0.0:
            raise DataError(
                f"cube file {name!r}: grid axis {i + 1} step {axes[i].tolist()} has zero "
                "length; expected a non-zero step vector"
            )
    volume = abs(float(np.linalg.det(axes)))
    if volume < 1e-6 * float(np.prod(lengths)):
        raise DataError(
            f"cube file {name!r}: grid axes {axes.tolist()} are (nearly) coplanar; expected "
            "three independent step vectors"
        )
    origin = np.asarray(head[1:4], dtype=np.float64)
    if not np.all(np.isfinite(origin)):
        raise DataError(f"cube file {name!r}: origin {origin.tolist()} is not finite")

    first_atom = 6
    if len(lines) < first_atom + natoms:
        raise DataError(
            f"cube file {name!r} ends after {len(lines)} lines; natoms={natoms} atom lines "
            "were expected after the grid axes"
        )
    z_list: list[int] = []
    pos = np.zeros((natoms, 3))
    for k in range(natoms):
        line_no = first_atom + k + 1
        row = _numbers(lines[first_atom + k], name, line_no, "atom")
        if len(row) != 5:
            raise DataError(
                f"cube file {name!r} line {line_no} {lines[first_atom + k].strip()!r}: "
                f"expected 'Z charge x y z' (5 numbers), got {len(row)}"
            )
        z = _as_int(row[0], name, line_no, "atomic number")
        if not 0 <= z <= 118:
            raise DataError(f"cube file {name!r} line {line_no}: atomic number {z} outside 0..118")
        z_list.append(z)
        pos[k] = row[2:5]
    if not np.all(np.isfinite(pos)):
        raise DataError(f"cube file {name!r}: atom positions are not all finite")

    body = lines[first_atom + natoms :]
    if natoms_signed < 0:  # orbital indices: 'm id_1 .. id_m', possibly over several lines
        tokens = " ".join(body).split()
        if not tokens:
            raise DataError(f"cube file {name!r}: natoms<0 but the orbital-index line is missing")
        m = _as_int(_float(tokens[0], name, first_atom + natoms + 1), name, 0, "orbital count")
        tokens = tokens[1 + m :]
    else:
        tokens = " ".join(body).split()
    if len(tokens) != total:
        what = "truncated" if len(tokens) < total else "too long"
        raise DataError(
            f"cube file {name!r} is {what}: it holds {len(tokens)} data values but its grid "
            f"{shape[0]} x {shape[1]} x {shape[2]} needs exactly {total}; check the grid "
            "counts or re-export the file"
        )
    try:
        values = np.array(tokens, dtype=np.float64)
    except ValueError:
        bad = next(t for t in tokens if not _is_float(t))
        raise DataError(f"cube file {name!r}: data value {bad!r} is not a number") from None
    finite = np.isfinite(values)
    if not finite.all():
        idx = int(np.argmin(finite))
        ijk = np.unravel_index(idx, shape)
        raise DataError(
            f"cube file {name!r}: data value {values[idx]!r} at grid index "
            f"{tuple(int(v) for v in ijk)} is not finite; expected finite numbers"
        )
    data = values.reshape(shape)
    data.setflags(write=False)
    return CubeData(
        origin_m=origin * unit_m,
        axes_m=axes * unit_m,
        data=data,
        atomic_numbers=np.asarray(z_list, dtype=np.int64),
        positions_m=pos * unit_m,
        comment=comment,
        source=name,
    )


def _numbers(line: str, name: str, line_no: int, what: str) -> list[float]:
    return [_float(t, name, line_no, what) for t in line.split()]


def _float(token: str, name: str, line_no: int, what: str = "value") -> float:
    try:
        return float(token)
    except ValueError:
        raise DataError(
            f"cube file {name!r} line {line_no}: {what} {token!r} is not a number"
        ) from None


def _as_int(value: float, name: str, line_no: int, what: str) -> int:
    if not math.isfinite(value) or value != int(value):
        raise DataError(f"cube file {name!r} line {line_no}: {what}={value!r} is not an integer")
    return int(value)


def _is_float(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True
