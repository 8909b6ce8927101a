"""Optional multislice backend of the HAADF-STEM simulator (abTEM), to validate the fast model.

The fast model (:mod:`simulators.stem_render`) images ``|ψ|² ⊛ O`` with ``O`` the atoms
weighted by ``Z^n``. This module renders the same specimen region through the same probe with
abTEM (https://abtem.github.io), which propagates the probe through the electrostatic potential
of the atoms slice by slice and integrates the intensity scattered onto an annular detector:
no ``Z^n`` law, no incoherent approximation. It is slow (minutes for a few thousand probe
positions on two cores) and is meant for validation, not for training data.

abTEM is an optional extra (``pip install 'scopepilot[multislice]'``) and is imported only when
a function here runs; without it they raise :class:`~drivers.errors.ConfigError` with the
install hint.

The specimen is the simulator's own: every column (defects included) within ``margin_ang`` of
the scan region, in a box that abTEM treats as periodic, so the margin must hold the probe's
tails (the seam at the box edge is then out of the probe's reach). The atoms of a projected
column are spread evenly along the beam over the specimen's thickness (MoS2 and WS2: S at
±1.595 Å around the metal plane, as ``ase.build.mx2`` builds them; SrTiO3: Sr every 3.905 Å,
Ti and O alternating every 1.95 Å).

Lengths in Å inside (``_ang``); the public inputs are the simulator's (metres, ScanRegion).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.ndimage

from drivers.errors import ConfigError
from drivers.frame import ScanRegion
from simulators.stem_probe import ANG, ProbeOptics
from simulators.stem_specimen import SpecimenModel

if TYPE_CHECKING:
    import ase

    from simulators.stem import STEMSimulator

INSTALL_HINT = (
    "the multislice backend needs abTEM, an optional extra: "
    "pip install 'scopepilot[multislice]' (or pip install abtem)"
)
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))

_COLUMN_SPAN_ANG = {"mos2": 6.38, "ws2": 6.38, "graphene": 3.35}
"""Length along the beam over which a column's atoms are spread, per specimen (pitch =
span / atoms in the column). MoS2: the two S of a column 3.19 Å apart; SrTiO3: 3.905 Å per cell
(:func:`_column_span_ang`)."""


def import_abtem() -> ModuleType:
    """The ``abtem`` module, or :class:`ConfigError` with the install hint when it is missing."""
    try:
        return importlib.import_module("abtem")
    except ImportError as exc:
        raise ConfigError(f"abtem is not installed; {INSTALL_HINT}") from exc


@dataclass(frozen=True)
class MultisliceSettings:
    """abTEM settings of :func:`render_multislice` (lengths in Å, angles in mrad).

    ``method``: ``"multislice"`` (one propagation per probe position) or ``"prism"`` (the
    S-matrix, ``prism_interpolation`` its interpolation factor). ``sampling_ang`` is the
    potential's grid spacing (abTEM keeps 2/3 of the grid's Nyquist angle: 0.05 Å reaches
    ~280 mrad at 80 kV, beyond the detector's ``detector_mrad``). ``slice_thickness_ang`` of
    the multislice. ``frozen_phonons`` configurations with Gaussian displacements of
    ``phonon_sigma_ang`` per axis (None: the simulator's ``thermal_sigma_m``); 0 keeps the
    atoms still and blurs the image by the thermal σ instead, as the fast model does. The
    effective source (the simulator's ``source_fwhm_m``) always blurs the image, which is exact
    for an incoherent source. ``margin_ang`` of specimen around the scan region.
    """

    method: str = "multislice"
    sampling_ang: float = 0.05
    slice_thickness_ang: float = 1.0
    detector_mrad: tuple[float, float] = (70.0, 200.0)
    frozen_phonons: int = 0
    phonon_sigma_ang: float | None = None
    prism_interpolation: int = 1
    margin_ang: float = 8.0
    parametrization: str = "lobato"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("multislice", "prism"):
            raise ConfigError(
                f"MultisliceSettings.method={self.method!r}; choose 'multislice' or 'prism'"
            )
        for name in ("sampling_ang", "slice_thickness_ang", "margin_ang"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"MultisliceSettings.{name} must be > 0, got {value!r}")
        inner, outer = self.detector_mrad
        if not 0 <= inner < outer:
            raise ConfigError(
                f"MultisliceSettings.detector_mrad={self.detector_mrad!r}; need 0 <= inner < outer"
            )
        if self.frozen_phonons < 0 or self.prism_interpolation < 1:
            raise ConfigError(
                f"MultisliceSettings: frozen_phonons={self.frozen_phonons!r} must be >= 0 and "
                f"prism_interpolation={self.prism_interpolation!r} >= 1"
            )


@dataclass(frozen=True)
class MultisliceResult:
    """A rendered frame: ``fraction`` ``(H, W)`` float64, the fraction of the beam on the
    detector at each pixel centre (the units of ``STEMSimulator.scattered_fraction``), the
    specimen box handed to abTEM (``atoms``) and the settings used."""

    fraction: np.ndarray
    atoms: ase.Atoms
    settings: MultisliceSettings


def _column_span_ang(model: SpecimenModel, thickness_cells: int) -> float:
    name = model.specimen.name
    if name == "srtio3":
        return 3.905 * thickness_cells
    return _COLUMN_SPAN_ANG.get(name, 3.0)


def _column_z_ang(atoms: tuple[int, ...], span_ang: float) -> tuple[list[int], np.ndarray]:
    """The atoms of a column interleaved by element, at evenly spaced depths centred on 0."""
    counts: dict[int, int] = {}
    keyed = []
    for z in atoms:
        n = counts.get(z, 0)
        counts[z] = n + 1
        keyed.append((n / atoms.count(z), -z))
    order = [-z for _, z in sorted(keyed)]
    n_atoms = len(order)
    pitch = span_ang / n_atoms
    depth = (np.arange(n_atoms) - (n_atoms - 1) / 2.0) * pitch
    return order, depth


def specimen_columns(
    model: SpecimenModel, x0: float, x1: float, y0: float, y1: float
) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """Every column in the box ``[x0, x1] x [y0, y1]`` (Å, stage coordinates) with its atoms,
    defects applied: ``(xy_ang (n, 2), atoms per column)``."""
    spec = model.specimen
    corners = np.array([[x0, y0], [x0, y1], [x1, y0], [x1, y1]]) - model.origin_ang
    frac = corners @ np.linalg.inv(model.cell_ang)
    lo = np.floor(frac.min(axis=0)).astype(int) - 1
    hi = np.ceil(frac.max(axis=0)).astype(int) + 1
    ii, jj = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1), indexing="ij")
    cell_origin = (
        model.origin_ang
        + np.outer(ii.ravel(), model.cell_ang[0])
        + np.outer(jj.ravel(), model.cell_ang[1])
    )
    xy_parts = [cell_origin + offset for offset in model.basis_ang]
    xy = np.concatenate(xy_parts)
    atoms: list[tuple[int, ...]] = [c for c in spec.columns for _ in range(cell_origin.shape[0])]
    defects = model.defects_in_box(x0, x1, y0, y1)
    rules = {rule.kind: rule for rule in spec.rules}
    extra_xy: list[np.ndarray] = []
    for pos, kind in zip(defects.xy_ang, defects.kinds, strict=True):
        rule = rules[kind]
        if rule.interstitial:
            extra_xy.append(pos)
            atoms.append(rule.atoms_after)
            continue
        dist = np.linalg.norm(xy - pos, axis=1)
        k = int(np.argmin(dist))
        if dist[k] < 1e-3:
            atoms[k] = rule.atoms_after
    if extra_xy:
        xy = np.concatenate([xy, np.array(extra_xy)])
    inside = (xy[:, 0] >= x0) & (xy[:, 0] <= x1) & (xy[:, 1] >= y0) & (xy[:, 1] <= y1)
    keep = [k for k in np.nonzero(inside)[0] if atoms[k]]
    return xy[keep], [atoms[k] for k in keep]


def specimen_box(
    model: SpecimenModel,
    region: ScanRegion,
    *,
    margin_ang: float,
    thickness_cells: int = 1,
    vacuum_ang: float = 1.0,
) -> ase.Atoms:
    """The atoms under ``region`` plus ``margin_ang`` as an orthogonal ``ase.Atoms`` box.

    Box coordinates follow the scan frame: x along the fast axis (image columns), y along the
    slow axis (rows), the region's first pixel corner at ``(margin_ang, margin_ang)``; z along
    the beam, the specimen centred with ``vacuum_ang`` above and below.
    """
    import ase

    width, height = region.width_m / ANG, region.height_m / ANG
    th = math.radians(region.rotation_deg)
    e_col = np.array([math.cos(th), math.sin(th)])
    e_row = np.array([-math.sin(th), math.cos(th)])
    centre = np.array([region.center_x_m, region.center_y_m]) / ANG
    half = 0.5 * math.hypot(width, height) + margin_ang
    xy, columns = specimen_columns(
        model, centre[0] - half, centre[0] + half, centre[1] - half, centre[1] + half
    )
    u = (xy - centre) @ e_col + width / 2 + margin_ang
    v = (xy - centre) @ e_row + height / 2 + margin_ang
    box_x, box_y = width + 2 * margin_ang, height + 2 * margin_ang
    inside = (u >= 0) & (u < box_x) & (v >= 0) & (v < box_y)
    span = _column_span_ang(model, thickness_cells)
    numbers: list[int] = []
    positions: list[tuple[float, float, float]] = []
    for k in np.nonzero(inside)[0]:
        order, depth = _column_z_ang(columns[k], span)
        numbers.extend(order)
        positions.extend((float(u[k]), float(v[k]), float(d)) for d in depth)
    box_z = span + 2 * vacuum_ang
    pos = np.array(positions).reshape(-1, 3)
    pos[:, 2] += box_z / 2
    return ase.Atoms(numbers=numbers, positions=pos, cell=[box_x, box_y, box_z], pbc=True)


def render_multislice(
    model: SpecimenModel,
    optics: ProbeOptics,
    region: ScanRegion,
    shape_px: tuple[int, int],
    *,
    settings: MultisliceSettings | None = None,
    thermal_sigma_m: float = 0.0,
    source_fwhm_m: float = 0.0,
    thickness_cells: int = 1,
) -> MultisliceResult:
    """The noise-free HAADF frame of ``region`` (``shape_px`` = (rows, cols)) by abTEM.

    Probe positions are the pixel centres of :meth:`STEMSimulator.scattered_fraction` (no
    drift, jitter or flyback). Raises :class:`ConfigError` with the install hint when abTEM is
    missing.
    """
    abtem = import_abtem()
    s = MultisliceSettings() if settings is None else settings
    h_px, w_px = shape_px
    pitch_x = region.width_m / ANG / w_px
    pitch_y = region.height_m / ANG / h_px
    # Blur of the image: the source always, the thermal smearing unless frozen phonons do it.
    sigma_phonon = thermal_sigma_m / ANG if s.phonon_sigma_ang is None else s.phonon_sigma_ang
    blur_ang = source_fwhm_m / ANG / FWHM_PER_SIGMA
    if s.frozen_phonons == 0:
        blur_ang = math.hypot(blur_ang, thermal_sigma_m / ANG)
    # Extra pixels around the frame so that the blur sees no edge.
    pad = math.ceil(4.0 * blur_ang / min(pitch_x, pitch_y)) if blur_ang > 0 else 0
    atoms = specimen_box(model, region, margin_ang=s.margin_ang, thickness_cells=thickness_cells)
    if s.frozen_phonons > 0 and sigma_phonon > 0:
        specimen: Any = abtem.FrozenPhonons(
            atoms, num_configs=s.frozen_phonons, sigmas=sigma_phonon, seed=s.seed
        )
    else:
        specimen = atoms
    potential = abtem.Potential(
        specimen,
        sampling=s.sampling_ang,
        slice_thickness=s.slice_thickness_ang,
        parametrization=s.parametrization,
        projection="infinite",
    )
    start = (s.margin_ang + (0.5 - pad) * pitch_x, s.margin_ang + (0.5 - pad) * pitch_y)
    n_x, n_y = w_px + 2 * pad, h_px + 2 * pad
    scan = abtem.GridScan(
        start=start,
        end=(start[0] + n_x * pitch_x, start[1] + n_y * pitch_y),
        gpts=(n_x, n_y),
        endpoint=False,
    )
    detector = abtem.AnnularDetector(inner=s.detector_mrad[0], outer=s.detector_mrad[1])
    aberrations = {"C10": optics.defocus_m / ANG, "C30": optics.cs_m / ANG}
    semiangle_mrad = optics.convergence_rad * 1e3
    if s.method == "prism":
        smatrix = abtem.SMatrix(
            potential=potential,
            energy=optics.voltage_V,
            semiangle_cutoff=semiangle_mrad,
            interpolation=s.prism_interpolation,
        )
        ctf = abtem.CTF(semiangle_cutoff=semiangle_mrad, aberration_coefficients=aberrations)
        measurement = smatrix.scan(scan=scan, detectors=detector, ctf=ctf, lazy=False)
    else:
        probe = abtem.Probe(
            energy=optics.voltage_V,
            semiangle_cutoff=semiangle_mrad,
            aberrations=aberrations,
            soft=False,
        )
        measurement = probe.scan(potential, scan=scan, detectors=detector, lazy=False)
    data = np.asarray(measurement.array, dtype=np.float64)
    if data.ndim > 2:  # a frozen-phonon axis abTEM did not reduce
        data = data.reshape(-1, *data.shape[-2:]).mean(axis=0)
    image = data.T  # abTEM indexes (x, y); frames are (row = y, col = x)
    if blur_ang > 0:
        image = scipy.ndimage.gaussian_filter(
            image, sigma=(blur_ang / pitch_y, blur_ang / pitch_x), mode="nearest"
        )
    image = image[pad : pad + h_px, pad : pad + w_px].copy()
    return MultisliceResult(image, atoms, s)


def render_simulator(
    sim: STEMSimulator,
    region: ScanRegion,
    shape_px: tuple[int, int],
    *,
    settings: MultisliceSettings | None = None,
) -> MultisliceResult:
    """:func:`render_multislice` of a simulator's own specimen, probe and blur: the multislice
    counterpart of ``sim.scattered_fraction(region, shape_px)``."""
    import_abtem()
    cfg = sim.config
    # STEMSimulator has no public accessor for its specimen model; read it here, in the package.
    model: SpecimenModel = sim._model
    return render_multislice(
        model,
        sim.optics,
        region,
        shape_px,
        settings=settings,
        thermal_sigma_m=cfg.thermal_sigma_m,
        source_fwhm_m=cfg.source_fwhm_m,
        thickness_cells=cfg.thickness_cells,
    )
