"""Configuration of the SEM forward model: every physics and instrument parameter.

Defaults follow PHYSICS.md (field-emission SEM, secondary-electron detector): 100 pA beam,
2 nm probe (FWHM), 1 µs dwell, a 5 µm field of view of 256 x 256 pixels (about 20 nm pixels),
a ±50 µm stage. Names carry their units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from drivers.errors import ConfigError
from simulators.sem_sample import MATERIALS, Population

ELEMENTARY_CHARGE_C = 1.602176634e-19
DEFAULT_SHAPE_PX = (256, 256)
DEFAULT_DWELL_S = 1e-6
DEFAULT_FOV_M = 5e-6
_NON_NUMBER_FIELDS = frozenset(
    {
        "substrate",
        "charging",
        "particle_radii_m",
        "particle_densities_per_um2",
        "particle_materials",
        "particle_material_weights",
    }
)


@dataclass(frozen=True)
class SEMConfig:
    """Physics and instrument parameters of :class:`simulators.sem.SEMSimulator`.

    Beam and detector: ``beam_current_A``, ``probe_size_m`` (FWHM of the Gaussian probe),
    ``se_yield`` (SE yield of a flat, Z = 0 surface per primary electron), ``bse_se_factor``
    (SE2 per backscattered electron, relative), ``collection_efficiency``, ``detector_gain``
    (output units per detected electron), ``max_tilt_deg`` (the 1/cos law saturates there),
    ``edge_gain`` and ``escape_length_m`` (edge brightening), ``stage_tilt_deg``.

    Sample: ``substrate`` (a :data:`~simulators.sem_sample.MATERIALS` name), grains of
    ``grain_size_m`` with ``grain_contrast`` and grooves ``groove_depth_m`` deep,
    ``groove_width_m`` wide; particle populations ``particle_radii_m`` with
    ``particle_densities_per_um2`` (one entry per size class), of ``particle_materials`` in the
    proportions ``particle_material_weights``; pores of ``pore_radius_m``.

    Charging (off by default): insulating particles saturate after
    ``charge_saturation_e_per_nm2`` of dose, leak with ``charge_leak_s``; a charged particle is
    brighter by ``charge_brightening`` (x its charge), leaves a streak of relative strength
    ``charge_streak_gain`` decaying over ``charge_streak_s`` of scan time, and deflects the
    beam by ``charge_deflection_m_per_um2`` per µm² of fully charged insulator.
    """

    beam_current_A: float = 100e-12
    probe_size_m: float = 2e-9
    default_dwell_s: float = DEFAULT_DWELL_S
    se_yield: float = 0.15
    bse_se_factor: float = 3.0
    collection_efficiency: float = 0.5
    detector_gain: float = 1.0
    max_tilt_deg: float = 80.0
    edge_gain: float = 0.6
    escape_length_m: float = 10e-9
    stage_tilt_deg: float = 0.0
    substrate: str = "Si"
    grain_size_m: float = 800e-9
    grain_contrast: float = 0.05
    groove_depth_m: float = 4e-9
    groove_width_m: float = 15e-9
    particle_radii_m: tuple[float, ...] = (25e-9, 80e-9, 250e-9)
    particle_densities_per_um2: tuple[float, ...] = (1.5, 0.3, 0.04)
    particle_aspect_max: float = 1.5
    particle_height_ratio: float = 0.9
    particle_materials: tuple[str, ...] = ("Au", "Ni", "Al2O3")
    particle_material_weights: tuple[float, ...] = (0.4, 0.3, 0.3)
    pore_radius_m: float = 60e-9
    pore_density_per_um2: float = 0.2
    pore_depth_ratio: float = 0.6
    pore_shadow: float = 0.5
    charging: bool = False
    charge_saturation_e_per_nm2: float = 20.0
    charge_leak_s: float = 30.0
    charge_brightening: float = 1.0
    charge_streak_gain: float = 1.0
    charge_streak_s: float = 20e-6
    charge_deflection_m_per_um2: float = 50e-9
    flyback_s: float = 20e-6
    drift_m_per_s: float = 1e-9
    stage_speed_m_per_s: float = 100e-6
    stage_settle_s: float = 0.2
    stage_range_m: float = 50e-6
    max_fov_m: float = 100e-6

    def __post_init__(self) -> None:
        positive = {
            "beam_current_A",
            "probe_size_m",
            "default_dwell_s",
            "se_yield",
            "collection_efficiency",
            "detector_gain",
            "max_tilt_deg",
            "escape_length_m",
            "grain_size_m",
            "groove_width_m",
            "particle_aspect_max",
            "particle_height_ratio",
            "pore_radius_m",
            "pore_depth_ratio",
            "charge_saturation_e_per_nm2",
            "charge_leak_s",
            "charge_streak_s",
            "stage_speed_m_per_s",
            "stage_range_m",
            "max_fov_m",
        }
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _NON_NUMBER_FIELDS:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"SEMConfig.{f.name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"SEMConfig.{f.name} must be finite, got {value!r}")
            if f.name == "stage_tilt_deg":
                continue
            if f.name in positive and value <= 0:
                raise ConfigError(f"SEMConfig.{f.name} must be > 0, got {value!r}")
            if value < 0:
                raise ConfigError(f"SEMConfig.{f.name} must be >= 0, got {value!r}")
        self._check_tuples()
        if not isinstance(self.charging, bool):
            raise ConfigError(f"SEMConfig.charging must be True or False, got {self.charging!r}")
        if self.substrate not in MATERIALS:
            raise ConfigError(
                f"SEMConfig.substrate={self.substrate!r} is unknown; choose one of "
                f"{sorted(MATERIALS)}"
            )
        for name in ("collection_efficiency", "pore_shadow", "pore_depth_ratio"):
            if getattr(self, name) > 1.0:
                raise ConfigError(f"SEMConfig.{name}={getattr(self, name)!r} must be <= 1")
        if self.max_tilt_deg >= 89.5:
            raise ConfigError(f"SEMConfig.max_tilt_deg={self.max_tilt_deg!r} must be < 89.5")
        if abs(self.stage_tilt_deg) > 75.0:
            raise ConfigError(
                f"SEMConfig.stage_tilt_deg={self.stage_tilt_deg!r} outside -75 .. 75 degrees"
            )
        if self.max_fov_m > 2.0 * self.stage_range_m:
            raise ConfigError(
                f"SEMConfig.max_fov_m={self.max_fov_m!r} m is larger than the stage "
                f"(±{self.stage_range_m!r} m); shrink the field of view or widen the stage"
            )

    def _check_tuples(self) -> None:
        radii, dens = self.particle_radii_m, self.particle_densities_per_um2
        mats, weights = self.particle_materials, self.particle_material_weights
        for name in ("particle_radii_m", "particle_densities_per_um2", "particle_material_weights"):
            values = getattr(self, name)
            if not isinstance(values, tuple) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in values
            ):
                raise ConfigError(f"SEMConfig.{name} must be a tuple of numbers, got {values!r}")
            if any(v < 0 for v in values):
                raise ConfigError(f"SEMConfig.{name} must not be negative, got {values!r}")
        if any(r <= 0 for r in radii):
            raise ConfigError(f"SEMConfig.particle_radii_m must be > 0, got {radii!r}")
        if len(radii) != len(dens):
            raise ConfigError(
                f"SEMConfig.particle_radii_m {radii!r} and particle_densities_per_um2 {dens!r} "
                "need one entry per size class"
            )
        if not isinstance(mats, tuple) or not mats or any(m not in MATERIALS for m in mats):
            raise ConfigError(
                f"SEMConfig.particle_materials={mats!r} must name materials from "
                f"{sorted(MATERIALS)}"
            )
        if len(weights) != len(mats) or sum(weights) <= 0:
            raise ConfigError(
                f"SEMConfig.particle_material_weights={weights!r} needs one weight >= 0 per "
                f"material {mats!r}, not all zero"
            )

    def populations(self) -> tuple[Population, ...]:
        """The particle size classes and the pores as sample populations."""
        pops = [
            Population(
                "particle",
                k,
                r,
                d * 1e12,
                self.particle_aspect_max,
                self.particle_height_ratio,
                self.particle_materials,
                self.particle_material_weights,
            )
            for k, (r, d) in enumerate(
                zip(self.particle_radii_m, self.particle_densities_per_um2, strict=True)
            )
        ]
        pops.append(
            Population(
                "pore",
                0,
                self.pore_radius_m,
                self.pore_density_per_um2 * 1e12,
                1.3,
                self.pore_depth_ratio,
            )
        )
        return tuple(pops)

    @property
    def insulating_materials(self) -> tuple[str, ...]:
        return tuple(m for m in self.particle_materials if MATERIALS[m][1])
