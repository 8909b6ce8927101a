"""The rule policy: ladder order and escalation, state awareness, moves to fresh areas, gating on
bad or uncertain frames, the stop conditions, capabilities, limits, determinism and reset."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.commands import Capability, Command, MoveTo, TipDip, TipPulse
from drivers.errors import ConfigError
from drivers.frame import Frame, ScanRegion, TipState
from drivers.limits import Limits
from drivers.observation import Decision, Observation, TipEstimate
from drivers.protocol import InstrumentInfo, InstrumentState
from drivers.safety import ForbiddenArea, SafetyEnvelope
from policies.base import NoPolicy, Policy, known_policies, make_policy
from policies.rule import LadderStep, RuleConfig, RulePolicy, default_ladders, spiral_sites

G, M, B, U, C = (
    TipState.GOOD,
    TipState.MULTIPLE,
    TipState.BLUNT,
    TipState.UNSTABLE,
    TipState.CRASHED,
)
ALL_CAPS = frozenset(Capability)


def estimate(state: TipState, p: float = 0.9, uncertainty: float = 0.1) -> TipEstimate:
    rest = (1.0 - p) / 4
    probs = {s: (p if s is state else rest) for s in TipState}
    return TipEstimate(state, probs, uncertainty, source="test")


class FakeSession:
    """Feeds observations to a policy and carries out its MoveTo commands, like the agent would."""

    def __init__(
        self,
        policy: Policy,
        *,
        capabilities: frozenset[Capability] = ALL_CAPS,
        limits: Limits | None = None,
        start_m: tuple[float, float] = (0.0, 0.0),
        scan_size_m: float = 20e-9,
    ) -> None:
        self.policy = policy
        self.position = start_m
        self.region = ScanRegion(*start_m, scan_size_m, scan_size_m)
        self.info = InstrumentInfo(
            kind="stm",
            id="test-stm",
            channels=("z",),
            capabilities=capabilities,
            limits=limits or Limits(),
        )
        self.frames = 0
        self.decisions: list[Decision] = []
        self.positions: list[tuple[float, float]] = []  # position at each decision

    def observe(
        self,
        tip: TipEstimate | None,
        *,
        problems: tuple[str, ...] = (),
        pending: int = 0,
        advisory: bool = False,
    ) -> Decision:
        data = np.zeros((32, 32), np.float32)
        frame = Frame(
            data=data,
            channel="z",
            pixel_size_m=(self.region.height_m / 32, self.region.width_m / 32),
            dwell_s=1e-3,
            scan_region=self.region,
            frame_index=self.frames,
            timestamp_s=float(self.frames),
            lines_done=32,
            instrument="test-stm",
        )
        state = InstrumentState(
            position_m=self.position,
            scan_region=self.region,
            shape_px=(32, 32),
            dwell_s=1e-3,
            scanning=False,
            time_s=float(self.frames),
            frames_done=self.frames,
        )
        obs = Observation(
            frame=frame,
            tip=tip,
            state=state,
            info=self.info,
            problems=problems,
            pending_commands=pending,
            advisory=advisory,
        )
        decision = self.policy.decide(obs)
        self.decisions.append(decision)
        self.positions.append(self.position)
        self.frames += 1
        for cmd in decision.commands:
            if isinstance(cmd, MoveTo):
                self.position = (cmd.x_m, cmd.y_m)
                self.region = self.region.moved_to(cmd.x_m, cmd.y_m)
        return decision

    def run(self, states: Iterable[TipState]) -> list[Decision]:
        return [self.observe(estimate(s)) for s in states]


def tip_commands(decisions: Sequence[Decision]) -> list[Command]:
    return [c for d in decisions for c in d.commands if isinstance(c, (TipPulse, TipDip))]


def as_step(cmd: Command) -> LadderStep:
    if isinstance(cmd, TipPulse):
        return LadderStep.pulse(cmd.bias_V, cmd.duration_s)
    assert isinstance(cmd, TipDip)
    return LadderStep.dip(cmd.depth_m, cmd.bias_V)


# ---------------------------------------------------------------- protocol and registry


def test_policies_satisfy_the_protocol_and_the_registry_builds_them() -> None:
    assert known_policies() == ["none", "rl", "rl-dose", "rl-scan", "rl-tip", "rule"]
    for name in known_policies():
        policy = make_policy(name)
        assert isinstance(policy, Policy)
        assert policy.name == name
    rule = make_policy("rule", bad_frames_to_act=3)
    assert isinstance(rule, RulePolicy)
    assert rule.config.bad_frames_to_act == 3


def test_unknown_policy_and_option_raise_config_error_naming_the_known_ones() -> None:
    with pytest.raises(
        ConfigError, match="known policies: none, rl, rl-dose, rl-scan, rl-tip, rule"
    ):
        make_policy("deepspm")
    with pytest.raises(ConfigError, match="bad_frames_to_act"):
        make_policy("rule", bad_frames=3)
    with pytest.raises(ConfigError, match="takes no options"):
        make_policy("none", anything=1)


@pytest.mark.parametrize(
    "options",
    [
        {"bad_frames_to_act": 0},
        {"max_uncertainty": 1.5},
        {"max_actions_per_episode": 0},
        {"max_failed_episodes": -1},
        {"damage_radius_m": 25e-9, "move_step_m": 40e-9},  # less than twice the damage radius
        {"ladders": {B: (LadderStep.dip(1e-9),)}},  # missing ladders for other states
    ],
)
def test_invalid_configuration_is_rejected(options: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        RuleConfig(**options)  # type: ignore[arg-type]


def test_no_policy_never_acts() -> None:
    session = FakeSession(NoPolicy())
    decisions = session.run([B, B, B, C, C, M, U, G] * 5)
    assert all(not d.commands and not d.stop for d in decisions)
    assert all("never acts" in d.reason for d in decisions)


# ---------------------------------------------------------------- the ladder


def test_waits_for_consecutive_bad_frames_before_acting() -> None:
    session = FakeSession(RulePolicy(RuleConfig(bad_frames_to_act=3)))
    first, second, third = session.run([B, B, B])
    assert not first.commands and not second.commands
    assert "1 of 3" in first.reason and "rescan" in first.reason
    assert "2 of 3" in second.reason
    assert isinstance(third.commands[0], TipDip)


def test_a_good_frame_breaks_the_run_of_bad_frames() -> None:
    session = FakeSession(RulePolicy())
    decisions = session.run([B, G, B, G, B])
    assert tip_commands(decisions) == []


@pytest.mark.parametrize("state", [M, B, U, C])
def test_each_state_walks_its_own_ladder_in_order_then_repeats_the_strongest(
    state: TipState,
) -> None:
    ladder = default_ladders()[state]
    session = FakeSession(RulePolicy())
    decisions = session.run([state] * (1 + len(ladder) + 2))
    steps = [as_step(c) for c in tip_commands(decisions)]
    assert steps[: len(ladder)] == list(ladder)
    assert steps[len(ladder) :] == [ladder[-1], ladder[-1]]
    assert "strongest step repeated" in decisions[-1].reason


def test_ladders_escalate_in_strength_within_each_action_type() -> None:
    for state, ladder in default_ladders().items():
        for action in ("pulse", "dip"):
            strengths = [s.strength for s in ladder if s.action == action]
            assert strengths == sorted(strengths), (state, action, strengths)
        assert {s.strength for s in ladder if s.action == "pulse"} <= {2.5, 4.0, 8.0}
        assert all(0.8e-9 <= s.depth_m <= 5e-9 for s in ladder if s.action == "dip")
        assert all(s.bias_V == pytest.approx(0.02) for s in ladder if s.action == "dip")
        assert all(s.duration_s == pytest.approx(0.2) for s in ladder if s.action == "pulse")


def test_state_aware_first_actions() -> None:
    """Multiple/unstable tips start with small pulses, blunt/crashed tips with dips."""
    for state in (M, U):
        cmd = tip_commands(FakeSession(RulePolicy()).run([state, state]))[0]
        assert isinstance(cmd, TipPulse) and abs(cmd.bias_V) == 2.5
    for state in (B, C):
        cmd = tip_commands(FakeSession(RulePolicy()).run([state, state]))[0]
        assert isinstance(cmd, TipDip)
    blunt = tip_commands(FakeSession(RulePolicy()).run([B, B]))[0]
    crashed = tip_commands(FakeSession(RulePolicy()).run([C, C]))[0]
    assert isinstance(blunt, TipDip) and isinstance(crashed, TipDip)
    assert crashed.depth_m > blunt.depth_m  # a crash starts deeper


def test_each_state_keeps_its_place_on_its_ladder_within_an_episode() -> None:
    session = FakeSession(RulePolicy())
    decisions = session.run([B, B, B, M, M, B])
    steps = [as_step(c) for c in tip_commands(decisions)]
    blunt, multiple = default_ladders()[B], default_ladders()[M]
    assert steps == [blunt[0], blunt[1], multiple[0], multiple[1], blunt[2]]


def test_waits_while_its_proposal_is_with_the_operator_and_does_not_escalate() -> None:
    """Supervised mode: unapproved proposals are not actions; the ladder resumes where it was."""
    session = FakeSession(RulePolicy())
    first = session.run([B, B])
    waiting = [session.observe(estimate(B), pending=1) for _ in range(30)]
    assert all(not d.commands and not d.stop for d in waiting)
    assert "waiting for the operator's approval" in waiting[-1].reason
    after = session.observe(estimate(B))  # the operator vetoed it: nothing pending any more
    steps = [as_step(c) for c in tip_commands([*first, after])]
    assert steps == list(default_ladders()[B][:2])
    assert "action 2 of episode 1" in after.reason


def test_manual_mode_advice_is_not_counted_as_actions() -> None:
    """Manual mode: the policy advises the step it would take, but advice is not an action,
    so 30 advised frames neither climb the ladder nor end the episode."""
    session = FakeSession(RulePolicy(RuleConfig(max_actions_per_episode=3)))
    assert tip_commands(session.run([B, B])) != []  # the episode's first action, ladder step 1
    advised = [session.observe(estimate(B), advisory=True) for _ in range(30)]
    assert all(not d.stop for d in advised)
    ladder = default_ladders()[B]
    assert {as_step(c) for c in tip_commands(advised)} == {ladder[1]}
    assert "advice only (manual mode)" in advised[-1].reason
    after = session.observe(estimate(B))  # back to autonomous: the ladder resumes
    assert as_step(tip_commands([after])[0]) == ladder[1]
    assert "action 2 of episode 1" in after.reason


def test_a_good_frame_ends_the_episode_and_the_next_one_starts_at_the_bottom() -> None:
    session = FakeSession(RulePolicy())
    decisions = session.run([B, B, B, B, G, B, B])
    assert "episode 1 succeeded after 3 actions" in decisions[4].reason
    assert not decisions[5].commands  # needs bad_frames_to_act again
    assert as_step(tip_commands(decisions[6:])[0]) == default_ladders()[B][0]
    assert "episode 2" in decisions[6].reason


def test_reasons_are_readable_and_every_command_carries_source_and_reason() -> None:
    session = FakeSession(RulePolicy())
    decisions = session.run([B, B, B])
    reason = decisions[1].reason
    assert "2 consecutive frames assessed bad, latest 'blunt' (p=0.90)" in reason
    assert "dip 0.8 nm at 20 mV, step 1 of 9 of the blunt ladder" in reason
    assert "dip 1.5 nm at 20 mV, step 2 of 9" in decisions[2].reason
    for d in decisions:
        assert d.reason and 0.0 <= d.confidence <= 1.0 and d.policy == "rule"
        for cmd in d.commands:
            assert cmd.source == "rule" and cmd.reason


# ---------------------------------------------------------------- moving to fresh areas


def test_every_conditioning_is_followed_by_a_move_in_the_same_decision() -> None:
    session = FakeSession(RulePolicy())
    decisions = session.run([M] * 12)
    for d in decisions[1:]:
        assert len(d.commands) == 2
        assert isinstance(d.commands[0], (TipPulse, TipDip))
        assert isinstance(d.commands[1], MoveTo)


def _check_moves(session: FakeSession, policy: RulePolicy) -> list[tuple[float, float]]:
    """Targets are inside the stage, never repeated, and each target's scan region is clear of
    every spot conditioned up to that move (the k-th move follows the k-th conditioning)."""
    cfg, lim = policy.config, session.info.limits
    half = session.region.width_m / 2
    targets = [
        (c.x_m, c.y_m) for d in session.decisions for c in d.commands if isinstance(c, MoveTo)
    ]
    assert len(set(targets)) == len(targets)
    discs = [ForbiddenArea(x, y, cfg.damage_radius_m) for x, y in policy.damaged_spots]
    for k, (x, y) in enumerate(targets):
        assert lim.stage_x_m[0] <= x - half and x + half <= lim.stage_x_m[1]
        assert lim.stage_y_m[0] <= y - half and y + half <= lim.stage_y_m[1]
        region = session.region.moved_to(x, y)
        assert not any(disc.overlaps(region) for disc in discs[: k + 1]), (x, y)
    return targets


def test_moves_go_to_fresh_in_limit_spots_and_stop_when_the_stage_is_used_up() -> None:
    limits = Limits(stage_x_m=(-200e-9, 200e-9), stage_y_m=(-150e-9, 150e-9))
    policy = RulePolicy(RuleConfig(max_actions_per_episode=1000))
    session = FakeSession(policy, limits=limits, start_m=(120e-9, -80e-9))
    decisions = session.run([B] * 200)
    targets = _check_moves(session, policy)
    assert len(targets) >= 10
    assert decisions[-1].stop
    assert "no undamaged area left" in decisions[-1].reason
    assert math.dist(targets[0], (120e-9, -80e-9)) == pytest.approx(60e-9)  # one step away


@settings(max_examples=30, deadline=None)
@given(
    x0=st.floats(-0.9e-6, 0.9e-6),
    y0=st.floats(-0.9e-6, 0.9e-6),
    scan_nm=st.sampled_from([10.0, 20.0, 50.0, 100.0]),
    step_nm=st.sampled_from([50.0, 60.0, 80.0]),
)
def test_moves_never_land_on_damage_or_outside_the_stage(
    x0: float, y0: float, scan_nm: float, step_nm: float
) -> None:
    policy = RulePolicy(RuleConfig(move_step_m=step_nm * 1e-9, max_actions_per_episode=1000))
    session = FakeSession(policy, start_m=(x0, y0), scan_size_m=scan_nm * 1e-9)
    session.run([U] * 40)
    assert len(_check_moves(session, policy)) == 39


def test_commands_pass_the_safety_envelope() -> None:
    session = FakeSession(RulePolicy(RuleConfig(max_actions_per_episode=100)))
    envelope = SafetyEnvelope(session.info.limits)
    session.run([M] * 15 + [B] * 15 + [C] * 15 + [U] * 15)
    for decision, position in zip(session.decisions, session.positions, strict=True):
        for cmd in decision.commands:
            envelope.check(cmd, position_m=position)


def test_without_stage_capability_it_conditions_but_does_not_move() -> None:
    caps = ALL_CAPS - {Capability.STAGE}
    session = FakeSession(RulePolicy(), capabilities=caps)
    decisions = session.run([B, B, B])
    assert [type(c) for d in decisions for c in d.commands] == [TipDip, TipDip]
    assert "cannot move the stage" in decisions[1].reason


# ---------------------------------------------------------------- gating


def test_no_conditioning_on_a_frame_with_problems_and_the_reason_says_why() -> None:
    session = FakeSession(RulePolicy())
    session.observe(estimate(B))
    decision = session.observe(estimate(B), problems=("12 of 1024 pixels are NaN or infinite",))
    assert not decision.commands
    assert "NaN" in decision.reason and "no conditioning" in decision.reason
    # the corrupt frame neither counts as bad nor breaks the run
    assert tip_commands([session.observe(estimate(B))])


def test_no_conditioning_on_an_uncertain_estimate_and_the_reason_says_why() -> None:
    session = FakeSession(RulePolicy(RuleConfig(max_uncertainty=0.5)))
    decisions = [session.observe(estimate(C, p=0.4, uncertainty=0.8)) for _ in range(5)]
    assert tip_commands(decisions) == []
    assert all("too uncertain" in d.reason and "0.80 > 0.50" in d.reason for d in decisions)
    nan_estimate = estimate(C, uncertainty=math.nan)
    assert not session.observe(nan_estimate).commands


def test_no_estimate_means_no_action() -> None:
    decision = FakeSession(RulePolicy()).observe(None)
    assert not decision.commands and "no tip estimate" in decision.reason


def test_without_tip_conditioning_capability_it_never_emits_tip_commands() -> None:
    caps = ALL_CAPS - {Capability.TIP_CONDITIONING}
    session = FakeSession(RulePolicy(), capabilities=caps)
    decisions = session.run([M, B, U, C] * 10)
    assert all(not d.commands for d in decisions)
    assert "no tip conditioning" in decisions[-1].reason
    assert not any(d.stop for d in decisions)


def test_ladder_steps_outside_the_limits_are_skipped() -> None:
    limits = Limits(pulse_bias_V=(-3.0, 3.0), dip_depth_m=(0.0, 2e-9))
    session = FakeSession(RulePolicy(), limits=limits)
    cmds = tip_commands(session.run([U] * 12))
    assert cmds
    for cmd in cmds:
        if isinstance(cmd, TipPulse):
            assert abs(cmd.bias_V) <= 3.0
        else:
            assert isinstance(cmd, TipDip) and cmd.depth_m <= 2e-9


# ---------------------------------------------------------------- stopping


def test_stops_when_an_episode_exceeds_its_action_cap_and_stays_stopped() -> None:
    session = FakeSession(RulePolicy())  # default cap: 20 actions per episode
    decisions = session.run([B] * 30)
    assert len(tip_commands(decisions)) == 20
    first_stop = next(i for i, d in enumerate(decisions) if d.stop)
    assert first_stop == 21  # 1 confirming frame + 20 actions, then the 21st action is refused
    assert "max_actions_per_episode=20" in decisions[first_stop].reason
    assert all(d.stop and not d.commands for d in decisions[first_stop:])


def test_failed_episodes_restart_the_ladder_until_max_failed_episodes() -> None:
    policy = RulePolicy(RuleConfig(max_actions_per_episode=3, max_failed_episodes=1))
    session = FakeSession(policy)
    decisions = session.run([B] * 10)
    steps = [as_step(c) for c in tip_commands(decisions)]
    ladder = default_ladders()[B]
    assert steps == [ladder[0], ladder[1], ladder[2], ladder[0], ladder[1], ladder[2]]
    assert "restarting the ladders" in decisions[4].reason
    assert decisions[7].stop and "2 failed episodes exceed max_failed_episodes=1" in (
        decisions[7].reason
    )


# ---------------------------------------------------------------- determinism and reset


def _script() -> list[TipEstimate | None]:
    states = [G, B, B, B, M, U, G, C, C, C, None, B, G, M, M, M]
    return [None if s is None else estimate(s, p=0.6 + 0.02 * i) for i, s in enumerate(states)]


def _replay(policy: RulePolicy) -> list[dict[str, object]]:
    session = FakeSession(policy, start_m=(100e-9, 50e-9))
    out = []
    for tip in _script():
        d = session.observe(tip)
        record = d.to_json()
        for c in record["commands"]:  # type: ignore[attr-defined]
            c.pop("id")
        out.append(record)
    return out


def test_same_observations_give_the_same_decisions_and_reset_forgets_everything() -> None:
    fresh = _replay(RulePolicy())
    assert fresh == _replay(RulePolicy())
    used = RulePolicy()
    _replay(used)
    assert used.damaged_spots and used.total_actions
    used.reset()
    assert used.damaged_spots == () and used.total_actions == 0
    assert _replay(used) == fresh


def test_reset_clears_a_stop() -> None:
    policy = RulePolicy(RuleConfig(max_actions_per_episode=1))
    session = FakeSession(policy)
    assert session.run([B, B, B])[-1].stop
    policy.reset()
    assert not FakeSession(policy).run([B])[0].stop


def test_spiral_visits_rings_in_order_without_repeats() -> None:
    sites = []
    for site in spiral_sites():
        sites.append(site)
        if len(sites) == 49:
            break
    assert sites[0] == (0, 0)
    assert len(set(sites)) == 49
    assert {max(abs(i), abs(j)) for i, j in sites} == {0, 1, 2, 3}
    rings = [max(abs(i), abs(j)) for i, j in sites]
    assert rings == sorted(rings)
