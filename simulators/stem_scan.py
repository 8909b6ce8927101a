"""Line-by-line scanning of one HAADF-STEM frame in simulated time (:class:`STEMFrameScan`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from drivers.errors import CommandRejected
from drivers.frame import Defect, GroundTruth, ScanRegion, TipState
from simulators.scan_patterns import sampling_mask
from simulators.stem_config import electrons_per_pixel
from simulators.stem_probe import ANG
from simulators.stem_render import ScanGeometry
from simulators.stem_specimen import DEFECT_CLASSES, DefectSet

if TYPE_CHECKING:
    from simulators.stem import STEMSimulator

BLOCK_ROWS = 64
"""Rows rendered (and their noise drawn) together."""


class STEMFrameScan:
    """One frame being scanned line by line in simulated time.

    ``next_line()`` returns row ``lines_done`` as ``(W,)`` float32 detector counts (NaN at the
    pixels a partial-scan pattern skips) and advances the simulator's clock by the line time:
    ``n_visited * dwell_s + flyback_s`` (a row a partial scan skips entirely takes no time).
    The probe positions include drift (in simulated time), line jitter and the flyback lag at
    the start of each line. Moving or advancing the simulator between lines re-plans the
    remaining lines from the new time. Partial patterns are charged time per visited pixel but
    are placed in raster order (drift within a frame is a few Å, so the order hardly matters).

    With ``config.backend == "multislice"`` the noise-free fraction of the whole frame is
    rendered by abTEM when the frame begins (:meth:`STEMSimulator.multislice_fraction`, cached
    per area) at the ideal probe positions: a precomputed image cannot follow drift, jitter or
    flyback, so they are left out of the positions (and of the ground truth, which stays
    aligned with the data); timing, dose, noise and partial patterns are as usual.
    """

    def __init__(
        self,
        sim: STEMSimulator,
        region: ScanRegion,
        shape_px: tuple[int, int],
        dwell_s: float,
        index: int,
        *,
        pattern: str = "raster",
        fraction: float = 1.0,
    ) -> None:
        self._sim = sim
        cfg = sim.config
        self.region = region
        self.shape_px = shape_px
        self.dwell_s = dwell_s
        self.index = index
        self.pattern = pattern
        self.fraction = fraction
        self.lines_done = 0
        self.backend = cfg.backend
        self._ideal = cfg.backend == "multislice"
        h_px, w_px = shape_px
        rng = sim._noise_rng
        self.mask = sampling_mask(pattern, fraction, shape_px, rng)
        self._jitter_ang = rng.standard_normal(h_px) * (cfg.line_jitter_m / ANG)
        visited = self.mask.sum(axis=1)
        self._line_time = np.where(visited > 0, visited * dwell_s + cfg.flyback_s, 0.0)
        self.electrons_per_px = electrons_per_pixel(cfg.beam_current_A, dwell_s)
        self.t_start_s = sim.time_s
        th = math.radians(region.rotation_deg)
        self._e_col = np.array([math.cos(th), math.sin(th)])
        self._e_row = np.array([-math.sin(th), math.cos(th)])
        self._pitch = (region.height_m / h_px / ANG, region.width_m / w_px / ANG)
        u = (-region.width_m / 2 + (np.arange(w_px) + 0.5) * region.width_m / w_px) / ANG
        t_in_line = (np.arange(w_px) + 0.5) * dwell_s
        lag = (cfg.flyback_amplitude_m / ANG) * np.exp(-t_in_line / cfg.flyback_decay_s)
        v_drift = np.asarray(sim.drift_velocity_m_per_s(sim.time_s)) / ANG
        if self._ideal:
            lag, v_drift = np.zeros_like(lag), np.zeros_like(v_drift)
        self._cols_ang = np.outer(u - lag, self._e_col) + np.outer(t_in_line, v_drift)
        self._factors = sim._renderer.column_factors(self._cols_ang)
        self._rows_ang = np.zeros((h_px, 2))
        self._row_t = np.zeros(h_px)
        self._counts = np.full(shape_px, np.nan, dtype=np.float32)  # noisy, all pixels
        self._clean = np.full(shape_px, np.nan, dtype=np.float32)
        self._rendered_to = 0
        self._epoch = sim._epoch
        self._plan(0, sim.time_s)
        self._multislice = sim.multislice_fraction(region, shape_px) if self._ideal else None

    @property
    def done(self) -> bool:
        return self.lines_done >= self.shape_px[0]

    @property
    def frame_time_s(self) -> float:
        """Simulated time the whole frame takes if nothing interrupts it."""
        return float(self._line_time.sum())

    def geometry(self) -> ScanGeometry:
        return ScanGeometry(self._rows_ang, self._cols_ang, self._e_row, self._e_col, self._pitch)

    def _plan(self, first_row: int, t0_s: float) -> None:
        """Schedule rows ``first_row..`` from ``t0_s`` and place them on the specimen."""
        h_px = self.shape_px[0]
        region = self.region
        times = t0_s + np.concatenate([[0.0], np.cumsum(self._line_time[first_row:-1])])
        self._row_t[first_row:] = times
        rows = np.arange(first_row, h_px)
        v = (-region.height_m / 2 + (rows + 0.5) * region.height_m / h_px) / ANG
        centre = np.array([region.center_x_m, region.center_y_m]) / ANG
        if self._ideal:
            self._rows_ang[first_row:] = centre + np.outer(v, self._e_row)
        else:
            dx, dy = self._sim.offset_m(times)
            self._rows_ang[first_row:] = (
                centre
                + np.outer(v, self._e_row)
                + np.outer(self._jitter_ang[first_row:], self._e_col)
                + np.stack([dx, dy], axis=1) / ANG
            )
        self._rendered_to = min(self._rendered_to, first_row)
        geom = self.geometry()
        self._defects = self._sim._model.defects_in_box(*geom.bounds(self._sim._kernel.cutoff_ang))

    def _fraction(self, r0: int, r1: int) -> np.ndarray:
        if self._multislice is not None:
            return self._multislice[r0:r1]
        geom = self.geometry().sub(r0, r1)
        return self._sim._renderer.render(geom, self._defects, self._factors)

    def _render_block(self, r0: int) -> None:
        r1 = min(r0 + BLOCK_ROWS, self.shape_px[0])
        cfg = self._sim.config
        mean_e = self._fraction(r0, r1) * self.electrons_per_px
        self._clean[r0:r1] = cfg.detector_gain * mean_e
        # Noise only where the beam dwells (all pixels of a raster scan).
        visit = None if self.pattern == "raster" else self.mask[r0:r1]
        rng = self._sim._noise_rng
        counts = rng.poisson(mean_e if visit is None else mean_e[visit]).astype(np.float32)
        counts *= np.float32(cfg.detector_gain)
        if cfg.read_noise_counts > 0:
            noise = rng.standard_normal(counts.shape, dtype=np.float32)
            noise *= np.float32(cfg.read_noise_counts)
            counts += noise
        if visit is None:
            self._counts[r0:r1] = counts
        else:
            self._counts[r0:r1][visit] = counts
        self._rendered_to = r1

    def next_line(self) -> np.ndarray:
        """Scan the next line: ``(W,)`` float32 counts, NaN at pixels the pattern skips."""
        if self.done:
            raise CommandRejected(f"frame {self.index} is complete ({self.shape_px[0]} lines)")
        sim = self._sim
        row = self.lines_done
        if abs(sim.time_s - self._row_t[row]) > 1e-9 or sim._epoch != self._epoch:
            self._epoch = sim._epoch
            self._plan(row, sim.time_s)
        if row >= self._rendered_to:
            self._render_block(row)
        line = self._counts[row].copy()  # NaN where the pattern skips
        sim._pass_time(float(self._line_time[row]))
        self.lines_done += 1
        return line

    def truth(self) -> GroundTruth:
        """Ground truth of the whole frame at the planned probe positions.

        ``clean`` is the expected detector signal (infinite-dose limit of the data, in the same
        units and with the same scan distortions, so it lines up pixel for pixel). ``tip_state``
        is always GOOD: a STEM has no tip, and GOOD means "nothing wrong with the probe" to code
        that asks every instrument about its tip.
        """
        sim = self._sim
        cfg = sim.config
        h_px = self.shape_px[0]
        clean = self._clean.copy()
        if self._rendered_to < h_px:
            r0 = self._rendered_to
            clean[r0:] = cfg.detector_gain * self.electrons_per_px * self._fraction(r0, h_px)
        geom = self.geometry()
        defects = self._defects
        class_mask = sim._renderer.class_mask(geom, defects, cfg.class_radius_m / ANG)
        extra: dict[str, object] = {
            "class_mask": class_mask,
            "sampling_mask": self.mask.copy(),
            "class_names": list(DEFECT_CLASSES),
            "specimen": cfg.specimen,
            "pattern": self.pattern,
            "fraction": self.fraction,
            "electrons_per_px": self.electrons_per_px,
            "lines_done": self.lines_done,
            "t_start_s": self.t_start_s,
            "frame_time_s": self.frame_time_s,
            "seed": sim.seed,
            "frame_index": self.index,
            "backend": self.backend,
        }
        return GroundTruth(
            tip_state=TipState.GOOD,
            tip_states=(TipState.GOOD,),
            clean=clean,
            defects=self._defect_list(geom, defects),
            extra=extra,
        )

    def _defect_list(self, geom: ScanGeometry, defects: DefectSet) -> tuple[Defect, ...]:
        if not len(defects):
            return ()
        h_px, w_px = self.shape_px
        row, col = geom.locate(defects.xy_ang)
        out = []
        for (x, y), kind, r, c in zip(defects.xy_ang, defects.kinds, row, col, strict=True):
            if -0.5 <= r <= h_px - 0.5 and -0.5 <= c <= w_px - 0.5:
                out.append(Defect(float(x) * ANG, float(y) * ANG, kind, float(r), float(c)))
        return tuple(out)
