"""FaultInjector: each fault does what it says, deterministically; the agent survives them all."""

from __future__ import annotations

import numpy as np
import pytest

from agent.loop import Agent, AgentConfig
from drivers.commands import SetDwell, TipPulse
from drivers.errors import CommunicationError, ConfigError, InstrumentError
from drivers.faults import CORRUPTIONS, FaultInjector, FaultKind
from drivers.frame import Frame, ScanRegion, frame_problems
from drivers.registry import open_instrument
from tests.contract.instrument import InstrumentContract
from tests.fakes import FakeInstrument, MemoryRecorder, ScriptedAssessor, ScriptedPolicy

F = FaultKind


def small_stm(seed: int = 1):
    return open_instrument(
        "sim:stm",
        seed=seed,
        shape_px=(32, 32),
        region=ScanRegion(0, 0, 4e-9, 4e-9),
        lines_per_chunk=8,
    )


class TestFaultInjectorWithoutFaultsContract(InstrumentContract):
    def make_instrument(self) -> FaultInjector:
        return FaultInjector(small_stm(), seed=0)


def injector(schedule, **kwargs) -> FaultInjector:
    return FaultInjector(FakeInstrument(lines_per_chunk=8), seed=7, schedule=schedule, **kwargs)


def final_of(inst: FaultInjector) -> Frame:
    return list(inst.stream())[-1]


# -- each fault kind --------------------------------------------------------------------------


def test_no_fault_passes_frames_through_unchanged() -> None:
    inst = injector({})
    frame = inst.acquire()
    assert frame.complete and "injected_fault" not in frame.metadata
    assert frame_problems(frame, expected_shape=(32, 32)) == []
    assert inst.log == []


def test_drop_frame_delivers_partials_then_raises_communication_error() -> None:
    inst = injector({0: F.DROP_FRAME})
    parts: list[Frame] = []
    with pytest.raises(CommunicationError, match="never arrived"):
        for part in inst.stream():
            parts.append(part)
    assert parts and not any(p.complete for p in parts)
    assert inst.log == [(0, F.DROP_FRAME)]
    assert inst.acquire().complete  # the next attempt is clean


def test_delay_sleeps_for_the_configured_time_before_the_final_frame() -> None:
    slept: list[float] = []
    inst = injector({0: F.DELAY}, delay_s=2.5, sleep=slept.append)
    parts = []
    for part in inst.stream():
        parts.append(part)
        if not part.complete:
            assert slept == []  # partials are not delayed
    assert slept == [2.5]
    assert parts[-1].complete and parts[-1].metadata["injected_fault"] == "delay"
    assert frame_problems(parts[-1], expected_shape=(32, 32)) == []
    assert inst.log == [(0, F.DELAY)]


def test_disconnect_raises_mid_frame() -> None:
    inst = injector({0: F.DISCONNECT})
    parts: list[Frame] = []
    with pytest.raises(CommunicationError, match="disconnect"):
        for part in inst.stream():
            parts.append(part)
    assert parts and all(2 * p.lines_done <= p.shape[0] for p in parts)
    assert not inst.inner.state().scanning  # the inner scan was closed, not left running
    assert inst.log == [(0, F.DISCONNECT)]


def test_stuck_command_times_out_without_applying_the_command() -> None:
    inst = injector({0: F.STUCK_COMMAND})
    inst.acquire()  # attempt 0 arms the stuck controller
    before = inst.state().dwell_s
    with pytest.raises(CommunicationError, match="timed out"):
        inst.execute(SetDwell(before * 2, source="test"))
    assert inst.state().dwell_s == before
    assert inst.inner.executed == []  # type: ignore[attr-defined]
    assert inst.log == [(0, F.STUCK_COMMAND)]
    inst.acquire()  # attempt 1 is clean: the controller answers again
    assert inst.execute(SetDwell(before * 2, source="test")).ok
    assert inst.state().dwell_s == pytest.approx(before * 2)


def test_driver_exception_raises_instrument_error() -> None:
    inst = injector({0: F.DRIVER_EXCEPTION})
    with pytest.raises(InstrumentError, match="driver exception"):
        list(inst.stream())
    assert inst.log == [(0, F.DRIVER_EXCEPTION)]


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        (F.NAN, "NaN or infinite"),
        (F.INF, "NaN or infinite"),
        (F.WRONG_SHAPE, "differs from the requested"),
        (F.WRONG_DTYPE, "not numeric"),
    ],
)
def test_corrupted_final_frame_is_flagged_by_frame_problems(kind: FaultKind, problem: str) -> None:
    inst = injector({0: kind})
    parts = list(inst.stream())
    final = parts[-1]
    assert final.metadata["injected_fault"] == kind.value
    assert all("injected_fault" not in p.metadata for p in parts[:-1])  # partials untouched
    problems = frame_problems(final, expected_shape=(32, 32))
    assert any(problem in p for p in problems), problems
    assert final.truth is not None  # ground truth kept
    assert inst.log == [(0, kind)]


