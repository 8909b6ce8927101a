"""Physics forward model of incoherent HAADF-STEM imaging, with ground truth.

A seeded specimen (:mod:`simulators.stem_specimen`: MoS2, WS2, graphene or SrTiO3 [001], built
with ``ase``, with lazily generated point defects) is imaged through a probe computed by
Fourier optics from the aperture and aberrations (:mod:`simulators.stem_probe`): the image is
``|ψ|² ⊛ O`` with ``O`` the atoms weighted by ``Z^n`` (:mod:`simulators.stem_render`). Dose is
beam current × dwell; detected electrons are Poisson, with detector gain and read noise. Scans
run line by line in simulated time with drift, line jitter and flyback distortion, as full
rasters or partial (random-pixel, line-subsampled, spiral) patterns. Nothing reads the wall
clock; every random draw comes from generators seeded by ``seed``.

>>> sim = STEMSimulator(seed=1)
>>> scan = sim.begin_frame(ScanRegion(0.0, 0.0, 3.2e-9, 3.2e-9), (64, 64), 2e-6)
>>> line = scan.next_line()
>>> line.shape, line.dtype.name
((64,), 'float32')

Image conventions follow :mod:`drivers.frame`: row 0 is the first line scanned, rows advance
along +y of the scan frame (rotated by ``region.rotation_deg``), columns along +x. Data are
detector counts (``detector_gain`` per detected electron).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from collections import OrderedDict

import numpy as np

from drivers.errors import CommandRejected, ConfigError
from drivers.frame import ScanRegion
from simulators.checks import (
    check_region_centre,
    check_shape,
    check_stage_target,
    finite,
    seed_root,
)
from simulators.noise import DriftModel
from simulators.scan_patterns import SCAN_PATTERNS, check_pattern
from simulators.stem_config import (
    BACKENDS,
    DEFAULT_DWELL_S,
    DEFAULT_FOV_M,
    DEFAULT_SHAPE_PX,
    STEMConfig,
    electrons_per_pixel,
)
from simulators.stem_multislice import MultisliceSettings, import_abtem, render_simulator
from simulators.stem_patches import PatchField
from simulators.stem_probe import ANG, ImagingKernel, ProbeOptics, probe_profile, wavelength_m
from simulators.stem_render import HAADFRenderer, ScanGeometry, render_reference
from simulators.stem_scan import STEMFrameScan
from simulators.stem_specimen import DEFECT_CLASSES, SPECIMENS, Specimen, SpecimenModel

__all__ = [
    "BACKENDS",
    "DEFAULT_DWELL_S",
    "DEFAULT_FOV_M",
    "DEFAULT_SHAPE_PX",
    "DEFECT_CLASSES",
    "INSTRUMENT_MULTISLICE",
    "SCAN_PATTERNS",
    "SPECIMENS",
    "STEMConfig",
    "STEMFrameScan",
    "STEMSimulator",
    "electrons_per_pixel",
    "wavelength_m",
]

logger = logging.getLogger(__name__)

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))

INSTRUMENT_MULTISLICE = MultisliceSettings(method="prism", sampling_ang=0.06, margin_ang=4.0)
"""abTEM settings of ``backend="multislice"`` frames: PRISM on a 0.06 Å grid, 4 Å of specimen
around the region, no frozen phonons (the thermal and source blur are applied to the image).
Coarse enough for small validation frames; cost grows with the field of view and pixel count."""
MULTISLICE_CACHE_SIZE = 8
"""Multislice frames kept per simulator, keyed by (region, shape, defects)."""


@functools.lru_cache(maxsize=16)
def _kernel(optics: ProbeOptics, blur_sigma_ang: float) -> ImagingKernel:
    return ImagingKernel(optics, blur_sigma_ang=blur_sigma_ang)


@functools.lru_cache(maxsize=16)
def _specimen(name: str, thickness_cells: int, dopant: str | None) -> Specimen:
    return SPECIMENS[name](thickness_cells, dopant)


class STEMSimulator:
    """A simulated HAADF-STEM with a seeded specimen on a stage."""

    def __init__(self, config: STEMConfig | None = None, *, seed: int | None = None) -> None:
        cfg = STEMConfig() if config is None else config
        if not isinstance(cfg, STEMConfig):
            raise ConfigError(f"config must be a STEMConfig, got {type(cfg).__name__}")
        self.config = cfg
        root = seed_root(seed)
        self.seed = int(root.entropy)  # type: ignore[arg-type]
        specimen_ss, noise_ss, drift_ss = root.spawn(3)
        spec_rng = np.random.default_rng(specimen_ss)
        specimen = _specimen(cfg.specimen, cfg.thickness_cells, cfg.dopant)
        angle = (
            spec_rng.uniform(0.0, 2.0 * math.pi)
            if cfg.lattice_angle_deg is None
            else math.radians(cfg.lattice_angle_deg)
        )
        origin = spec_rng.uniform(0.0, 1.0, 2) @ specimen.cell_ang
        self._model = SpecimenModel(
            specimen,
            key=int(spec_rng.integers(2**62)),
            angle_rad=angle,
            origin_ang=(float(origin[0]), float(origin[1])),
            z_exponent=cfg.z_exponent,
            cross_section_ref_ang2=cfg.cross_section_ref_m2 / ANG**2,
            density_scale=cfg.defect_density_scale,
        )
        if cfg.patch_density_per_um2 > 0:
            self._model.patches = PatchField(
                self._model.key,
                density_per_ang2=cfg.patch_density_per_um2 * 1e-8,
                radius_ang=cfg.patch_radius_m / ANG,
                substitution_scale=cfg.patch_substitution_scale,
            )
        self.optics = ProbeOptics(cfg.voltage_V, cfg.convergence_rad, cfg.defocus_m, cfg.cs_m)
        blur = math.hypot(cfg.thermal_sigma_m, cfg.source_fwhm_m / FWHM_PER_SIGMA) / ANG
        self._kernel = _kernel(self.optics, round(blur, 9))
        self._renderer = HAADFRenderer(self._model, self._kernel)
        self._noise_rng = np.random.default_rng(noise_ss)
        self._drift = DriftModel.random(np.random.default_rng(drift_ss), cfg.drift_m_per_s)
        self._t = 0.0
        self._pos = (0.0, 0.0)
        self._epoch = 0  # bumped whenever the imaging conditions change
        self._frames = 0
        self._multislice_cache: OrderedDict[tuple[object, ...], np.ndarray] = OrderedDict()
        if cfg.backend == "multislice":
            import_abtem()  # fail now, with the install hint, rather than at the first frame

    # -- state -----------------------------------------------------------------------------------

    @property
    def time_s(self) -> float:
        """Simulated time since construction."""
        return self._t

    @property
    def position_m(self) -> tuple[float, float]:
        """Commanded stage position (the scan centre); drift comes on top."""
        return self._pos

    @property
    def lattice_angle_deg(self) -> float:
        """Orientation of the specimen's a1 axis on the stage (ground truth)."""
        a1 = self._model.cell_ang[0]
        return math.degrees(math.atan2(a1[1], a1[0]))

    @property
    def lattice_vectors_m(self) -> np.ndarray:
        """``(2, 2)`` rows a1, a2 of the specimen lattice on the stage, in metres."""
        return self._model.cell_ang * ANG

    @property
    def mean_scattered_fraction(self) -> float:
        """Fraction of the beam the perfect specimen sends to the HAADF detector."""
        return self._model.mean_fraction

    def patch_centres_m(self, x0_m: float, x1_m: float, y0_m: float, y1_m: float) -> np.ndarray:
        """``(n, 2)`` centres (m, stage coordinates) of the dopant-rich patches reaching into the
        box (ground truth; empty without ``patch_density_per_um2``)."""
        patches = self._model.patches
        if patches is None:
            return np.zeros((0, 2))
        box = (x0_m / ANG, x1_m / ANG, y0_m / ANG, y1_m / ANG)
        return patches.centres_in_box(*box) * ANG

    def probe_fwhm_m(self) -> float:
        """FWHM of the probe intensity from the optics alone (no source size), in metres."""
        return probe_profile(self.optics).fwhm_ang * ANG

    def column_cross_sections_m2(self) -> dict[str, float]:
        """HAADF cross-section of each kind of column in the perfect crystal (m²)."""
        spec = self._model.specimen
        return {
            label: float(s) * ANG**2
            for label, s in zip(spec.labels, self._model.column_sigma, strict=True)
        }

    def offset_m(self, t_s: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Drift displacement of the specimen under the beam at simulated time ``t_s``."""
        return self._drift.displacement_m(np.asarray(t_s, dtype=np.float64))

    def drift_velocity_m_per_s(self, t_s: float) -> tuple[float, float]:
        dt = 1e-3
        x0, y0 = self.offset_m(t_s)
        x1, y1 = self.offset_m(t_s + dt)
        return float(x1 - x0) / dt, float(y1 - y0) / dt

    def electrons_per_pixel(self, dwell_s: float) -> float:
        """Incident electrons per pixel at ``dwell_s`` and the configured beam current."""
        return electrons_per_pixel(self.config.beam_current_A, dwell_s)

    def _pass_time(self, dt_s: float) -> None:
        self._t += dt_s

    # -- actions ---------------------------------------------------------------------------------

    def advance(self, dt_s: float) -> None:
        """Let ``dt_s`` of simulated time pass (the specimen drifts)."""
        dt = finite("dt_s", dt_s)
        if dt < 0:
            raise CommandRejected(f"dt_s must be >= 0, got {dt_s!r}")
        self._pass_time(dt)

    def move_to(self, x_m: float, y_m: float) -> None:
        """Move the stage so that the beam is over ``(x_m, y_m)`` (takes distance / speed)."""
        x, y = check_stage_target(x_m, y_m, self.config.stage_range_m)
        dist = math.hypot(x - self._pos[0], y - self._pos[1])
        self._pass_time(dist / self.config.move_speed_m_per_s)
        self._pos = (x, y)

    # -- imaging ---------------------------------------------------------------------------------

    def _ideal_geometry(self, region: ScanRegion, shape_px: tuple[int, int]) -> ScanGeometry:
        h_px, w_px = shape_px
        th = math.radians(region.rotation_deg)
        e_col = np.array([math.cos(th), math.sin(th)])
        e_row = np.array([-math.sin(th), math.cos(th)])
        u = (-region.width_m / 2 + (np.arange(w_px) + 0.5) * region.width_m / w_px) / ANG
        v = (-region.height_m / 2 + (np.arange(h_px) + 0.5) * region.height_m / h_px) / ANG
        centre = np.array([region.center_x_m, region.center_y_m]) / ANG
        pitch = (region.height_m / h_px / ANG, region.width_m / w_px / ANG)
        return ScanGeometry(centre + np.outer(v, e_row), np.outer(u, e_col), e_row, e_col, pitch)

    def scattered_fraction(self, region: ScanRegion, shape_px: tuple[int, int]) -> np.ndarray:
        """``(H, W)`` float64: fraction of the beam reaching the detector at each pixel centre
        of ``region`` (no drift, jitter or flyback)."""
        geom = self._ideal_geometry(_check_region(region), check_shape(shape_px, min_px=2))
        defects = self._model.defects_in_box(*geom.bounds(self._kernel.cutoff_ang))
        return self._renderer.render(geom, defects)

    def multislice_fraction(self, region: ScanRegion, shape_px: tuple[int, int]) -> np.ndarray:
        """The abTEM counterpart of :meth:`scattered_fraction` (``INSTRUMENT_MULTISLICE``
        settings), cached by (region, shape, defects) so that frames of an area already imaged
        cost nothing. Raises :class:`ConfigError` with the install hint when abTEM is missing.
        The returned array is shared with the cache: read it, do not write it."""
        region = _check_region(region)
        shape = check_shape(shape_px, min_px=2)
        geom = self._ideal_geometry(region, shape)
        defects = self._model.defects_in_box(*geom.bounds(self._kernel.cutoff_ang))
        digest = hashlib.sha256(np.ascontiguousarray(defects.xy_ang).tobytes())
        digest.update("|".join(defects.kinds).encode())
        key = (region, shape, digest.hexdigest())
        cached = self._multislice_cache.get(key)
        if cached is not None:
            self._multislice_cache.move_to_end(key)
            return cached
        result = render_simulator(self, region, shape, settings=INSTRUMENT_MULTISLICE)
        fraction = np.clip(result.fraction, 0.0, None)
        fraction.setflags(write=False)
        self._multislice_cache[key] = fraction
        while len(self._multislice_cache) > MULTISLICE_CACHE_SIZE:
            self._multislice_cache.popitem(last=False)
        return fraction

    def render_clean(
        self, region: ScanRegion, shape_px: tuple[int, int], *, dwell_s: float = DEFAULT_DWELL_S
    ) -> np.ndarray:
        """``(H, W)`` float32 expected counts at ``dwell_s``: the region with no noise and no
        scan distortions, in the units of the frames."""
        dwell = _positive("dwell_s", dwell_s)
        counts = self.scattered_fraction(region, shape_px) * self.electrons_per_pixel(dwell)
        return (self.config.detector_gain * counts).astype(np.float32)

    def render_reference(self, region: ScanRegion, shape_px: tuple[int, int]) -> np.ndarray:
        """The brute-force FFT-on-a-fine-grid fraction of an unrotated ``region`` (float64):
        the same physics as :meth:`scattered_fraction`, slower (baseline and validation)."""
        region = _check_region(region)
        if region.rotation_deg % 360:
            raise CommandRejected("render_reference supports unrotated regions only")
        return render_reference(
            self._model,
            self._kernel,
            center_ang=(region.center_x_m / ANG, region.center_y_m / ANG),
            size_ang=(region.height_m / ANG, region.width_m / ANG),
            shape_px=check_shape(shape_px, min_px=2),
        )

    def begin_frame(
        self,
        region: ScanRegion,
        shape_px: tuple[int, int],
        dwell_s: float,
        *,
        pattern: str = "raster",
        fraction: float = 1.0,
    ) -> STEMFrameScan:
        """Start scanning ``region`` line by line (``pattern`` at ``fraction`` coverage)."""
        region = _check_region(region)
        shape = check_shape(shape_px, min_px=2)
        dwell = _positive("dwell_s", dwell_s)
        try:
            pattern, fraction = check_pattern(pattern, fraction)
        except ConfigError as exc:
            raise CommandRejected(str(exc)) from None
        check_region_centre(region, self.config.stage_range_m)
        self._frames += 1
        return STEMFrameScan(
            self, region, shape, dwell, self._frames - 1, pattern=pattern, fraction=fraction
        )


def _check_region(region: ScanRegion) -> ScanRegion:
    if not isinstance(region, ScanRegion):
        raise CommandRejected(f"region must be a ScanRegion, got {region!r}")
    return region


def _positive(name: str, value: float) -> float:
    v = finite(name, value)
    if v <= 0:
        raise CommandRejected(f"{name} must be > 0, got {value!r}")
    return v
