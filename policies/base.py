"""The :class:`Policy` protocol, the do-nothing baseline and the policy registry.

A policy turns an :class:`~drivers.observation.Observation` into a
:class:`~drivers.observation.Decision`. It never talks to an instrument: the agent passes every
command of the decision through the safety gate.

>>> policy = make_policy("none")
>>> isinstance(policy, Policy)
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from drivers.commands import Command
from drivers.errors import ConfigError
from drivers.observation import Decision, Observation


def named_decision(
    name: str,
    reason: str,
    confidence: float,
    *,
    commands: tuple[Command, ...] = (),
    stop: bool = False,
) -> Decision:
    """A decision of the policy ``name``: the reason starts with the name, the confidence is
    clipped to [0, 1] (a network's probability may round outside it)."""
    return Decision(
        commands=commands,
        reason=f"{name}: {reason}",
        confidence=min(max(confidence, 0.0), 1.0),
        stop=stop,
        policy=name,
    )


def require_positive(owner: object, names: Sequence[str]) -> None:
    """Raise :class:`ConfigError` unless each attribute in ``names`` of the dataclass ``owner``
    is a finite number > 0 (for the ``__post_init__`` checks of policy configurations)."""
    for name in names:
        value = getattr(owner, name)
        if not (isinstance(value, (int, float)) and 0 < value < math.inf):
            raise ConfigError(
                f"{type(owner).__name__}.{name} must be a positive number, got {value!r}"
            )


@runtime_checkable
class Policy(Protocol):
    """A decision maker. ``decide`` is called once per new assessed frame, in order."""

    name: str
    version: str

    def decide(self, observation: Observation) -> Decision:
        """What to do next, given the freshest frame and what perception made of it."""
        ...

    def reset(self) -> None:
        """Forget everything learnt during a session (counters, damaged spots, ...)."""
        ...


class NoPolicy:
    """The baseline that never acts: every decision is empty. Benchmarks compare against it."""

    name = "none"
    version = "1"

    def decide(self, observation: Observation) -> Decision:
        return Decision(
            reason="baseline policy 'none' never acts",
            confidence=1.0,
            policy=self.name,
        )

    def reset(self) -> None:
        return None


def _make_none(**options: Any) -> Policy:
    if options:
        raise ConfigError(f"policy 'none' takes no options, got {sorted(options)}")
    return NoPolicy()


def _make_rule(**options: Any) -> Policy:
    from policies.rule import RulePolicy

    return RulePolicy.from_options(**options)


def _make_rl(kind: str) -> Callable[..., Policy]:
    def factory(**options: Any) -> Policy:
        from policies import rl

        if kind == "rl-scan":
            from policies.scan_policy import make_rl_scan

            return make_rl_scan(**options)
        return {"rl": rl.make_rl, "rl-tip": rl.make_rl_tip, "rl-dose": rl.make_rl_dose}[kind](
            **options
        )

    return factory


_POLICIES: dict[str, Callable[..., Policy]] = {
    "none": _make_none,
    "rule": _make_rule,
    "rl": _make_rl("rl"),
    "rl-tip": _make_rl("rl-tip"),
    "rl-dose": _make_rl("rl-dose"),
    "rl-scan": _make_rl("rl-scan"),
}


def known_policies() -> list[str]:
    """The names :func:`make_policy` accepts."""
    return sorted(_POLICIES)


def make_policy(name: str, **options: Any) -> Policy:
    """Build the policy called ``name`` with keyword ``options``.

    ``make_policy("rule", bad_frames_to_act=3)`` sets fields of
    :class:`~policies.rule.RuleConfig`. Raises :class:`ConfigError` for an unknown name (listing
    the known ones) or an unknown or invalid option.
    """
    factory = _POLICIES.get(name) if isinstance(name, str) else None
    if factory is None:
        raise ConfigError(f"unknown policy {name!r}; known policies: {', '.join(known_policies())}")
    return factory(**options)
