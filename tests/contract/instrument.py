"""The contract every Instrument implementation passes.

Subclass :class:`InstrumentContract` in a test module and implement ``make_instrument`` (return
an open instrument scanning small frames so the suite stays fast). Remote and real drivers run the
very same tests.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from drivers.commands import (
    AbortScan,
    Capability,
    Command,
    MoveTo,
    Scan,
    SetDwell,
    TipPulse,
)
from drivers.errors import CommandRejected, LimitViolation, NotConnected
from drivers.frame import Frame, frame_problems
from drivers.limits import Limits
from drivers.protocol import CommandResult, Instrument, InstrumentInfo, InstrumentState


class InstrumentContract:
    """Behaviour every driver must show. Implement :meth:`make_instrument`."""

    def make_instrument(self) -> Instrument:
        raise NotImplementedError

    @pytest.fixture
    def instrument(self) -> Iterator[Instrument]:
        inst = self.make_instrument()
        try:
            yield inst
        finally:
            inst.close()

    # -- description ----------------------------------------------------------------------

    def test_is_an_instrument(self, instrument: Instrument) -> None:
        assert isinstance(instrument, Instrument)

    def test_info_declares_kind_channels_capabilities_limits(self, instrument: Instrument) -> None:
        info = instrument.info()
        assert isinstance(info, InstrumentInfo)
        assert info.kind in {"stm", "afm", "stem", "sem"}
        assert info.channels and all(isinstance(c, str) for c in info.channels)
        assert info.capabilities and all(isinstance(c, Capability) for c in info.capabilities)
        assert Capability.SCAN in info.capabilities
        assert isinstance(info.limits, Limits)
        info.to_json()  # JSON-able

    def test_state_is_within_limits(self, instrument: Instrument) -> None:
        state = instrument.state()
        limits = instrument.info().limits
        assert isinstance(state, InstrumentState)
        assert limits.dwell_s[0] <= state.dwell_s <= limits.dwell_s[1]
        assert math.isfinite(state.time_s)
        assert not state.scanning

    # -- acquisition ------------------------------------------------------------------------

    def test_acquire_returns_a_complete_consistent_frame(self, instrument: Instrument) -> None:
        state = instrument.state()
        frame = instrument.acquire()
        assert isinstance(frame, Frame)
        assert frame.complete
        assert frame.shape == tuple(state.shape_px)
        assert frame_problems(frame, expected_shape=state.shape_px) == []
        assert frame.instrument == instrument.info().id
        assert frame.channel in instrument.info().channels
        region = frame.scan_region
        assert frame.pixel_size_m[0] == pytest.approx(region.height_m / frame.shape[0])
        assert frame.pixel_size_m[1] == pytest.approx(region.width_m / frame.shape[1])
        assert frame.dwell_s == pytest.approx(state.dwell_s)
        assert float(np.std(frame.data)) > 0  # an image, not a constant

    def test_frames_are_numbered_and_time_advances(self, instrument: Instrument) -> None:
        t0 = instrument.state().time_s
        first, second = instrument.acquire(), instrument.acquire()
        assert second.frame_index == first.frame_index + 1
        assert t0 <= first.timestamp_s < second.timestamp_s <= instrument.state().time_s
        assert instrument.state().frames_done >= 2

    def test_stream_yields_lines_in_order_and_ends_complete(self, instrument: Instrument) -> None:
        parts = list(instrument.stream())
        assert len(parts) >= 2, "a scan must stream partial frames before the complete one"
        done = [p.lines_done for p in parts]
        assert done == sorted(done) and done[-1] == parts[-1].shape[0]
        assert parts[-1].complete and not any(p.complete for p in parts[:-1])
        for part in parts[:-1]:
            assert np.all(np.isfinite(part.done_data))
            assert np.all(np.isnan(part.data[part.lines_done :]))
            # lines once delivered do not change afterwards
            np.testing.assert_array_equal(part.done_data, parts[-1].data[: part.lines_done])

    def test_abort_during_stream_ends_the_scan_early(self, instrument: Instrument) -> None:
        parts = []
        for part in instrument.stream():
            parts.append(part)
            if len(parts) == 1:
                instrument.execute(AbortScan(source="test"))
        assert not parts[-1].complete
        assert not instrument.state().scanning
        assert instrument.acquire().complete  # the next scan works normally

    def test_command_from_another_thread_while_streaming(self, instrument: Instrument) -> None:
        dwell = instrument.state().dwell_s
        results: list[CommandResult] = []
        parts = []
        for part in instrument.stream():
            parts.append(part)
            if len(parts) == 1:
                worker = threading.Thread(
                    target=lambda: results.append(instrument.execute(SetDwell(dwell)))
                )
                worker.start()
                worker.join(timeout=30)
        assert results and results[0].ok
        assert parts[-1].complete

    # -- commands ---------------------------------------------------------------------------

    def test_set_dwell_applies_to_the_next_frame(self, instrument: Instrument) -> None:
        _low, high = instrument.info().limits.dwell_s
        new = min(high, instrument.state().dwell_s * 2)
        result = instrument.execute(SetDwell(new, source="test"))
        assert result.ok
        assert instrument.state().dwell_s == pytest.approx(new)
        assert instrument.acquire().dwell_s == pytest.approx(new)

    def test_scan_command_changes_shape(self, instrument: Instrument) -> None:
        rows, cols = instrument.state().shape_px
        instrument.execute(Scan(shape_px=(rows // 2, cols // 2), source="test"))
        assert instrument.acquire().shape == (rows // 2, cols // 2)

    def test_out_of_limits_command_is_rejected_and_changes_nothing(
        self, instrument: Instrument
    ) -> None:
        before = instrument.state()
        too_long = instrument.info().limits.dwell_s[1] * 10
        with pytest.raises(LimitViolation) as err:
            instrument.execute(SetDwell(too_long, source="test"))
        assert err.value.value == pytest.approx(too_long)
        assert instrument.state().dwell_s == before.dwell_s

    def test_unsupported_command_is_rejected(self, instrument: Instrument) -> None:
        info = instrument.info()
        unsupported: list[Command] = []
        if Capability.TIP_CONDITIONING not in info.capabilities:
            unsupported.append(TipPulse(2.5, 0.2, source="test"))
        if Capability.STAGE not in info.capabilities:
            unsupported.append(MoveTo(0.0, 0.0, source="test"))
        for command in unsupported:
            with pytest.raises(CommandRejected):
                instrument.execute(command)
        with pytest.raises(CommandRejected):
            instrument.execute("not a command")  # type: ignore[arg-type]

    def test_move_to_moves_the_scan(self, instrument: Instrument) -> None:
        if Capability.STAGE not in instrument.info().capabilities:
            pytest.skip("no stage")
        limits = instrument.info().limits
        x = (limits.stage_x_m[0] + limits.stage_x_m[1]) / 2 + 50e-9
        instrument.execute(MoveTo(x, 0.0, source="test"))
        assert instrument.state().position_m[0] == pytest.approx(x, abs=1e-12)
        assert instrument.acquire().scan_region.center_x_m == pytest.approx(x, abs=1e-12)

    def test_move_outside_the_stage_is_rejected(self, instrument: Instrument) -> None:
        if Capability.STAGE not in instrument.info().capabilities:
            pytest.skip("no stage")
        limits = instrument.info().limits
        before = instrument.state().position_m
        with pytest.raises(LimitViolation):
            instrument.execute(MoveTo(limits.stage_x_m[1] * 2 + 1e-6, 0.0, source="test"))
        assert instrument.state().position_m == before

    # -- lifecycle --------------------------------------------------------------------------

    def test_closed_instrument_raises_not_connected(self, instrument: Instrument) -> None:
        instrument.close()
        with pytest.raises(NotConnected):
            instrument.acquire()
        with pytest.raises(NotConnected):
            instrument.execute(SetDwell(instrument.info().limits.dwell_s[0]))
        instrument.close()  # idempotent
