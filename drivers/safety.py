"""The safety envelope: every command is checked here before it reaches an instrument.

A violation raises :class:`LimitViolation` carrying the value, the limit and the command id.
The envelope is thread-safe; rate limits count conditioning actions that were actually executed
(:meth:`SafetyEnvelope.record_executed`), in instrument time.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from drivers.commands import (
    Command,
    MoveTo,
    Scan,
    SetBias,
    SetDwell,
    TipDip,
    TipPulse,
)
from drivers.errors import ConfigError, LimitViolation
from drivers.frame import ScanRegion
from drivers.limits import Limits, Range


@dataclass(frozen=True)
class ForbiddenArea:
    """A disc of the sample the tip/beam must not scan, visit or condition over."""

    x_m: float
    y_m: float
    radius_m: float
    label: str = ""

    def __post_init__(self) -> None:
        for name in ("x_m", "y_m", "radius_m"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"ForbiddenArea.{name} must be a number, got {value!r}")
        if not all(math.isfinite(v) for v in (self.x_m, self.y_m, self.radius_m)):
            raise ConfigError(f"ForbiddenArea values must be finite, got {self!r}")
        if self.radius_m <= 0:
            raise ConfigError(f"ForbiddenArea.radius_m must be > 0, got {self.radius_m!r}")

    def contains(self, x_m: float, y_m: float) -> bool:
        return math.hypot(x_m - self.x_m, y_m - self.y_m) <= self.radius_m

    def overlaps(self, region: ScanRegion) -> bool:
        """Whether the disc touches the (axis-aligned bounding box of the) scan region."""
        half_w, half_h = region.width_m / 2, region.height_m / 2
        if region.rotation_deg % 180:
            half_w = half_h = math.hypot(half_w, half_h)
        dx = max(abs(self.x_m - region.center_x_m) - half_w, 0.0)
        dy = max(abs(self.y_m - region.center_y_m) - half_h, 0.0)
        return math.hypot(dx, dy) <= self.radius_m


def _within(value: float, allowed: Range) -> bool:
    return allowed[0] <= value <= allowed[1]


class SafetyEnvelope:
    """Checks commands against :class:`Limits` and forbidden areas.

    ``limits`` are the instrument's; ``operator_limits`` (optional) narrow them further.
    """

    def __init__(
        self,
        limits: Limits,
        *,
        operator_limits: Limits | None = None,
        forbidden: Iterable[ForbiddenArea] = (),
    ) -> None:
        self.instrument_limits = limits
        self.limits = limits.narrowed(operator_limits) if operator_limits is not None else limits
        self._forbidden: list[ForbiddenArea] = list(forbidden)
        self._conditioning_times: deque[float] = deque()
        self._lock = threading.Lock()

    @property
    def forbidden(self) -> tuple[ForbiddenArea, ...]:
        with self._lock:
            return tuple(self._forbidden)

    def forbid(self, area: ForbiddenArea) -> None:
        with self._lock:
            self._forbidden.append(area)

    def set_operator_limits(self, operator_limits: Limits | None) -> None:
        narrowed = (
            self.instrument_limits
            if operator_limits is None
            else self.instrument_limits.narrowed(operator_limits)
        )
        with self._lock:
            self.limits = narrowed

    def _violation(
        self, command: Command, field: str, value: object, limit: object, why: str = ""
    ) -> LimitViolation:
        text = why or f"outside the allowed range {limit!r}"
        return LimitViolation(
            f"{command.kind} #{command.id}: {field}={value!r} is {text}",
            value=value,
            limit=limit,
            command_id=command.id,
            field=field,
        )

    def _check_range(self, command: Command, field: str, value: float, allowed: Range) -> None:
        if not _within(value, allowed):
            raise self._violation(command, field, value, allowed)

    def _check_position(self, command: Command, field: str, x_m: float, y_m: float) -> None:
        lim = self.limits
        if not (_within(x_m, lim.stage_x_m) and _within(y_m, lim.stage_y_m)):
            raise self._violation(
                command,
                field,
                (x_m, y_m),
                (lim.stage_x_m, lim.stage_y_m),
                "outside the stage range",
            )
        for area in self._forbidden:
            if area.contains(x_m, y_m):
                raise self._violation(
                    command, field, (x_m, y_m), area, f"inside forbidden area {area.label!r}"
                )

    def check(
        self,
        command: Command,
        *,
        position_m: tuple[float, float] = (0.0, 0.0),
        now_s: float = 0.0,
    ) -> None:
        """Raise :class:`LimitViolation` if ``command`` may not run now at ``position_m``."""
        with self._lock:
            self._check(command, position_m, now_s)

    def _check(self, command: Command, position_m: tuple[float, float], now_s: float) -> None:
        lim = self.limits
        if isinstance(command, (TipPulse, TipDip)):
            if isinstance(command, TipPulse):
                self._check_range(command, "bias_V", command.bias_V, lim.pulse_bias_V)
                self._check_range(command, "duration_s", command.duration_s, lim.pulse_duration_s)
            else:
                self._check_range(command, "depth_m", command.depth_m, lim.dip_depth_m)
                self._check_range(command, "bias_V", command.bias_V, lim.dip_bias_V)
            self._check_position(command, "position_m", *position_m)
            self._check_rate(command, now_s)
        elif isinstance(command, SetDwell):
            self._check_range(command, "dwell_s", command.dwell_s, lim.dwell_s)
        elif isinstance(command, SetBias):
            self._check_range(command, "bias_V", command.bias_V, lim.bias_V)
        elif isinstance(command, MoveTo):
            self._check_position(command, "target_m", command.x_m, command.y_m)
        elif isinstance(command, Scan):
            self._check_scan(command)

    def _check_scan(self, command: Scan) -> None:
        lim = self.limits
        if command.dwell_s is not None:
            self._check_range(command, "dwell_s", command.dwell_s, lim.dwell_s)
        if command.shape_px is not None:
            for n in command.shape_px:
                self._check_range(command, "shape_px", n, lim.shape_px)
        region = command.region
        if region is None:
            return
        self._check_range(command, "width_m", region.width_m, lim.scan_size_m)
        self._check_range(command, "height_m", region.height_m, lim.scan_size_m)
        self._check_position(command, "center_m", region.center_x_m, region.center_y_m)
        half = math.hypot(region.width_m, region.height_m) / 2 if region.rotation_deg % 180 else 0.0
        half_x = half or region.width_m / 2
        half_y = half or region.height_m / 2
        x_lo, x_hi = region.center_x_m - half_x, region.center_x_m + half_x
        y_lo, y_hi = region.center_y_m - half_y, region.center_y_m + half_y
        if not (
            _within(x_lo, lim.stage_x_m)
            and _within(x_hi, lim.stage_x_m)
            and _within(y_lo, lim.stage_y_m)
            and _within(y_hi, lim.stage_y_m)
        ):
            raise self._violation(
                command,
                "region",
                ((x_lo, x_hi), (y_lo, y_hi)),
                (lim.stage_x_m, lim.stage_y_m),
                "extending outside the stage range",
            )
        for area in self._forbidden:
            if area.overlaps(region):
                raise self._violation(
                    command, "region", region, area, f"overlapping forbidden area {area.label!r}"
                )

    def _check_rate(self, command: Command, now_s: float) -> None:
        # A check is a query: it must not forget executed actions (a dry run at a later time
        # would otherwise erase history that a later real check still needs).
        lim = self.limits
        times = [t for t in self._conditioning_times if t > now_s - lim.conditioning_window_s]
        last = max(self._conditioning_times, default=None)
        if last is not None and now_s - last < lim.min_conditioning_interval_s:
            raise self._violation(
                command,
                "interval_s",
                now_s - last,
                lim.min_conditioning_interval_s,
                f"shorter than the minimum interval {lim.min_conditioning_interval_s} s "
                "between conditioning actions",
            )
        if len(times) >= lim.max_conditioning_per_window:
            raise self._violation(
                command,
                "rate",
                len(times) + 1,
                lim.max_conditioning_per_window,
                f"more than {lim.max_conditioning_per_window} conditioning actions within "
                f"{lim.conditioning_window_s} s",
            )

    def record_executed(self, command: Command, *, now_s: float) -> None:
        """Count an executed command towards the rate limits."""
        if isinstance(command, (TipPulse, TipDip)):
            with self._lock:
                times = self._conditioning_times
                horizon = now_s - self.limits.conditioning_window_s
                while times and times[0] <= horizon:
                    times.popleft()
                times.append(now_s)
