"""Simulated instruments behind ``sim:`` URIs (``sim:stm``, ``sim:stem``, ``sim:sem``).

A :class:`SimulatedSTM` drives :class:`simulators.stm.STMSimulator` exactly as a controller
drives a microscope (see :mod:`drivers.sim_base`); the STEM and SEM instruments live in
:mod:`drivers.sim_stem` and :mod:`drivers.sim_sem` and are imported on first use.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from drivers.commands import Approach, Capability, Command, Retract, TipDip, TipPulse
from drivers.errors import ConfigError
from drivers.frame import ScanRegion, TipState
from drivers.limits import STM_LIMITS, Limits
from drivers.sim_base import Handler, SimulatedScanInstrument, build_config
from simulators.stm import STMConfig, STMSimulator

_DRIVER_KEYWORDS = (
    "seed, config, limits, region, shape_px, dwell_s, lines_per_chunk, instrument_id, cube"
)


class SimulatedSTM(SimulatedScanInstrument):
    """A constant-current STM over the physics simulator (the ``sim:stm`` instrument).

    ``lines_per_chunk`` sets how often :meth:`stream` yields a partial frame. All timing is
    simulated: a 256 x 256 frame at 1 ms dwell takes about two minutes of instrument time and
    a few tens of milliseconds of CPU. Keyword options not named here are
    :class:`simulators.stm.STMConfig` fields (``surface="hsi100"``, ...). ``cube`` images a
    DFT LDOS from a Gaussian cube file instead of the generated surface (``"graphene"`` is the
    shipped GPAW graphene LDOS, see ``simulators/data/README.md``).
    """

    kind = "stm"
    channel = "topography"
    capabilities = frozenset(
        {Capability.SCAN, Capability.STAGE, Capability.TIP_CONDITIONING, Capability.Z_CONTROL}
    )

    def __init__(
        self,
        *,
        seed: int | None = None,
        config: STMConfig | None = None,
        limits: Limits = STM_LIMITS,
        region: ScanRegion | None = None,
        shape_px: tuple[int, int] = (256, 256),
        dwell_s: float = 1e-3,
        lines_per_chunk: int = 32,
        instrument_id: str = "sim:stm",
        cube: str | None = None,
        **config_overrides: Any,
    ) -> None:
        config = build_config(STMConfig, config, config_overrides, "sim:stm", _DRIVER_KEYWORDS)
        sim: STMSimulator
        if cube is None:
            sim = STMSimulator(config, seed=seed)
        elif not isinstance(cube, (str, os.PathLike)):
            raise ConfigError(
                f"cube must be a path to a Gaussian cube file or 'graphene', got {cube!r}"
            )
        else:  # a DFT LDOS instead of the generated surface ("graphene" = the shipped cube)
            from simulators.stm_dft import GRAPHENE_CUBE, CubeSTMSimulator

            sim = CubeSTMSimulator(
                config, seed=seed, cube=GRAPHENE_CUBE if cube == "graphene" else cube
            )
        super().__init__(
            sim,
            limits=limits,
            region=region if region is not None else ScanRegion(),
            shape_px=shape_px,
            dwell_s=dwell_s,
            lines_per_chunk=lines_per_chunk,
            instrument_id=instrument_id,
        )

    def _details(self) -> dict[str, Any]:
        return {"simulated": True, "surface": self._sim.config.surface}

    def _state_extra(self) -> dict[str, Any]:
        return {"retracted": self._sim.tip_retracted}

    def _handlers(self) -> dict[type[Command], Handler]:
        return {
            **super()._handlers(),
            TipPulse: lambda c: dict(self._sim.pulse(c.bias_V, c.duration_s)),
            TipDip: lambda c: dict(self._sim.dip(c.depth_m, c.bias_V)),
            Retract: lambda c: self._apply_z(retract=True),
            Approach: lambda c: self._apply_z(retract=False),
        }

    def _apply_z(self, *, retract: bool) -> dict[str, Any]:
        if retract:
            self._sim.retract()
        else:
            self._sim.approach()
        return {"retracted": self._sim.tip_retracted}

    @property
    def tip_state(self) -> TipState:
        return self._sim.tip_state


def _open_sem(**options: Any) -> Any:
    from drivers.sim_sem import SimulatedSEM

    return SimulatedSEM(**options)


def _open_stem(**options: Any) -> Any:
    from drivers.sim_stem import SimulatedSTEM

    return SimulatedSTEM(**options)


_SIMULATED: dict[str, Callable[..., Any]] = {
    "stm": SimulatedSTM,
    "stem": _open_stem,
    "sem": _open_sem,
}


def open_simulated(name: str, **options: Any) -> Any:
    """Open ``sim:NAME``; unknown names raise :class:`ConfigError` listing the known ones."""
    factory = _SIMULATED.get(name)
    if factory is None:
        raise ConfigError(
            f"unknown simulated instrument 'sim:{name}'; known: "
            + ", ".join(f"sim:{k}" for k in sorted(_SIMULATED))
        )
    return factory(**options)