def test_nan_and_inf_hit_the_expected_values() -> None:
    nan = final_of(injector({0: F.NAN}))
    inf = final_of(injector({0: F.INF}))
    assert np.isnan(nan.data).any() and not np.isinf(nan.data).any()
    assert np.isposinf(inf.data).any() and not np.isnan(inf.data).any()


def test_wrong_shape_and_wrong_dtype() -> None:
    assert final_of(injector({0: F.WRONG_SHAPE})).shape == (32, 16)
    wrong = final_of(injector({0: F.WRONG_DTYPE}))
    assert wrong.data.dtype == np.bool_ and wrong.shape == (32, 32)


def test_truncated_final_frame_has_fewer_lines_and_is_not_marked_aborted() -> None:
    final = final_of(injector({0: F.TRUNCATED}))
    assert final.lines_done == 16 and not final.complete
    assert not final.metadata.get("aborted", False)
    assert np.all(np.isnan(final.data[16:])) and np.all(np.isfinite(final.done_data))


def test_saturated_final_frame_is_clipped_to_a_constant_maximum() -> None:
    inst = injector({0: F.SATURATED}, saturated_fraction=0.5)
    final = final_of(inst)
    top = float(final.data.max())
    assert np.count_nonzero(final.data == top) >= 0.45 * final.data.size
    assert final.metadata["injected_fault"] == "saturated"


# -- determinism and configuration ------------------------------------------------------------


def run_attempts(seed: int, n: int = 40) -> tuple[list[tuple[int, FaultKind]], list[bytes]]:
    probs: dict[FaultKind, float] = {k: 0.06 for k in FaultKind if k is not F.STUCK_COMMAND}
    inst = FaultInjector(
        FakeInstrument(seed=3), seed=seed, probabilities=probs, sleep=lambda s: None
    )
    finals: list[bytes] = []
    for _ in range(n):
        try:
            finals.append(final_of(inst).data.tobytes())
        except InstrumentError:
            finals.append(b"fault")
    return inst.log, finals


def test_same_seed_same_faults_and_same_pixels() -> None:
    log_a, frames_a = run_attempts(seed=11)
    log_b, frames_b = run_attempts(seed=11)
    log_c, _ = run_attempts(seed=12)
    assert log_a == log_b and frames_a == frames_b
    assert len({k for _, k in log_a}) >= 4  # the probabilities really inject a mix
    assert log_a != log_c


def test_schedule_overrides_probabilities() -> None:
    inst = FaultInjector(
        FakeInstrument(), seed=0, schedule={0: F.NAN}, probabilities={F.DRIVER_EXCEPTION: 1.0}
    )
    assert inst.fault_for(0) is F.NAN and inst.fault_for(1) is F.DRIVER_EXCEPTION


@pytest.mark.parametrize(
    "kwargs",
    [
        {"probabilities": {F.NAN: 0.7, F.INF: 0.6}},
        {"probabilities": {F.NAN: -0.1}},
        {"schedule": {-1: F.NAN}},
        {"delay_s": float("nan")},
    ],
)
def test_bad_configuration_is_rejected(kwargs) -> None:
    with pytest.raises(ConfigError):
        FaultInjector(FakeInstrument(), seed=0, **kwargs)


# -- the agent against every fault -----------------------------------------------------------

# attempt -> fault; stream errors consume an attempt without a frame
SESSION_SCHEDULE = {
    1: F.NAN,
    2: F.DISCONNECT,
    3: F.INF,
    4: F.WRONG_SHAPE,
    5: F.DRIVER_EXCEPTION,
    6: F.WRONG_DTYPE,
    7: F.DROP_FRAME,
    8: F.TRUNCATED,
    9: F.DELAY,
    10: F.STUCK_COMMAND,
    12: F.SATURATED,
}
# SATURATED is not flagged by frame_problems (a flat image is what a crashed tip looks like):
FLAGGED = CORRUPTIONS - {F.SATURATED}


def pulse_every_frame(obs):
    return (TipPulse(2.5, 0.2),)


def run_session(schedule, *, frames: int, max_faults: int = 5):
    inst = FaultInjector(FakeInstrument(), seed=5, schedule=schedule, sleep=lambda s: None)
    recorder = MemoryRecorder()
    agent = Agent(
        inst,
        ScriptedPolicy(commands_for=pulse_every_frame),
        assessor=ScriptedAssessor(),
        recorder=recorder,
        config=AgentConfig(frames=frames, fault_backoff_s=0.0, max_consecutive_faults=max_faults),
        sleep=lambda s: None,
    )
    result = agent.run()  # (a) never raises
    return inst, recorder, result


def seqs_with(recorder: MemoryRecorder, kinds) -> set[int]:
    return {
        extra["seq"]
        for frame, _, extra in recorder.frames
        if frame.metadata.get("injected_fault") in {k.value for k in kinds}
    }


