"""The operator control API over a running :class:`~agent.loop.Agent`.

A :class:`Controller` watches the agent (it registers as a listener) and keeps what an operator
needs to see: mode, state, the current frame, pending commands, the last decisions with their
reasons and uncertainties, stage latencies and faults. Its actions (pause, resume, abort, mode,
approve, veto, a manual command, policy thresholds, the control lock) go through the agent, so
manual commands pass the same gate and safety envelope as the policy's, and every action is
recorded in the session as an ``operator`` event with time (``t_wall``), origin and effect. A
refused action is recorded too, with ``"refused": true`` and the reason in its effect.

Origins are ``"<channel>:<operator>"``, for example ``"console:alice"`` or ``"ctl:bob"``.

The control lock: an operator who takes it is the only one whose actions are accepted until
they release it. Two exceptions, on purpose: **pause** and **abort** are accepted from anyone
at any time, because the person who sees a tip crash coming must be able to stop the machine
whoever holds the lock. Everything is thread-safe; the web console calls it from its event loop
thread while the agent runs in its own threads.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from agent.gate import Fate, Mode
from agent.loop import Agent
from drivers.commands import Command, command_from_json
from drivers.errors import ConfigError, DataError, ScopePilotError
from drivers.frame import Frame

__all__ = [
    "AuthError",
    "ControlLocked",
    "Controller",
    "NoSuchCommand",
    "OperatorError",
]


class OperatorError(ScopePilotError):
    """An operator request was refused (nothing was done; the refusal is recorded)."""


class ControlLocked(OperatorError):  # noqa: N818 (reads as a state, like NotConnected)
    """Another operator holds the control lock."""


class NoSuchCommand(OperatorError):  # noqa: N818 (reads as a state, like NotConnected)
    """Approve or veto named a command that is not pending (never was, or already decided)."""


class AuthError(OperatorError):
    """Missing or wrong access token."""


Waker = Callable[[], None]

_DECISIONS_KEPT = 50
_FAULTS_KEPT = 20
_OPERATOR_KEPT = 50


class Controller:
    """Operator control of ``agent``; create it before ``agent.run()`` starts.

    Read side: :meth:`status` (a JSON-able snapshot), :meth:`latest_frame`, :attr:`version`
    (bumped on every change) and :meth:`add_waker` (called from agent threads on each change).
    Action side: one method per action, each taking ``origin`` (who asks, see the module
    docstring) and returning a JSON-able result, or raising a :class:`ScopePilotError` subclass
    whose message says what was wrong.
    """

    def __init__(self, agent: Agent, *, wall_clock: Callable[[], float] = time.time) -> None:
        self.agent = agent
        self._wall = wall_clock
        self._lock = threading.Lock()
        self._version = 0
        self._wakers: list[Waker] = []
        self._frame: tuple[int, Frame] | None = None
        self._products: dict[str, tuple[int, Frame]] = {}  # newest image per stage (sr view)
        self._perception: dict[int, dict[str, Any]] = {}
        self._decisions: deque[dict[str, Any]] = deque(maxlen=_DECISIONS_KEPT)
        self._faults: deque[dict[str, Any]] = deque(maxlen=_FAULTS_KEPT)
        self._operator: deque[dict[str, Any]] = deque(maxlen=_OPERATOR_KEPT)
        self._fates: dict[int, list[dict[str, Any]]] = {}
        self._state = "running" if agent.running else "not started"
        self._stop_reason = ""
        self._lock_holder: str | None = None
        self._lock_since: float | None = None
        agent.add_listener(self._on_event)

    # -- read side --------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    def add_waker(self, waker: Waker) -> None:
        """``waker()`` is called (from agent threads) after every change; keep it quick."""
        with self._lock:
            self._wakers.append(waker)

    def remove_waker(self, waker: Waker) -> None:
        with self._lock:
            if waker in self._wakers:
                self._wakers.remove(waker)

    def latest_frame(self) -> tuple[int, Frame] | None:
        """``(seq, frame)`` of the newest complete frame, or None before the first."""
        return self._frame

    def latest_product(self, name: str) -> tuple[int, Frame] | None:
        """``(seq, image as a frame)`` of the newest image a perception stage made (``"sr"``:
        the recovered image), or None while there is none."""
        return self._products.get(name)

    def perception_of(self, seq: int) -> dict[str, Any] | None:
        """The perception event payload of frame ``seq`` (tip, defects, problems), if known."""
        with self._lock:
            found = self._perception.get(seq)
            return dict(found) if found is not None else None

    def status(self) -> dict[str, Any]:
        """Everything the console shows, as plain JSON-able data."""
        gate = self.agent.gate
        latencies = {
            stage: {
                "last_s": values[-1],
                "mean_s": sum(values) / len(values),
                "max_s": max(values),
                "n": len(values),
            }
            for stage, values in self.agent.latencies(50).items()
            if values
        }
        # Read the agent's side before taking our lock: the gate reports fates to
        # _on_event (which takes our lock) while holding its own, so holding ours while
        # asking the gate for its pending commands could deadlock.
        pending = [_command_view(c) for c in gate.pending()]
        mode, paused, aborted = gate.mode.value, gate.paused, gate.aborted
        thresholds = self.agent.policy_thresholds()
        with self._lock:
            frame = self._frame
            current = None
            if frame is not None:
                seq, f = frame
                perception = self._perception.get(seq, {})
                current = {
                    "seq": seq,
                    "frame_index": f.frame_index,
                    "shape": list(f.shape),
                    "channel": f.channel,
                    "timestamp_s": f.timestamp_s,
                    "tip": perception.get("tip"),
                    "defects": perception.get("defects") or [],
                    "defects_summary": perception.get("defects_summary"),
                    "sr": perception.get("sr"),
                    "early_abort": perception.get("early_abort"),
                    "problems": perception.get("problems", []),
                }
            return {
                "version": self._version,
                "state": self._derived_state(),
                "stop_reason": self._stop_reason,
                "mode": mode,
                "paused": paused,
                "aborted": aborted,
                "lock": {"holder": self._lock_holder, "since": self._lock_since},
                "instrument": {"id": self.agent.info.id, "kind": self.agent.info.kind},
                "policy": {
                    "name": self.agent.policy.name,
                    "version": self.agent.policy.version,
                    "thresholds": thresholds,
                },
                "frames": self.agent.result.frames,
                "frame": current,
                "pending": pending,
                "decisions": list(self._decisions)[::-1],
                "faults": list(self._faults)[::-1],
                "operator": list(self._operator)[::-1],
                "latencies": latencies,
            }

    def _derived_state(self) -> str:
        if self._state in ("not started", "stopped"):
            return self._state
        if self.agent.gate.aborted:
            return "aborting"
        return "paused" if self.agent.gate.paused else "running"

    # -- actions ----------------------------------------------------------------------------

    def pause(self, *, origin: str) -> dict[str, Any]:
        """Stop policy commands. When this returns (the acknowledgement), none will be issued."""
        self._check_live("pause", origin)
        self.agent.pause(origin=origin)
        return {"action": "pause", "effect": "paused"}

    def resume(self, *, origin: str) -> dict[str, Any]:
        self._check_live("resume", origin)
        self._check_lock("resume", origin)
        if self.agent.gate.aborted:
            self._refuse("resume", origin, ConfigError("the session was aborted; it cannot resume"))
        self.agent.resume(origin=origin)
        return {"action": "resume", "effect": "running"}

    def abort(self, *, origin: str, reason: str = "") -> dict[str, Any]:
        self._check_live("abort", origin)
        self.agent.abort(origin=origin, reason=reason or f"abort by {origin}")
        return {"action": "abort", "effect": "session stopping"}

    def set_mode(self, mode: str, *, origin: str) -> dict[str, Any]:
        self._check_live("mode", origin)
        self._check_lock("mode", origin)
        try:
            new = Mode(mode)
        except ValueError:
            self._refuse(
                "mode",
                origin,
                ConfigError(f"unknown mode {mode!r}; modes are {', '.join(m.value for m in Mode)}"),
            )
        self.agent.set_mode(new, origin=origin)
        return {"action": "mode", "effect": f"mode is now {new.value}"}

    def approve(self, command_id: str, *, origin: str) -> dict[str, Any]:
        self._check_live("approve", origin, command_id=command_id)
        self._check_lock("approve", origin, command_id=command_id)
        try:
            fate = self.agent.approve(str(command_id), origin=origin)  # records a refusal itself
        except ConfigError as exc:
            raise NoSuchCommand(str(exc)) from None
        return _fate_result("approve", fate)

    def veto(self, command_id: str, *, origin: str, reason: str = "") -> dict[str, Any]:
        self._check_live("veto", origin, command_id=command_id)
        self._check_lock("veto", origin, command_id=command_id)
        try:
            fate = self.agent.veto(str(command_id), origin=origin, reason=reason)
        except ConfigError as exc:
            raise NoSuchCommand(str(exc)) from None
        return _fate_result("veto", fate)

    def send(self, command: Command | Mapping[str, Any] | str, *, origin: str) -> dict[str, Any]:
        """A manual command (a :class:`Command` or its JSON form) through the gate and envelope.

        A malformed command raises :class:`DataError` and nothing is sent. A command the
        envelope rejects is recorded with fate ``rejected`` and returned, not raised.
        """
        self._check_live("submit", origin)
        self._check_lock("submit", origin)
        if not isinstance(command, Command):
            try:
                command = command_from_json(command)
            except DataError as exc:
                self._refuse("submit", origin, DataError(f"malformed command: {exc}"))
        fate = self.agent.submit(command, origin=origin)
        return _fate_result("submit", fate)

    def set_thresholds(self, values: Mapping[str, Any], *, origin: str) -> dict[str, Any]:
        """Change policy thresholds live (see :meth:`Agent.adjust_policy`)."""
        self._check_live("thresholds", origin)
        self._check_lock("thresholds", origin)
        old = self.agent.adjust_policy(values, origin=origin)
        return {"action": "thresholds", "effect": "changed", "old": old, "new": dict(values)}

    def take_lock(self, *, origin: str) -> dict[str, Any]:
        """Become the only operator whose actions are accepted (pause and abort excepted)."""
        who = operator_of(origin)
        with self._lock:
            holder = self._lock_holder
            if holder is None or holder == who:
                self._lock_holder, self._lock_since = who, self._wall()
        if holder is not None and holder != who:
            self._refuse("lock", origin, ControlLocked(self._locked_message(holder)))
        self.agent.record_operator("lock", origin, f"control lock taken by {who}")
        self._changed()
        return {"action": "lock", "effect": f"control lock held by {who}"}

    def release_lock(self, *, origin: str) -> dict[str, Any]:
        who = operator_of(origin)
        with self._lock:
            holder = self._lock_holder
            if holder == who:
                self._lock_holder = self._lock_since = None
        if holder != who:
            why = "nobody holds it" if holder is None else self._locked_message(holder)
            self._refuse("unlock", origin, ControlLocked(f"cannot release the lock: {why}"))
        self.agent.record_operator("unlock", origin, f"control lock released by {who}")
        self._changed()
        return {"action": "unlock", "effect": "control lock free"}

    def refuse(self, action: str, origin: str, error: ScopePilotError) -> None:
        """Record a request refused before it reached this controller (e.g. a wrong token)."""
        self.agent.record_operator(action, origin, f"refused: {error}")

    # -- helpers ----------------------------------------------------------------------------

    def _refuse(self, action: str, origin: str, error: ScopePilotError, **more: Any) -> NoReturn:
        self.agent.record_operator(action, origin, f"refused: {error}", **more)
        raise error

    def _check_lock(self, action: str, origin: str, **more: Any) -> None:
        holder = self._lock_holder
        if holder is not None and holder != operator_of(origin):
            self._refuse(action, origin, ControlLocked(self._locked_message(holder)), **more)

    def _check_live(self, action: str, origin: str, **more: Any) -> None:
        if self._state == "stopped":
            why = self._stop_reason or "it ended"
            self._refuse(action, origin, OperatorError(f"the session has stopped ({why})"), **more)

    def _locked_message(self, holder: str) -> str:
        since = ""
        if self._lock_since is not None:
            since = time.strftime(" since %H:%M:%S", time.localtime(self._lock_since))
        return (
            f"operator {holder!r} holds the control lock{since}; ask them to release it "
            f"(pause and abort are always accepted)"
        )

    def _on_event(self, kind: str, payload: Mapping[str, Any], frame: Frame | None) -> None:
        with self._lock:
            if kind == "frame" and frame is not None:
                seq = int(payload["seq"])
                self._frame = (seq, frame)
                for old in [k for k in self._perception if k < seq - 4]:
                    del self._perception[old]
            elif kind == "perception":
                self._perception[int(payload["frame"])] = dict(payload)
            elif kind == "product" and frame is not None:
                self._products[str(payload["name"])] = (int(payload["seq"]), frame)
            elif kind == "command":
                of_frame = payload.get("frame")
                # An expiry on frame n is of a command proposed earlier: update it there.
                if of_frame is not None and payload.get("fate") != "expired":
                    self._fates.setdefault(int(of_frame), []).append(_fate_view(payload))
                self._mark_decided(payload)
            elif kind == "decision":
                seq = int(payload["frame"])
                tip = (self._perception.get(seq) or {}).get("tip")
                self._decisions.append(
                    {
                        "frame": seq,
                        "reason": payload.get("reason", ""),
                        "confidence": payload.get("confidence"),
                        "uncertainty": tip.get("uncertainty") if tip else None,
                        "tip": tip.get("state") if tip else None,
                        "commands": [c.get("type") for c in payload.get("commands", [])],
                        "fates": self._fates.pop(seq, []),
                        "stop": payload.get("stop", False),
                    }
                )
                for old in [k for k in self._fates if k < seq - 4]:
                    del self._fates[old]
            elif kind == "fault":
                self._faults.append(dict(payload))
            elif kind == "operator":
                self._operator.append(dict(payload))
            elif kind == "status":
                state = payload.get("state")
                if state == "started":
                    self._state = "running"
                elif state == "stopped":
                    self._state = "stopped"
                    self._stop_reason = str(payload.get("reason", ""))
        self._changed()

    def _mark_decided(self, payload: Mapping[str, Any]) -> None:
        """An approve/veto fate arrives without a frame: update that decision's fate list."""
        fate = payload.get("fate")
        if fate not in ("approved", "executed", "vetoed", "expired", "rejected", "failed"):
            return
        command_id = (payload.get("command") or {}).get("id")
        for decision in self._decisions:
            for entry in decision["fates"]:
                if entry["id"] == command_id:
                    entry["fate"] = fate

    def _changed(self) -> None:
        self._version += 1
        for waker in list(self._wakers):
            try:
                waker()
            except Exception:  # a closed event loop, a gone client: not the agent's problem
                self.remove_waker(waker)


def operator_of(origin: str) -> str:
    """The operator's name in an origin ``"<channel>:<operator>"`` (the whole string if none)."""
    return origin.split(":", 1)[1] if ":" in origin else origin


def _command_view(command: Command) -> dict[str, Any]:
    return {
        "id": command.id,
        "type": command.kind,
        "params": command.params(),
        "source": command.source,
        "reason": command.reason,
        "text": repr(command),
    }


def _fate_view(payload: Mapping[str, Any]) -> dict[str, Any]:
    command = payload.get("command") or {}
    return {
        "id": command.get("id"),
        "type": command.get("type"),
        "fate": payload.get("fate"),
        "reason": payload.get("reason", ""),
    }


def _fate_result(action: str, fate: Fate) -> dict[str, Any]:
    return {
        "action": action,
        "effect": fate.fate,
        "command": _command_view(fate.command),
        "fate": fate.fate,
        "reason": fate.reason,
    }
