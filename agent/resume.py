"""``scopepilot run --resume S.zarr``: continue an interrupted session into the same store.

A session whose process was killed (power cut, ``kill -9``, OOM) leaves a store without the
``ended`` attribute. :func:`plan_resume` checks that such a store can be continued and works out
how: the stored configuration (instrument URI, simulator options, perception and policy), how
many frames are left, and where numbering continues. The run then appends through
:meth:`agent.recorder.SessionRecorder.reopen` and a :class:`ContinuedRecorder`, which shifts the
agent's frame numbers by the frames already stored, so that rows, event numbers and the
``frame`` fields of events all continue where the killed run stopped.

What is not carried over: the state of the instrument (a simulator is reopened, seeded with
``seed + resume_number * RESUME_SEED_STRIDE`` so that it does not replay the frames it already
produced; a real instrument is wherever it is) and the policy's memory of the first part
(escalation counters, damaged spots), which starts fresh. The ``resumed`` status event says so.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.loop import Recorder
from drivers.errors import ConfigError, DataError
from drivers.frame import Frame

RESUME_SEED_STRIDE = 1_000_003
"""Seed offset per resume of a simulated session (a prime, far from neighbouring seeds)."""

_REQUIRED = ("instrument", "policy", "frames")


@dataclass(frozen=True)
class ResumePlan:
    """How to continue the interrupted session at ``path``."""

    path: Path
    config: dict[str, Any]
    versions: dict[str, Any]
    frames_before: int
    events_before: int
    resume_number: int  # 1 for the first resume of this store
    instrument_kind: str | None  # from the session's "started" event, when recorded

    @property
    def frames_left(self) -> int:
        return int(self.config["frames"]) - self.frames_before

    @property
    def seed(self) -> int:
        """Simulator seed for this part of the session."""
        return int(self.config.get("seed") or 0) + self.resume_number * RESUME_SEED_STRIDE

    def check_compatible(self, kind: str, versions: Mapping[str, str]) -> None:
        """Refuse to continue with another kind of instrument or other model/policy versions."""
        if self.instrument_kind is not None and kind != self.instrument_kind:
            raise ConfigError(
                f"cannot resume {self.path}: it was recorded on a {self.instrument_kind!r} "
                f"instrument, {self.config['instrument']!r} is now a {kind!r}"
            )
        changed = {
            key: (self.versions.get(key), value)
            for key, value in versions.items()
            if key != "scopepilot" and key in self.versions and self.versions[key] != value
        }
        if changed:
            detail = "; ".join(
                f"{k}: recorded {old!r}, now {new!r}" for k, (old, new) in changed.items()
            )
            raise ConfigError(
                f"cannot resume {self.path}: perception/policy versions changed ({detail}); "
                f"replay the session with the new versions instead (scopepilot replay)"
            )

    def status_payload(self) -> dict[str, Any]:
        return {
            "state": "resumed",
            "frames_before": self.frames_before,
            "events_before": self.events_before,
            "frames_left": self.frames_left,
            "resume_number": self.resume_number,
            "seed": self.seed if str(self.config["instrument"]).startswith("sim:") else None,
            "note": "instrument reopened and policy state started fresh; frames and events "
            "before this one are from the interrupted run",
        }


def plan_resume(path: str | os.PathLike[str]) -> ResumePlan:
    """Check the store at ``path`` and plan its continuation.

    Raises :class:`DataError` when ``path`` is not a readable session store or was closed
    (complete), and :class:`ConfigError` when its configuration cannot be run again or it
    already holds all its frames.
    """
    from agent.session import Session

    path = Path(path)
    session = Session(path)
    if session.ended:
        raise DataError(
            f"cannot resume {path}: the session was closed at {session.ended} (complete); "
            f"only an interrupted session can be resumed"
        )
    config = session.config
    missing = [key for key in _REQUIRED if key not in config]
    if missing:
        raise ConfigError(
            f"cannot resume {path}: its stored config lacks {missing} (not written by "
            f"scopepilot run)"
        )
    frames = config["frames"]
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ConfigError(f"cannot resume {path}: stored config frames={frames!r} is not >= 1")
    if not isinstance(config["instrument"], str):
        raise ConfigError(f"cannot resume {path}: stored instrument {config['instrument']!r}")
    done = len(session)
    if done >= frames:
        raise ConfigError(
            f"cannot resume {path}: it already holds {done} of {frames} frames (complete)"
        )
    kind = None
    for event in session.events("status"):
        instrument = event["payload"].get("instrument")
        if event["payload"].get("state") == "started" and isinstance(instrument, dict):
            kind = instrument.get("kind") if isinstance(instrument.get("kind"), str) else None
            break
    resumes = sum(1 for e in session.events("status") if e["payload"].get("state") == "resumed")
    return ResumePlan(
        path=path,
        config=config,
        versions=session.versions,
        frames_before=done,
        events_before=len(session.events()),
        resume_number=resumes + 1,
        instrument_kind=kind,
    )


def sim_option_args(config: Mapping[str, Any]) -> list[str]:
    """The stored ``sim_options`` as ``--sim KEY=VALUE`` strings (values as JSON)."""
    options = config.get("sim_options") or {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"stored sim_options must be a mapping, got {options!r}")
    return [f"{key}={json.dumps(value)}" for key, value in options.items()]


class ContinuedRecorder:
    """Wraps a reopened recorder so that the agent's frame numbers continue the stored ones.

    The agent numbers frames from 0; this adds ``offset`` to the ``frame`` field of event
    payloads and the ``seq`` of frame extras (nothing else is changed).
    """

    def __init__(self, recorder: Recorder, offset: int) -> None:
        self._recorder = recorder
        self.offset = offset

    def append_frame(
        self, frame: Frame, *, problems: Any = (), extra: Mapping[str, Any] = {}
    ) -> int:
        shifted = dict(extra)
        if isinstance(shifted.get("seq"), int):
            shifted["seq"] += self.offset
        return self._recorder.append_frame(frame, problems=problems, extra=shifted)

    def append_event(
        self,
        kind: str,
        payload: Mapping[str, Any],
        *,
        t_wall: float | None = None,
        t_instrument: float | None = None,
    ) -> int:
        shifted = dict(payload)
        if isinstance(shifted.get("frame"), int) and not isinstance(shifted["frame"], bool):
            shifted["frame"] += self.offset
        return self._recorder.append_event(kind, shifted, t_wall=t_wall, t_instrument=t_instrument)

    def append_array(self, name: str, array: Any) -> dict[str, Any]:
        """A perception stage's image (see :meth:`SessionRecorder.append_array`)."""
        store = getattr(self._recorder, "append_array", None)
        if store is None:
            raise DataError(f"{type(self._recorder).__name__} cannot store arrays")
        ref: dict[str, Any] = store(name, array)
        return ref


def apply_plan(args: Any, plan: ResumePlan) -> Any:
    """``scopepilot run`` arguments (an argparse namespace) set from the stored configuration.

    ``--resume`` takes every run setting from the store; ``--out`` and ``--overwrite`` would
    contradict it and raise :class:`ConfigError`.
    """
    import argparse

    if getattr(args, "out", None) is not None or getattr(args, "overwrite", False):
        raise ConfigError("--resume S.zarr continues that store in place; drop --out/--overwrite")
    config = plan.config
    values = dict(vars(args))
    values.update(
        instrument=config["instrument"],
        policy=config["policy"],
        frames=plan.frames_left,
        seed=plan.seed,
        mode=config.get("mode") or "autonomous",
        shape=config.get("shape"),
        size_nm=config.get("size_nm"),
        dwell_us=config.get("dwell_us"),
        sim=sim_option_args(config) if str(config["instrument"]).startswith("sim:") else [],
        free_running=not config.get("lockstep", True),
        out=str(plan.path),
    )
    return argparse.Namespace(**values)
