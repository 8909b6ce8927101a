"""Replay: re-run perception and a (possibly different) policy on a recorded session.

``replay_session(S, R, overrides={...})`` reads the frames of the session store ``S`` in order,
rebuilds perception and policy with :func:`agent.pipeline.build_pipeline` from S's stored
configuration (as :func:`agent.pipeline.recorded_config` reads it: the models that ran) updated
by ``overrides`` (``policy``, ``policy_options``, ``assessor``,
``assessor_options``, ``quality``), and decides on every frame exactly as the agent loop does
(:meth:`agent.loop.Agent._decide_on`): a frame with problems is not assessed and not acted on,
a policy exception becomes a no-action decision, the tip history holds the last
``history_len`` estimates. Nothing is sent to an instrument. The result is a new session store
``R`` with the same frames and R's own perception and decision events, so that
:func:`diff_sessions` can compare the two frame by frame.

Deterministic: the same store and overrides give bit-identical decisions (command ids aside,
which are fresh random ids by design), and replaying a lockstep session with its own
configuration reproduces its recorded decisions. What a replay cannot know: what the instrument
would have done after a *different* command (the frames are yesterday's); replay evaluates
decisions on the frames that were seen, it does not simulate their consequences. Operator
threshold changes recorded during the run (``operator`` events ``thresholds``) are applied at
the same point when the recorded policy is replayed; a resume seam restarts the policy, as the
resumed run did.

The instrument state a policy sees (stage position, scan region, dwell) is rebuilt from each
frame's header: the loop reads it after the frame, before the decision's commands, so in a
lockstep session it is the frame's own settings. A decision event that carries a ``state``
(recorded by newer agents) is used as it is.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from agent.perception.stages import run_stages
from agent.pipeline import Pipeline, build_pipeline, recorded_config
from agent.recorder import SessionRecorder
from agent.session import Session
from drivers.errors import ConfigError, DataError, ScopePilotError
from drivers.frame import Frame, ScanRegion, TipState
from drivers.observation import Decision, Observation, QualityEstimate, TipEstimate
from drivers.protocol import InstrumentInfo, InstrumentState

log = logging.getLogger(__name__)

PIPELINE_KEYS = ("policy", "policy_options", "assessor", "assessor_options", "quality")
"""Configuration keys a replay may override (everything else is the recorded run's)."""


def state_for_frame(frame: Frame, recorded: Mapping[str, Any] | None = None) -> InstrumentState:
    """The instrument state the agent saw when deciding on ``frame``.

    ``recorded`` (a decision event's ``state``, when the agent recorded one) wins; otherwise the
    state is the frame's own settings: stage at the scan centre, its region, shape and dwell.
    """
    if recorded is not None:
        try:
            region = ScanRegion.from_json(recorded["scan_region"])
            return InstrumentState(
                position_m=(float(recorded["position_m"][0]), float(recorded["position_m"][1])),
                scan_region=region,
                shape_px=(int(recorded["shape_px"][0]), int(recorded["shape_px"][1])),
                dwell_s=float(recorded["dwell_s"]),
                scanning=bool(recorded.get("scanning", False)),
                time_s=float(recorded.get("time_s", frame.timestamp_s)),
                frames_done=int(recorded.get("frames_done", frame.frame_index + 1)),
                connected=bool(recorded.get("connected", True)),
                extra=dict(recorded.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError, IndexError, DataError) as exc:
            raise DataError(f"recorded instrument state is malformed: {exc!r}") from None
    region = frame.scan_region
    return InstrumentState(
        position_m=(region.center_x_m, region.center_y_m),
        scan_region=region,
        shape_px=frame.shape,
        dwell_s=frame.dwell_s,
        scanning=False,
        time_s=frame.timestamp_s,
        frames_done=frame.frame_index + 1,
    )


def canonical_decision(payload: Mapping[str, Any]) -> dict[str, Any]:
    """A decision event payload without what differs between identical decisions (command ids,
    latencies): two decisions are the same when these are equal."""
    commands = []
    for command in payload.get("commands") or ():
        if isinstance(command, Mapping):
            commands.append({k: v for k, v in command.items() if k != "id"})
    return {
        "commands": commands,
        "reason": payload.get("reason"),
        "confidence": payload.get("confidence"),
        "stop": bool(payload.get("stop", False)),
        "policy": payload.get("policy"),
    }


def session_instrument(session: Session) -> InstrumentInfo:
    """The instrument info from the session's first ``started`` status event."""
    for event in session.events("status"):
        payload = event["payload"]
        if payload.get("state") == "started" and isinstance(payload.get("instrument"), Mapping):
            return InstrumentInfo.from_json(payload["instrument"], "recorded instrument info")
    raise DataError(
        f"{session.path}: no 'started' status event with the instrument info; cannot tell "
        f"which instrument the frames came from"
    )


def replay_config(recorded: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The recorded session config with pipeline ``overrides`` applied.

    Choosing another policy drops the recorded ``policy_options`` (they belong to the recorded
    policy) unless ``overrides`` gives new ones. Raises :class:`ConfigError` for a key that is
    not a pipeline key.
    """
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"replay overrides must be a mapping, got {type(overrides).__name__}")
    unknown = sorted(set(overrides) - set(PIPELINE_KEYS), key=str)
    if unknown:
        raise ConfigError(
            f"replay can change {', '.join(PIPELINE_KEYS)}; not {unknown} (the frames are fixed)"
        )
    config = dict(recorded)
    policy = overrides.get("policy")
    if policy is not None and policy != recorded.get("policy"):
        config["policy_options"] = {}
    assessor = overrides.get("assessor")
    if assessor is not None and assessor != recorded.get("assessor"):
        config["assessor_options"] = {}
    config.update(overrides)
    return config


@dataclass
class ReplayResult:
    """What a replay did: frames decided, decisions with commands, where it stopped, time."""

    out: Path
    frames: int = 0
    acted: int = 0
    stop_reason: str = ""
    seconds: float = 0.0
    recorded_scan_s: float = 0.0  # the instrument time the recorded frames took, when known
    per_stage_s: dict[str, float] = field(default_factory=dict)


def replay_session(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    overrides: Mapping[str, Any] = {},  # read only
    overwrite: bool = False,
    history_len: int = 8,
    on_frame: Callable[[int], None] | None = None,
) -> ReplayResult:
    """Replay the session at ``source`` into a new store ``out`` (see the module docstring).

    Raises :class:`DataError` for an unreadable source, :class:`ConfigError` for bad overrides
    or an ``out`` that exists (without ``overwrite``) or is ``source`` itself.
    """
    t_start = time.perf_counter()
    session = Session(source)
    out_path = Path(out)
    if out_path.resolve() == session.path.resolve():
        raise ConfigError(f"replay output {out_path} is the source session; choose another path")
    info = session_instrument(session)
    kind = info.kind
    config = replay_config(recorded_config(session.config, session.versions), overrides)
    # nothing streams in a replay: a recorded early abort is judged by the assessor's watch on
    # the recorded lines (_watched_tip), whatever the assessor
    config["early_abort"] = False
    pipeline = build_pipeline(config, kind=kind)
    decisions = _recorded_by_frame(session, "decision")
    resumes = _resume_rows(session)
    # operator threshold changes happened to the recorded policy; a different one ignores them
    same_policy = config.get("policy") == session.config.get("policy")
    changes = _threshold_changes(session) if same_policy else {}
    overridden = set(overrides.get("policy_options") or ())
    versions = {**pipeline.versions(), "replay_of": str(session.path)}
    stored_config = {
        **config,
        "replay": {"source": str(session.path), "overrides": dict(overrides)},
    }
    result = ReplayResult(out=out_path)
    with SessionRecorder(
        out_path, overwrite=overwrite, config=stored_config, versions=versions
    ) as recorder:
        recorder.append_event(
            "status",
            {
                "state": "started",
                "mode": "replay",
                "replay_of": str(session.path),
                "policy": pipeline.policy.name,
                "assessor": _name(pipeline.assessor),
                "quality": _name(pipeline.quality),
                "instrument": info.to_json(),
            },
        )
        replayer = _Replayer(pipeline, info, history_len)
        records = session.frame_records()
        for row, record in enumerate(records):
            if row in resumes:  # the run was resumed here: its policy started fresh
                pipeline = build_pipeline(config, kind=kind)
                replayer = _Replayer(pipeline, info, history_len, first_seq=row)
            for values in changes.get(row, ()):
                kept = {k: v for k, v in values.items() if k not in overridden}
                if kept:
                    _adjust_thresholds(pipeline.policy, kept)
                    recorder.append_event(
                        "operator",
                        {
                            "action": "thresholds",
                            "origin": "replay",
                            "effect": f"the operator's change before frame {row}, replayed",
                            "values": kept,
                        },
                    )
            frame = session.frame(row)
            # the agent's problems; the recorder's own note about an unstorable ground-truth
            # image was never shown to the policy
            problems = tuple(
                str(p)
                for p in record.get("problems") or ()
                if not str(p).startswith("ground-truth clean image")
            )
            recorder.append_frame(frame, problems=problems, extra={"seq": row})
            recorded = decisions.get(row) or {}
            recorded_state = recorded.get("state")
            pending = recorded.get("pending_commands", 0)
            advisory = recorded.get("advisory", False)
            early = (record.get("extra") or {}).get("early_abort")
            perception, decision_payload, stop = replayer.step(
                row,
                frame,
                problems,
                recorded_state if isinstance(recorded_state, Mapping) else None,
                pending_commands=pending if isinstance(pending, int) else 0,
                advisory=advisory is True,
                early_abort=early if isinstance(early, Mapping) else None,
            )
            if replayer.arrays:  # sr images: pixels first, the perception event commits them
                refs = {k: recorder.append_array(k, v) for k, v in replayer.arrays.items()}
                perception = {**perception, "arrays": refs}
            recorder.append_event("perception", perception, t_instrument=frame.timestamp_s)
            recorder.append_event("decision", decision_payload, t_instrument=frame.timestamp_s)
            result.frames += 1
            result.acted += bool(decision_payload["commands"])
            result.recorded_scan_s += _scan_time_s(frame)
            if on_frame is not None:
                on_frame(row)
            if stop:
                result.stop_reason = f"policy {pipeline.policy.name} stopped at frame {row}"
                break
        if not result.stop_reason:
            result.stop_reason = f"replayed all {result.frames} frames"
        recorder.append_event(
            "status",
            {"state": "stopped", "reason": result.stop_reason, "frames": result.frames},
        )
        result.per_stage_s = dict(replayer.stage_s)
    result.seconds = time.perf_counter() - t_start
    return result


def _watched_tip(assessor: Any, frame: Frame, early_abort: Mapping[str, Any]) -> TipEstimate | None:
    """The assessor's ``watch`` on the lines the agent had seen when it aborted the scan; None
    when the assessor cannot watch or does not see a bad tip there."""
    watch = getattr(assessor, "watch", None)
    if not callable(watch):
        return None
    lines = early_abort.get("lines_done")
    if isinstance(lines, int) and 0 < lines < frame.lines_done:
        frame = dataclasses.replace(frame, lines_done=lines)
    tip = watch(frame)
    if tip is None or tip.state is TipState.GOOD:
        return None
    return tip if isinstance(tip, TipEstimate) else None


def _name(part: Any) -> str | None:
    return None if part is None else str(part.name)


def _scan_time_s(frame: Frame) -> float:
    """Time the instrument spent scanning ``frame``: recorded ``scan_time_s`` metadata when the
    driver gives it, else dwell x scanned pixels (a lower bound: no flyback)."""
    recorded = frame.metadata.get("scan_time_s")
    if isinstance(recorded, (int, float)) and math.isfinite(recorded) and recorded > 0:
        return float(recorded)
    return float(frame.dwell_s) * frame.lines_done * frame.shape[1]


def _recorded_by_frame(session: Session, kind: str) -> dict[int, dict[str, Any]]:
    """The last ``kind`` event payload of each frame row."""
    out: dict[int, dict[str, Any]] = {}
    for event in session.events(kind):
        frame = event["payload"].get("frame")
        if isinstance(frame, int) and not isinstance(frame, bool):
            out[frame] = event["payload"]
    return out


def _threshold_changes(session: Session) -> dict[int, list[dict[str, Any]]]:
    """Operator threshold changes (``operator`` events, action ``thresholds``, not refused) by
    the first frame they can have affected: the first frame perceived after the change was
    recorded. (A change made while that frame was being perceived took effect one frame later
    in the run; diff shows such a frame.)"""
    changes: dict[int, list[dict[str, Any]]] = {}
    pending: list[dict[str, Any]] = []
    for event in session.events():
        payload = event["payload"]
        if event["kind"] == "operator" and payload.get("action") == "thresholds":
            values = payload.get("values")
            if not payload.get("refused") and isinstance(values, Mapping):
                pending.append(dict(values))
        elif event["kind"] == "status" and payload.get("state") == "resumed":
            pending = []  # the resumed run started from the stored config
        elif event["kind"] == "perception" and pending:
            frame = payload.get("frame")
            if isinstance(frame, int):
                changes.setdefault(frame, []).extend(pending)
                pending = []
    return changes


def _adjust_thresholds(policy: Any, values: Mapping[str, Any]) -> None:
    """Apply an operator's threshold change to ``policy.config`` (a dataclass), as
    :meth:`agent.loop.Agent.adjust_policy` did in the run."""
    config = getattr(policy, "config", None)
    if config is None or not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise DataError(
            f"the recorded operator changed thresholds {dict(values)} but policy "
            f"{policy.name!r} has no dataclass config to change"
        )
    try:
        policy.config = dataclasses.replace(config, **values)
    except (TypeError, ValueError, ConfigError) as exc:
        raise DataError(f"cannot replay the operator's thresholds {dict(values)}: {exc}") from None


def _resume_rows(session: Session) -> set[int]:
    rows = set()
    for event in session.events("status"):
        payload = event["payload"]
        if payload.get("state") == "resumed" and isinstance(payload.get("frames_before"), int):
            rows.add(int(payload["frames_before"]))
    return rows


class _Replayer:
    """The loop's perceive -> decide step for one frame at a time, without an instrument."""

    def __init__(
        self, pipeline: Pipeline, info: InstrumentInfo, history_len: int, *, first_seq: int = 0
    ) -> None:
        self.pipeline = pipeline
        self.info = info
        self.history: deque[TipEstimate] = deque(maxlen=history_len)
        self.commands_so_far = 0
        self.first_seq = first_seq
        self.stage_s: dict[str, float] = {"perceive": 0.0, "decide": 0.0}
        self.arrays: dict[str, Any] = {}  # the last step's stage images (e.g. sr)

    def step(
        self,
        row: int,
        frame: Frame,
        problems: tuple[str, ...],
        recorded_state: Mapping[str, Any] | None,
        *,
        pending_commands: int = 0,
        advisory: bool = False,
        early_abort: Mapping[str, Any] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any], bool]:
        """Perception and decision on one recorded frame; ``pending_commands`` is how many
        commands were waiting for the operator when the agent decided (supervised mode);
        ``advisory`` whether the agent was in manual mode (the policy only advised);
        ``early_abort`` is the record of a scan the agent aborted for a tip change (its frame is
        judged by the assessor's ``watch`` on the lines the agent had seen, as in the run)."""
        assessor, quality_assessor, policy = (
            self.pipeline.assessor,
            self.pipeline.quality,
            self.pipeline.policy,
        )
        t0 = time.perf_counter()
        tip: TipEstimate | None = None
        quality: QualityEstimate | None = None
        if early_abort is not None and not problems and not frame.complete:
            tip = _watched_tip(assessor, frame, early_abort)
            if tip is None:
                problems = (
                    *problems,
                    f"incomplete frame ({frame.lines_done} of {frame.shape[0]} lines; aborted "
                    f"early by the recorded run, {_name(assessor)} does not see the tip change)",
                )
        elif not problems and frame.complete:
            try:
                if assessor is not None:
                    tip = assessor.assess(frame)
                if quality_assessor is not None:
                    quality = quality_assessor.assess(frame)
            except ScopePilotError as exc:
                problems = (*problems, f"assessor failed: {exc}")
        t1 = time.perf_counter()
        products = run_stages(
            self.pipeline.stages if not problems and frame.complete else (), frame
        )
        self.arrays = dict(products.arrays)
        for name, seconds in products.latency_s.items():
            self.stage_s[name] = self.stage_s.get(name, 0.0) + seconds
        perception = {
            "frame": row,
            "frame_index": frame.frame_index,
            "assessor": _name(assessor),
            "tip": tip.to_json() if tip is not None else None,
            "quality": quality.to_json() if quality is not None else None,
            **products.fields,
            **({"early_abort": dict(early_abort)} if tip is not None and early_abort else {}),
            "problems": list(problems),
        }
        self.stage_s["perceive"] += t1 - t0
        t1 = time.perf_counter()  # the decision's time starts after the stages
        observation = Observation(
            frame=frame,
            tip=tip,
            state=state_for_frame(frame, recorded_state),
            info=self.info,
            problems=problems,
            history=tuple(self.history),
            frames_seen=row - self.first_seq + 1,
            commands_so_far=self.commands_so_far,
            quality=quality,
            pending_commands=pending_commands,
            advisory=advisory,
            stages=products.fields,
        )
        try:
            if problems:
                decision = Decision(
                    reason="frame not acted on: " + "; ".join(problems),
                    confidence=0.0,
                    policy=policy.name,
                )
            else:
                decision = policy.decide(observation)
        except Exception as exc:  # as the loop does: a faulty policy is a no-action decision
            decision = Decision(
                reason=f"policy raised {type(exc).__name__}; no action",
                confidence=0.0,
                policy=policy.name,
            )
        t2 = time.perf_counter()
        self.stage_s["decide"] += t2 - t1
        if tip is not None:
            self.history.append(tip)
        commands = [
            c.with_meta(source=policy.name) if c.source == "policy" else c
            for c in decision.commands
        ]
        self.commands_so_far += len(commands)
        payload = {
            "frame": row,
            **decision.to_json(),
            "commands": [c.to_json() for c in commands],
            "policy_version": policy.version,
            "pending_commands": pending_commands,
            "advisory": advisory,
        }
        return perception, payload, decision.stop


# -- diff ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameDiff:
    """One frame on which two sessions decided differently, and the likely causes."""

    frame: int
    a: dict[str, Any] | None  # canonical decision in A (None: A made no decision on it)
    b: dict[str, Any] | None
    causes: tuple[str, ...]


@dataclass
class SessionDiff:
    a: Path
    b: Path
    config_changes: list[str]
    frames_compared: int
    same: int  # identical decisions (reason included)
    reason_only: int  # the same commands and stop flag, another reason
    differences: list[FrameDiff]  # other commands or stop flag
    only_in_a: list[int]
    only_in_b: list[int]

    def to_json(self) -> dict[str, Any]:
        return {
            "a": str(self.a),
            "b": str(self.b),
            "config_changes": self.config_changes,
            "frames_compared": self.frames_compared,
            "same": self.same,
            "reason_only": self.reason_only,
            "differences": [
                {"frame": d.frame, "a": d.a, "b": d.b, "causes": list(d.causes)}
                for d in self.differences
            ],
            "only_in_a": self.only_in_a,
            "only_in_b": self.only_in_b,
        }


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(f"{prefix}.{key}" if prefix else str(key), item))
        return out
    return {prefix: value}


def config_changes(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Pipeline settings that differ between two session configs, as ``key: a -> b`` lines
    (a key absent from a config is shown as ``default``)."""
    flat_a = _flatten("", {k: a.get(k) for k in PIPELINE_KEYS})
    flat_b = _flatten("", {k: b.get(k) for k in PIPELINE_KEYS})
    lines = []
    for key in sorted(set(flat_a) | set(flat_b)):
        va, vb = flat_a.get(key, _DEFAULT), flat_b.get(key, _DEFAULT)
        if va in ({}, None) and vb in ({}, None):
            continue
        if va != vb:
            lines.append(f"{key}: {_show(va)} -> {_show(vb)}")
    return lines


_DEFAULT = object()


def _show(value: Any) -> str:
    return "default" if value is _DEFAULT else json.dumps(value)


def _threshold(config: Mapping[str, Any], name: str, default: float) -> float:
    options = config.get("policy_options")
    value = options.get(name) if isinstance(options, Mapping) else None
    return float(value) if isinstance(value, (int, float)) else default


def _perception_causes(
    pa: Mapping[str, Any] | None,
    pb: Mapping[str, Any] | None,
    config_a: Mapping[str, Any],
    config_b: Mapping[str, Any],
) -> list[str]:
    if pa is None or pb is None:
        return ["perception missing in " + ("A" if pa is None else "B")]
    causes = []
    if pa.get("problems") != pb.get("problems"):
        causes.append(f"problems: {pa.get('problems')} -> {pb.get('problems')}")
    ta, tb = pa.get("tip") or {}, pb.get("tip") or {}
    if ta.get("state") != tb.get("state"):
        causes.append(f"tip state: {ta.get('state')} -> {tb.get('state')}")
    ua, ub = ta.get("uncertainty"), tb.get("uncertainty")
    if isinstance(ua, (int, float)) and isinstance(ub, (int, float)) and ua != ub:
        from policies.rule import RuleConfig

        limit_a = _threshold(config_a, "max_uncertainty", RuleConfig.max_uncertainty)
        limit_b = _threshold(config_b, "max_uncertainty", RuleConfig.max_uncertainty)
        if (ua <= limit_a) != (ub <= limit_b):
            causes.append(
                f"tip uncertainty {ua:.3f} (max {limit_a:g}) -> {ub:.3f} (max {limit_b:g}): "
                f"{'trusted -> not trusted' if ua <= limit_a else 'not trusted -> trusted'}"
            )
        elif abs(ua - ub) > 1e-9:
            causes.append(f"tip uncertainty {ua:.3f} -> {ub:.3f}")
    qa, qb = (pa.get("quality") or {}).get("snr"), (pb.get("quality") or {}).get("snr")
    if qa != qb and not (qa is None and qb is None):
        causes.append(f"image SNR {qa} -> {qb}")
    return causes


def _summary(decision: Mapping[str, Any] | None) -> str:
    if decision is None:
        return "no decision"
    commands = [c.get("type", "?") for c in decision["commands"]]
    what = ", ".join(commands) if commands else "no command"
    return f"{what}{' + stop' if decision['stop'] else ''} ({decision['reason']})"


def diff_sessions(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> SessionDiff:
    """Compare the decisions of two sessions over the same frames (a run and its replay, or two
    replays) frame by frame, and say for each difference what perception output or setting
    changed. Raises :class:`DataError` when either is unreadable or they hold different frames.
    """
    sa, sb = Session(a), Session(b)
    _check_same_frames(sa, sb)
    decisions_a = _recorded_by_frame(sa, "decision")
    decisions_b = _recorded_by_frame(sb, "decision")
    perception_a = _recorded_by_frame(sa, "perception")
    perception_b = _recorded_by_frame(sb, "perception")
    changes = config_changes(sa.config, sb.config)
    diff = SessionDiff(sa.path, sb.path, changes, 0, 0, 0, [], [], [])
    diverged_at: int | None = None
    for frame in sorted(set(decisions_a) | set(decisions_b)):
        da, db = decisions_a.get(frame), decisions_b.get(frame)
        if da is None or db is None:
            (diff.only_in_b if da is None else diff.only_in_a).append(frame)
            continue
        diff.frames_compared += 1
        ca, cb = canonical_decision(da), canonical_decision(db)
        if ca == cb:
            diff.same += 1
            continue
        if (ca["commands"], ca["stop"]) == (cb["commands"], cb["stop"]):
            diff.reason_only += 1
            continue
        causes = _perception_causes(
            perception_a.get(frame), perception_b.get(frame), sa.config, sb.config
        )
        if ca["policy"] != cb["policy"]:
            causes.append(f"policy: {ca['policy']} -> {cb['policy']}")
        if not causes:
            if changes:
                causes.append("same perception; settings differ: " + "; ".join(changes))
            elif diverged_at is not None:
                causes.append(
                    f"same perception and settings; the policy's memory differs since frame "
                    f"{diverged_at} (its earlier decisions differed)"
                )
            else:
                causes.append("same perception and settings: the policy is not deterministic")
        if diverged_at is None:
            diverged_at = frame
        diff.differences.append(FrameDiff(frame, ca, cb, tuple(causes)))
    return diff


def _check_same_frames(sa: Session, sb: Session) -> None:
    """Headers of every common row, and the pixels of the first and last, must match."""
    ra, rb = sa.frame_records(), sb.frame_records()
    common = min(len(ra), len(rb))
    for row in range(common):
        if ra[row]["header"] != rb[row]["header"]:
            _different(sa, sb, row, "headers")
    for row in sorted({0, common - 1} - {-1}):
        a, b = sa.frame(row).data, sb.frame(row).data
        if a.shape != b.shape or a.dtype != b.dtype or a.tobytes() != b.tobytes():
            _different(sa, sb, row, "pixels")


def _different(sa: Session, sb: Session, row: int, what: str) -> NoReturn:
    raise DataError(
        f"{sa.path} and {sb.path} hold different frames ({what} of row {row} differ); diff "
        f"compares sessions over the same frames, such as a session and its replay"
    )


def format_diff(diff: SessionDiff, *, limit: int = 50) -> str:
    """A readable report of ``diff`` (at most ``limit`` differing frames listed)."""
    lines = [f"A: {diff.a}", f"B: {diff.b}"]
    if diff.config_changes:
        lines.append("settings changed:")
        lines += [f"  {line}" for line in diff.config_changes]
    else:
        lines.append("settings: the same")
    lines.append(
        f"decisions compared on {diff.frames_compared} frames: {diff.same} the same, "
        f"{diff.reason_only} the same action for another reason, "
        f"{len(diff.differences)} a different action"
    )
    for label, rows in (("A", diff.only_in_a), ("B", diff.only_in_b)):
        if rows:
            lines.append(f"decided only in {label} on {len(rows)} frames: {_ranges(rows)}")
    for d in diff.differences[:limit]:
        lines.append(f"frame {d.frame}:")
        lines.append(f"  A: {_summary(d.a)}")
        lines.append(f"  B: {_summary(d.b)}")
        lines += [f"  why: {cause}" for cause in d.causes]
    if len(diff.differences) > limit:
        lines.append(f"... {len(diff.differences) - limit} more (use --json for all)")
    return "\n".join(lines)


def _ranges(rows: Iterable[int]) -> str:
    out: list[str] = []
    for row in sorted(rows):
        if out and out[-1].endswith(f"-{row - 1}"):
            out[-1] = out[-1].rsplit("-", 1)[0] + f"-{row}"
        elif out and out[-1] == str(row - 1):
            out[-1] = f"{row - 1}-{row}"
        else:
            out.append(str(row))
    return ", ".join(out)
