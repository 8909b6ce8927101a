"""A readable rule policy for STM tip conditioning: an escalation ladder per tip state.

How it decides, one assessed frame at a time:

1. It acts only on ``observation.tip``. A frame with ``problems`` (NaN, corrupt) or an estimate
   whose ``uncertainty`` exceeds :attr:`RuleConfig.max_uncertainty` gets no conditioning: the
   decision is empty (the agent rescans) and the reason says why. Such frames neither count as
   bad nor break a run of bad frames.
2. After :attr:`RuleConfig.bad_frames_to_act` consecutive bad assessments (any state but
   ``good``) it starts a *conditioning episode*: one action per further bad frame, walking the
   ladder of the latest assessed state. Each state has its own ladder and its own position on
   it, so an episode that goes ``blunt`` → ``multiple`` → ``blunt`` resumes the blunt ladder
   where it left off. Past the last step the strongest step is repeated.
3. Each action damages the surface around the tip (:attr:`RuleConfig.damage_radius_m`), so the
   same decision moves the tip to a fresh site: the next site of a square spiral of pitch
   :attr:`RuleConfig.move_step_m` around the first position seen, skipping sites whose scan
   region would leave the stage limits or touch a damaged disc. Sites are never revisited (the
   spiral only moves outwards). The damaged spots are kept as a compact array (16 bytes each), so
   a night of conditioning costs little memory and the overlap check is one vectorized pass.
4. An episode ends at the next ``good`` assessment. An episode that needs more than
   :attr:`RuleConfig.max_actions_per_episode` actions has failed; when more than
   :attr:`RuleConfig.max_failed_episodes` episodes failed the policy stops the session
   (``Decision.stop``), otherwise it starts the ladders again from the first step.

Defaults follow the autonomous STM work of Krull et al., Commun. Phys. 3, 54 (2020) (DeepSPM):
bias pulses of ±2.5, ±4 and ±8 V for 0.2 s and controlled dips of 0.8–5 nm at 20 mV.
The policy has no randomness: the same observations give the same decisions.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from drivers.commands import Capability, Command, MoveTo, TipDip, TipPulse
from drivers.errors import ConfigError
from drivers.frame import ScanRegion, TipState
from drivers.limits import Limits
from drivers.observation import Decision, Observation, TipEstimate
from policies.dose import dose_command

logger = logging.getLogger(__name__)

BAD_STATES = (TipState.MULTIPLE, TipState.BLUNT, TipState.UNSTABLE, TipState.CRASHED)


@dataclass(frozen=True)
class LadderStep:
    """One conditioning action: a bias pulse or a controlled dip.

    ``action="pulse"`` uses ``bias_V`` and ``duration_s``; ``action="dip"`` uses ``depth_m`` and
    ``bias_V``. Use :meth:`pulse` and :meth:`dip` to build them.
    """

    action: Literal["pulse", "dip"]
    bias_V: float
    duration_s: float = 0.2
    depth_m: float = 0.0

    @classmethod
    def pulse(cls, bias_V: float, duration_s: float = 0.2) -> LadderStep:
        return cls("pulse", bias_V=bias_V, duration_s=duration_s)

    @classmethod
    def dip(cls, depth_m: float, bias_V: float = 0.02) -> LadderStep:
        return cls("dip", bias_V=bias_V, depth_m=depth_m)

    def __post_init__(self) -> None:
        if self.action not in ("pulse", "dip"):
            raise ConfigError(f"LadderStep.action must be 'pulse' or 'dip', got {self.action!r}")
        for name in ("bias_V", "duration_s", "depth_m"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"LadderStep.{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"LadderStep.{name} must be finite, got {value!r}")
        if self.action == "pulse" and self.duration_s <= 0:
            raise ConfigError(f"a pulse needs duration_s > 0, got {self.duration_s!r}")
        if self.action == "dip" and self.depth_m <= 0:
            raise ConfigError(f"a dip needs depth_m > 0, got {self.depth_m!r}")

    @property
    def strength(self) -> float:
        """The escalation measure within one action type: |bias| of a pulse, depth of a dip."""
        return abs(self.bias_V) if self.action == "pulse" else self.depth_m

    def describe(self) -> str:
        if self.action == "pulse":
            return f"pulse {self.bias_V:+.1f} V for {self.duration_s:g} s"
        return f"dip {self.depth_m * 1e9:.1f} nm at {self.bias_V * 1e3:.0f} mV"

    def fits(self, limits: Limits) -> bool:
        """Whether the instrument's (and operator's) limits allow this step."""
        if self.action == "pulse":
            return _within(self.bias_V, limits.pulse_bias_V) and _within(
                self.duration_s, limits.pulse_duration_s
            )
        return _within(self.depth_m, limits.dip_depth_m) and _within(self.bias_V, limits.dip_bias_V)

    def command(self, *, source: str, reason: str) -> Command:
        if self.action == "pulse":
            return TipPulse(self.bias_V, self.duration_s, source=source, reason=reason)
        return TipDip(self.depth_m, self.bias_V, source=source, reason=reason)


def _within(value: float, allowed: tuple[float, float]) -> bool:
    return allowed[0] <= value <= allowed[1]


def default_ladders() -> dict[TipState, tuple[LadderStep, ...]]:
    """The escalation ladders, gentlest first (DeepSPM action magnitudes).

    Pulses and dips each rise in strength along a ladder. A double/multiple or unstable apex
    usually carries a loose cluster or adsorbate that a modest field pulse removes, so those
    ladders begin with small pulses. A blunt or crashed apex has to be re-formed by indenting it
    into the surface, so those begin with dips (deeper first for a crash).
    """
    p, d = LadderStep.pulse, LadderStep.dip
    nm = 1e-9
    return {
        TipState.MULTIPLE: (
            p(+2.5), p(-2.5), p(+4.0), p(-4.0),
            d(0.8 * nm), d(1.5 * nm),
            p(+8.0), p(-8.0),
            d(3.0 * nm), d(5.0 * nm),
        ),
        TipState.UNSTABLE: (
            p(+2.5), p(-2.5), p(+4.0), p(-4.0), p(+8.0), p(-8.0),
            d(0.8 * nm), d(1.5 * nm), d(3.0 * nm), d(5.0 * nm),
        ),
        TipState.BLUNT: (
            d(0.8 * nm), d(1.5 * nm), d(2.5 * nm),
            p(+4.0), p(-4.0),
            d(3.5 * nm),
            p(+8.0), p(-8.0),
            d(5.0 * nm),
        ),
        TipState.CRASHED: (
            d(1.5 * nm), d(3.0 * nm),
            p(+8.0), p(-8.0),
            d(5.0 * nm),
        ),
    }  # fmt: skip


@dataclass(frozen=True)
class RuleConfig:
    """Every threshold of :class:`RulePolicy` (lengths in metres, biases in volts)."""

    bad_frames_to_act: int = 2
    max_uncertainty: float = 0.6
    max_actions_per_episode: int = 20
    max_failed_episodes: int = 0
    damage_radius_m: float = 25e-9
    move_step_m: float = 60e-9
    ladders: Mapping[TipState, tuple[LadderStep, ...]] = field(default_factory=default_ladders)
    target_snr: float | None = None  # None: no dose control (see policies.dose)
    snr_tolerance: float = 1.5
    dwell_step: float = 2.0

    def __post_init__(self) -> None:
        for name in ("bad_frames_to_act", "max_actions_per_episode"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"RuleConfig.{name} must be an int >= 1, got {value!r}")
        value = self.max_failed_episodes
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"RuleConfig.max_failed_episodes must be an int >= 0, got {value!r}")
        for name in ("max_uncertainty", "damage_radius_m", "move_step_m"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"RuleConfig.{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"RuleConfig.{name} must be finite and >= 0, got {value!r}")
        if self.max_uncertainty > 1:
            raise ConfigError(
                f"RuleConfig.max_uncertainty must be in [0, 1], got {self.max_uncertainty!r}"
            )
        if self.damage_radius_m <= 0:
            raise ConfigError(
                f"RuleConfig.damage_radius_m must be > 0, got {self.damage_radius_m!r}"
            )
        if self.move_step_m < 2 * self.damage_radius_m:
            raise ConfigError(
                f"RuleConfig.move_step_m={self.move_step_m!r} must be at least twice "
                f"damage_radius_m={self.damage_radius_m!r} so that moves leave damaged areas"
            )
        if self.target_snr is not None and not (
            isinstance(self.target_snr, (int, float)) and 0 < self.target_snr < math.inf
        ):
            raise ConfigError(f"RuleConfig.target_snr must be > 0 or None, got {self.target_snr!r}")
        for name in ("snr_tolerance", "dwell_step"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 1 < value < math.inf):
                raise ConfigError(f"RuleConfig.{name} must be a number > 1, got {value!r}")
        for state in BAD_STATES:
            ladder = self.ladders.get(state) if isinstance(self.ladders, Mapping) else None
            if not ladder or not all(isinstance(s, LadderStep) for s in ladder):
                raise ConfigError(
                    f"RuleConfig.ladders needs a non-empty tuple of LadderStep for {state.value!r}"
                )


def spiral_sites() -> Iterator[tuple[int, int]]:
    """Integer grid sites in a square spiral: (0, 0), then ring 1, ring 2, ... (endless).

    Each ring starts at its east side and runs counter-clockwise.
    """
    yield (0, 0)
    ring = 1
    while True:
        i, j = ring, -ring + 1
        while j < ring:  # east side, going up
            yield (i, j)
            j += 1
        while i > -ring:  # north side, going west
            yield (i, j)
            i -= 1
        while j > -ring:  # west side, going down
            yield (i, j)
            j -= 1
        while i <= ring:  # south side, going east (ends at the ring's start corner)
            yield (i, j)
            i += 1
        ring += 1


class RulePolicy:
    """The escalation-ladder tip-conditioning policy (see the module docstring)."""

    name = "rule"
    version = "1.0"

    def __init__(self, config: RuleConfig | None = None) -> None:
        if config is not None and not isinstance(config, RuleConfig):
            raise ConfigError(f"RulePolicy config must be a RuleConfig, got {config!r}")
        self.config = config or RuleConfig()
        self.reset()

    @classmethod
    def from_options(cls, **options: Any) -> RulePolicy:
        """Build from keyword options: ``config=RuleConfig(...)`` or :class:`RuleConfig` fields."""
        config = options.pop("config", None)
        names = {f.name for f in dataclasses.fields(RuleConfig)}
        unknown = set(options) - names
        if unknown:
            raise ConfigError(
                f"unknown rule-policy options {sorted(unknown)}; known: {sorted(names)}"
            )
        if config is not None:
            if not isinstance(config, RuleConfig):
                raise ConfigError(f"config must be a RuleConfig, got {config!r}")
            return cls(dataclasses.replace(config, **options))
        return cls(RuleConfig(**options))

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        self._bad_run = 0
        self._in_episode = False
        self._episode_actions = 0
        self._ladder_steps: dict[TipState, int] = {}
        self._episodes = 0
        self._failed_episodes = 0
        self._total_actions = 0
        self._stopped: str | None = None
        self._damaged = np.zeros((0, 2))  # (x_m, y_m) rows; the first _n_damaged are used
        self._n_damaged = 0
        self._origin: tuple[float, float] | None = None
        self._sites = spiral_sites()  # each site comes once: sites are never revisited

    @property
    def damaged_spots(self) -> tuple[tuple[float, float], ...]:
        """Where conditioning happened, (x_m, y_m) in order."""
        return tuple((float(x), float(y)) for x, y in self._damaged[: self._n_damaged])

    @property
    def total_actions(self) -> int:
        return self._total_actions

    # ------------------------------------------------------------------ decide

    def decide(self, observation: Observation) -> Decision:
        """The tip ladder's decision, plus a dwell change when dose control is on."""
        decision = self._decide_tip(observation)
        cfg = self.config
        if cfg.target_snr is None or observation.problems or decision.stop:
            return decision
        command, why = dose_command(
            observation,
            target_snr=cfg.target_snr,
            tolerance=cfg.snr_tolerance,
            dwell_step=cfg.dwell_step,
        )
        commands = decision.commands
        if command is not None:
            commands = (*commands, command.with_meta(source=self.name))
        return dataclasses.replace(
            decision, commands=commands, reason=f"{decision.reason}; dose: {why}"
        )

    def _decide_tip(self, observation: Observation) -> Decision:
        if self._stopped is not None:
            return self._decision(reason=f"stopped: {self._stopped}", confidence=1.0, stop=True)
        if self._origin is None:
            x0, y0 = observation.state.position_m
            self._origin = (float(x0), float(y0))
            next(self._sites)  # the starting site counts as visited
        frame_label = f"frame {observation.frame.frame_index}"
        if observation.problems:
            return self._decision(
                reason=f"{frame_label} not acted on ({'; '.join(observation.problems)}): "
                "no conditioning, rescan",
                confidence=0.0,
            )
        tip = observation.tip
        if tip is None and Capability.TIP_CONDITIONING not in observation.info.capabilities:
            return self._decision(
                reason=f"{frame_label}: instrument {observation.info.id!r} has no tip to condition",
                confidence=1.0,
            )
        if tip is None:
            return self._decision(
                reason=f"{frame_label} has no tip estimate: no conditioning, rescan",
                confidence=0.0,
            )
        if not (math.isfinite(tip.uncertainty) and tip.uncertainty <= self.config.max_uncertainty):
            return self._decision(
                reason=f"{frame_label}: tip estimate too uncertain (uncertainty "
                f"{tip.uncertainty:.2f} > {self.config.max_uncertainty:.2f}; most likely "
                f"{_said(tip)}): no conditioning, rescan",
                confidence=0.0,
            )
        if tip.state is TipState.GOOD:
            return self._on_good(tip)
        return self._on_bad(observation, tip)

    def _on_good(self, tip: TipEstimate) -> Decision:
        reason = f"tip assessed {_said(tip)}: keep scanning"
        if self._in_episode:
            reason += (
                f"; conditioning episode {self._episodes} succeeded after "
                f"{self._episode_actions} action{'s' if self._episode_actions != 1 else ''}"
            )
        self._bad_run = 0
        self._in_episode = False
        self._episode_actions = 0
        self._ladder_steps = {}
        return self._decision(reason=reason, confidence=tip.p_good)

    def _on_bad(self, observation: Observation, tip: TipEstimate) -> Decision:
        cfg = self.config
        self._bad_run += 1
        confidence = float(tip.probabilities.get(tip.state, 0.0))
        if self._bad_run == 1:
            seen = f"frame assessed {_said(tip)}"
        else:
            seen = f"{self._bad_run} consecutive frames assessed bad, latest {_said(tip)}"
        if Capability.TIP_CONDITIONING not in observation.info.capabilities:
            return self._decision(
                reason=f"{seen}; instrument {observation.info.id!r} has no tip conditioning: "
                "not conditioning, operator attention needed",
                confidence=confidence,
            )
        if not self._in_episode and self._bad_run < cfg.bad_frames_to_act:
            return self._decision(
                reason=f"{seen}; {self._bad_run} of {cfg.bad_frames_to_act} consecutive bad "
                "frames needed before conditioning: rescan to confirm",
                confidence=1.0 - tip.uncertainty,
            )
        if observation.pending_commands:
            # Supervised mode: the last proposal is still with the operator. Proposing (and
            # counting) another would escalate the ladder on actions that never happened.
            n = observation.pending_commands
            return self._decision(
                reason=f"{seen}; {n} command{'s' if n != 1 else ''} still waiting for the "
                "operator's approval: not proposing another",
                confidence=confidence,
            )
        notes: list[str] = []
        if self._in_episode and self._episode_actions >= cfg.max_actions_per_episode:
            self._failed_episodes += 1
            failed = (
                f"conditioning episode {self._episodes} failed: still bad after "
                f"{self._episode_actions} actions (max_actions_per_episode="
                f"{cfg.max_actions_per_episode})"
            )
            if self._failed_episodes > cfg.max_failed_episodes:
                return self._stop(
                    f"{failed}; {self._failed_episodes} failed episode"
                    f"{'s' if self._failed_episodes != 1 else ''} exceed max_failed_episodes="
                    f"{cfg.max_failed_episodes}: the tip needs the operator"
                )
            notes.append(f"{failed}; restarting the ladders")
            self._in_episode = False
        ladder = [s for s in cfg.ladders[tip.state] if s.fits(observation.info.limits)]
        if not ladder:
            return self._decision(
                reason=f"{seen}; no step of the {tip.state.value} ladder fits the instrument "
                "limits: not conditioning, operator attention needed",
                confidence=confidence,
            )
        # Manual mode: the proposal is advice the agent will not carry out, so it neither starts
        # an episode nor climbs the ladder (the operator's own commands are not counted either).
        advisory = observation.advisory
        if not self._in_episode and not advisory:
            self._in_episode = True
            self._episodes += 1
            self._episode_actions = 0
            self._ladder_steps = {}
        index = self._ladder_steps.get(tip.state, 0) if self._in_episode else 0
        step = ladder[min(index, len(ladder) - 1)]
        where = f"step {min(index, len(ladder) - 1) + 1} of {len(ladder)} of the "
        where += f"{tip.state.value} ladder"
        if index >= len(ladder):
            where += " (strongest step repeated)"

        position = (float(observation.state.position_m[0]), float(observation.state.position_m[1]))
        stage = Capability.STAGE in observation.info.capabilities
        target: tuple[float, float] | None = None
        if stage:
            target = self._next_site(
                position, observation.state.scan_region, observation.info.limits
            )
            if target is None:
                return self._stop(
                    f"{seen}; no undamaged area left within the stage limits to move to after "
                    "conditioning"
                )
        action_reason = f"{seen}: {step.describe()}, {where}"
        commands: list[Command] = [step.command(source=self.name, reason=action_reason)]
        if target is not None:
            move_reason = (
                f"move to fresh area ({target[0] * 1e9:.0f}, {target[1] * 1e9:.0f}) nm: "
                f"conditioning damages ~{cfg.damage_radius_m * 1e9:.0f} nm around the tip"
            )
            commands.append(MoveTo(*target, source=self.name, reason=move_reason))
            notes.append(move_reason)
        else:
            notes.append(
                "instrument cannot move the stage: the next frame may show the conditioned area"
            )
        if advisory:
            reason = "; ".join(
                [action_reason, "advice only (manual mode): not counted as an action", *notes]
            )
            return self._decision(commands=tuple(commands), reason=reason, confidence=confidence)
        if self._n_damaged == len(self._damaged):  # grow by doubling: amortized O(1)
            self._damaged = np.resize(self._damaged, (max(16, 2 * self._n_damaged), 2))
        self._damaged[self._n_damaged] = position
        self._n_damaged += 1
        self._ladder_steps[tip.state] = index + 1
        self._episode_actions += 1
        self._total_actions += 1
        reason = "; ".join(
            [action_reason, f"action {self._episode_actions} of episode {self._episodes}", *notes]
        )
        logger.info("rule policy: %s", reason)
        return self._decision(commands=tuple(commands), reason=reason, confidence=confidence)

    # ------------------------------------------------------------------ helpers

    def _next_site(
        self, position: tuple[float, float], region: ScanRegion, limits: Limits
    ) -> tuple[float, float] | None:
        """The next spiral site whose scan region is inside the stage and clear of damage."""
        origin = self._origin if self._origin is not None else position
        step = self.config.move_step_m
        spots = np.concatenate([self._damaged[: self._n_damaged], [position]])
        half_w, half_h = region.width_m / 2, region.height_m / 2
        x_lo, x_hi = _inner(limits.stage_x_m, half_w)
        y_lo, y_hi = _inner(limits.stage_y_m, half_h)
        span = max(
            abs(limits.stage_x_m[1] - limits.stage_x_m[0]),
            abs(limits.stage_y_m[1] - limits.stage_y_m[0]),
        )
        # every site beyond this ring lies outside the stage from any origin inside it
        max_ring = math.ceil(span / step) + 1 if step > 0 else 0
        for i, j in self._sites:
            if max(abs(i), abs(j)) > max_ring:
                return None
            x = origin[0] + i * step
            y = origin[1] + j * step
            if not (x_lo <= x <= x_hi and y_lo <= y <= y_hi):
                continue
            if _touches_any(spots, self.config.damage_radius_m, region.moved_to(x, y)):
                continue
            return (x, y)
        return None  # pragma: no cover - the spiral is endless

    def _stop(self, why: str) -> Decision:
        self._stopped = why
        logger.warning("rule policy stops the session: %s", why)
        return self._decision(reason=f"stop: {why}", confidence=1.0, stop=True)

    def _decision(
        self,
        *,
        reason: str,
        confidence: float,
        commands: tuple[Command, ...] = (),
        stop: bool = False,
    ) -> Decision:
        confidence = min(max(confidence, 0.0), 1.0) if math.isfinite(confidence) else 0.0
        return Decision(
            commands=commands, reason=reason, confidence=confidence, stop=stop, policy=self.name
        )


def _touches_any(spots: np.ndarray, radius_m: float, region: ScanRegion) -> bool:
    """Whether a disc of ``radius_m`` around any of the ``(N, 2)`` spots touches the region
    (:meth:`drivers.safety.ForbiddenArea.overlaps` for all of them at once)."""
    half_w, half_h = region.width_m / 2, region.height_m / 2
    if region.rotation_deg % 180:
        half_w = half_h = math.hypot(half_w, half_h)
    dx = np.maximum(np.abs(spots[:, 0] - region.center_x_m) - half_w, 0.0)
    dy = np.maximum(np.abs(spots[:, 1] - region.center_y_m) - half_h, 0.0)
    return bool(np.any(np.hypot(dx, dy) <= radius_m))


def _inner(allowed: tuple[float, float], half: float) -> tuple[float, float]:
    """The centre positions that keep a half-width ``half`` inside ``allowed`` (or the range
    itself when the scan is wider than the stage)."""
    low, high = allowed[0] + half, allowed[1] - half
    return (low, high) if low <= high else allowed


def _said(tip: TipEstimate) -> str:
    p = float(tip.probabilities.get(tip.state, 0.0))
    return f"'{tip.state.value}' (p={p:.2f})"
