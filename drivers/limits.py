"""Limits: what an instrument can physically take, and what the operator allows.

All ranges are closed intervals ``(low, high)`` in SI units named in the field.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from drivers.errors import ConfigError

Range = tuple[float, float]


def _is_number(value: object) -> bool:
    """A real number that fits a float (not a bool, not an int too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _check_range(name: str, value: Range) -> None:
    if not isinstance(value, tuple) or len(value) != 2 or not all(_is_number(v) for v in value):
        raise ConfigError(f"Limits.{name} must be a (low, high) pair of numbers, got {value!r}")
    low, high = value
    if math.isnan(low) or math.isnan(high) or low > high:
        raise ConfigError(f"Limits.{name} must have low <= high, got {value!r}")


@dataclass(frozen=True)
class Limits:
    """Physical and operator limits of an instrument (the defaults suit a low-temperature STM).

    ``max_conditioning_per_window`` conditioning actions (pulses and dips) are allowed within any
    ``conditioning_window_s`` of instrument time, and never closer than
    ``min_conditioning_interval_s`` to the previous one.
    """

    bias_V: Range = (-10.0, 10.0)
    pulse_bias_V: Range = (-10.0, 10.0)
    pulse_duration_s: Range = (0.001, 1.0)
    dip_depth_m: Range = (0.0, 5e-9)
    dip_bias_V: Range = (-1.0, 1.0)
    dwell_s: Range = (1e-5, 1e-2)
    scan_size_m: Range = (1e-9, 1e-6)
    shape_px: tuple[int, int] = (16, 2048)
    stage_x_m: Range = (-1e-6, 1e-6)
    stage_y_m: Range = (-1e-6, 1e-6)
    min_conditioning_interval_s: float = 0.0
    max_conditioning_per_window: int = 1_000_000
    conditioning_window_s: float = 3600.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "shape_px":
                if not (
                    isinstance(value, tuple)
                    and len(value) == 2
                    and all(isinstance(n, int) and not isinstance(n, bool) for n in value)
                    and 0 < value[0] <= value[1]
                ):
                    raise ConfigError(
                        f"Limits.shape_px must be 0 < low <= high ints, got {value!r}"
                    )
            elif f.name == "max_conditioning_per_window":
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ConfigError(f"Limits.{f.name} must be an int >= 0, got {value!r}")
            elif f.type == "Range":
                _check_range(f.name, value)
            elif not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"Limits.{f.name} must be a finite number >= 0, got {value!r}")

    def narrowed(self, other: Limits) -> Limits:
        """The intersection of two limit sets (e.g. instrument limits and operator limits).

        Raises :class:`ConfigError` when a range would become empty.
        """
        values: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, tuple):
                low, high = max(mine[0], theirs[0]), min(mine[1], theirs[1])
                if low > high:
                    raise ConfigError(
                        f"operator limit {f.name}={theirs!r} does not overlap the instrument's "
                        f"{mine!r}"
                    )
                values[f.name] = (low, high)
            elif f.name == "max_conditioning_per_window":
                values[f.name] = min(mine, theirs)
            elif f.name == "conditioning_window_s":
                values[f.name] = max(mine, theirs)
            else:
                values[f.name] = max(mine, theirs)
        return Limits(**values)

    def to_json(self) -> dict[str, Any]:
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Limits:
        if not isinstance(obj, Mapping):
            raise ConfigError(f"limits must be a mapping, got {obj!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(obj) - names
        if unknown:
            raise ConfigError(
                f"unknown limit names {sorted(unknown, key=str)}; known: {sorted(names)}"
            )
        kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in obj.items()}
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None


#: A low-temperature STM's envelope: the simulated STM's and the Nanonis driver's default.
STM_LIMITS = Limits(
    bias_V=(-10.0, 10.0),
    pulse_bias_V=(-10.0, 10.0),
    pulse_duration_s=(0.001, 1.0),
    dip_depth_m=(0.0, 5e-9),
    dip_bias_V=(-1.0, 1.0),
    dwell_s=(1e-5, 1e-2),
    scan_size_m=(1e-9, 500e-9),
    shape_px=(16, 1024),
    stage_x_m=(-1e-6, 1e-6),
    stage_y_m=(-1e-6, 1e-6),
)
