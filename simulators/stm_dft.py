"""Constant-current STM images from a DFT LDOS (or density) cube of a periodic slab.

In the Tersoff–Hamann picture an s-wave tip measures ``I ∝ V · rho(r_tip)``, with ``rho`` the
sample LDOS integrated over the bias window, so constant current is a constant-``rho``
(iso-LDOS) surface. :class:`CubeSTM` takes that ``rho`` on a grid (a Gaussian cube written by
a DFT code, see :mod:`simulators.cube`) and finds the iso-surface height

* on the cube's own in-plane grid, once per setpoint and tip: per column, the topmost height
  where ``rho`` crosses the isovalue, interpolating ``ln rho`` linearly between grid planes
  (the density decays exponentially into the vacuum) and, above the top of the cube,
  extrapolating with the exponential decay fitted to its top planes;
* then at every scan pixel by periodic cubic-spline interpolation of that height map
  (the in-plane cell tiles the plane; :func:`scipy.ndimage.map_coordinates`, ``grid-wrap``).

A tip with several apexes or a blunt one sees ``sum_j a_j rho(x - d_j, y - d_j, z + h_j)``
blurred in plane by a Gaussian of radius ``blur_m``, as in :mod:`simulators.stm_ldos`; for a
periodic sample that field is itself periodic in the cell, so it is built on the cube grid
(Fourier shifts in plane, log-linear shifts along z) before the iso-surface is taken.

The isovalue is set like :class:`~simulators.stm_config.STMConfig` sets its gap: at the
reference conductance the tip sits, on average, ``gap_m`` above the top atom plane; the
isovalue is the geometric mean of ``rho`` over that plane times ``conductance_ratio``
(``|I_set / V| / 200 pS``). A higher setpoint therefore brings the tip closer. Heights are
metres relative to ``top atom plane + gap_m``.

>>> import numpy as np
>>> from drivers.frame import ScanRegion
>>> cube = synthetic_cube()
>>> stm = CubeSTM(cube)
>>> img = stm.render_region(ScanRegion(width_m=2e-9, height_m=2e-9), (32, 32))
>>> img.shape, img.dtype.name
((32, 32), 'float32')

Hooking it into :class:`~simulators.stm.STMSimulator`: :meth:`CubeSTM.render` has the
signature of :meth:`simulators.stm_ldos.LDOSModel.render`, so ``STMSimulator._make_ldos`` can
return a ``CubeSTM`` instead of an ``LDOSModel``.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from drivers.errors import ConfigError, DataError
from drivers.frame import ScanRegion
from simulators.checks import check_shape
from simulators.cube import CubeData, read_cube
from simulators.stm import STMSimulator
from simulators.stm_config import REFERENCE_CONDUCTANCE_S, STMConfig
from simulators.stm_grid import Grid
from simulators.stm_tip import CANONICAL_GOOD, TipConfig

__all__ = [
    "DATA_DIR",
    "DEFAULT_CUBE_GAP_M",
    "GRAPHENE_CUBE",
    "CubeSTM",
    "CubeSTMSimulator",
    "synthetic_cube",
]

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
GRAPHENE_CUBE = DATA_DIR / "graphene_ldos.cube"
"""GPAW LDOS of graphene, E_F .. E_F + 1 eV (see ``simulators/data/README.md``)."""
DEFAULT_CUBE_GAP_M = 3.0e-10
"""Mean tip height above the top atom plane at the reference conductance (100 pA / 0.5 V)."""

_AXIS_TOL = 1e-3  # |sin| of the allowed tilt of the cube axes from the slab frame
_FIT_PLANES = 4  # top planes used to fit the exponential decay into the vacuum
_MIN_DECAY_PER_M = 2e9  # slowest decay of ln rho accepted in the fit (0.2 / Å)
_CACHE_SIZE = 16  # height maps and their resampled versions
_FINE_STEP_M = 0.04e-10  # spacing of the resampled height map that pixels interpolate
_FINE_MAX_PX = 2048  # per axis


class CubeSTM:
    """Tersoff–Hamann constant-current imaging of a periodic slab given as a cube LDOS.

    ``cube``: the slab's LDOS (or density) with two grid axes in the surface (xy) plane,
    spanning one periodic cell, and the third along +z into the vacuum; ``gap_m``: mean tip
    height above the top atom plane at ``conductance_ratio`` 1; ``isovalue``: use this
    LDOS value (cube units) instead of the one ``gap_m`` gives.
    """

    def __init__(
        self,
        cube: CubeData,
        *,
        gap_m: float = DEFAULT_CUBE_GAP_M,
        conductance_ratio: float = 1.0,
        isovalue: float | None = None,
    ) -> None:
        if not isinstance(cube, CubeData):
            raise ConfigError(f"cube must be a CubeData, got {type(cube).__name__}")
        for name, value in (("gap_m", gap_m), ("conductance_ratio", conductance_ratio)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"CubeSTM {name} must be a number, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"CubeSTM {name} must be finite and > 0, got {value!r}")
        if not 1e-10 <= gap_m <= 2e-9:
            raise ConfigError(f"CubeSTM gap_m={gap_m!r} outside 1e-10 .. 2e-9 m")
        self.cube = cube
        self.gap_m = float(gap_m)
        self.conductance_ratio = float(conductance_ratio)
        data = _check_geometry(cube)
        n1, n2, nz = data.shape
        self._shape = (n1, n2, nz)
        self._dz_m = float(cube.axes_m[2, 2])
        self._z0_m = float(cube.origin_m[2])
        self._origin_xy = np.asarray(cube.origin_m[:2], dtype=np.float64)
        steps = cube.axes_m[:2, :2]  # rows: in-plane step vectors (x, y)
        self._to_index = np.linalg.inv(steps.T)  # (x, y) -> fractional grid index
        cell = steps * np.array([[n1], [n2]], dtype=np.float64)
        recip = 2.0 * np.pi * np.linalg.inv(cell).T  # rows b1, b2 with a_i . b_j = 2 pi d_ij
        m1 = np.fft.fftfreq(n1, 1.0 / n1)
        m2 = np.fft.fftfreq(n2, 1.0 / n2)
        self._g = (
            m1[:, None, None] * recip[0][None, None, :]
            + m2[None, :, None] * recip[1][None, None, :]
        )  # (n1, n2, 2) reciprocal vectors of the FFT grid, 1/m
        peak = float(np.max(data))
        if peak <= 0.0:
            raise DataError(
                f"cube file {cube.source!r}: LDOS maximum {peak!r} is not positive; expected "
                "a density or LDOS (non-negative, not all zero)"
            )
        self._floor = peak * 1e-14
        self._rho = np.maximum(data, self._floor)
        self._log = np.log(self._rho)
        self._decay_per_m = self._fit_decay(self._log)
        if cube.atomic_numbers.size:
            self.top_atom_z_m = float(np.max(cube.positions_m[:, 2]))
        else:  # no atoms listed: the plane of highest mean density stands in for them
            self.top_atom_z_m = self._z0_m + self._dz_m * float(
                np.argmax(self._log.mean(axis=(0, 1)))
            )
        self.z_ref_m = self.top_atom_z_m + self.gap_m
        if isovalue is None:
            at_ref = self._log_at(self._log, self._decay_per_m, self.z_ref_m)
            log_iso = float(np.mean(at_ref)) + math.log(self.conductance_ratio)
        else:
            if isinstance(isovalue, bool) or not isinstance(isovalue, (int, float)):
                raise ConfigError(f"CubeSTM isovalue must be a number, got {isovalue!r}")
            if not math.isfinite(isovalue) or isovalue <= 0:
                raise ConfigError(f"CubeSTM isovalue must be finite and > 0, got {isovalue!r}")
            log_iso = math.log(isovalue)
        self.log_isovalue = log_iso
        self._maps: OrderedDict[tuple[object, ...], np.ndarray] = OrderedDict()

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: float | None) -> CubeSTM:
        """Read the cube at ``path`` (:func:`simulators.cube.read_cube`) and image it."""
        return cls(read_cube(path), **kwargs)  # type: ignore[arg-type]

    @property
    def isovalue(self) -> float:
        """The constant-current LDOS value, in the cube's units."""
        return math.exp(self.log_isovalue)

    @property
    def cell_m(self) -> np.ndarray:
        """``(2, 2)`` in-plane periodic cell (rows: cell vectors, metres)."""
        n1, n2, _ = self._shape
        return np.asarray(self.cube.axes_m[:2, :2] * np.array([[n1], [n2]], dtype=np.float64))

    # -- iso-surface on the cube grid ------------------------------------------------------------

    def _fit_decay(self, log: np.ndarray) -> np.ndarray:
        """Per column decay rate ``-d ln rho / dz`` (1/m) over the top planes, ``(n1, n2)``."""
        nz = log.shape[2]
        k = min(_FIT_PLANES, nz)
        z = np.arange(k, dtype=np.float64) * self._dz_m
        top = log[:, :, nz - k :]
        zc = z - z.mean()
        slope = (top - top.mean(axis=2, keepdims=True)) @ zc / float(zc @ zc)
        decay = -slope
        median = float(np.median(decay))
        if median < _MIN_DECAY_PER_M:
            raise DataError(
                f"cube file {self.cube.source!r}: the LDOS does not decay into the vacuum at "
                f"the top of the cube (fitted decay {median * 1e-10:.3g} / Å, expected at "
                f"least {_MIN_DECAY_PER_M * 1e-10:.2g} / Å); the third axis must point from "
                "the slab into vacuum and the cube must end in vacuum"
            )
        return np.asarray(np.maximum(decay, 0.5 * median))

    def _log_at(self, log: np.ndarray, decay: np.ndarray, z_m: float) -> np.ndarray:
        """``ln rho`` of every column at height ``z_m`` (log-linear, exponential above)."""
        nz = log.shape[2]
        t = (z_m - self._z0_m) / self._dz_m
        if t >= nz - 1:
            return np.asarray(log[:, :, -1] - decay * (t - (nz - 1)) * self._dz_m)
        t = max(t, 0.0)
        k = min(int(t), nz - 2)
        f = t - k
        return np.asarray((1.0 - f) * log[:, :, k] + f * log[:, :, k + 1])

    def _field(self, config: TipConfig) -> tuple[np.ndarray, np.ndarray]:
        """``ln`` of the tip's effective LDOS field on the cube grid and its top decay."""
        sharp_single = (
            config.blur_m <= 0.0
            and len(config.apexes) == 1
            and config.apexes[0].dx_m == 0.0
            and config.apexes[0].dy_m == 0.0
            and config.apexes[0].dz_m == 0.0
        )
        if sharp_single:
            return self._log, self._decay_per_m
        spec = np.fft.fft2(self._rho, axes=(0, 1))
        g2 = np.sum(self._g**2, axis=2)
        blur = np.exp(-0.5 * g2 * config.blur_m**2) if config.blur_m > 0 else 1.0
        nz = self._shape[2]
        total = np.zeros(self._shape)
        z_idx = np.arange(nz, dtype=np.float64)
        for apex in config.apexes:
            phase = np.exp(-1j * (self._g[..., 0] * apex.dx_m + self._g[..., 1] * apex.dy_m))
            shifted = np.fft.ifft2(spec * (phase * blur)[:, :, None], axes=(0, 1)).real
            log = np.log(np.maximum(shifted, self._floor))
            if apex.dz_m != 0.0:  # this apex sits dz higher: it sees ln rho(z + dz)
                t = z_idx + apex.dz_m / self._dz_m
                k = np.clip(np.floor(t).astype(np.int64), 0, nz - 2)
                f = np.clip(t - k, 0.0, None)
                above = t > nz - 1
                lo, hi = log[:, :, k], log[:, :, k + 1]
                val = (1.0 - f) * lo + f * hi
                extra = log[:, :, -1:] - self._decay_per_m[:, :, None] * (
                    (t[above] - (nz - 1)) * self._dz_m
                )
                val[:, :, above] = extra
                log = val
            total += apex.weight * np.exp(log)
        log_total = np.log(np.maximum(total, self._floor))
        return log_total, self._fit_decay(log_total)

    def height_map(self, config: TipConfig = CANONICAL_GOOD) -> np.ndarray:
        """``(n1, n2)`` float64 iso-surface height (m, absolute z) on the cube's in-plane grid."""
        key = (config.apexes, config.blur_m)
        cached = self._maps.get(key)
        if cached is not None:
            self._maps.move_to_end(key)
            return cached
        log, decay = self._field(config)
        level = self.log_isovalue
        nz = log.shape[2]
        above = log >= level
        reached = above.any(axis=2)
        k = nz - 1 - np.argmax(above[:, :, ::-1], axis=2)  # topmost plane at or above the level
        k_in = np.minimum(k, nz - 2)
        lo = np.take_along_axis(log, k_in[:, :, None], axis=2)[:, :, 0]
        hi = np.take_along_axis(log, k_in[:, :, None] + 1, axis=2)[:, :, 0]
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.where(lo > hi, (lo - level) / (lo - hi), 0.0)
        z_in = self._z0_m + (k_in + np.clip(frac, 0.0, 1.0)) * self._dz_m
        z_top = self._z0_m + (nz - 1) * self._dz_m
        z_out = z_top + (log[:, :, -1] - level) / decay
        z = np.where(k == nz - 1, z_out, z_in)
        # A column whose LDOS never reaches the level: the tip goes as low as the cube allows.
        z = np.where(reached, z, self._z0_m)
        n_low = int(np.count_nonzero(~reached))
        if n_low:
            logger.debug("%d columns never reach the isovalue; clipped to the cube bottom", n_low)
        z.setflags(write=False)
        self._maps[key] = z
        self._trim()
        return z

    def _trim(self) -> None:
        while len(self._maps) > _CACHE_SIZE:
            self._maps.popitem(last=False)

    # -- images ----------------------------------------------------------------------------------

    def render(self, grid: Grid, config: TipConfig = CANONICAL_GOOD) -> np.ndarray:
        """Constant-current topography ``(nr, W)`` float64 metres relative to ``z_ref_m``.

        Same contract as :meth:`simulators.stm_ldos.LDOSModel.render`.
        """
        fine, up = self._fine_map(config)
        to_index = self._to_index * np.array([[up[0]], [up[1]]], dtype=np.float64)
        # Fractional indices along the two in-plane axes: separable over rows and columns.
        row0 = (grid.rows_m - self._origin_xy) @ to_index.T  # (nr, 2)
        step = to_index @ grid.step_m  # (2,)
        col = np.arange(grid.width, dtype=np.float64)
        idx = np.empty((2, *grid.shape))
        for a in range(2):
            np.add(row0[:, a : a + 1], col[None, :] * step[a], out=idx[a])
        z = ndimage.map_coordinates(fine, idx, order=1, mode="grid-wrap")
        z -= self.z_ref_m
        return np.asarray(z, dtype=np.float64)

    def _fine_map(self, config: TipConfig) -> tuple[np.ndarray, tuple[int, int]]:
        """:meth:`height_map` resampled (periodic cubic spline) to at most ``_FINE_STEP_M``
        spacing, and the upsampling factor per axis; bilinear interpolation of it is within
        ~0.01 pm of the cubic spline and twice as fast (cached with the height map)."""
        key = ("fine", config.apexes, config.blur_m)
        cached = self._maps.get(key)
        if cached is not None:
            self._maps.move_to_end(key)
            return cached, (
                int(cached.shape[0]) // self._shape[0],
                int(cached.shape[1]) // self._shape[1],
            )
        zmap = self.height_map(config)
        steps = np.linalg.norm(self.cube.axes_m[:2, :2], axis=1)
        up = [max(1, math.ceil(float(st) / _FINE_STEP_M)) for st in steps]
        up = [min(u, max(1, _FINE_MAX_PX // n)) for u, n in zip(up, zmap.shape, strict=True)]
        i1 = np.arange(zmap.shape[0] * up[0]) / up[0]
        i2 = np.arange(zmap.shape[1] * up[1]) / up[1]
        g1, g2 = np.meshgrid(i1, i2, indexing="ij")
        fine = ndimage.map_coordinates(zmap, [g1, g2], order=3, mode="grid-wrap")
        fine.setflags(write=False)
        self._maps[key] = fine
        self._trim()
        return fine, (up[0], up[1])

    def render_region(
        self,
        region: ScanRegion,
        shape_px: tuple[int, int],
        config: TipConfig = CANONICAL_GOOD,
    ) -> np.ndarray:
        """``(H, W)`` float32 metres: ``region`` scanned as in :class:`~simulators.stm.STMSimulator`
        (row 0 first, rows along +y of the rotated scan frame, no noise, no drift)."""
        if not isinstance(region, ScanRegion):
            raise ConfigError(f"region must be a ScanRegion, got {region!r}")
        h_px, w_px = check_shape(shape_px, error=ConfigError)
        th = math.radians(region.rotation_deg)
        c, s = math.cos(th), math.sin(th)
        u0 = -region.width_m / 2 + 0.5 * region.width_m / w_px
        v = -region.height_m / 2 + (np.arange(h_px) + 0.5) * region.height_m / h_px
        x = region.center_x_m + c * u0 - s * v
        y = region.center_y_m + s * u0 + c * v
        grid = Grid(np.stack([x, y], axis=1), np.array([c, s]) * (region.width_m / w_px), w_px)
        return self.render(grid, config).astype(np.float32)


def _check_geometry(cube: CubeData) -> np.ndarray:
    """Check that the cube is a slab (axes 1, 2 in the xy plane, axis 3 along +z); returns the
    data with a periodic duplicate last plane (as some codes write) dropped."""
    axes = cube.axes_m
    lengths = np.linalg.norm(axes, axis=1)
    name = cube.source
    for i in range(2):
        if abs(axes[i, 2]) > _AXIS_TOL * lengths[i]:
            raise DataError(
                f"cube file {name!r}: grid axis {i + 1} step {(axes[i] * 1e10).round(4).tolist()} "
                "Å leaves the surface (xy) plane; expected the first two axes in the surface "
                "plane and the third along +z"
            )
    if axes[2, 2] <= 0 or math.hypot(axes[2, 0], axes[2, 1]) > _AXIS_TOL * lengths[2]:
        raise DataError(
            f"cube file {name!r}: grid axis 3 step {(axes[2] * 1e10).round(4).tolist()} Å is not "
            "normal to the surface plane; expected it along +z (from the slab into vacuum)"
        )
    data = cube.data
    if data.shape[2] < _FIT_PLANES:
        raise DataError(
            f"cube file {name!r}: {data.shape[2]} grid planes along z; expected at least "
            f"{_FIT_PLANES} to follow the LDOS into the vacuum"
        )
    for axis in (0, 1):
        n = data.shape[axis]
        if n > 2:
            first = np.take(data, 0, axis=axis)
            last = np.take(data, n - 1, axis=axis)
            scale = float(np.max(np.abs(first))) or 1.0
            if float(np.max(np.abs(first - last))) <= 1e-9 * scale:
                data = np.take(data, np.arange(n - 1), axis=axis)
    return data


def synthetic_cube(
    *,
    a_m: float = 2.88e-10,
    n_xy: int = 12,
    nz: int = 24,
    dz_m: float = 0.25e-10,
    kappa_per_m: float = 1.05e10,
) -> CubeData:
    """A hexagonal one-atom-per-cell surface LDOS ``sum_i exp(-2 kappa |r - R_i|)`` on a cube
    grid (for tests and examples; no DFT): atom plane at z = 0, the cube from 1 Å above it."""
    a1 = np.array([a_m, 0.0])
    a2 = np.array([0.5 * a_m, 0.5 * math.sqrt(3.0) * a_m])
    f = np.arange(n_xy) / n_xy
    px = f[:, None] * a1[0] + f[None, :] * a2[0]
    py = f[:, None] * a1[1] + f[None, :] * a2[1]
    z = 1e-10 + np.arange(nz) * dz_m
    rho = np.zeros((n_xy, n_xy, nz))
    for i in range(-3, 4):
        for j in range(-3, 4):
            rx = px - (i * a1[0] + j * a2[0])
            ry = py - (i * a1[1] + j * a2[1])
            r = np.sqrt(rx[:, :, None] ** 2 + ry[:, :, None] ** 2 + z[None, None, :] ** 2)
            rho += np.exp(-2.0 * kappa_per_m * r)
    axes = np.zeros((3, 3))
    axes[0, :2] = a1 / n_xy
    axes[1, :2] = a2 / n_xy
    axes[2, 2] = dz_m
    rho = rho / rho.max()
    rho.setflags(write=False)
    return CubeData(
        origin_m=np.array([0.0, 0.0, 1e-10]),
        axes_m=axes,
        data=rho,
        atomic_numbers=np.array([79]),
        positions_m=np.zeros((1, 3)),
        comment=("synthetic hexagonal LDOS", ""),
        source="<synthetic>",
    )


class CubeSTMSimulator(STMSimulator):
    """:class:`~simulators.stm.STMSimulator` imaging a DFT cube instead of a generated surface.

    Tip states, conditioning, drift, creep, noise and line-by-line scanning are the parent's;
    the sample is the cube's periodic slab (``cube``: a :class:`CubeData` or a path, default
    the shipped graphene LDOS), imaged by :class:`CubeSTM` at the configured setpoint and
    bias; ``gap_m`` is the tip height above the top atom plane at the reference conductance
    (None: :data:`DEFAULT_CUBE_GAP_M`; ``STMConfig.gap_m`` and ``kappa_per_m`` belong to the
    generated surfaces and are not used: the decay comes from the DFT LDOS). The sample has no
    defects, steps or conditioning damage: ``defect_density_per_nm2`` is set to 0 so ground
    truth lists no defects; ``damage_sites_m`` still lists where actions hit.
    """

    def __init__(
        self,
        config: STMConfig | None = None,
        *,
        seed: int | None = None,
        cube: CubeData | str | Path = GRAPHENE_CUBE,
        gap_m: float | None = None,
    ) -> None:
        self._cube = cube if isinstance(cube, CubeData) else read_cube(cube)
        self._cube_gap_m = DEFAULT_CUBE_GAP_M if gap_m is None else gap_m
        cfg = STMConfig() if config is None else config
        if isinstance(cfg, STMConfig) and cfg.defect_density_per_nm2 != 0.0:
            cfg = replace(cfg, defect_density_per_nm2=0.0)
        super().__init__(cfg, seed=seed)

    def _make_ldos(self) -> CubeSTM:  # type: ignore[override]  # same render() contract
        ratio = abs(self.config.setpoint_A / self._bias_V) / REFERENCE_CONDUCTANCE_S
        return CubeSTM(self._cube, gap_m=self._cube_gap_m, conductance_ratio=ratio)
