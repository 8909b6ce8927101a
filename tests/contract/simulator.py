"""The contract every physics simulator passes (in the spirit of Gymnasium's ``check_env``).

Subclass :class:`SimulatorContract` in a test module and implement :meth:`make_simulator`
and :meth:`default_scan`; declare the physics the simulator promises through the class
attributes. A simulator has the shape of :class:`simulators.stm.STMSimulator`:

- ``time_s`` (simulated seconds), ``position_m``, ``move_to(x_m, y_m)``, ``advance(dt_s)``;
- ``begin_frame(region, shape_px, dwell_s)`` -> a scan with ``next_line() -> (W,) float32``,
  ``lines_done``, ``done`` and ``truth() -> drivers.frame.GroundTruth``;
- ``render_clean(region, shape_px)`` -> ``(H, W)`` noise-free image of a region.

The checks: determinism by seed, ground-truth shapes, dtypes and positions, the dose law
(halving the dwell multiplies the noise variance relative to the clean image by
``dose_noise_ratio``), shift covariance (moving the scan region by k pixels moves the image
by k pixels), line timing in simulated time with no wall clock, and errors after the end.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np
import pytest

from drivers.errors import CommandRejected
from drivers.frame import GroundTruth, ScanRegion, TipState


def frame_data(
    sim: Any, region: ScanRegion, shape_px: tuple[int, int], dwell_s: float
) -> tuple[np.ndarray, GroundTruth]:
    """Scan one whole frame: ``(data (H, W), truth)``."""
    scan = sim.begin_frame(region, shape_px, dwell_s)
    data = np.stack([scan.next_line() for _ in range(shape_px[0])])
    return data, scan.truth()


def integer_shift(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """The integer ``(dy, dx)`` with ``b[r, c] ~ a[r + dy, c + dx]`` (peak of the circular
    cross-correlation of the mean-removed images)."""
    fa = np.fft.rfft2(a - a.mean())
    fb = np.fft.rfft2(b - b.mean())
    corr = np.fft.irfft2(fa * np.conj(fb), s=a.shape)
    dy, dx = np.unravel_index(int(np.argmax(corr)), corr.shape)
    h, w = a.shape
    return (int(dy) if dy <= h // 2 else int(dy) - h, int(dx) if dx <= w // 2 else int(dx) - w)


class SimulatorContract:
    """Behaviour every simulator must show. Implement the two hooks; tune the attributes."""

    dose_noise_ratio: float = 2.0
    """Expected ratio of relative noise variances when the dwell is halved."""
    dose_noise_rtol: float = 0.15
    shift_px: tuple[int, int] = (5, 3)
    """(rows, cols) by which the shift test moves the scan region."""

    def make_simulator(self, seed: int) -> Any:
        raise NotImplementedError

    def default_scan(self) -> tuple[ScanRegion, tuple[int, int], float]:
        """``(region, shape_px, dwell_s)`` of a small, fast frame with visible structure."""
        raise NotImplementedError

    def line_time_s(self, shape_px: tuple[int, int], dwell_s: float) -> float:
        """Simulated time one ``next_line`` takes (default: one pass, ``W * dwell``)."""
        return shape_px[1] * dwell_s

    # -- determinism ------------------------------------------------------------------------

    def test_same_seed_gives_bit_identical_frames(self) -> None:
        region, shape, dwell = self.default_scan()
        a, ta = frame_data(self.make_simulator(11), region, shape, dwell)
        b, tb = frame_data(self.make_simulator(11), region, shape, dwell)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ta.clean, tb.clean)
        assert ta.defects == tb.defects

    def test_different_seed_gives_a_different_frame(self) -> None:
        region, shape, dwell = self.default_scan()
        a, _ = frame_data(self.make_simulator(11), region, shape, dwell)
        b, _ = frame_data(self.make_simulator(12), region, shape, dwell)
        assert not np.array_equal(a, b)

    def test_second_frame_differs_from_the_first(self) -> None:
        region, shape, dwell = self.default_scan()
        sim = self.make_simulator(3)
        a, _ = frame_data(sim, region, shape, dwell)
        b, _ = frame_data(sim, region, shape, dwell)
        assert not np.array_equal(a, b), "noise must be drawn afresh for every frame"

    # -- ground truth -----------------------------------------------------------------------

    def test_ground_truth_shapes_dtypes_and_positions(self) -> None:
        region, shape, dwell = self.default_scan()
        data, truth = frame_data(self.make_simulator(4), region, shape, dwell)
        assert data.shape == shape and data.dtype == np.float32
        assert np.all(np.isfinite(data))
        assert isinstance(truth, GroundTruth)
        assert isinstance(truth.tip_state, TipState)
        assert truth.clean is not None
        assert truth.clean.shape == shape and truth.clean.dtype == np.float32
        assert np.all(np.isfinite(truth.clean))
        assert float(np.std(truth.clean)) > 0, "the clean image must show structure"
        h, w = shape
        reach = math.hypot(region.width_m, region.height_m)  # generous: drift included
        for d in truth.defects:
            assert -0.5 <= d.row_px <= h - 0.5 and -0.5 <= d.col_px <= w - 0.5, d
            assert math.hypot(d.x_m - region.center_x_m, d.y_m - region.center_y_m) <= reach
            assert isinstance(d.kind, str) and d.kind
        for key, value in truth.extra.items():
            if isinstance(value, np.ndarray) and value.ndim == 2:
                assert value.shape == shape, f"truth.extra[{key!r}] has shape {value.shape}"

    def test_truth_clean_matches_render_clean_scale(self) -> None:
        region, shape, dwell = self.default_scan()
        sim = self.make_simulator(5)
        _, truth = frame_data(sim, region, shape, dwell)
        ideal = sim.render_clean(region, shape)
        assert ideal.shape == shape
        assert np.all(np.isfinite(ideal))
        # same structure: the drift-aligned clean image correlates with the ideal one
        r = np.corrcoef(ideal.ravel(), np.asarray(truth.clean).ravel())[0, 1]
        assert r > 0.5, f"truth.clean and render_clean disagree (r = {r:.2f})"

    # -- physics invariants -----------------------------------------------------------------

    def _relative_noise_variance(self, seed: int, dwell_s: float) -> float:
        region, shape, _ = self.default_scan()
        data, truth = frame_data(self.make_simulator(seed), region, shape, dwell_s)
        clean = np.asarray(truth.clean, dtype=np.float64)
        noise = data.astype(np.float64) - clean
        return float(np.var(noise) / np.var(clean))

    def test_halving_the_dwell_scales_the_relative_noise_variance(self) -> None:
        _, _, dwell = self.default_scan()
        ratios = [
            self._relative_noise_variance(seed, dwell / 2)
            / self._relative_noise_variance(seed, dwell)
            for seed in (21, 22)
        ]
        ratio = float(np.mean(ratios))
        assert ratio == pytest.approx(self.dose_noise_ratio, rel=self.dose_noise_rtol), ratios

    def test_shifted_region_shifts_the_image(self) -> None:
        region, shape, _ = self.default_scan()
        sim = self.make_simulator(6)
        dr, dc = self.shift_px
        px_y, px_x = region.height_m / shape[0], region.width_m / shape[1]
        moved = dataclasses.replace(
            region,
            center_x_m=region.center_x_m + dc * px_x,
            center_y_m=region.center_y_m + dr * px_y,
        )
        a = sim.render_clean(region, shape)
        b = sim.render_clean(moved, shape)
        assert integer_shift(a, b) == (dr, dc)
        # and the overlap agrees pixel for pixel (up to float rounding of the positions)
        overlap_a, overlap_b = a[dr:, dc:], b[: shape[0] - dr, : shape[1] - dc]
        scale = float(np.abs(a).max())
        inner = (slice(4, -4), slice(4, -4))  # away from filter edges
        np.testing.assert_allclose(overlap_b[inner], overlap_a[inner], atol=1e-3 * scale)

    # -- time -------------------------------------------------------------------------------

    def test_lines_advance_simulated_time_without_the_wall_clock(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        region, shape, dwell = self.default_scan()
        sim = self.make_simulator(7)

        def no_wall_clock(*args: object) -> float:
            raise AssertionError("a simulator must not read the wall clock")

        with monkeypatch.context() as m:
            for name in (
                "time",
                "monotonic",
                "perf_counter",
                "time_ns",
                "monotonic_ns",
                "perf_counter_ns",
                "sleep",
            ):
                m.setattr(time, name, no_wall_clock)
            t0 = sim.time_s
            scan = sim.begin_frame(region, shape, dwell)
            assert sim.time_s == pytest.approx(t0)
            starts = []
            for _ in range(3):
                starts.append(sim.time_s)
                scan.next_line()
            line = self.line_time_s(shape, dwell)
            assert np.diff([*starts, sim.time_s]) == pytest.approx([line] * 3, rel=1e-9)
            assert scan.lines_done == 3 and not scan.done
            sim.advance(1.0)
            assert sim.time_s == pytest.approx(starts[0] + 3 * line + 1.0)
            while not scan.done:
                scan.next_line()
        assert scan.lines_done == shape[0]

    def test_next_line_after_the_end_raises(self) -> None:
        region, shape, dwell = self.default_scan()
        sim = self.make_simulator(8)
        scan = sim.begin_frame(region, shape, dwell)
        for _ in range(shape[0]):
            scan.next_line()
        assert scan.done
        t = sim.time_s
        with pytest.raises(CommandRejected):
            scan.next_line()
        assert sim.time_s == t, "a refused line must not take time"

    def test_partial_truth_is_available_mid_frame(self) -> None:
        region, shape, dwell = self.default_scan()
        sim = self.make_simulator(9)
        scan = sim.begin_frame(region, shape, dwell)
        for _ in range(shape[0] // 2):
            scan.next_line()
        truth = scan.truth()
        assert truth.clean is not None and truth.clean.shape == shape

    def test_move_to_changes_what_is_seen(self) -> None:
        region, shape, dwell = self.default_scan()
        sim = self.make_simulator(10)
        _, before = frame_data(sim, region, shape, dwell)
        x = region.center_x_m + 3 * region.width_m
        sim.move_to(x, region.center_y_m)
        assert sim.position_m[0] == pytest.approx(x)
        moved = dataclasses.replace(region, center_x_m=x)
        _, after = frame_data(sim, moved, shape, dwell)
        a, b = np.asarray(before.clean), np.asarray(after.clean)
        assert float(np.max(np.abs(a - b))) > 0.1 * float(np.std(a)), "the view did not change"
