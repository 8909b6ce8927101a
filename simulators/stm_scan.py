"""Line-by-line scanning of one STM frame in simulated time (see :class:`FrameScan`)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from drivers.errors import CommandRejected
from drivers.frame import Defect, GroundTruth, ScanRegion, TipState
from simulators.noise import flicker_series, white_sigma_m
from simulators.stm_grid import Grid
from simulators.stm_tip import CANONICAL_GOOD, TipConfig

if TYPE_CHECKING:
    from simulators.stm import STMSimulator

_Rendered = tuple[int, np.ndarray, np.ndarray | None]
"""First row rendered, ``(rows, W)`` float64 heights from it, float32 heights + noise or None."""


class FrameScan:
    """One frame being scanned line by line in simulated time.

    ``next_line()`` scans row ``lines_done`` (trace and retrace, ``2 W dwell_s``), reflecting
    the tip as it is during that line: a tip change mid-line splits the line. Actions on the
    simulator between lines (pulse, dip, move, advance) show in the remaining lines.
    ``data`` holds the lines scanned so far (NaN after them).
    """

    def __init__(
        self,
        sim: STMSimulator,
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
        self.data = np.full(shape_px, np.nan, dtype=np.float32)
        self.line_time_s = 2.0 * w_px * dwell_s
        self.t_start_s = sim.time_s
        cfg = sim.config
        rng = sim._noise_rng
        self._sigma_white = white_sigma_m(cfg.white_noise_m_per_sqrt_hz, dwell_s)
        white = rng.standard_normal(shape_px, dtype=np.float32)
        line_offset = rng.standard_normal(h_px) * cfg.line_noise_m
        flicker = flicker_series(rng, h_px * 2 * w_px, dwell_s, cfg.flicker_noise_m_per_decade)
        self._flicker = flicker.reshape(h_px, 2 * w_px)[:, :w_px]
        # Every line's noise at once: sigma * white (float32) + line offset + flicker (float32),
        # the same element-wise arithmetic as line by line, without temporary frames.
        white *= self._sigma_white
        self._noise = np.add(white, line_offset[:, None])
        self._noise += self._flicker
        self._row_t = np.zeros(h_px)
        self._rows_m = np.zeros((h_px, 2))
        self._step_m = np.zeros(2)
        # Per tip configuration: first row rendered, heights (float64) from that row on, and
        # heights plus noise rounded to float32 (the lines as scanned), filled on first use.
        self._cache: dict[int, _Rendered] = {}
        self._crashed_lines: dict[int, np.ndarray] = {}  # per crashed tip configuration
        self._epoch = sim._epoch
        self._line_states: list[TipState] = []
        self._seen: list[TipState] = []
        self._tip_changes = 0
        self._apex_switches = 0
        self._retracted_lines = 0
        self._plan(0, sim.time_s)

    @property
    def done(self) -> bool:
        return self.lines_done >= self.shape_px[0]

    @property
    def frame_time_s(self) -> float:
        return self.line_time_s * self.shape_px[0]

    def _plan(self, first_row: int, t0_s: float) -> None:
        """Schedule rows ``first_row..`` from ``t0_s`` and place their pixels on the sample."""
        rows = np.arange(first_row, self.shape_px[0], dtype=np.float64)
        t = t0_s + (rows - first_row) * self.line_time_s
        self._row_t[first_row:] = t
        offset = self._sim.offset_m(t + 0.5 * self.shape_px[1] * self.dwell_s)
        grid = self._sim._grid(self.region, self.shape_px, rows, offset)
        self._rows_m[first_row:] = grid.rows_m
        self._step_m = grid.step_m
        self._cache.clear()

    def _render_from(self, row: int, config: TipConfig) -> _Rendered:
        """The cached rendering of ``config`` that covers ``row`` (rendered from ``row`` on if
        there is none)."""
        hit = self._cache.get(config.id)
        if hit is None or hit[0] > row:
            grid = Grid(self._rows_m[row:], self._step_m, self.shape_px[1])
            hit = (row, self._sim._ldos.render(grid, config), None)
            self._cache[config.id] = hit
        return hit

    def _rendered(self, row: int, config: TipConfig) -> np.ndarray:
        first, heights, _ = self._render_from(row, config)
        return heights[row - first]

    def _scanned(self, row: int, config: TipConfig) -> np.ndarray:
        """``(W,)`` float32: heights plus noise of ``row`` (tip not retracted, no tip change in
        the line). Every remaining row is done at once, with the same element-wise sums and
        rounding as row by row."""
        if config.state is TipState.CRASHED:
            crashed = self._crashed_lines.get(config.id)
            if crashed is None:
                crashed = self._crashed_values(config, slice(None))
                crashed += self._noise  # float64 sums rounded to float32, as line by line
                self._crashed_lines[config.id] = crashed
            return crashed[row]
        first, heights, lines = self._render_from(row, config)
        if lines is None:
            lines = (heights + self._noise[first:]).astype(np.float32)
            self._cache[config.id] = (first, heights, lines)
        return lines[row - first]

    def _line_values(self, row: int, config: TipConfig, retracted: bool) -> np.ndarray:
        w_px = self.shape_px[1]
        z_limit = self._sim.config.z_limit_m
        if retracted:
            return np.full(w_px, z_limit)
        if config.state is TipState.CRASHED:
            return self._crashed_values(config, row)
        return self._rendered(row, config)

    def _crashed_values(self, config: TipConfig, rows: int | slice) -> np.ndarray:
        """Feedback saturated: pinned below the limit, wandering with the 1/f noise (float32)."""
        z_limit = self._sim.config.z_limit_m
        return np.asarray(z_limit - config.crash_depth_m + 4.0 * self._flicker[rows])

    def next_line(self) -> np.ndarray:
        """Scan the next row: ``(W,)`` float32 metres; advances simulated time by a line."""
        row = self.lines_done
        h_px, w_px = self.shape_px
        if row >= h_px:
            raise CommandRejected(f"frame {self.index} is complete ({h_px} lines)")
        sim = self._sim
        t0 = sim._t
        if abs(t0 - self._row_t[row]) > 1e-9 or sim._epoch != self._epoch:
            self._epoch = sim._epoch
            self._plan(row, t0)
        retracted = sim._retracted
        first = sim._tip.config
        events = sim._pass_time(self.line_time_s)
        if not events:
            majority = first.state
            if majority not in self._seen:
                self._seen.append(majority)
            if not retracted:
                line = self._scanned(row, first)
            else:
                line = self._line_values(row, first, retracted) + self._noise[row]
        else:
            segments: list[tuple[int, TipConfig]] = [(0, first)]
            previous = first
            for t_event, config in events:
                if config.state is not previous.state:
                    self._tip_changes += 1
                else:
                    self._apex_switches += 1
                previous = config
                col = int((t_event - t0) / self.dwell_s)
                if col < w_px:
                    if col <= segments[-1][0]:
                        segments[-1] = (segments[-1][0], config)
                    else:
                        segments.append((col, config))
            if len(segments) == 1:
                config = segments[0][1]
                line = self._line_values(row, config, retracted).copy()
                majority = config.state
                if majority not in self._seen:
                    self._seen.append(majority)
            else:
                line = np.empty(w_px)
                counts: Counter[TipState] = Counter()
                for i, (c0, config) in enumerate(segments):
                    c1 = segments[i + 1][0] if i + 1 < len(segments) else w_px
                    line[c0:c1] = self._line_values(row, config, retracted)[c0:c1]
                    counts[config.state] += c1 - c0
                    if config.state not in self._seen:
                        self._seen.append(config.state)
                majority = counts.most_common(1)[0][0]
            line += self._noise[row]
        self._line_states.append(majority)
        if retracted:
            self._retracted_lines += 1
        out = line.astype(np.float32)  # a copy (the float32 lines of ``_scanned`` included)
        self.data[row] = out
        self._row_t[row] = t0
        self.lines_done = row + 1
        return out

    def _grid_all(self) -> Grid:
        return Grid(self._rows_m, self._step_m, self.shape_px[1])

    def _defects(self, grid: Grid) -> tuple[Defect, ...]:
        h_px, w_px = self.shape_px
        x0, x1, y0, y1 = grid.bounds()
        found = self._sim._surface.defects_in_box(x0, x1, y0, y1)
        if not found:
            return ()
        pts = np.array([[d.x_m, d.y_m] for d in found])
        step = grid.step_m
        col_dir = step / float(np.hypot(step[0], step[1]))
        normal = np.array([-col_dir[1], col_dir[0]])
        # Rows advance along the normal (monotonically unless drift outruns the slow scan):
        # interpolate the row coordinate, extrapolating linearly beyond the first/last row.
        s_rows = grid.rows_m @ normal
        s_pts = pts @ normal
        if h_px > 1:
            k0 = np.clip(np.searchsorted(s_rows, s_pts) - 1, 0, h_px - 2)
            frac = (s_pts - s_rows[k0]) / (s_rows[k0 + 1] - s_rows[k0])
        else:
            k0 = np.zeros(pts.shape[0], dtype=np.int64)
            frac = (s_pts - s_rows[0]) / (self.region.height_m / h_px)
        row = k0 + frac
        k1 = np.minimum(k0 + 1, h_px - 1)
        inner = np.clip(frac, 0.0, 1.0)[:, None]
        origin = grid.rows_m[k0] * (1.0 - inner) + grid.rows_m[k1] * inner
        col = (pts - origin) @ step / float(step @ step)
        out = []
        for d, r, c in zip(found, row, col, strict=True):
            if -0.5 <= r <= h_px - 0.5 and -0.5 <= c <= w_px - 0.5:
                out.append(Defect(d.x_m, d.y_m, d.kind, float(r), float(c)))
        return tuple(out)

    def truth(self) -> GroundTruth:
        """Ground truth of the frame so far (all rows for ``clean`` and defects).

        ``clean`` is the good-tip, noise-free image at the positions the lines were (or will
        be) scanned, so it lines up with the data pixel for pixel, drift included.
        """
        sim = self._sim
        grid = self._grid_all()
        hit = self._cache.get(CANONICAL_GOOD.id)
        if hit is not None and hit[0] == 0 and self._epoch == sim._epoch:
            clean = hit[1]
        else:
            clean = sim._ldos.render(grid, CANONICAL_GOOD)
        if self._line_states:
            state = Counter(self._line_states).most_common(1)[0][0]
        else:
            state = sim.tip_state
        damaged = 0.0
        if sim._surface.damage:
            x, y = grid.xy()
            damaged = float(np.mean(sim._surface.damage_at(x, y) > 0.5))
        extra: dict[str, object] = {
            "tip_changes": self._tip_changes,
            "apex_switches": self._apex_switches,
            "lines_done": self.lines_done,
            "lines_per_state": {str(s): n for s, n in Counter(self._line_states).items()},
            "retracted_lines": self._retracted_lines,
            "surface": sim.config.surface,
            "t_start_s": self.t_start_s,
            "frame_time_s": self.frame_time_s,
            "seed": sim.seed,
            "frame_index": self.index,
            "apexes_m": [a.to_json() for a in sim.tip_config.apexes],
            "tip_blur_m": sim.tip_config.blur_m,
        }
        return GroundTruth(
            tip_state=state,
            tip_states=tuple(self._seen) if self._seen else (state,),
            clean=clean.astype(np.float32),
            defects=self._defects(grid),
            damaged_fraction=damaged,
            extra=extra,
        )
