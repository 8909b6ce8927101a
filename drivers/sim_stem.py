"""The simulated HAADF-STEM behind ``sim:stem``.

A :class:`SimulatedSTEM` drives :class:`simulators.stem.STEMSimulator` as a scan controller
drives a microscope: it scans line by line in simulated time, streams partial frames, executes
commands between lines, and enforces its own limits (the instrument side of the envelope). A
STEM has no tip: it declares no tip-conditioning or z-control capability, so ``TipPulse``,
``TipDip``, ``Approach`` and ``Retract`` are rejected, and its limits allow no conditioning
actions at all.
"""

from __future__ import annotations

from typing import Any

from drivers.commands import Capability, Command, SetScanPattern
from drivers.errors import ConfigError, DataError
from drivers.frame import ScanRegion
from drivers.limits import Limits
from drivers.sim_base import Handler, SimulatedScanInstrument, build_config
from simulators.stem import (
    DEFAULT_DWELL_S,
    DEFAULT_FOV_M,
    DEFAULT_SHAPE_PX,
    STEMConfig,
    STEMSimulator,
)

STEM_LIMITS = Limits(
    dwell_s=(1e-7, 2e-5),
    scan_size_m=(1e-9, 1e-6),
    shape_px=(16, 2048),
    stage_x_m=(-1e-6, 1e-6),
    stage_y_m=(-1e-6, 1e-6),
    max_conditioning_per_window=0,  # no tip: no conditioning, ever
)
"""Dwell 0.1–20 µs, field of view 1 nm – 1 µm, stage ±1 µm, 16–2048 pixels a side."""

CHANNEL = "haadf"


class SimulatedSTEM(SimulatedScanInstrument):
    """An incoherent HAADF-STEM over the physics simulator (the ``sim:stem`` instrument).

    Frames hold detector counts (float32). ``pattern`` / ``fraction`` choose a partial scan
    (``SetScanPattern`` changes them); in a partial scan the pixels the beam skips are NaN by
    design, and ``frame.truth.extra["sampling_mask"]`` says which were visited. Keyword options
    not named here are :class:`simulators.stem.STEMConfig` fields (``specimen="ws2"``,
    ``beam_current_A=50e-12``, ...). ``backend="multislice"`` renders with abTEM (an optional
    extra; opening raises :class:`ConfigError` with the install hint when it is missing) at
    ideal probe positions, with no drift, jitter or flyback: keep such frames small (a 32 x 32
    frame over a few Å takes tens of seconds).
    """

    kind = "stem"
    channel = CHANNEL
    capabilities = frozenset({Capability.SCAN, Capability.STAGE, Capability.PARTIAL_SCAN})

    def __init__(
        self,
        *,
        seed: int | None = None,
        config: STEMConfig | None = None,
        limits: Limits = STEM_LIMITS,
        region: ScanRegion | None = None,
        shape_px: tuple[int, int] = DEFAULT_SHAPE_PX,
        dwell_s: float = DEFAULT_DWELL_S,
        pattern: str = "raster",
        fraction: float = 1.0,
        lines_per_chunk: int = 32,
        instrument_id: str = "sim:stem",
        **config_overrides: Any,
    ) -> None:
        config = build_config(
            STEMConfig,
            config,
            config_overrides,
            "sim:stem",
            "seed, config, limits, region, shape_px, dwell_s, pattern, fraction, "
            "lines_per_chunk, instrument_id",
        )
        try:
            initial = SetScanPattern(pattern, fraction, source="init")
        except DataError as exc:
            raise ConfigError(str(exc)) from None
        self._pattern, self._fraction = initial.pattern, initial.fraction
        super().__init__(
            STEMSimulator(config, seed=seed),
            limits=limits,
            region=region
            if region is not None
            else ScanRegion(0.0, 0.0, DEFAULT_FOV_M, DEFAULT_FOV_M),
            shape_px=shape_px,
            dwell_s=dwell_s,
            lines_per_chunk=lines_per_chunk,
            instrument_id=instrument_id,
        )

    def _details(self) -> dict[str, Any]:
        cfg = self._sim.config
        return {
            "simulated": True,
            "specimen": cfg.specimen,
            "voltage_V": cfg.voltage_V,
            "convergence_rad": cfg.convergence_rad,
            "beam_current_A": cfg.beam_current_A,
            "backend": cfg.backend,
            "units": "counts",
        }

    def _state_extra(self) -> dict[str, Any]:
        return {
            "pattern": self._pattern,
            "fraction": self._fraction,
            "beam_current_A": self._sim.config.beam_current_A,
        }

    def _begin_frame(self, region: ScanRegion, shape: tuple[int, int], dwell_s: float) -> Any:
        return self._sim.begin_frame(
            region, shape, dwell_s, pattern=self._pattern, fraction=self._fraction
        )

    def _frame_metadata(self) -> dict[str, Any]:
        return {"pattern": self._pattern, "fraction": self._fraction, "units": "counts"}

    def _handlers(self) -> dict[type[Command], Handler]:
        return {**super()._handlers(), SetScanPattern: self._apply_pattern}

    def _apply_pattern(self, command: SetScanPattern) -> dict[str, Any]:
        self._pattern, self._fraction = command.pattern, command.fraction
        return {"pattern": self._pattern, "fraction": self._fraction}


def open_simulated_stem(**options: Any) -> SimulatedSTEM:
    """Open ``sim:stem`` with the keyword options of :class:`SimulatedSTEM`."""
    return SimulatedSTEM(**options)