def test_agent_survives_every_fault_and_records_them() -> None:
    inst, rec, result = run_session(SESSION_SCHEDULE, frames=12)
    assert result.frames == 12 and result.stop_reason == "completed 12 frames"
    assert {k for _, k in inst.log} == set(FaultKind)  # every fault was really injected
    # (d) disconnects, driver exceptions and dropped frames are fault events; the session went on
    faults = rec.kinds("fault")
    assert len(faults) == result.faults == 3
    assert [f["error"].split(":")[0] for f in faults] == [
        "CommunicationError",
        "InstrumentError",
        "CommunicationError",
    ]
    assert all(f["consecutive"] == 1 for f in faults)
    # (b) no command on a frame whose data was flagged as corrupted
    flagged = seqs_with(rec, FLAGGED)
    assert len(flagged) == len(FLAGGED)
    commanded = {c["frame"] for c in rec.kinds("command")}
    assert commanded and not commanded & flagged
    assert all(c["fate"] in {"executed", "failed"} for c in rec.kinds("command"))
    # the stuck command failed, was recorded, and the next frame's command went through
    failed = [c for c in rec.kinds("command") if c["fate"] == "failed"]
    assert len(failed) == 1 and "timed out" in failed[0]["reason"]
    # every frame that arrived was recorded, perceived and decided
    assert [e["seq"] for _, _, e in rec.frames] == list(range(12))
    assert [d["frame"] for d in rec.kinds("decision")] == list(range(12))


def test_every_flagged_corruption_is_seen_as_a_problem_by_the_agent() -> None:
    _, rec, _ = run_session(SESSION_SCHEDULE, frames=12)
    flagged = seqs_with(rec, FLAGGED)
    perceived = {p["frame"]: p["problems"] for p in rec.kinds("perception")}
    assert all(perceived[seq] for seq in flagged)
    decided = {d["frame"]: d for d in rec.kinds("decision")}
    assert all(decided[seq]["reason"].startswith("frame not acted on") for seq in flagged)


def test_every_corrupted_frame_is_recorded_with_its_problems_except_truncated() -> None:
    _, rec, _ = run_session(SESSION_SCHEDULE, frames=12)
    flagged = seqs_with(rec, FLAGGED - {F.TRUNCATED})
    recorded = {extra["seq"]: problems for _, problems, extra in rec.frames}
    assert flagged and all(recorded[seq] for seq in flagged)


def test_truncated_frame_is_recorded_with_problems() -> None:
    _, rec, _ = run_session(SESSION_SCHEDULE, frames=12)
    (seq,) = seqs_with(rec, {F.TRUNCATED})
    recorded = {extra["seq"]: problems for _, problems, extra in rec.frames}
    assert recorded[seq]


def test_a_saturated_frame_is_data_for_perception_not_a_corrupt_frame() -> None:
    """Decision (see drivers/frame.py frame_problems): a clipped or flat image is what a crashed
    STM tip looks like, and conditioning is then the right response, so saturation is left to
    the assessor, not flagged as corruption. The frame is recorded, marked, and decided on."""
    _, rec, _ = run_session(SESSION_SCHEDULE, frames=12)
    (seq,) = seqs_with(rec, {F.SATURATED})
    frame, problems, _ = next(item for item in rec.frames if item[2]["seq"] == seq)
    assert problems == [] and frame.metadata["injected_fault"] == "saturated"
    assert seq in {d["frame"] for d in rec.kinds("decision")}
    assert seq in {p["frame"] for p in rec.kinds("perception") if p["tip"] is not None}


def test_consecutive_faults_stop_the_session_naming_the_last() -> None:
    schedule = {1: F.DISCONNECT, 2: F.DRIVER_EXCEPTION, 3: F.DROP_FRAME, 4: F.DISCONNECT}
    _, rec, result = run_session(schedule, frames=10, max_faults=4)
    assert result.frames == 1 and result.faults == 4
    assert result.stop_reason.startswith("4 consecutive acquisition faults")
    assert "CommunicationError" in result.stop_reason and "disconnect" in result.stop_reason
    assert [f["consecutive"] for f in rec.kinds("fault")] == [1, 2, 3, 4]
    assert rec.kinds("status")[-1]["reason"] == result.stop_reason


def test_session_recovers_when_faults_stop_short_of_the_limit() -> None:
    schedule = {1: F.DISCONNECT, 2: F.DRIVER_EXCEPTION, 3: F.DROP_FRAME}
    _, rec, result = run_session(schedule, frames=4, max_faults=4)
    assert result.frames == 4 and result.stop_reason == "completed 4 frames"
    assert [f["consecutive"] for f in rec.kinds("fault")] == [1, 2, 3]
    assert {c["frame"] for c in rec.kinds("command")} == {0, 1, 2, 3}
