"""Physics forward model of a constant-current STM, with ground truth.

A seeded, lazily generated sample (:mod:`simulators.stm_surface`) is imaged through a
Tersoff–Hamann LDOS (:mod:`simulators.stm_ldos`) by a tip whose apex changes state
(:mod:`simulators.stm_tip`), line by line in simulated time with drift, piezo creep and noise
(:mod:`simulators.noise`). Nothing reads the wall clock; every random draw comes from
generators seeded by ``seed``, so the same seed and the same call sequence give bit-identical
frames.

>>> sim = STMSimulator(seed=1)
>>> scan = sim.begin_frame(ScanRegion(), (64, 64), 1e-3)
>>> line = scan.next_line()
>>> line.shape, line.dtype.name
((64,), 'float32')

Image conventions follow :mod:`drivers.frame`: row 0 is the first line scanned, rows advance
along +y of the scan frame (rotated by ``region.rotation_deg``), columns along +x. Heights are
metres relative to the tip height over a flat terrace 0.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from drivers.errors import CommandRejected, ConfigError
from drivers.frame import ScanRegion, TipState
from simulators.checks import (
    check_region_centre,
    check_shape,
    check_stage_target,
    finite,
    seed_root,
)
from simulators.noise import CreepModel, DriftModel
from simulators.stm_config import (
    DAMAGE_RADIUS_M,
    DEFAULT_DWELL_S,
    DEFAULT_FRAME_TIME_S,
    DEFAULT_GAP_M,
    DEFAULT_SHAPE_PX,
    REFERENCE_CONDUCTANCE_S,
    STMConfig,
    frame_time_s,
)
from simulators.stm_grid import Grid
from simulators.stm_ldos import LDOSModel
from simulators.stm_scan import FrameScan
from simulators.stm_surface import SURFACES, SurfaceModel
from simulators.stm_tip import (
    CANONICAL_GOOD,
    Apex,
    TipConfig,
    TipModel,
    conditioning_probabilities,
    dip_strength,
    pulse_strength,
)

__all__ = [
    "DAMAGE_RADIUS_M",
    "DEFAULT_DWELL_S",
    "DEFAULT_FRAME_TIME_S",
    "DEFAULT_GAP_M",
    "DEFAULT_SHAPE_PX",
    "FrameScan",
    "STMConfig",
    "STMSimulator",
    "conditioning_probabilities",
    "frame_time_s",
]

logger = logging.getLogger(__name__)


class STMSimulator:
    """A simulated constant-current STM with a lazily generated sample and a changing tip."""

    def __init__(self, config: STMConfig | None = None, *, seed: int | None = None) -> None:
        cfg = STMConfig() if config is None else config
        if not isinstance(cfg, STMConfig):
            raise ConfigError(f"config must be an STMConfig, got {type(cfg).__name__}")
        self.config = cfg
        root = seed_root(seed)
        self.seed = int(root.entropy)  # type: ignore[arg-type]
        tip_ss, noise_ss, damage_ss, drift_ss = root.spawn(4)
        self._surface = SurfaceModel(
            SURFACES[cfg.surface],
            entropy=self.seed,
            defect_density_per_nm2=cfg.defect_density_per_nm2,
            terrace_width_m=cfg.terrace_width_m,
            herringbone_amplitude_m=cfg.herringbone_amplitude_m,
            lattice_angle_rad=(
                None if cfg.lattice_angle_deg is None else math.radians(cfg.lattice_angle_deg)
            ),
        )
        self._bias_V = cfg.bias_V
        self._ldos = self._make_ldos()
        self._tip = TipModel(
            np.random.default_rng(tip_ss),
            degradation_rate_per_s=cfg.degradation_rate_per_s,
            bad_change_rate_per_s=cfg.bad_tip_change_rate_per_s,
            unstable_switch_rate_per_s=cfg.unstable_switch_rate_per_s,
            initial=cfg.initial_tip,
        )
        self._noise_rng = np.random.default_rng(noise_ss)
        self._damage_rng = np.random.default_rng(damage_ss)
        self._drift = DriftModel.random(np.random.default_rng(drift_ss), cfg.drift_m_per_s)
        self._creep = CreepModel(cfg.creep_fraction, cfg.creep_time_s)
        self._t = 0.0
        self._pos = (0.0, 0.0)
        self._retracted = False
        self._epoch = 0  # bumped whenever the sample or the imaging conditions change
        self._frames = 0

    def _make_ldos(self) -> LDOSModel:
        cfg = self.config
        ratio = abs(cfg.setpoint_A / self._bias_V) / REFERENCE_CONDUCTANCE_S
        gap = DEFAULT_GAP_M[cfg.surface] if cfg.gap_m is None else cfg.gap_m
        return LDOSModel(
            self._surface, kappa_per_m=cfg.kappa_per_m, gap_m=gap, conductance_ratio=ratio
        )

    # -- state -----------------------------------------------------------------------------------

    @property
    def time_s(self) -> float:
        """Simulated time since construction."""
        return self._t

    @property
    def tip_state(self) -> TipState:
        return self._tip.state

    @property
    def tip_config(self) -> TipConfig:
        """The current apex geometry (ground truth)."""
        return self._tip.config

    @property
    def position_m(self) -> tuple[float, float]:
        """Commanded lateral tip position (sample coordinates); drift and creep come on top."""
        return self._pos

    @property
    def tip_retracted(self) -> bool:
        return self._retracted

    @property
    def bias_V(self) -> float:
        return self._bias_V

    @property
    def damage_sites_m(self) -> tuple[tuple[float, float, float], ...]:
        """``(x_m, y_m, radius_m)`` of every conditioning damage disc so far (ground truth)."""
        return self._surface.damage.sites()

    def offset_m(self, t_s: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Drift plus creep displacement of the tip from its commanded position at ``t_s``."""
        t = np.asarray(t_s, dtype=np.float64)
        dx, dy = self._drift.displacement_m(t)
        cx, cy = self._creep.displacement_m(t)
        return dx + cx, dy + cy

    def _actual_position(self) -> tuple[float, float]:
        ox, oy = self.offset_m(self._t)
        return self._pos[0] + float(ox), self._pos[1] + float(oy)

    def _pass_time(self, dt_s: float) -> list[tuple[float, TipConfig]]:
        events = self._tip.evolve(self._t, dt_s, active=not self._retracted)
        self._t += dt_s
        return events

    # -- actions ---------------------------------------------------------------------------------

    def advance(self, dt_s: float) -> None:
        """Let ``dt_s`` of simulated time pass (drift, creep, spontaneous tip changes)."""
        dt = finite("dt_s", dt_s)
        if dt < 0:
            raise CommandRejected(f"dt_s must be >= 0, got {dt_s!r}")
        self._pass_time(dt)

    def move_to(self, x_m: float, y_m: float) -> None:
        """Move the tip to ``(x_m, y_m)`` at ``move_speed_m_per_s``; starts piezo creep."""
        x, y = check_stage_target(x_m, y_m, self.config.stage_range_m)
        dx, dy = x - self._pos[0], y - self._pos[1]
        self._pass_time(math.hypot(dx, dy) / self.config.move_speed_m_per_s)
        self._creep.add_move(self._t, dx, dy)
        self._pos = (x, y)

    def retract(self) -> None:
        """Withdraw the tip: feedback off, z at the piezo limit; the tip stops changing."""
        self._retracted = True

    def approach(self) -> None:
        """Bring the tip back into tunnelling (takes ``approach_s``)."""
        if self._retracted:
            self._t += self.config.approach_s
            self._retracted = False

    def set_bias(self, bias_V: float) -> None:
        """Change the imaging bias (the tip height follows the new conductance setpoint)."""
        v = finite("bias_V", bias_V)
        if v == 0.0:
            raise CommandRejected("bias_V must be non-zero (no tunnelling current at 0 V)")
        self._bias_V = v
        self._ldos = self._make_ldos()
        self._epoch += 1

    def set_tip(
        self, state: TipState | str, apexes_m: Sequence[tuple[float, float, float]] | None = None
    ) -> None:
        """Put the tip in ``state`` (a random geometry for it, or the given apexes).

        ``apexes_m``: ``(dx_m, dy_m, dz_m)`` per apex, the first being the main one; used by
        tests and data generation (e.g. a double tip with a known offset).
        """
        try:
            st = TipState(state)
        except ValueError:
            raise CommandRejected(f"unknown tip state {state!r}") from None
        apexes = None
        if apexes_m is not None:
            apexes = tuple(Apex(float(a[0]), float(a[1]), float(a[2])) for a in apexes_m)
            if not apexes:
                raise CommandRejected("apexes_m must list at least one apex")
        self._tip.set_state(st, apexes)

    def _damage(self, kind: str, strength: float) -> float:
        radius = min(DAMAGE_RADIUS_M * math.sqrt(strength), 30e-9)
        if radius < 1e-9:
            return 0.0
        x, y = self._actual_position()
        self._surface.add_damage(self._damage_rng, x, y, radius, kind, strength)
        self._epoch += 1
        return radius

    def _condition(self, kind: str, strength: float, busy_s: float) -> dict[str, object]:
        if self._retracted:
            raise CommandRejected(f"cannot {kind} with the tip retracted; approach first")
        before = self._tip.state
        after = self._tip.condition(kind, strength)
        x, y = self._actual_position()
        radius = self._damage(kind, strength)
        self._pass_time(busy_s)
        logger.debug("%s strength %.2f: %s -> %s", kind, strength, before, after)
        return {
            "tip_before": str(before),
            "tip_after": str(after),
            "damage_radius_m": radius,
            "strength": strength,
            "x_m": x,
            "y_m": y,
            "time_s": self._t,
        }

    def pulse(self, bias_V: float, duration_s: float) -> dict[str, object]:
        """A bias pulse at the tip position; changes the tip stochastically, damages the sample.

        Returns JSON-able detail: ``tip_before``, ``tip_after``, ``damage_radius_m``,
        ``strength``, ``x_m``, ``y_m`` (where the damage is), ``time_s`` (after settling).
        """
        v, d = finite("bias_V", bias_V), finite("duration_s", duration_s)
        if d <= 0:
            raise CommandRejected(f"duration_s must be > 0, got {duration_s!r}")
        return self._condition("pulse", pulse_strength(v, d), d + self.config.pulse_settle_s)

    def dip(self, depth_m: float, bias_V: float) -> dict[str, object]:
        """A controlled dip ``depth_m`` into the sample at ``bias_V``; same detail as pulse."""
        depth, v = finite("depth_m", depth_m), finite("bias_V", bias_V)
        if depth <= 0:
            raise CommandRejected(f"depth_m must be > 0, got {depth_m!r}")
        busy = 2.0 * depth / self.config.dip_speed_m_per_s + self.config.dip_settle_s
        return self._condition("dip", dip_strength(depth, v), busy)

    # -- imaging ---------------------------------------------------------------------------------

    def _grid(
        self,
        region: ScanRegion,
        shape_px: tuple[int, int],
        rows: np.ndarray,
        offset: tuple[np.ndarray, np.ndarray] | None,
    ) -> Grid:
        h_px, w_px = shape_px
        th = math.radians(region.rotation_deg)
        c, s = math.cos(th), math.sin(th)
        u0 = -region.width_m / 2 + 0.5 * region.width_m / w_px
        v = -region.height_m / 2 + (rows + 0.5) * region.height_m / h_px
        x = region.center_x_m + c * u0 - s * v
        y = region.center_y_m + s * u0 + c * v
        if offset is not None:
            x = x + offset[0]
            y = y + offset[1]
        step = np.array([c, s]) * (region.width_m / w_px)
        return Grid(np.stack([x, y], axis=1), step, w_px)

    def render_clean(self, region: ScanRegion, shape_px: tuple[int, int]) -> np.ndarray:
        """``(H, W)`` float32 metres: the region as a good tip sees it, no noise, no drift."""
        shape = check_shape(shape_px)
        grid = self._grid(region, shape, np.arange(shape[0], dtype=np.float64), None)
        return self._ldos.render(grid, CANONICAL_GOOD).astype(np.float32)

    def begin_frame(
        self, region: ScanRegion, shape_px: tuple[int, int], dwell_s: float
    ) -> FrameScan:
        """Start scanning ``region`` (centred where the driver put the tip) line by line."""
        if not isinstance(region, ScanRegion):
            raise CommandRejected(f"region must be a ScanRegion, got {region!r}")
        shape = check_shape(shape_px)
        dwell = finite("dwell_s", dwell_s)
        if dwell <= 0:
            raise CommandRejected(f"dwell_s must be > 0, got {dwell_s!r}")
        check_region_centre(region, self.config.stage_range_m)
        self._frames += 1
        return FrameScan(self, region, shape, dwell, self._frames - 1)
