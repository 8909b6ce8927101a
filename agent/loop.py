"""The real-time agent loop: acquire -> record -> perceive -> decide -> gate -> execute.

Three threads, decoupled by queues:

- **acquisition** streams frames from the instrument and hands each complete frame to the
  recorder queue (bounded, blocking: the recorder never drops a frame, it slows acquisition
  instead) and to a one-slot "latest frame" box for the decision thread (a frame replaced
  before it was looked at is counted as a skipped stale frame);
- **decision** assesses the freshest frame, builds an :class:`Observation`, asks the policy and
  passes its commands through the :class:`CommandGate`;
- **recorder** writes frames and events, in order, to the session store.

Frames and events share one unbounded queue to the recorder, in order; at most
``record_queue_size`` *frames* may wait in it (acquisition blocks for a free slot: the recorder
never drops a frame, it slows acquisition instead). Events never block: the command gate reports
fates while holding its lock, and a slow recorder must not delay an operator's pause.

Observers (the operator console's :class:`agent.control.Controller`) register with
:meth:`Agent.add_listener` and see every event and every complete frame as it happens.

``lockstep=True`` (the default) makes acquisition wait for the decision on frame *n* before it
scans frame *n + 1*, which is how conditioning works on a real STM (scan, judge, act, scan) and
makes simulated sessions deterministic: same seed, same frames, same decisions. With
``lockstep=False`` the instrument scans continuously and decisions use the freshest frame.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.gate import CommandGate, Fate, Mode
from agent.perception.stages import FrameStage, run_stages
from agent.summary import LatencyStats
from drivers.commands import AbortScan, Capability, Command, Retract
from drivers.errors import ConfigError, ScopePilotError
from drivers.frame import Frame, TipState, frame_problems
from drivers.observation import Decision, Observation, QualityEstimate, TipEstimate
from drivers.protocol import Instrument
from drivers.safety import SafetyEnvelope
from policies.base import Policy

log = logging.getLogger(__name__)


class Assessor(Protocol):
    """Perception of the tip: a classical assessor or a neural network."""

    name: str

    def assess(self, frame: Frame) -> TipEstimate: ...


class QualityAssessor(Protocol):
    """Image quality (signal-to-noise) of a frame, whatever the instrument."""

    name: str

    def assess(self, frame: Frame) -> QualityEstimate: ...


class Recorder(Protocol):
    def append_frame(
        self, frame: Frame, *, problems: Any = (), extra: Mapping[str, Any] = ...
    ) -> int: ...

    def append_event(
        self,
        kind: str,
        payload: Mapping[str, Any],
        *,
        t_wall: float | None = None,
        t_instrument: float | None = None,
    ) -> int: ...


Listener = Callable[[str, Mapping[str, Any], Frame | None], None]
"""``listener(kind, payload, frame)``: ``kind`` is an event kind, ``"frame"`` for a complete
frame (payload ``{"seq", "problems"}``) or ``"product"`` for an image a perception stage made of
frame ``seq`` (payload ``{"seq", "name"}``, the image as ``frame.data`` of a copy of the frame;
not recorded as an event, the perception event carries it). Called from the agent's threads: it
must be quick and must not call back into the agent."""


class _NullRecorder:
    def __init__(self) -> None:
        self.rows = 0

    def append_frame(self, frame: Frame, *, problems: Any = (), extra: Any = None) -> int:
        self.rows += 1
        return self.rows - 1

    def append_event(self, kind: str, payload: Any, **_: Any) -> int:
        return 0


@dataclass(frozen=True)
class AgentConfig:
    """How the loop runs. ``frames`` is the number of frames to acquire (the session length).

    Acquisition faults (disconnects, driver errors, lost frames) are retried with exponential
    backoff (``fault_backoff_s`` doubling up to ``max_backoff_s``). After
    ``pause_after_faults`` in a row the agent pauses command issue and raises an alert (a
    ``fault`` event with ``"alert": true``); the first good frame after that resumes it (unless
    the operator paused too). After ``max_consecutive_faults`` in a row the session stops.
    """

    frames: int = 100
    mode: Mode = Mode.AUTONOMOUS
    lockstep: bool = True
    record_queue_size: int = 64
    history_len: int = 8
    pause_after_faults: int = 3
    max_consecutive_faults: int = 20
    fault_backoff_s: float = 0.5
    max_backoff_s: float = 60.0

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise ConfigError(f"frames must be >= 1, got {self.frames!r}")
        if not 1 <= self.pause_after_faults <= self.max_consecutive_faults:
            raise ConfigError(
                f"need 1 <= pause_after_faults <= max_consecutive_faults, got "
                f"{self.pause_after_faults!r} and {self.max_consecutive_faults!r}"
            )
        if self.record_queue_size < 1:
            raise ConfigError(f"record_queue_size must be >= 1, got {self.record_queue_size!r}")
        Mode(self.mode)


@dataclass(frozen=True)
class Step:
    """What happened for one frame (handed to the ``on_step`` observer, e.g. a progress bar)."""

    seq: int
    frame: Frame
    tip: TipEstimate | None
    problems: tuple[str, ...]
    decision: Decision | None
    fates: tuple[Fate, ...]


@dataclass
class AgentResult:
    frames: int = 0
    stale_skipped: int = 0
    faults: int = 0
    stop_reason: str = ""
    latencies_s: dict[str, LatencyStats] = field(default_factory=dict)
    """Per stage, in bounded memory: exact count/mean/max, sampled percentiles."""


WATCH_EVERY_LINES = 16
"""With ``early_abort``, the tip assessor's ``watch`` judges a streaming scan once per this many
new lines (the tip network's recent read-out covers the last 16 lines), unless the assessor
states its own interval as ``watch_every_lines`` (the tip network with its line-change detector
looks every 4 lines: a change is reported when it is seen, not at the next multiple of 16)."""


@dataclass(frozen=True)
class EarlyAbort:
    """A scan the agent aborted because the tip changed while it streamed: the ``tip`` estimate
    of the last lines when ``lines_done`` lines were scanned, the ``AbortScan`` command's id and
    the reason. The partial frame is acted on with this estimate (not judged as incomplete)."""

    lines_done: int
    tip: TipEstimate
    command_id: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "lines_done": self.lines_done,
            "tip": self.tip.to_json(),
            "command_id": self.command_id,
            "reason": self.reason,
        }


class _ScanWatcher:
    """One scan's watch: every :data:`WATCH_EVERY_LINES` lines (or the assessor's
    ``watch_every_lines``) the assessor judges the latest
    lines; a change from a good tip (the previous frame's estimate, or an earlier look at this
    scan) to a confident bad state sends ``AbortScan`` through the gate, like a policy command
    (paused: suppressed; manual: advised; supervised: not sent, the operator approves policy
    commands and a pending abort would outlive its scan). Each look and its outcome is recorded
    as an ``early_abort`` event when it triggers."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.seq = agent.result.frames
        self.watched = 0
        self.every = int(getattr(agent.assessor, "watch_every_lines", WATCH_EVERY_LINES))
        self.done = False
        last = agent._history[-1] if agent._history else None
        self.seen_good = last is not None and last.state is TipState.GOOD

    def look(self, part: Frame) -> EarlyAbort | None:
        agent = self.agent
        if self.done or part.lines_done - self.watched < self.every:
            return None
        self.watched = part.lines_done
        watch = agent._watch
        if watch is None:
            return None
        t0 = agent._clock()
        estimate = watch(part)
        agent._add_latency("watch", agent._clock() - t0)
        if estimate is None:  # too few lines or the network is unsure: no grounds to abort
            return None
        if estimate.state is TipState.GOOD:
            self.seen_good = True
            return None
        if not self.seen_good:  # bad since before this scan: the policy is already on it
            return None
        self.done = True
        first = max(0, part.lines_done - WATCH_EVERY_LINES)
        reason = (
            f"tip changed to {estimate.state} in lines {first}-{part.lines_done - 1} "
            f"(uncertainty {estimate.uncertainty:.2f}); scan aborted early"
        )
        source = f"{getattr(agent.assessor, 'name', 'assessor')} watch"
        command = AbortScan(source=source, reason=reason)
        payload: dict[str, Any] = {
            "frame": self.seq,
            "lines_done": part.lines_done,
            "tip": estimate.to_json(),
            "command_id": command.id,
            "reason": reason,
        }
        if agent.gate.mode is Mode.SUPERVISED:
            agent._event(
                "early_abort",
                {**payload, "fate": "not sent", "why": "supervised mode: the scan runs to its end"},
                part,
            )
            return None
        fate = agent.gate.submit_policy(command)
        agent._event("early_abort", {**payload, "fate": fate.fate, "why": fate.reason}, part)
        if fate.fate != "executed":
            return None
        return EarlyAbort(part.lines_done, estimate, command.id, reason)


