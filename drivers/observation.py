"""What a policy sees (:class:`Observation`) and what it returns (:class:`Decision`).

Policies never talk to instruments: they get observations and return decisions, which the agent
passes through the safety gate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from drivers.commands import Command
from drivers.frame import Frame, TipState
from drivers.protocol import InstrumentInfo, InstrumentState


@dataclass(frozen=True)
class TipEstimate:
    """A perception output about the tip.

    ``probabilities`` sum to 1 over :class:`TipState`; ``uncertainty`` is in [0, 1] (0 = sure);
    ``features`` are the diagnostic numbers the estimate rests on (for records and replay).
    """

    state: TipState
    probabilities: Mapping[TipState, float]
    uncertainty: float
    source: str
    features: Mapping[str, float] = field(default_factory=dict)

    @property
    def p_good(self) -> float:
        return float(self.probabilities.get(TipState.GOOD, 0.0))

    def to_json(self) -> dict[str, Any]:
        return {
            "state": str(self.state),
            "probabilities": {str(k): float(v) for k, v in self.probabilities.items()},
            "uncertainty": float(self.uncertainty),
            "source": self.source,
            "features": {k: float(v) for k, v in self.features.items()},
        }


@dataclass(frozen=True)
class QualityEstimate:
    """How good the image itself is (independent of the tip): ``snr`` = signal std / noise std.

    ``noise_std`` and ``signal_std`` are in the frame's data units.
    """

    snr: float
    noise_std: float
    signal_std: float
    source: str = "classical"

    def to_json(self) -> dict[str, Any]:
        return {
            "snr": float(self.snr),
            "noise_std": float(self.noise_std),
            "signal_std": float(self.signal_std),
            "source": self.source,
        }


@dataclass(frozen=True)
class Observation:
    """The freshest complete frame, what perception made of it, and context.

    ``problems`` lists why the frame must not be acted on (empty when it is fine);
    ``history`` holds the tip estimates of earlier frames, oldest first; ``quality`` is the
    image-quality estimate (None when no quality assessor runs); ``pending_commands`` counts the
    commands still waiting for the operator's approval (supervised mode); ``advisory`` is true
    when the agent will not carry out the policy's commands (manual mode: the policy only
    advises), so a policy must not count its advice as actions taken; ``stages`` holds the frame
    stages' outputs on this frame as its perception event records them (e.g. ``stages["sr"]``,
    the sr model's ``ran``, ``reject``, ``relative_uncertainty``, ...; empty when no stage ran).
    """

    frame: Frame
    tip: TipEstimate | None
    state: InstrumentState
    info: InstrumentInfo
    problems: tuple[str, ...] = ()
    history: tuple[TipEstimate, ...] = ()
    frames_seen: int = 0
    commands_so_far: int = 0
    quality: QualityEstimate | None = None
    pending_commands: int = 0
    advisory: bool = False
    stages: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    """A policy's answer: commands to issue (possibly none), why, and how sure it is.

    ``stop`` asks the agent to end the session (e.g. too many failed conditioning attempts).
    """

    commands: tuple[Command, ...] = ()
    reason: str = ""
    confidence: float = 1.0
    stop: bool = False
    policy: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "commands": [c.to_json() for c in self.commands],
            "reason": self.reason,
            "confidence": float(self.confidence),
            "stop": self.stop,
            "policy": self.policy,
        }
