"""Physics forward model of secondary-electron (SE) imaging in an SEM, with ground truth.

A seeded, lazily generated sample (:mod:`simulators.sem_sample`: grains, particles, pores) is
imaged point by point:

1. **Yield.** At the probe position the SE yield is
   ``delta = delta_0 * sec(theta) * (1 + beta * eta(Z)) * grain * edge * shadow``:
   ``theta`` the local surface tilt from the analytic height gradient (edge effect, saturating
   at ``max_tilt_deg``), ``eta(Z)`` Reuter's backscatter coefficient (SE2 from backscattered
   electrons: heavier material is brighter), ``grain`` the per-grain orientation contrast,
   ``edge = 1 + edge_gain * tanh(-L * escape_length_m)`` with ``L`` the Laplacian of the height
   smoothed over the SE escape length (extra escape at convex edges, less at concave
   corners), ``shadow`` the loss of collection inside pores.
2. **Probe.** The yield map is convolved with a Gaussian of FWHM ``probe_size_m``.
3. **Dose.** ``I_beam * dwell / e`` electrons per pixel; the clean image is the expected
   detected count ``dose * delta * collection_efficiency * detector_gain``; the data are Poisson
   counts (times the gain), so halving the dwell doubles the relative noise variance.
4. **Charging** (``charging=True``): insulating particles charge with the dose they receive
   (saturating, leaking with ``charge_leak_s``), look brighter, leave bright streaks along the
   fast-scan direction after them and deflect the beam, so the lines drift sideways.

Scanning runs in simulated time (``line_time = W * dwell + flyback_s``) with thermal drift;
the wall clock is never read. :class:`SEMFrameScan` renders the frame's expected image once,
vectorised, and draws the Poisson noise line by line.

Image conventions follow :mod:`drivers.frame` (row 0 first scanned, along +y of the scan
frame). There is no tip: :class:`~drivers.frame.GroundTruth` reports ``TipState.GOOD``.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.ndimage

from drivers.errors import CommandRejected, ConfigError, LimitViolation
from drivers.frame import ScanRegion
from simulators.checks import (
    check_region_centre,
    check_shape,
    check_stage_target,
    finite,
    seed_root,
)
from simulators.noise import DriftModel
from simulators.sem_config import ELEMENTARY_CHARGE_C, SEMConfig
from simulators.sem_sample import SampleModel, SurfaceMaps
from simulators.sem_scan import SEMFrameScan

__all__ = ["SEMConfig", "SEMFrameScan", "SEMSimulator", "backscatter_coefficient"]


def backscatter_coefficient(z_number: np.ndarray | float) -> np.ndarray:
    """Reuter's fit of the backscatter coefficient eta(Z) at normal incidence (0..~0.5)."""
    z = np.asarray(z_number)
    eta = ((8.3e-7 * z - 1.86e-4) * z + 0.016) * z - 0.0254  # Horner: z**3 is slow
    return np.clip(eta, 0.0, 1.0)


