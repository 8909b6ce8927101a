"""The Instrument protocol every driver implements (simulated, remote, real).

Capabilities are declared in :class:`InstrumentInfo`, never guessed. An instrument that cannot
execute a command raises :class:`~drivers.errors.CommandRejected`; one outside its limits raises
:class:`~drivers.errors.LimitViolation` (instruments enforce their own envelope too).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from drivers.commands import Capability, Command
from drivers.errors import ConfigError, DataError
from drivers.frame import Frame, ScanRegion
from drivers.limits import Limits

SPM_KINDS = ("stm", "afm")
"""Instrument kinds (:attr:`InstrumentInfo.kind`) that scan with a tip: a tip assessor can judge
their frames, and their defects model is the STM one."""


@dataclass(frozen=True)
class InstrumentInfo:
    """What an instrument is and what it can do. ``kind`` is ``stm``, ``stem``, ``sem``, ..."""

    kind: str
    id: str
    channels: tuple[str, ...]
    capabilities: frozenset[Capability]
    limits: Limits
    details: Mapping[str, Any] = field(default_factory=dict)

    def supports(self, command: Command) -> bool:
        return command.requires in self.capabilities

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "id": self.id,
            "channels": list(self.channels),
            "capabilities": sorted(str(c) for c in self.capabilities),
            "limits": self.limits.to_json(),
            "details": dict(self.details),
        }

    @classmethod
    def from_json(cls, obj: Any, what: str = "instrument info") -> InstrumentInfo:
        """The inverse of :meth:`to_json`; :class:`DataError` names ``what`` when ``obj`` is
        malformed (from a session store or over the wire: never trusted)."""
        try:
            return cls(
                kind=str(obj["kind"]),
                id=str(obj["id"]),
                channels=tuple(str(c) for c in obj["channels"]),
                capabilities=frozenset(Capability(c) for c in obj["capabilities"]),
                limits=Limits.from_json(obj["limits"]),
                details=dict(obj.get("details") or {}),
            )
        except (KeyError, TypeError, ValueError, AttributeError, ConfigError) as exc:
            raise DataError(f"{what} is malformed ({exc!r}): {obj!r:.200}") from None


@dataclass(frozen=True)
class InstrumentState:
    """A snapshot of the instrument. ``time_s`` is instrument time (simulated for simulators)."""

    position_m: tuple[float, float]
    scan_region: ScanRegion
    shape_px: tuple[int, int]
    dwell_s: float
    scanning: bool
    time_s: float
    frames_done: int
    connected: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "position_m": list(self.position_m),
            "scan_region": self.scan_region.to_json(),
            "shape_px": list(self.shape_px),
            "dwell_s": self.dwell_s,
            "scanning": self.scanning,
            "time_s": self.time_s,
            "frames_done": self.frames_done,
            "connected": self.connected,
            "extra": dict(self.extra),
        }


@dataclass(frozen=True)
class CommandResult:
    """What happened when an instrument executed a command (``detail`` is small and JSON-able)."""

    command_id: str
    ok: bool
    time_s: float
    detail: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class Instrument(Protocol):
    """A microscope the agent can drive. Implementations are thread-safe: ``execute`` may be
    called from another thread while ``stream`` is being iterated (it then takes effect between
    lines, as on a real controller)."""

    def info(self) -> InstrumentInfo: ...

    def state(self) -> InstrumentState: ...

    def acquire(self) -> Frame:
        """Scan one whole frame with the current settings and return it."""
        ...

    def stream(self) -> Iterator[Frame]:
        """Scan one frame, yielding partial frames (``lines_done`` rising) and last the complete
        frame, or a partial one if the scan was aborted."""
        ...

    def execute(self, command: Command) -> CommandResult: ...

    def close(self) -> None: ...