class _LatestBox:
    """A one-slot mailbox: ``put`` replaces what is there and says whether it did."""

    def __init__(self) -> None:
        self._item: Any = None
        self._cond = threading.Condition()

    def put(self, item: Any) -> bool:
        with self._cond:
            replaced = self._item is not None
            self._item = item
            self._cond.notify_all()
            return replaced

    def get(self, timeout: float) -> Any:
        with self._cond:
            if self._item is None:
                self._cond.wait(timeout)
            item, self._item = self._item, None
            return item


_SENTINEL = object()


class Agent:
    """Runs a session: ``Agent(instrument, policy, assessor=..., recorder=...).run()``.

    ``pause``, ``resume``, ``abort``, ``set_mode``, ``approve``, ``veto`` and ``submit`` may be
    called from any thread while :meth:`run` is running; each is recorded as an operator action.
    """

    def __init__(
        self,
        instrument: Instrument,
        policy: Policy,
        *,
        assessor: Assessor | None,
        quality: QualityAssessor | None = None,
        stages: Sequence[FrameStage] = (),
        early_abort: bool = False,
        recorder: Recorder | None = None,
        envelope: SafetyEnvelope | None = None,
        config: AgentConfig | None = None,
        on_step: Callable[[Step], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.instrument = instrument
        self.policy = policy
        self.assessor = assessor
        self.quality = quality
        self.stages = tuple(stages)
        self.config = config or AgentConfig()
        self.info = instrument.info()
        self._recorder: Recorder = recorder if recorder is not None else _NullRecorder()
        self.envelope = envelope or SafetyEnvelope(self.info.limits)
        self.gate = CommandGate(
            instrument, self.info, self.envelope, mode=self.config.mode, on_fate=self._on_fate
        )
        self._on_step = on_step
        self._clock, self._wall, self._sleep = clock, wall_clock, sleep
        self._records: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._frame_slots = threading.Semaphore(self.config.record_queue_size)
        self._latest = _LatestBox()
        self._decided = threading.Event()
        self._stop = threading.Event()
        self._acquisition_done = threading.Event()
        self._history: deque[TipEstimate] = deque(maxlen=self.config.history_len)
        self._current_seq: int | None = None
        self._step_fates: list[Fate] = []
        self._errors: list[BaseException] = []
        self._commands_so_far = 0
        self.result = AgentResult()
        self._lat_lock = threading.Lock()
        self._fault_paused = False
        self._policy_lock = threading.Lock()
        self._listeners: list[Listener] = []
        self._operator_ids: set[str] = set()
        self._started = threading.Event()
        self._finished = threading.Event()
        watch = getattr(assessor, "watch", None)
        if early_abort and not callable(watch):
            raise ConfigError(
                f"early_abort needs a tip assessor with watch() (tipnet), got "
                f"{getattr(assessor, 'name', None)!r}"
            )
        self._watch: Callable[[Frame], TipEstimate | None] | None = (
            watch if early_abort and self.can_condition else None
        )

    # -- operator control (thread-safe) -------------------------------------------------------

    def pause(self, *, origin: str = "operator") -> None:
        self._fault_paused = False  # an operator's pause is not lifted by the fault recovery
        self.gate.pause()
        self._operator("pause", origin, "no policy command will be issued until resume")

    def resume(self, *, origin: str = "operator") -> None:
        self.gate.resume()
        self._operator("resume", origin, "policy commands flow again")

    def abort(self, *, origin: str = "operator", reason: str = "operator abort") -> None:
        """Stop the scan, retract where supported, and end the session."""
        self.gate.abort()
        self._stop_with(reason)
        effects = []
        for command in (
            AbortScan(source=origin, reason=reason),
            Retract(source=origin, reason=reason),
        ):
            if command.requires in self.info.capabilities:
                try:
                    self.instrument.execute(command)
                    effects.append(command.kind)
                    self._on_fate(Fate(command, "executed", reason))
                except ScopePilotError as exc:
                    self._on_fate(Fate(command, "failed", f"{type(exc).__name__}: {exc}"))
        self._operator("abort", origin, f"session stopped; executed {effects or 'nothing'}")

    def set_mode(self, mode: Mode | str, *, origin: str = "operator") -> None:
        self.gate.set_mode(mode)
        self._operator("mode", origin, f"mode is now {self.gate.mode.value}")

    def approve(self, command_id: str, *, origin: str = "operator") -> Fate:
        """Issue a pending command (supervised mode). An unknown or expired id raises
        :class:`ConfigError`; the refusal is recorded too."""
        self._operator_ids.add(command_id)
        try:
            fate = self.gate.approve(command_id, operator=origin)
        except ScopePilotError as exc:
            self.record_operator("approve", origin, f"refused: {exc}", command_id=command_id)
            raise
        self._operator("approve", origin, f"{command_id}: {fate.fate}", command_id=command_id)
        return fate

    def veto(self, command_id: str, *, origin: str = "operator", reason: str = "") -> Fate:
        """Drop a pending command. An unknown or expired id raises :class:`ConfigError`."""
        try:
            fate = self.gate.veto(command_id, operator=origin, reason=reason)
        except ScopePilotError as exc:
            self.record_operator("veto", origin, f"refused: {exc}", command_id=command_id)
            raise
        self._operator("veto", origin, f"{command_id}: vetoed", command_id=command_id)
        return fate

    def submit(self, command: Command, *, origin: str = "operator") -> Fate:
        """A manual command, through the same envelope as the policy's."""
        command = command.with_meta(source=origin)
        self._operator_ids.add(command.id)
        self._operator("submit", origin, f"manual {command!r}", command_id=command.id)
        return self.gate.submit_operator(command)

    def adjust_policy(
        self, values: Mapping[str, Any], *, origin: str = "operator"
    ) -> dict[str, Any]:
        """Change thresholds of a policy whose settings are a dataclass in ``policy.config``
        (the rule policy's :class:`~policies.rule.RuleConfig`), between two decisions.

        Only number fields can be changed; the new config is validated by the dataclass, and a
        bad value raises :class:`ConfigError` and changes nothing. Returns the old values.
        """
        try:
            old = self._adjust_policy(values)
        except ScopePilotError as exc:
            self.record_operator("thresholds", origin, f"refused: {exc}", values=dict(values))
            raise
        self._operator(
            "thresholds",
            origin,
            "; ".join(f"{k}: {old[k]!r} -> {v!r}" for k, v in values.items()),
            values=dict(values),
            old=old,
        )
        return old

    def policy_thresholds(self) -> dict[str, Any]:
        """The live-adjustable thresholds of the policy (number fields of ``policy.config``)."""
        config = getattr(self.policy, "config", None)
        if config is None or not dataclasses.is_dataclass(config):
            return {}
        out: dict[str, Any] = {}
        for item in dataclasses.fields(config):
            value = getattr(config, item.name)
            if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
                out[item.name] = value
        return out

    def _adjust_policy(self, values: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(values, Mapping) or not values:
            raise ConfigError(
                f"thresholds must be a non-empty mapping of name to value, got {values!r}"
            )
        with self._policy_lock:
            known = self.policy_thresholds()
            if not known:
                raise ConfigError(
                    f"policy {self.policy.name!r} has no adjustable thresholds "
                    f"(no dataclass config with number fields)"
                )
            for name, value in values.items():
                if name not in known:
                    raise ConfigError(
                        f"policy {self.policy.name!r} has no threshold {name!r}; "
                        f"adjustable: {', '.join(sorted(known))}"
                    )
                if isinstance(value, bool) or not isinstance(value, (int, float, type(None))):
                    raise ConfigError(f"threshold {name} must be a number, got {value!r}")
            config = self.policy.config  # type: ignore[attr-defined]
            try:
                new = dataclasses.replace(config, **values)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"bad thresholds {dict(values)!r}: {exc}") from None
            self.policy.config = new  # type: ignore[attr-defined]
            return {name: known[name] for name in values}

    def record_operator(self, action: str, origin: str, effect: str, **more: Any) -> None:
        """Record an operator action the agent did not perform itself (a refused request, a
        control-lock change): ``effect`` says what happened; refusals start with "refused"."""
        if effect.startswith("refused"):
            more = {"refused": True, **more}
        self._operator(action, origin, effect, **more)

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(kind, payload, frame)`` for every event and complete frame."""
        self._listeners.append(listener)

    def latencies(self, last: int = 50) -> dict[str, list[float]]:
        """The last ``last`` (at most :data:`agent.summary.RECENT_SIZE`) latencies of each
        stage, in seconds."""
        with self._lat_lock:
            return {k: v.recent(last) for k, v in self.result.latencies_s.items()}

    @property
    def running(self) -> bool:
        """True between the start of :meth:`run` and the end of its decisions."""
        return self._started.is_set() and not self._finished.is_set()

    # -- running ------------------------------------------------------------------------------

    def run(self) -> AgentResult:
        """Run the session to the end (frames done, policy stop, abort or fatal error)."""
        self._started.set()
        self._event(
            "status",
            {
                "state": "started",
                "mode": self.gate.mode.value,
                "policy": self.policy.name,
                "assessor": self.assessor.name if self.assessor is not None else None,
                "quality": self.quality.name if self.quality is not None else None,
                "stages": [stage.name for stage in self.stages],
                "instrument": self.info.to_json(),
            },
        )
        threads = [
            threading.Thread(target=self._guard(self._record_loop), name="recorder", daemon=True),
            threading.Thread(target=self._guard(self._decide_loop), name="decision", daemon=True),
            threading.Thread(
                target=self._guard(self._acquire_loop), name="acquisition", daemon=True
            ),
        ]
        for thread in threads:
            thread.start()
        threads[2].join()
        threads[1].join()
        self.gate.expire_pending("the session ended")  # recorded: no command is left hanging
        self._finished.set()
        self._event(
            "status",
            {
                "state": "stopped",
                "reason": self.result.stop_reason,
                "frames": self.result.frames,
                "stale_skipped": self.result.stale_skipped,
                "faults": self.result.faults,
            },
        )
        self._records.put(_SENTINEL)
        threads[0].join()
        if self._errors:
            raise self._errors[0]
        return self.result

    def _guard(self, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # a dying thread must stop the session, not hang it
                log.exception("agent thread %s died", threading.current_thread().name)
                self._errors.append(exc)
                self._stop_with(f"internal error in {threading.current_thread().name}: {exc!r}")
                self._acquisition_done.set()
                self._decided.set()

        return run

    def _stop_with(self, reason: str) -> None:
        if not self._stop.is_set():
            self.result.stop_reason = reason
            self._stop.set()
        self._decided.set()

    def _acquire_loop(self) -> None:
        cfg = self.config
        consecutive_faults = 0
        self._decided.set()
        try:
            while self.result.frames < cfg.frames and not self._stop.is_set():
                if cfg.lockstep:
                    while not self._decided.wait(0.05):
                        if self._stop.is_set():
                            return
                    if self._stop.is_set():
                        return
                t0 = self._clock()
                try:
                    expected = self.instrument.state().shape_px
                    frame, early = self._scan_one()
                except ScopePilotError as exc:
                    consecutive_faults += 1
                    self.result.faults += 1
                    alert = consecutive_faults == cfg.pause_after_faults
                    self._event(
                        "fault",
                        {
                            "stage": "acquire",
                            "error": f"{type(exc).__name__}: {exc}",
                            "consecutive": consecutive_faults,
                            "alert": alert,
                        },
                    )
                    if consecutive_faults >= cfg.max_consecutive_faults:
                        self._stop_with(
                            f"{consecutive_faults} consecutive acquisition faults; "
                            f"last: {type(exc).__name__}: {exc}"
                        )
                        return
                    if alert and not self.gate.paused:
                        log.warning("%d acquisition faults in a row: pausing", consecutive_faults)
                        self.gate.pause()
                        self._fault_paused = True
                        self._operator("pause", "agent", f"{consecutive_faults} faults in a row")
                    backoff = cfg.fault_backoff_s * 2 ** (consecutive_faults - 1)
                    self._sleep(min(backoff, cfg.max_backoff_s))
                    continue
                if self._fault_paused:
                    self._fault_paused = False
                    self.gate.resume()
                    self._operator("resume", "agent", "the instrument recovered")
                consecutive_faults = 0
                acquire_s = self._clock() - t0
                problems = tuple(frame_problems(frame, expected_shape=expected))
                seq = self.result.frames
                extra: dict[str, Any] = {"acquire_s": acquire_s, "seq": seq}
                if early is not None:  # aborted by the agent for a tip change: acted on
                    extra["early_abort"] = early.to_json()
                elif not frame.complete:  # aborted or truncated: recorded, never acted on
                    problems = (
                        *problems,
                        f"incomplete frame ({frame.lines_done} of {frame.shape[0]} lines)",
                    )
                self.result.frames += 1
                self._frame_slots.acquire()  # backpressure: the recorder never drops a frame
                self._records.put(("frame", frame, problems, extra, self._clock()))
                self._notify("frame", {"seq": seq, "problems": list(problems)}, frame)
                self._add_latency("acquire", acquire_s)
                if cfg.lockstep:
                    self._decided.clear()
                if self._latest.put((seq, frame, problems, early)):
                    self.result.stale_skipped += 1
            if not self._stop.is_set():
                self.result.stop_reason = f"completed {self.result.frames} frames"
        finally:
            self._acquisition_done.set()

    def _scan_one(self) -> tuple[Frame, EarlyAbort | None]:
        """Stream one scan; with ``early_abort``, watch its latest lines (:class:`_ScanWatcher`)."""
        last: Frame | None = None
        early: EarlyAbort | None = None
        watcher = _ScanWatcher(self) if self._watch is not None else None
        # the watch costs one small network pass per 16 lines; without it nothing is added
        for part in self.instrument.stream():
            last = part
            if watcher is not None and early is None and not part.complete:
                early = watcher.look(part)
        if last is None:
            raise ScopePilotError("the instrument's scan produced no frame")
        if early is not None and last.complete:  # the scan ended before the abort took hold
            early = None
        return last, early

    def _decide_loop(self) -> None:
        while True:
            item = self._latest.get(timeout=0.05)
            if item is None:
                if self._acquisition_done.is_set():
                    item = self._latest.get(timeout=0)
                    if item is None:
                        return
                else:
                    continue
            seq, frame, problems, early = item
            try:
                self._decide_on(seq, frame, problems, early)
            finally:
                self._decided.set()

    def _decide_on(
        self,
        seq: int,
        frame: Frame,
        problems: tuple[str, ...],
        early: EarlyAbort | None = None,
    ) -> None:
        t0 = self._clock()
        tip: TipEstimate | None = None
        quality: QualityEstimate | None = None
        if early is not None and not problems:  # the tip change that aborted the scan
            tip = early.tip
        elif not problems and frame.complete:
            try:
                if self.assessor is not None:
                    tip = self.assessor.assess(frame)
                if self.quality is not None:
                    quality = self.quality.assess(frame)
            except ScopePilotError as exc:
                problems = (*problems, f"assessor failed: {exc}")
        t1 = self._clock()
        # sr, defects, ...: recorded beside the tip; a rejected output says so and why
        products = run_stages(self.stages if not problems and frame.complete else (), frame)
        stages_s = {f"{name}_s": value for name, value in products.latency_s.items()}
        self._event(
            "perception",
            {
                "frame": seq,
                "frame_index": frame.frame_index,
                "assessor": self.assessor.name if self.assessor is not None else None,
                "tip": tip.to_json() if tip is not None else None,
                "quality": quality.to_json() if quality is not None else None,
                **products.fields,
                **({"early_abort": early.to_json()} if early is not None else {}),
                "problems": list(problems),
            },
            frame,
            arrays=products.arrays,
        )
        for name, image in products.arrays.items():  # the console's sr view
            product = dataclasses.replace(frame, data=image, truth=None)
            self._notify("product", {"seq": seq, "name": name}, product)
        perceive_s = t1 - t0
        t1 = self._clock()  # the decision's time starts after the stages
        state = self.instrument.state()
        observation = Observation(
            frame=frame,
            tip=tip,
            state=state,
            info=self.info,
            problems=problems,
            history=tuple(self._history),
            frames_seen=seq + 1,
            commands_so_far=self._commands_so_far,
            quality=quality,
            pending_commands=len(self.gate.pending()),
            advisory=self.gate.mode is Mode.MANUAL,
            stages=products.fields,
        )
        try:
            if problems:  # never act on a corrupted, partial or unassessable frame
                decision = Decision(
                    reason="frame not acted on: " + "; ".join(problems),
                    confidence=0.0,
                    policy=self.policy.name,
                )
            else:
                with self._policy_lock:
                    decision = self.policy.decide(observation)
        except Exception as exc:  # a faulty policy must not kill an unattended session
            self.result.faults += 1
            self._event(
                "fault",
                {"stage": "decide", "frame": seq, "error": f"{type(exc).__name__}: {exc}"},
                frame,
            )
            decision = Decision(
                reason=f"policy raised {type(exc).__name__}; no action",
                confidence=0.0,
                policy=self.policy.name,
            )
        t2 = self._clock()
        if tip is not None:
            self._history.append(tip)
        self._current_seq = seq
        self._step_fates = []
        if decision.commands and self.gate.mode is Mode.SUPERVISED:
            self.gate.expire_pending(f"superseded by the decision on frame {seq}")
        for command in decision.commands:
            if command.source == "policy":
                command = command.with_meta(source=self.policy.name)
            self._commands_so_far += 1
            self.gate.submit_policy(command)
        fates = tuple(self._step_fates)
        self._current_seq = None
        t3 = self._clock()
        latency = {"perceive_s": perceive_s, **stages_s, "decide_s": t2 - t1, "gate_s": t3 - t2}
        for name, value in latency.items():
            self._add_latency(name[:-2], value)
        self._event(
            "decision",
            {
                "frame": seq,
                **decision.to_json(),
                "policy_version": self.policy.version,
                "latency_s": latency,
                "pending_commands": observation.pending_commands,
                "advisory": observation.advisory,
            },
            frame,
        )
        if self._on_step is not None:
            self._on_step(Step(seq, frame, tip, problems, decision, fates))
        if decision.stop:
            self._stop_with(f"policy {self.policy.name} stopped: {decision.reason}")

    def _record_loop(self) -> None:
        while True:
            item = self._records.get()
            if item is _SENTINEL:
                return
            if item[0] == "frame":
                _, frame, problems, extra, t_queued = item
                try:
                    self._recorder.append_frame(frame, problems=list(problems), extra=extra)
                finally:
                    self._frame_slots.release()
                self._add_latency("record", self._clock() - t_queued)
            else:
                _, kind, payload, t_wall, t_instrument, arrays = item
                store = getattr(self._recorder, "append_array", None)
                if arrays and store is not None:  # pixels first: the event commits them
                    refs = {name: store(name, image) for name, image in arrays.items()}
                    payload = {**payload, "arrays": refs}
                self._recorder.append_event(kind, payload, t_wall=t_wall, t_instrument=t_instrument)

    # -- helpers ------------------------------------------------------------------------------

    def _on_fate(self, fate: Fate) -> None:
        operator = fate.command.id in self._operator_ids or fate.command.source in (
            "operator",
            "console",
        )
        origin = "operator" if operator else "policy"
        # Only the decision thread's fates belong to the frame being decided; an operator's
        # approval arriving from another thread meanwhile does not.
        deciding = threading.current_thread().name == "decision"
        seq = self._current_seq if deciding else None
        self._event("command", {**fate.to_json(), "frame": seq, "origin": origin})
        if seq is not None:
            self._step_fates.append(fate)

    def _operator(self, action: str, origin: str, effect: str, **more: Any) -> None:
        log.info("operator %s (%s): %s", action, origin, effect)
        self._event("operator", {"action": action, "origin": origin, "effect": effect, **more})

    def _event(
        self,
        kind: str,
        payload: Mapping[str, Any],
        frame: Frame | None = None,
        *,
        arrays: Mapping[str, Any] | None = None,
    ) -> None:
        """Queue an event for the recorder and tell the listeners. ``arrays`` (images) are
        stored first by a recorder that has ``append_array``, and the event records their
        references under ``payload["arrays"]``; other recorders (tests, benches) drop them."""
        t_instrument = frame.timestamp_s if frame is not None else None
        payload = dict(payload)
        self._records.put(("event", kind, payload, self._wall(), t_instrument, arrays or None))
        self._notify(kind, payload, frame)

    def _notify(self, kind: str, payload: Mapping[str, Any], frame: Frame | None) -> None:
        for listener in self._listeners:
            try:
                listener(kind, payload, frame)
            except Exception:  # an observer must never stop the session
                log.exception("agent listener %r failed on a %s event", listener, kind)

    def _add_latency(self, stage: str, seconds: float) -> None:
        with self._lat_lock:
            stats = self.result.latencies_s.get(stage)
            if stats is None:
                stats = self.result.latencies_s[stage] = LatencyStats()
            stats.add(seconds)

    @property
    def can_condition(self) -> bool:
        return Capability.TIP_CONDITIONING in self.info.capabilities
