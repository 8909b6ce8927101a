"""Line-by-line scanning of one SEM frame in simulated time (see :class:`SEMFrameScan`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import scipy.signal

from drivers.errors import CommandRejected
from drivers.frame import Defect, GroundTruth, ScanRegion, TipState
from simulators.sem_sample import Features

if TYPE_CHECKING:
    from simulators.sem import SEMSimulator


def streak_filter(source: np.ndarray, decay_px: float) -> np.ndarray:
    """Causal exponential smoothing along the fast-scan axis (axis 1), ``decay_px`` long."""
    a = math.exp(-1.0 / max(decay_px, 1e-6))
    return np.asarray(scipy.signal.lfilter([1.0 - a], [1.0, -a], source, axis=1))


def _slots(ids: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """Index of each of ``ids`` in ``sorted_ids`` (-1 where absent), ``(len(ids),)`` int64."""
    if sorted_ids.size == 0:
        return np.full(ids.shape, -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), sorted_ids.size - 1)
    return np.where(sorted_ids[pos] == ids, pos, -1).astype(np.int64)


@dataclass(eq=False)
class _Plan:
    """Rows ``first_row..`` as planned at one moment: features, charge ramp."""

    first_row: int
    particles: Features
    pores: Features
    corners: tuple[np.ndarray, np.ndarray, np.ndarray]  # origin, column step, row step (m)
    charge_ids: np.ndarray  # insulating particle ids (sorted)
    charge_rows: np.ndarray  # (rows + 1, n) charge before each planned row (last: after all)
    committed: bool = False


class SEMFrameScan:
    """One SEM frame being scanned line by line in simulated time.

    ``next_line()`` scans row ``lines_done`` (``W * dwell_s + flyback_s``) and returns the
    detector counts ``(W,)`` float32. The expected image of all remaining rows is rendered once
    (vectorised) when the scan starts and again only if the stage moves or time jumps between
    lines. ``data`` holds the lines scanned so far (NaN after them).
    """

    def __init__(
        self,
        sim: SEMSimulator,
        region: ScanRegion,
        shape_px: tuple[int, int],
        dwell_s: float,
        index: int,
    ) -> None:
        self._sim = sim
        self.region = region
        self.shape_px = shape_px
        self.dwell_s = dwell_s
        self.index = index
        self.lines_done = 0
        h_px, w_px = shape_px
        self.pitch_m = (region.height_m / h_px, region.width_m / w_px)
        self.line_time_s = w_px * dwell_s + sim.config.flyback_s
        self.t_start_s = sim.time_s
        self.data = np.full(shape_px, np.nan, dtype=np.float32)
        self._clean = np.zeros(shape_px, dtype=np.float32)
        self._mean = np.zeros(shape_px, dtype=np.float32)
        self._noisy = np.zeros(shape_px, dtype=np.float32)
        self._mask = np.zeros(shape_px, dtype=bool)
        self._row_t = np.zeros(h_px)
        self._shift_m = np.zeros(h_px)
        self._plans: list[_Plan] = []
        self._epoch = sim.epoch
        self._plan(0, sim.time_s)

    @property
    def done(self) -> bool:
        return self.lines_done >= self.shape_px[0]

    @property
    def frame_time_s(self) -> float:
        return self.line_time_s * self.shape_px[0]

    # -- planning --------------------------------------------------------------------------------

    def _plan(self, first_row: int, t0_s: float) -> None:
        """Render rows ``first_row..`` scanned from ``t0_s`` (drift and charging included)."""
        sim, cfg = self._sim, self._sim.config
        if self._plans and not self._plans[-1].committed:
            self._commit(self._plans[-1], first_row)
        rows = np.arange(first_row, self.shape_px[0], dtype=np.float64)
        t = t0_s + (rows - first_row) * self.line_time_s
        self._row_t[first_row:] = t
        drift = sim.offset_m(t + 0.5 * self.shape_px[1] * self.dwell_s)
        x, y = sim.positions(self.region, self.shape_px, rows, drift)
        pitch = min(self.pitch_m)
        maps = sim.surface(x, y, pitch)
        scale = sim.counts_per_yield(self.dwell_s)
        clean = sim.se_yield(maps, self.pitch_m) * scale
        self._clean[first_row:] = clean
        self._mask[first_row:] = maps.particle >= 0
        corners = (
            np.array([x[0, 0], y[0, 0]]),
            np.array([x[0, -1] - x[0, 0], y[0, -1] - y[0, 0]]) / max(x.shape[1] - 1, 1),
            np.array([x[-1, 0] - x[0, 0], y[-1, 0] - y[0, 0]]) / max(x.shape[0] - 1, 1),
        )
        ids = np.zeros(0, dtype=np.uint64)
        q_rows = np.zeros((rows.size + 1, 0))
        mean = clean
        if cfg.charging:
            ids, q_rows = self._charge_ramp(maps.particle, maps.particles, t0_s)
            if ids.size:
                mean = self._charged_mean(rows, drift, maps.particles, ids, q_rows, scale)
        self._mean[first_row:] = mean
        # Poisson counts of the detected electrons, drawn for all planned rows at once.
        gain = cfg.detector_gain
        counts = sim.noise_rng.poisson(mean * (1.0 / gain) if gain != 1.0 else mean)
        self._noisy[first_row:] = counts * gain if gain != 1.0 else counts
        self._plans.append(_Plan(first_row, maps.particles, maps.pores, corners, ids, q_rows))

    def _charge_ramp(
        self, which: np.ndarray, particles: Features, t0_s: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Charge of each insulating particle in view before each row: ``(ids, (rows+1, n))``.

        A particle of area ``A`` charges as ``q = 1 - (1 - q0) exp(-D / D_sat)`` with the dose
        density ``D`` it has received (electrons on its pixels so far / ``A``).
        """
        sim, cfg = self._sim, self._sim.config
        ins = particles.insulating
        hit = which[which >= 0]
        if hit.size == 0 or not np.any(ins[hit]):
            return np.zeros(0, dtype=np.uint64), np.zeros((which.shape[0] + 1, 0))
        local = np.unique(hit[ins[hit]])
        ids = particles.id[local]
        order = np.argsort(ids)
        local, ids = local[order], ids[order]
        lookup = np.full(particles.size, -1, dtype=np.int64)
        lookup[local] = np.arange(local.size)
        n_rows = which.shape[0]
        rows_idx, cols_idx = np.nonzero(which >= 0)
        slot = lookup[which[rows_idx, cols_idx]]
        keep = slot >= 0
        counts = np.zeros((n_rows + 1, local.size))
        np.add.at(counts, (rows_idx[keep] + 1, slot[keep]), 1.0)
        pixels_before = np.cumsum(counts, axis=0)
        area_m2 = math.pi * particles.a_m[local] * particles.b_m[local]
        d_sat = cfg.charge_saturation_e_per_nm2 * 1e18
        per_pixel = sim.electrons_per_pixel(self.dwell_s) / (area_m2 * d_sat)
        q0 = sim.charge_at(ids, t0_s)
        q_rows = 1.0 - (1.0 - q0)[None, :] * np.exp(-pixels_before * per_pixel[None, :])
        return ids, q_rows

    def _charged_mean(
        self,
        rows: np.ndarray,
        drift: tuple[np.ndarray, np.ndarray],
        particles: Features,
        ids: np.ndarray,
        q_rows: np.ndarray,
        scale: float,
    ) -> np.ndarray:
        """Expected counts with charging: deflected lines, brighter insulators, streaks."""
        sim, cfg = self._sim, self._sim.config
        slots = _slots(particles.id, ids)
        area_um2 = math.pi * particles.a_m * particles.b_m * 1e12
        area_of_slot = np.zeros(ids.size)
        area_of_slot[slots[slots >= 0]] = area_um2[slots >= 0]
        shift = cfg.charge_deflection_m_per_um2 * (q_rows[:-1] @ area_of_slot)
        first = int(rows[0])
        self._shift_m[first:] = shift
        th = math.radians(self.region.rotation_deg)
        offset = (drift[0] + shift * math.cos(th), drift[1] + shift * math.sin(th))
        x, y = sim.positions(self.region, self.shape_px, rows, offset)
        maps = sim.surface(x, y, min(self.pitch_m))
        mean = sim.se_yield(maps, self.pitch_m) * scale
        which = maps.particle
        slot_map = np.append(_slots(maps.particles.id, ids), -1)[which]  # -1: substrate
        charged = slot_map >= 0
        q = np.zeros(which.shape)
        r_idx = np.nonzero(charged)[0]
        q[charged] = q_rows[r_idx, slot_map[charged]]
        excess = mean * q
        decay_px = cfg.charge_streak_s / self.dwell_s
        return (
            mean
            + cfg.charge_brightening * excess
            + cfg.charge_streak_gain * streak_filter(excess, decay_px)
        )

    def _commit(self, plan: _Plan, upto_row: int) -> None:
        """Store the charge the insulators in ``plan`` reached by row ``upto_row``."""
        plan.committed = True
        if plan.charge_ids.size == 0:
            return
        k = min(max(upto_row - plan.first_row, 0), plan.charge_rows.shape[0] - 1)
        now = self._sim.time_s
        for pid, q in zip(plan.charge_ids.tolist(), plan.charge_rows[k].tolist(), strict=True):
            self._sim.charge[int(pid)] = (float(q), now)

    def commit_charge(self) -> None:
        """Record the charge deposited so far (the simulator calls it when a frame is left)."""
        if self._plans and not self._plans[-1].committed:
            self._commit(self._plans[-1], self.lines_done)

    # -- scanning ------------------------------------------------------------------------------

    def next_line(self) -> np.ndarray:
        """Scan the next row: ``(W,)`` float32 counts; advances simulated time by a line."""
        if self.done:
            raise CommandRejected(f"frame {self.index} is complete ({self.shape_px[0]} lines)")
        sim = self._sim
        row = self.lines_done
        t0 = sim.time_s
        if abs(t0 - self._row_t[row]) > 1e-12 or sim.epoch != self._epoch:
            self._epoch = sim.epoch
            self._plan(row, t0)
        out = self._noisy[row].copy()
        self.data[row] = out
        sim._t = t0 + self.line_time_s  # == sim.advance(line_time_s), checked at construction
        self.lines_done += 1
        if self.done:
            self.commit_charge()
        return out

    # -- ground truth ----------------------------------------------------------------------------

    def _defects(self) -> tuple[Defect, ...]:
        h_px, w_px = self.shape_px
        out: list[Defect] = []
        bounds = [p.first_row for p in self._plans[1:]] + [h_px]
        for plan, last in zip(self._plans, bounds, strict=True):
            origin, ex, ey = plan.corners
            det = ex[0] * ey[1] - ex[1] * ey[0]
            for f in (plan.particles, plan.pores):
                if f.size == 0:
                    continue
                dx, dy = f.x_m - origin[0], f.y_m - origin[1]
                col = (dx * ey[1] - dy * ey[0]) / det
                row = (ex[0] * dy - ex[1] * dx) / det + plan.first_row
                inside = (
                    (row >= plan.first_row - 0.5)
                    & (row <= last - 0.5)
                    & (col >= -0.5)
                    & (col <= w_px - 0.5)
                )
                for k in np.nonzero(inside)[0]:
                    out.append(
                        Defect(
                            float(f.x_m[k]), float(f.y_m[k]), f.kind, float(row[k]), float(col[k])
                        )
                    )
        return tuple(out)

    def truth(self) -> GroundTruth:
        """Ground truth of the frame (all rows, scanned or planned).

        ``clean`` is the expected detector count without noise and without charging, at the
        positions the lines were (or will be) scanned, drift included, so it lines up with the
        data pixel for pixel. ``extra["particle_mask"]`` is ``(H, W)`` bool (particle on top).
        An SEM has no tip: ``tip_state`` is always ``TipState.GOOD``.
        """
        sim, cfg = self._sim, self._sim.config
        extra: dict[str, object] = {
            "particle_mask": self._mask.copy(),
            "lines_done": self.lines_done,
            "t_start_s": self.t_start_s,
            "frame_time_s": self.frame_time_s,
            "line_time_s": self.line_time_s,
            "electrons_per_pixel": sim.electrons_per_pixel(self.dwell_s),
            "probe_size_m": cfg.probe_size_m,
            "charging": cfg.charging,
            "seed": sim.seed,
            "frame_index": self.index,
        }
        if cfg.charging:
            extra["charge_shift_m"] = [float(v) for v in self._shift_m]
        return GroundTruth(
            tip_state=TipState.GOOD,
            tip_states=(TipState.GOOD,),
            clean=self._clean.copy(),
            defects=self._defects(),
            extra=extra,
        )
