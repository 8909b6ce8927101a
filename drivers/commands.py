"""Typed, immutable instrument commands with a JSON form for records and the wire.

Every command carries an ``id``, the ``source`` that issued it (policy name, ``operator``,
``console``) and the ``reason`` given. Values carry their units in their names.

>>> cmd = TipPulse(4.0, 0.2, source="rule", reason="3 bad frames")
>>> command_from_json(cmd.to_json()) == cmd
True
"""

from __future__ import annotations

import dataclasses
import json
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

from drivers.errors import DataError
from drivers.frame import ScanRegion


class Capability(StrEnum):
    """What an instrument can do; each command requires one."""

    SCAN = "scan"  # Scan, SetDwell, AbortScan
    STAGE = "stage"  # MoveTo
    TIP_CONDITIONING = "tip_conditioning"  # TipPulse, TipDip
    Z_CONTROL = "z_control"  # Approach, Retract
    BIAS = "bias"  # SetBias
    PARTIAL_SCAN = "partial_scan"  # sparse scan patterns (STEM/SEM)


def new_command_id() -> str:
    return uuid.uuid4().hex[:12]


_REGISTRY: dict[str, type[Command]] = {}


def _finite_float(command: Command, name: str, value: object) -> float:
    """``value`` as a finite float, or :class:`DataError` naming the field and the value."""
    where = f"{type(command).__name__}.{name}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where} must be a number, got {value!r}")
    try:
        number = float(value)  # an int too large for a float raises OverflowError
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise DataError(f"{where} must be finite, got {value!r}")
    return number


