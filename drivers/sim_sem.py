"""The simulated SEM behind ``sim:sem`` (secondary-electron channel ``se``).

A :class:`SimulatedSEM` drives :class:`simulators.sem.SEMSimulator` as a scan controller
drives an SEM: it scans line by line in simulated time, streams partial frames, executes
commands between lines and enforces its own limits (the instrument side of the envelope).
An SEM has a stage and a scan generator but no tip and no z feedback: tip conditioning and
approach/retract commands are rejected, and frames report ``TipState.GOOD``.
"""

from __future__ import annotations

from typing import Any

from drivers.commands import Capability
from drivers.frame import ScanRegion
from drivers.limits import Limits
from drivers.sim_base import SimulatedScanInstrument, build_config
from simulators.sem import SEMConfig, SEMSimulator

SEM_LIMITS = Limits(
    dwell_s=(1e-7, 1e-5),
    scan_size_m=(100e-9, 100e-6),
    shape_px=(16, 4096),
    stage_x_m=(-50e-6, 50e-6),
    stage_y_m=(-50e-6, 50e-6),
)
"""Field-emission SEM with a ±50 µm stage: 0.1–10 µs dwell, 100 nm – 100 µm field of view."""

SEM_CHANNEL = "se"


class SimulatedSEM(SimulatedScanInstrument):
    """A secondary-electron SEM over the physics simulator (the ``sim:sem`` instrument).

    Defaults: 256 x 256 pixels over 5 µm at 1 µs dwell (about 70 ms of instrument time per
    frame). ``lines_per_chunk`` sets how often :meth:`stream` yields a partial frame. Unknown
    keyword options raise :class:`ConfigError` listing the :class:`SEMConfig` options.
    """

    kind = "sem"
    channel = SEM_CHANNEL
    capabilities = frozenset({Capability.SCAN, Capability.STAGE})

    def __init__(
        self,
        *,
        seed: int | None = None,
        config: SEMConfig | None = None,
        limits: Limits = SEM_LIMITS,
        region: ScanRegion | None = None,
        shape_px: tuple[int, int] = (256, 256),
        dwell_s: float = 1e-6,
        lines_per_chunk: int = 32,
        instrument_id: str = "sim:sem",
        **config_overrides: Any,
    ) -> None:
        config = build_config(
            SEMConfig,
            config,
            config_overrides,
            "sim:sem",
            "seed, config, limits, region, shape_px, dwell_s, lines_per_chunk, instrument_id",
        )
        super().__init__(
            SEMSimulator(config, seed=seed),
            limits=limits,
            region=region if region is not None else ScanRegion(0.0, 0.0, 5e-6, 5e-6),
            shape_px=shape_px,
            dwell_s=dwell_s,
            lines_per_chunk=lines_per_chunk,
            instrument_id=instrument_id,
        )

    def _details(self) -> dict[str, Any]:
        cfg = self._sim.config
        return {
            "simulated": True,
            "beam_current_A": cfg.beam_current_A,
            "probe_size_m": cfg.probe_size_m,
            "charging": cfg.charging,
        }

    def _state_extra(self) -> dict[str, Any]:
        return {"beam_current_A": self._sim.config.beam_current_A}
