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
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

from drivers.errors import CommandRejected, ConfigError, LimitViolation
from drivers.frame import Defect, GroundTruth, ScanRegion, TipState
from simulators.noise import CreepModel, DriftModel, flicker_series, white_sigma_m
from simulators.stm_ldos import LDOSModel
from simulators.stm_surface import SURFACES, Grid, SurfaceModel
from simulators.stm_tip import (
    CANONICAL_GOOD,
    Apex,
    TipConfig,
    TipModel,
    dip_strength,
    pulse_strength,
)

logger = logging.getLogger(__name__)

DEFAULT_SHAPE_PX = (256, 256)
DEFAULT_DWELL_S = 1e-3
DEFAULT_FRAME_TIME_S = 2 * DEFAULT_SHAPE_PX[0] * DEFAULT_SHAPE_PX[1] * DEFAULT_DWELL_S
"""Trace plus retrace of the default 256 x 256 scan at 1 ms per pixel: 131.072 s."""

DEFAULT_GAP_M = {"au111": 2.4e-10, "hsi100": 3.5e-10}
"""Effective tip–atom-plane distance at 100 pA / 0.5 V per surface (see :class:`STMConfig`)."""

_REFERENCE_CONDUCTANCE_S = 100e-12 / 0.5
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
        if self.surface not in SURFACES:
            raise ConfigError(
                f"STMConfig.surface={self.surface!r} is unknown; choose one of {sorted(SURFACES)}"
            )
        if self.gap_m is None:
            object.__setattr__(self, "gap_m", DEFAULT_GAP_M[self.surface])
        try:
            object.__setattr__(self, "initial_tip", TipState(self.initial_tip))
        except ValueError:
            raise ConfigError(
                f"STMConfig.initial_tip={self.initial_tip!r} is not a tip state; "
                f"choose one of {[str(s) for s in TipState]}"
            ) from None
        positive = {
            "kappa_per_m", "gap_m", "setpoint_A", "terrace_width_m", "creep_time_s",
            "move_speed_m_per_s", "z_limit_m", "stage_range_m", "dip_speed_m_per_s",
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
        if not 1.5e-10 <= float(self.gap_m) <= 1.5e-9:
            raise ConfigError(f"STMConfig.gap_m={self.gap_m!r} outside 1.5e-10 .. 1.5e-9 m")
        if not 5e9 <= self.kappa_per_m <= 2e10:
            raise ConfigError(f"STMConfig.kappa_per_m={self.kappa_per_m!r} outside 5e9 .. 2e10")
        if self.creep_fraction > 0.5:
            raise ConfigError(f"STMConfig.creep_fraction={self.creep_fraction!r} above 0.5")

    @property
    def conductance_ratio(self) -> float:
        return abs(self.setpoint_A / self.bias_V) / _REFERENCE_CONDUCTANCE_S


def _finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CommandRejected(f"{name} must be a finite number, got {value!r}")
    return float(value)


class STMSimulator:
    """A simulated constant-current STM with a lazily generated sample and a changing tip."""

    def __init__(self, config: STMConfig | None = None, *, seed: int | None = None) -> None:
        cfg = STMConfig() if config is None else config
        if not isinstance(cfg, STMConfig):
            raise ConfigError(f"config must be an STMConfig, got {type(cfg).__name__}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ConfigError(f"seed must be a non-negative int or None, got {seed!r}")
        self.config = cfg
        root = np.random.SeedSequence(seed)
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
        ratio = abs(cfg.setpoint_A / self._bias_V) / _REFERENCE_CONDUCTANCE_S
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
        return tuple((e.x_m, e.y_m, e.radius_m) for e in self._surface.damage)

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
        dt = _finite("dt_s", dt_s)
        if dt < 0:
            raise CommandRejected(f"dt_s must be >= 0, got {dt_s!r}")
        self._pass_time(dt)

    def move_to(self, x_m: float, y_m: float) -> None:
        """Move the tip to ``(x_m, y_m)`` at ``move_speed_m_per_s``; starts piezo creep."""
        x, y = _finite("x_m", x_m), _finite("y_m", y_m)
        limit = self.config.stage_range_m
        for name, v in (("x_m", x), ("y_m", y)):
            if abs(v) > limit:
                raise LimitViolation(
                    f"move_to {name}={v!r} is outside the stage range ±{limit!r} m",
                    value=v, limit=(-limit, limit), field=name,
                )
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
        v = _finite("bias_V", bias_V)
        if v == 0.0:
            raise CommandRejected("bias_V must be non-zero (no tunnelling current at 0 V)")
        self._bias_V = v
        self._ldos = self._make_ldos()
        self._epoch += 1

    def set_tip(self, state: TipState | str,
                apexes_m: Sequence[tuple[float, float, float]] | None = None) -> None:
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
        v, d = _finite("bias_V", bias_V), _finite("duration_s", duration_s)
        if d <= 0:
            raise CommandRejected(f"duration_s must be > 0, got {duration_s!r}")
        return self._condition("pulse", pulse_strength(v, d), d + self.config.pulse_settle_s)

    def dip(self, depth_m: float, bias_V: float) -> dict[str, object]:
        """A controlled dip ``depth_m`` into the sample at ``bias_V``; same detail as pulse."""
        depth, v = _finite("depth_m", depth_m), _finite("bias_V", bias_V)
        if depth <= 0:
            raise CommandRejected(f"depth_m must be > 0, got {depth_m!r}")
        busy = 2.0 * depth / self.config.dip_speed_m_per_s + self.config.dip_settle_s
        return self._condition("dip", dip_strength(depth, v), busy)

    # -- imaging ---------------------------------------------------------------------------------

    def _grid(self, region: ScanRegion, shape_px: tuple[int, int], rows: np.ndarray,
              offset: tuple[np.ndarray, np.ndarray] | None) -> Grid:
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
        shape = _check_shape(shape_px)
        grid = self._grid(region, shape, np.arange(shape[0], dtype=np.float64), None)
        return self._ldos.render(grid, CANONICAL_GOOD).astype(np.float32)

    def begin_frame(self, region: ScanRegion, shape_px: tuple[int, int],
                    dwell_s: float) -> FrameScan:
        """Start scanning ``region`` (centred where the driver put the tip) line by line."""
        if not isinstance(region, ScanRegion):
            raise CommandRejected(f"region must be a ScanRegion, got {region!r}")
        shape = _check_shape(shape_px)
        dwell = _finite("dwell_s", dwell_s)
        if dwell <= 0:
            raise CommandRejected(f"dwell_s must be > 0, got {dwell_s!r}")
        limit = self.config.stage_range_m + max(region.width_m, region.height_m)
        for name in ("center_x_m", "center_y_m"):
            v = getattr(region, name)
            if abs(v) > limit:
                raise LimitViolation(
                    f"scan region {name}={v!r} is outside the stage range", value=v,
                    limit=(-limit, limit), field=name,
                )
        self._frames += 1
        return FrameScan(self, region, shape, dwell, self._frames - 1)


def _check_shape(shape_px: tuple[int, int]) -> tuple[int, int]:
    try:
        h, w = shape_px
    except (TypeError, ValueError):
        raise CommandRejected(f"shape_px must be (rows, cols), got {shape_px!r}") from None
    for v in (h, w):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= 8192:
            raise CommandRejected(f"shape_px must be two ints in 1..8192, got {shape_px!r}")
    return int(h), int(w)


class FrameScan:
    """One frame being scanned line by line in simulated time.

    ``next_line()`` scans row ``lines_done`` (trace and retrace, ``2 W dwell_s``), reflecting
    the tip as it is during that line: a tip change mid-line splits the line. Actions on the
    simulator between lines (pulse, dip, move, advance) show in the remaining lines.
    ``data`` holds the lines scanned so far (NaN after them).
    """

    def __init__(self, sim: STMSimulator, region: ScanRegion, shape_px: tuple[int, int],
                 dwell_s: float, index: int) -> None:
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
        self._white = rng.standard_normal(shape_px, dtype=np.float32)
        self._line_offset = rng.standard_normal(h_px) * cfg.line_noise_m
        flicker = flicker_series(rng, h_px * 2 * w_px, dwell_s, cfg.flicker_noise_m_per_decade)
        self._flicker = flicker.reshape(h_px, 2 * w_px)[:, :w_px]
        self._row_t = np.zeros(h_px)
        self._rows_m = np.zeros((h_px, 2))
        self._step_m = np.zeros(2)
        self._cache: dict[int, tuple[int, np.ndarray]] = {}
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

    def _rendered(self, row: int, config: TipConfig) -> np.ndarray:
        hit = self._cache.get(config.id)
        if hit is None or hit[0] > row:
            grid = Grid(self._rows_m[row:], self._step_m, self.shape_px[1])
            hit = (row, self._sim._ldos.render(grid, config))
            self._cache[config.id] = hit
        return hit[1][row - hit[0]]

    def _line_values(self, row: int, config: TipConfig, retracted: bool) -> np.ndarray:
        w_px = self.shape_px[1]
        z_limit = self._sim.config.z_limit_m
        if retracted:
            return np.full(w_px, z_limit)
        if config.state is TipState.CRASHED:
            # Feedback saturated: pinned below the limit, wandering with the 1/f noise.
            return z_limit - config.crash_depth_m + 4.0 * self._flicker[row]
        return self._rendered(row, config)

    def next_line(self) -> np.ndarray:
        """Scan the next row: ``(W,)`` float32 metres; advances simulated time by a line."""
        if self.done:
            raise CommandRejected(f"frame {self.index} is complete ({self.shape_px[0]} lines)")
        sim = self._sim
        row = self.lines_done
        w_px = self.shape_px[1]
        t0 = sim.time_s
        if abs(t0 - self._row_t[row]) > 1e-9 or sim._epoch != self._epoch:
            self._epoch = sim._epoch
            self._plan(row, t0)
        retracted = sim.tip_retracted
        segments: list[tuple[int, TipConfig]] = [(0, sim._tip.config)]
        previous = sim._tip.config
        for t_event, config in sim._pass_time(self.line_time_s):
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
        line += self._sigma_white * self._white[row] + self._line_offset[row] + self._flicker[row]
        self._line_states.append(majority)
        if retracted:
            self._retracted_lines += 1
        out = line.astype(np.float32)
        self.data[row] = out
        self._row_t[row] = t0
        self.lines_done += 1
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
        # Signed distance of each defect ahead of each row, (H, n): decreasing with the row.
        ahead = (pts[None, :, :] - grid.rows_m[:, None, :]) @ normal
        below = np.clip(np.sum(ahead > 0, axis=0), 1, max(h_px - 1, 1))
        k0 = below - 1
        cols_n = np.arange(pts.shape[0])
        if h_px > 1:
            a0, a1 = ahead[k0, cols_n], ahead[np.minimum(k0 + 1, h_px - 1), cols_n]
            frac = np.where(a0 != a1, a0 / np.where(a0 != a1, a0 - a1, 1.0), 0.0)
            row = k0 + frac
        else:
            row = (ahead[0] / (self.region.height_m / h_px)).astype(np.float64)
        k_near = np.clip(np.rint(row).astype(np.int64), 0, h_px - 1)
        col = (pts - grid.rows_m[k_near]) @ step / float(step @ step)
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
        x, y = grid.xy()
        damaged = float(np.mean(sim._surface.damage_at(x, y) > 0.5)) if sim._surface.damage else 0.0
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