@dataclass(frozen=True)
class Command:
    """Base of all commands. Subclasses add typed fields with units in their names."""

    requires: ClassVar[Capability] = Capability.SCAN

    id: str = field(default_factory=new_command_id, kw_only=True, compare=False)
    source: str = field(default="policy", kw_only=True, compare=False)
    reason: str = field(default="", kw_only=True, compare=False)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("id", "source", "reason"):
                if not isinstance(value, str):
                    raise DataError(
                        f"{type(self).__name__}.{f.name} must be a string, got {value!r}"
                    )
                continue
            if f.type in ("float", float):
                object.__setattr__(self, f.name, _finite_float(self, f.name, value))

    @property
    def kind(self) -> str:
        return type(self).__name__

    def params(self) -> dict[str, Any]:
        """The command's own fields (without id, source, reason) as JSON-able values."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("id", "source", "reason"):
                continue
            value = getattr(self, f.name)
            if isinstance(value, ScanRegion):
                value = value.to_json()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "id": self.id,
            "source": self.source,
            "reason": self.reason,
            **self.params(),
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)

    def with_meta(self, *, source: str | None = None, reason: str | None = None) -> Command:
        """A copy with another source or reason (same id)."""
        return dataclasses.replace(
            self,
            source=self.source if source is None else source,
            reason=self.reason if reason is None else reason,
        )

    def __repr__(self) -> str:
        parts = []
        for name, value in self.params().items():
            if isinstance(value, float):
                parts.append(f"{name}={value:.4g}")
            else:
                parts.append(f"{name}={value!r}")
        text = f"{self.kind}({', '.join(parts)}) #{self.id}"
        if self.source:
            text += f" from {self.source}"
        if self.reason:
            text += f": {self.reason}"
        return text


@dataclass(frozen=True, repr=False)
class Scan(Command):
    """Scan ``region`` with ``shape_px`` = (rows, cols) at ``dwell_s`` per pixel.

    Any of them may be None to keep the instrument's current value.
    """

    region: ScanRegion | None = None
    shape_px: tuple[int, int] | None = None
    dwell_s: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.region is not None and not isinstance(self.region, ScanRegion):
            raise DataError(f"Scan.region must be a ScanRegion, got {self.region!r}")
        if self.shape_px is not None:
            if not isinstance(self.shape_px, (tuple, list)):
                raise DataError(f"Scan.shape_px must be two positive ints, got {self.shape_px!r}")
            shape = tuple(self.shape_px)
            if len(shape) != 2 or not all(
                isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape
            ):
                raise DataError(f"Scan.shape_px must be two positive ints, got {self.shape_px!r}")
            object.__setattr__(self, "shape_px", shape)
        if self.dwell_s is not None:
            dwell_s = _finite_float(self, "dwell_s", self.dwell_s)
            if dwell_s <= 0:
                raise DataError(f"Scan.dwell_s must be positive and finite, got {self.dwell_s!r}")
            object.__setattr__(self, "dwell_s", dwell_s)


@dataclass(frozen=True, repr=False)
class SetDwell(Command):
    """Set the per-pixel dwell time for the following scans."""

    dwell_s: float


@dataclass(frozen=True, repr=False)
class MoveTo(Command):
    """Move the tip/beam (and the scan centre) to sample position (x_m, y_m)."""

    requires: ClassVar[Capability] = Capability.STAGE
    x_m: float
    y_m: float


@dataclass(frozen=True, repr=False)
class TipPulse(Command):
    """A bias pulse of ``bias_V`` for ``duration_s`` at the current tip position."""

    requires: ClassVar[Capability] = Capability.TIP_CONDITIONING
    bias_V: float
    duration_s: float = 0.2


@dataclass(frozen=True, repr=False)
class TipDip(Command):
    """A controlled dip of the tip ``depth_m`` into the surface at ``bias_V``."""

    requires: ClassVar[Capability] = Capability.TIP_CONDITIONING
    depth_m: float
    bias_V: float = 0.02


@dataclass(frozen=True, repr=False)
class SetBias(Command):
    """Set the sample bias for imaging."""

    requires: ClassVar[Capability] = Capability.BIAS
    bias_V: float


@dataclass(frozen=True, repr=False)
class AbortScan(Command):
    """Stop the scan in progress; the partial frame is delivered as it is."""


@dataclass(frozen=True, repr=False)
class Retract(Command):
    """Withdraw the tip from the surface (feedback off)."""

    requires: ClassVar[Capability] = Capability.Z_CONTROL


@dataclass(frozen=True, repr=False)
class Approach(Command):
    """Approach the tip to tunnelling range (feedback on)."""

    requires: ClassVar[Capability] = Capability.Z_CONTROL


def command_types() -> dict[str, type[Command]]:
    """Every known command type by name."""
    return dict(_REGISTRY)


def command_from_json(obj: Mapping[str, Any] | str | bytes) -> Command:
    """Parse the JSON form (a mapping, or a JSON string or UTF-8 bytes) back into a command.

    Raises :class:`DataError` naming the problem for malformed input, unknown types, missing or
    unknown fields and wrong value types.
    """
    if isinstance(obj, (str, bytes)):
        try:
            obj = json.loads(obj)
        except (ValueError, RecursionError) as exc:
            # ValueError covers JSONDecodeError, UnicodeDecodeError and Python's limit on the
            # digits of an int; RecursionError is what absurdly deep nesting raises.
            raise DataError(f"command is not valid JSON: {exc}") from None
    if not isinstance(obj, Mapping):
        raise DataError(f"command JSON must be an object, got {type(obj).__name__}")
    kind = obj.get("type")
    cls = _REGISTRY.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise DataError(
            f"unknown command type {kind!r}; known types: {', '.join(sorted(_REGISTRY))}"
        )
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(obj) - names - {"type"}
    if unknown:
        raise DataError(
            f"{kind} has no fields {sorted(unknown, key=str)}; fields are {sorted(names)}"
        )
    kwargs: dict[str, Any] = {k: v for k, v in obj.items() if k != "type"}
    if "region" in kwargs and kwargs["region"] is not None:
        kwargs["region"] = ScanRegion.from_json(kwargs["region"])
    if "shape_px" in kwargs and isinstance(kwargs["shape_px"], list):
        kwargs["shape_px"] = tuple(kwargs["shape_px"])
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise DataError(f"{kind}: {exc}") from None


SCAN_PATTERNS: tuple[str, ...] = ("raster", "random", "lines", "spiral")


@dataclass(frozen=True, repr=False)
class SetScanPattern(Command):
    """Scan the following frames with ``pattern`` visiting ``fraction`` of the pixels.

    ``raster`` visits every pixel (``fraction`` 1); ``random`` (random pixels), ``lines``
    (every k-th line) and ``spiral`` are partial scans: the pixels they skip are NaN.
    """

    requires: ClassVar[Capability] = Capability.PARTIAL_SCAN
    pattern: str = "raster"
    fraction: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.pattern, str) or self.pattern not in SCAN_PATTERNS:
            raise DataError(
                f"SetScanPattern.pattern must be one of {SCAN_PATTERNS}, got {self.pattern!r}"
            )
        if not 0.0 < self.fraction <= 1.0:
            raise DataError(f"SetScanPattern.fraction must be in (0, 1], got {self.fraction!r}")
        if self.pattern == "raster" and self.fraction != 1.0:
            raise DataError(
                f"SetScanPattern: a raster visits every pixel, so fraction must be 1, got "
                f"{self.fraction!r}; use 'random', 'lines' or 'spiral' for partial scans"
            )
