"""Configuration of the STM forward model: every physics and instrument parameter.

Defaults follow PHYSICS.md; names carry their units. The default scan is 256 x 256 pixels at
1 ms per pixel (:data:`DEFAULT_FRAME_TIME_S` = 131 s with retrace).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from drivers.errors import ConfigError
from drivers.frame import TipState
from simulators.stm_surface import SURFACES

DEFAULT_SHAPE_PX = (256, 256)
DEFAULT_DWELL_S = 1e-3
DEFAULT_FRAME_TIME_S = 2 * DEFAULT_SHAPE_PX[0] * DEFAULT_SHAPE_PX[1] * DEFAULT_DWELL_S
"""Trace plus retrace of the default 256 x 256 scan at 1 ms per pixel: 131.072 s."""

DEFAULT_GAP_M = {"au111": 2.4e-10, "hsi100": 3.5e-10}
"""Effective tip–atom-plane distance at 100 pA / 0.5 V per surface (see :class:`STMConfig`)."""

REFERENCE_CONDUCTANCE_S = 100e-12 / 0.5
DAMAGE_RADIUS_M = 25e-9
"""Radius of the damage disc of a strength-1 action (8 V / 0.2 s pulse, 5 nm dip); it scales
as sqrt(strength), capped at 30 nm: 2.5 V -> 14 nm, 4 V -> 18 nm, 0.8 nm dip -> 10 nm."""


def frame_time_s(shape_px: tuple[int, int], dwell_s: float) -> float:
    """Simulated time to scan a frame: trace and retrace of every line."""
    return 2.0 * shape_px[0] * shape_px[1] * dwell_s


@dataclass(frozen=True)
class STMConfig:
    """Physics and instrument parameters (PHYSICS.md defaults; units in the names).

    ``gap_m`` is the effective distance from the tip's s-orbital to the top atom plane at the
    reference conductance 100 pA / 0.5 V (None: the surface's default, :data:`DEFAULT_GAP_M`).
    The s-wave Tersoff–Hamann model underestimates the corrugation of close-packed metals at
    the real ~6 Å gap, so the defaults are small enough to give the observed corrugations:
    ~0.1 Å atomic corrugation on Au(111), ~1 Å across the H:Si(100) dimer rows. Changing
    ``setpoint_A`` or ``bias_V`` moves the tip by about ``ln(ratio) / 2 kappa`` from there.

    The default ``degradation_rate_per_s`` makes a good tip last 20 default frames on average;
    ``bad_tip_change_rate_per_s`` is how often a bad tip changes to another state by itself.
    """

    surface: str = "au111"
    kappa_per_m: float = 1.05e10
    gap_m: float | None = None
    setpoint_A: float = 100e-12
    bias_V: float = 0.5
    defect_density_per_nm2: float = 0.02
    terrace_width_m: float = 60e-9
    herringbone_amplitude_m: float = 0.15e-10
    lattice_angle_deg: float | None = None  # None: random per seed
    degradation_rate_per_s: float = 1.0 / (20.0 * DEFAULT_FRAME_TIME_S)
    bad_tip_change_rate_per_s: float = 0.2 / (20.0 * DEFAULT_FRAME_TIME_S)
    unstable_switch_rate_per_s: float = 0.3
    drift_m_per_s: float = 0.5e-9 / 60.0
    creep_fraction: float = 0.01
    creep_time_s: float = 60.0
    move_speed_m_per_s: float = 200e-9
    white_noise_m_per_sqrt_hz: float = 9e-14  # 2 pm RMS at 1 ms dwell
    flicker_noise_m_per_decade: float = 1e-12
    line_noise_m: float = 2e-12
    z_limit_m: float = 200e-9
    stage_range_m: float = 1e-6
    pulse_settle_s: float = 2.0
    dip_speed_m_per_s: float = 10e-9
    dip_settle_s: float = 5.0
    approach_s: float = 5.0
    initial_tip: TipState = TipState.GOOD

    def __post_init__(self) -> None:
        if not isinstance(self.surface, str) or self.surface not in SURFACES:
            raise ConfigError(
                f"STMConfig.surface={self.surface!r} is unknown; choose one of {sorted(SURFACES)}"
            )
        gap_m = DEFAULT_GAP_M[self.surface] if self.gap_m is None else self.gap_m
        object.__setattr__(self, "gap_m", gap_m)
        try:
            object.__setattr__(self, "initial_tip", TipState(self.initial_tip))
        except ValueError:
            raise ConfigError(
                f"STMConfig.initial_tip={self.initial_tip!r} is not a tip state; "
                f"choose one of {[str(s) for s in TipState]}"
            ) from None
        positive = {
            "kappa_per_m",
            "gap_m",
            "setpoint_A",
            "terrace_width_m",
            "creep_time_s",
            "move_speed_m_per_s",
            "z_limit_m",
            "stage_range_m",
            "dip_speed_m_per_s",
        }
        for f in fields(self):
            if f.name in ("surface", "initial_tip"):
                continue
            value = getattr(self, f.name)
            if f.name == "lattice_angle_deg" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"STMConfig.{f.name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"STMConfig.{f.name} must be finite, got {value!r}")
            if f.name in ("bias_V", "lattice_angle_deg"):
                continue
            if f.name in positive and value <= 0:
                raise ConfigError(f"STMConfig.{f.name} must be > 0, got {value!r}")
            if value < 0:
                raise ConfigError(f"STMConfig.{f.name} must be >= 0, got {value!r}")
        if self.bias_V == 0:
            raise ConfigError("STMConfig.bias_V must be non-zero (no tunnelling current at 0 V)")
        if not 1.5e-10 <= gap_m <= 1.5e-9:
            raise ConfigError(f"STMConfig.gap_m={self.gap_m!r} outside 1.5e-10 .. 1.5e-9 m")
        if not 5e9 <= self.kappa_per_m <= 2e10:
            raise ConfigError(f"STMConfig.kappa_per_m={self.kappa_per_m!r} outside 5e9 .. 2e10")
        if self.creep_fraction > 0.5:
            raise ConfigError(f"STMConfig.creep_fraction={self.creep_fraction!r} above 0.5")

    @property
    def conductance_ratio(self) -> float:
        return abs(self.setpoint_A / self.bias_V) / REFERENCE_CONDUCTANCE_S