class SEMSimulator:
    """A simulated SEM (secondary-electron detector) over a lazily generated sample.

    Same shape as :class:`simulators.stm.STMSimulator`: ``time_s``, ``position_m``,
    ``begin_frame``, ``move_to``, ``advance``, ``render_clean``. Every random draw comes from
    generators seeded by ``seed``.
    """

    def __init__(self, config: SEMConfig | None = None, *, seed: int | None = None) -> None:
        cfg = SEMConfig() if config is None else config
        if not isinstance(cfg, SEMConfig):
            raise ConfigError(f"config must be an SEMConfig, got {type(cfg).__name__}")
        self.config = cfg
        root = seed_root(seed)
        self.seed = int(root.entropy)  # type: ignore[arg-type]
        noise_ss, drift_ss = root.spawn(2)
        self._sample = SampleModel(
            self.seed % (1 << 63),
            substrate=cfg.substrate,
            grain_size_m=cfg.grain_size_m,
            grain_contrast=cfg.grain_contrast,
            groove_depth_m=cfg.groove_depth_m,
            groove_width_m=cfg.groove_width_m,
            populations=cfg.populations(),
        )
        self._noise_rng = np.random.default_rng(noise_ss)
        self._drift = DriftModel.random(np.random.default_rng(drift_ss), cfg.drift_m_per_s)
        self._t = 0.0
        self._pos = (0.0, 0.0)
        self._epoch = 0
        self._frames = 0
        self._active: SEMFrameScan | None = None
        self.charge: dict[int, tuple[float, float]] = {}
        """Charge state of insulating particles: id -> (fraction of saturation, time_s)."""

    # -- state ---------------------------------------------------------------------------------

    @property
    def time_s(self) -> float:
        """Simulated time since construction."""
        return self._t

    @property
    def position_m(self) -> tuple[float, float]:
        """Commanded stage position (the scan centre); thermal drift comes on top."""
        return self._pos

    @property
    def sample(self) -> SampleModel:
        return self._sample

    def offset_m(self, t_s: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Thermal drift of the beam relative to the sample at ``t_s``."""
        return self._drift.displacement_m(np.asarray(t_s, dtype=np.float64))

    def charge_at(self, ids: np.ndarray, t_s: float) -> np.ndarray:
        """Charge (0..1 of saturation) of the particles ``ids`` at ``t_s``, leak included."""
        tau = self.config.charge_leak_s
        out = np.zeros(ids.shape[0])
        for k, pid in enumerate(ids.tolist()):
            hit = self.charge.get(pid)
            if hit is not None:
                out[k] = hit[0] * math.exp(-max(t_s - hit[1], 0.0) / tau)
        return out

    # -- actions -------------------------------------------------------------------------------

    def advance(self, dt_s: float) -> None:
        """Let ``dt_s`` of simulated time pass (drift, charge leaking away)."""
        dt = finite("dt_s", dt_s)
        if dt < 0:
            raise CommandRejected(f"dt_s must be >= 0, got {dt_s!r}")
        self._t += dt

    def move_to(self, x_m: float, y_m: float) -> None:
        """Move the stage so that the scan centre is ``(x_m, y_m)``; takes travel + settle."""
        x, y = check_stage_target(x_m, y_m, self.config.stage_range_m)
        distance = math.hypot(x - self._pos[0], y - self._pos[1])
        if distance > 0.0:
            self._t += distance / self.config.stage_speed_m_per_s + self.config.stage_settle_s
            self._pos = (x, y)
            self._epoch += 1

    # -- imaging -------------------------------------------------------------------------------

    def positions(
        self,
        region: ScanRegion,
        shape_px: tuple[int, int],
        rows: np.ndarray,
        offset: tuple[np.ndarray, np.ndarray] | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``(x, y)`` of the pixels of ``rows``: ``(len(rows), W)`` float64 metres.

        ``offset`` is ``None`` or per-row ``(dx, dy)`` arrays (drift, charging deflection).
        Stage tilt foreshortens y (the tilt axis is the stage x axis).
        """
        h_px, w_px = shape_px
        th = math.radians(region.rotation_deg)
        c, s = math.cos(th), math.sin(th)
        u = -region.width_m / 2 + (np.arange(w_px) + 0.5) * (region.width_m / w_px)
        v = -region.height_m / 2 + (rows + 0.5) * (region.height_m / h_px)
        x = region.center_x_m + c * u[None, :] - s * v[:, None]
        y = region.center_y_m + s * u[None, :] + c * v[:, None]
        if offset is not None:
            x = x + np.asarray(offset[0])[:, None]
            y = y + np.asarray(offset[1])[:, None]
        tilt = math.radians(self.config.stage_tilt_deg)
        if tilt:
            y = y / math.cos(tilt)
        return x, y

    def surface(self, x: np.ndarray, y: np.ndarray, pitch_m: float) -> SurfaceMaps:
        """Surface maps of the sample at ``(x, y)`` (see :meth:`SampleModel.render`)."""
        maps = self._sample.render(x, y, pitch_m)
        tilt = math.radians(self.config.stage_tilt_deg)
        if tilt:
            # the tilted plane adds tan(tilt) to the slope along y (foreshortening is in x, y)
            object.__setattr__(maps, "gy", maps.gy + math.tan(tilt))
        return maps

    def se_yield(self, maps: SurfaceMaps, pitch_yx_m: tuple[float, float]) -> np.ndarray:
        """Probe-convolved SE yield per primary electron ``(H, W)`` float32."""
        cfg = self.config
        f32 = np.float32
        sec = np.sqrt(maps.gx * maps.gx + maps.gy * maps.gy + f32(1.0))
        np.minimum(sec, f32(1.0 / math.cos(math.radians(cfg.max_tilt_deg))), out=sec)
        eta = backscatter_coefficient(maps.z_number)
        delta = sec * (eta * f32(cfg.bse_se_factor) + f32(1.0)) * maps.grain_factor
        delta *= f32(cfg.se_yield)
        if cfg.edge_gain > 0.0:
            delta *= self._edge_factor(maps.z_m, pitch_yx_m)
        if cfg.pore_shadow > 0.0:
            delta *= f32(1.0) - f32(cfg.pore_shadow) * maps.pore_depth
        sigma = [cfg.probe_size_m / 2.3548 / p for p in pitch_yx_m]
        if max(sigma) > 0.05 and min(delta.shape) > 1:
            delta = scipy.ndimage.gaussian_filter(delta, sigma, mode="nearest", truncate=3.0)
        return delta

    def _edge_factor(self, z_m: np.ndarray, pitch_yx_m: tuple[float, float]) -> np.ndarray:
        cfg = self.config
        py, px = pitch_yx_m
        sig = (max(cfg.escape_length_m / py, 0.5), max(cfg.escape_length_m / px, 0.5))
        if min(z_m.shape) < 3:
            return np.ones_like(z_m)
        d2y = scipy.ndimage.gaussian_filter(z_m, sig, order=(2, 0), mode="nearest", truncate=3.0)
        d2x = scipy.ndimage.gaussian_filter(z_m, sig, order=(0, 2), mode="nearest", truncate=3.0)
        f32 = np.float32
        lap = d2y * f32(-cfg.escape_length_m / py**2) + d2x * f32(-cfg.escape_length_m / px**2)
        convex = np.tanh(lap)
        return f32(1.0) + f32(cfg.edge_gain) * np.where(convex > 0, convex, f32(0.5) * convex)

    def electrons_per_pixel(self, dwell_s: float) -> float:
        """Primary electrons per pixel: ``I_beam * dwell / e``."""
        return self.config.beam_current_A * dwell_s / ELEMENTARY_CHARGE_C

    def counts_per_yield(self, dwell_s: float) -> float:
        """Detector output per unit SE yield: dose x collection efficiency x gain."""
        cfg = self.config
        return self.electrons_per_pixel(dwell_s) * cfg.collection_efficiency * cfg.detector_gain

    def render_clean(
        self, region: ScanRegion, shape_px: tuple[int, int], dwell_s: float | None = None
    ) -> np.ndarray:
        """``(H, W)`` float32: the expected detector counts of ``region`` (no noise, no drift,
        no charging) at ``dwell_s`` (default ``config.default_dwell_s``)."""
        shape = check_shape(shape_px)
        dwell = self.config.default_dwell_s if dwell_s is None else finite("dwell_s", dwell_s)
        x, y = self.positions(region, shape, np.arange(shape[0], dtype=np.float64), None)
        pitch = (region.height_m / shape[0], region.width_m / shape[1])
        maps = self.surface(x, y, min(pitch))
        return (self.se_yield(maps, pitch) * self.counts_per_yield(dwell)).astype(np.float32)

    def begin_frame(
        self, region: ScanRegion, shape_px: tuple[int, int], dwell_s: float
    ) -> SEMFrameScan:
        """Start scanning ``region`` line by line (centred where the driver put the stage)."""
        if not isinstance(region, ScanRegion):
            raise CommandRejected(f"region must be a ScanRegion, got {region!r}")
        shape = check_shape(shape_px)
        dwell = finite("dwell_s", dwell_s)
        if dwell <= 0:
            raise CommandRejected(f"dwell_s must be > 0, got {dwell_s!r}")
        cfg = self.config
        size = max(region.width_m, region.height_m)
        if size > cfg.max_fov_m:
            raise LimitViolation(
                f"scan region size {size!r} m exceeds the largest field of view "
                f"{cfg.max_fov_m!r} m",
                value=size,
                limit=cfg.max_fov_m,
                field="width_m",
            )
        check_region_centre(region, cfg.stage_range_m)
        if self._active is not None:
            self._active.commit_charge()  # an unfinished (aborted) frame charged what it scanned
        self._frames += 1
        self._active = SEMFrameScan(self, region, shape, dwell, self._frames - 1)
        return self._active

    @property
    def epoch(self) -> int:
        """Bumped whenever the stage moves (a scan in progress re-plans its remaining lines)."""
        return self._epoch

    @property
    def noise_rng(self) -> np.random.Generator:
        return self._noise_rng
