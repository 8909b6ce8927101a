"""Argument checks shared by the simulators (clear errors, nothing changed on bad input)."""

from __future__ import annotations

import math

import numpy as np

from drivers.errors import CommandRejected, ConfigError, LimitViolation
from drivers.frame import ScanRegion


def finite(name: str, value: float) -> float:
    """``value`` as a float; a bool, non-number, NaN or inf raises :class:`CommandRejected`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CommandRejected(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_stage_target(x_m: float, y_m: float, stage_range_m: float) -> tuple[float, float]:
    """A move target inside ``±stage_range_m`` on both axes, else :class:`LimitViolation`."""
    x, y = finite("x_m", x_m), finite("y_m", y_m)
    for name, v in (("x_m", x), ("y_m", y)):
        if abs(v) > stage_range_m:
            raise LimitViolation(
                f"move_to {name}={v!r} is outside the stage range ±{stage_range_m!r} m",
                value=v,
                limit=(-stage_range_m, stage_range_m),
                field=name,
            )
    return x, y


def check_region_centre(region: ScanRegion, stage_range_m: float) -> None:
    """The scan centre must lie within the stage range plus the scan size."""
    limit = stage_range_m + max(region.width_m, region.height_m)
    for name in ("center_x_m", "center_y_m"):
        v = getattr(region, name)
        if abs(v) > limit:
            raise LimitViolation(
                f"scan region {name}={v!r} is outside the stage range",
                value=v,
                limit=(-limit, limit),
                field=name,
            )


def seed_root(seed: int | None) -> np.random.SeedSequence:
    """The root of a simulator's random streams; ``seed`` must be a non-negative int or None
    (None draws fresh entropy, recorded in ``root.entropy`` so the run can be repeated)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ConfigError(f"seed must be a non-negative int or None, got {seed!r}")
    return np.random.SeedSequence(seed)


def check_shape(
    shape_px: tuple[int, int], *, min_px: int = 1, error: type[Exception] = CommandRejected
) -> tuple[int, int]:
    """``shape_px`` as two ints in ``min_px``..8192, else ``error`` naming the value."""
    try:
        h, w = shape_px
    except (TypeError, ValueError):
        raise error(f"shape_px must be (rows, cols), got {shape_px!r}") from None
    for v in (h, w):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not min_px <= v <= 8192:
            raise error(f"shape_px must be two ints in {min_px}..8192, got {shape_px!r}")
    return int(h), int(w)
