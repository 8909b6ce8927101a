"""The command gate: every command, from a policy or an operator, passes here.

The gate applies the operator mode (autonomous / supervised / manual), pause and abort, the safety
envelope and the instrument's declared capabilities, then issues the command to the instrument
and reports its fate. Fates: ``executed``, ``rejected`` (envelope or capability), ``failed``
(instrument error), ``pending`` (waiting for approval), ``vetoed``, ``advised`` (manual mode),
``suppressed`` (paused or aborted), ``expired`` (a pending command superseded by a newer decision).

Pause semantics: once :meth:`CommandGate.pause` has returned, no command from a policy is issued
until :meth:`CommandGate.resume`. Checking and issuing happen under one lock, so a pause waits for
a command already being executed and can never be overtaken by a later one. Operator commands
(manual submissions, approvals) still pass while paused: the person at the microscope stays in
charge. ``on_fate`` is called with the lock held: it must only record, never call the gate, and
never block (the agent's sink queues the event without waiting for the recorder, so a slow disk
cannot delay a pause; tests/test_control.py holds a stuck recorder to check this).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from drivers.commands import Command
from drivers.errors import ConfigError, InstrumentError, LimitViolation
from drivers.protocol import Instrument, InstrumentInfo
from drivers.safety import SafetyEnvelope

log = logging.getLogger(__name__)


class Mode(StrEnum):
    AUTONOMOUS = "autonomous"  # policy commands go straight through the gate
    SUPERVISED = "supervised"  # policy commands wait for operator approval
    MANUAL = "manual"  # the policy only advises


@dataclass(frozen=True)
class Fate:
    """What became of a command."""

    command: Command
    fate: str
    reason: str = ""
    detail: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "command": self.command.to_json(),
            "fate": self.fate,
            "reason": self.reason,
            "detail": dict(self.detail or {}),
        }


FateSink = Callable[[Fate], None]


class CommandGate:
    """Serialises command issue against pause, mode, envelope and capabilities."""

    def __init__(
        self,
        instrument: Instrument,
        info: InstrumentInfo,
        envelope: SafetyEnvelope,
        *,
        mode: Mode = Mode.AUTONOMOUS,
        on_fate: FateSink | None = None,
    ) -> None:
        self._instrument = instrument
        self._info = info
        self.envelope = envelope
        self._mode = Mode(mode)
        self._on_fate = on_fate or (lambda fate: None)
        self._lock = threading.RLock()
        self._paused = False
        self._aborted = False
        self._pending: dict[str, Command] = {}
        self.issued = 0

    # -- operator state -------------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def aborted(self) -> bool:
        return self._aborted

    def set_mode(self, mode: Mode | str) -> None:
        try:
            new = Mode(mode)
        except ValueError:
            raise ConfigError(
                f"unknown mode {mode!r}; modes are {', '.join(m.value for m in Mode)}"
            ) from None
        with self._lock:
            self._mode = new
            if new is not Mode.SUPERVISED:
                for command in self._pending.values():
                    self._report(Fate(command, "expired", f"mode changed to {new.value}"))
                self._pending.clear()

    def pause(self) -> None:
        """Stop issuing policy commands. When this returns, none will be issued."""
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            if not self._aborted:
                self._paused = False

    def abort(self) -> None:
        """Stop issuing anything from the policy for good; pending commands expire."""
        with self._lock:
            self._aborted = True
            self._paused = True
            for command in self._pending.values():
                self._report(Fate(command, "expired", "session aborted"))
            self._pending.clear()

    def pending(self) -> list[Command]:
        with self._lock:
            return list(self._pending.values())

    # -- issuing ----------------------------------------------------------------------------

    def submit_policy(self, command: Command) -> Fate:
        """A command a policy wants issued; the mode decides what happens to it."""
        with self._lock:
            if self._aborted or self._paused:
                why = "session aborted" if self._aborted else "agent paused by the operator"
                return self._report(Fate(command, "suppressed", why))
            if self._mode is Mode.MANUAL:
                return self._report(
                    Fate(command, "advised", "manual mode: the policy only advises")
                )
            if self._mode is Mode.SUPERVISED:
                self._pending[command.id] = command
                return self._report(
                    Fate(command, "pending", "supervised mode: waiting for operator approval")
                )
            return self._issue_locked(command)

    def submit_operator(self, command: Command) -> Fate:
        """A manual command from the operator: envelope and capabilities still apply."""
        with self._lock:
            if self._aborted:
                return self._report(Fate(command, "suppressed", "session aborted"))
            return self._issue_locked(command)

    def approve(self, command_id: str, *, operator: str = "operator") -> Fate:
        with self._lock:
            command = self._pending.pop(command_id, None)
            if command is None:
                raise ConfigError(
                    f"no pending command with id {command_id!r}; pending: "
                    f"{sorted(self._pending) or 'none'}"
                )
            self._report(Fate(command, "approved", f"approved by {operator}"))
            return self._issue_locked(command)

    def veto(self, command_id: str, *, operator: str = "operator", reason: str = "") -> Fate:
        with self._lock:
            command = self._pending.pop(command_id, None)
            if command is None:
                raise ConfigError(f"no pending command with id {command_id!r}")
            return self._report(Fate(command, "vetoed", reason or f"vetoed by {operator}"))

    def expire_pending(self, reason: str) -> None:
        with self._lock:
            dropped = list(self._pending.values())
            self._pending.clear()
            for command in dropped:
                self._report(Fate(command, "expired", reason))

    def _issue_locked(self, command: Command) -> Fate:
        """Capability and envelope checks, then issue. Called with the lock held, so that a
        pause acknowledged by :meth:`pause` can never be overtaken by a command."""
        if not self._info.supports(command):
            return self._report(
                Fate(
                    command,
                    "rejected",
                    f"{self._info.id} does not support {command.kind} "
                    f"(needs capability {command.requires!s})",
                )
            )
        try:
            state = self._instrument.state()
            self.envelope.check(command, position_m=state.position_m, now_s=state.time_s)
        except LimitViolation as exc:
            detail = {"value": repr(exc.value), "limit": repr(exc.limit), "field": exc.field}
            return self._report(Fate(command, "rejected", str(exc), detail))
        except InstrumentError as exc:
            return self._report(Fate(command, "failed", f"{type(exc).__name__}: {exc}"))
        self.issued += 1
        try:
            result = self._instrument.execute(command)
        except LimitViolation as exc:
            return self._report(Fate(command, "rejected", f"instrument envelope: {exc}"))
        except InstrumentError as exc:
            return self._report(Fate(command, "failed", f"{type(exc).__name__}: {exc}"))
        self.envelope.record_executed(command, now_s=result.time_s)
        return self._report(Fate(command, "executed", "", dict(result.detail)))

    def _report(self, fate: Fate) -> Fate:
        log.debug("%s -> %s %s", fate.command, fate.fate, fate.reason)
        self._on_fate(fate)
        return fate
