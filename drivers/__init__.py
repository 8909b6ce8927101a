"""Instrument protocol, commands, frames, limits, the safety envelope and the drivers.

The shared nouns of scopepilot live here, once. ``open_instrument(uri)`` picks a driver.
"""

from drivers.commands import (
    AbortScan,
    Approach,
    Capability,
    Command,
    MoveTo,
    Retract,
    Scan,
    SetBias,
    SetDwell,
    SetScanPattern,
    TipDip,
    TipPulse,
    command_from_json,
    command_types,
)
from drivers.errors import (
    CommandRejected,
    CommunicationError,
    ConfigError,
    DataError,
    InstrumentError,
    LimitViolation,
    ModelError,
    NotConnected,
    ScopePilotError,
)
from drivers.frame import Defect, Frame, GroundTruth, ScanRegion, TipState, frame_problems
from drivers.limits import Limits
from drivers.observation import Decision, Observation, QualityEstimate, TipEstimate
from drivers.protocol import CommandResult, Instrument, InstrumentInfo, InstrumentState
from drivers.registry import known_schemes, open_instrument, register_scheme
from drivers.safety import ForbiddenArea, SafetyEnvelope

__all__ = [
    "AbortScan",
    "Approach",
    "Capability",
    "Command",
    "CommandRejected",
    "CommandResult",
    "CommunicationError",
    "ConfigError",
    "DataError",
    "Decision",
    "Defect",
    "ForbiddenArea",
    "Frame",
    "GroundTruth",
    "Instrument",
    "InstrumentError",
    "InstrumentInfo",
    "InstrumentState",
    "LimitViolation",
    "Limits",
    "ModelError",
    "MoveTo",
    "NotConnected",
    "Observation",
    "QualityEstimate",
    "Retract",
    "SafetyEnvelope",
    "Scan",
    "ScanRegion",
    "ScopePilotError",
    "SetBias",
    "SetDwell",
    "SetScanPattern",
    "TipDip",
    "TipEstimate",
    "TipPulse",
    "TipState",
    "command_from_json",
    "command_types",
    "frame_problems",
    "known_schemes",
    "open_instrument",
    "register_scheme",
]
