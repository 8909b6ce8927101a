"""A gymnasium environment for STM tip conditioning on the simulated STM (``sim:stm``).

Each episode opens a fresh simulated STM (seed drawn from the environment's generator) whose
tip starts in a bad state, scans a small frame (96 x 96 over 6 nm by default: 0.0625 nm pixels,
the tip network's trained pixel size) and asks the
*assessor* passed in by the caller what the tip looks like. The assessor is any object with
``name``, ``version`` and ``assess(frame) -> TipEstimate`` (the classical assessor or a trained
network in ``agent.perception``); policies never import the agent, so the caller supplies it.

One step = one of the 12 conditioning actions of :data:`policies.tip_actions.CONDITIONING_ACTIONS`
at the current site, a move to a fresh site (:class:`policies.tip_actions.SiteMap`) and a new
frame. Reward -1 per step, minus ``damage_penalty_per_nm2`` times the area the step damaged
(so of two actions that fix a tip about as often, the gentler one earns more); when the
assessor's P(good) reaches ``good_threshold`` and a second frame confirms it, +10 and the
episode terminates. Episodes are truncated after ``max_actions``
actions. Invalid actions (outside the safety envelope or without room on the damaged-area map)
are masked (:meth:`TipConditioningEnv.action_masks`, as sb3-contrib's MaskablePPO expects);
stepping one raises :class:`~drivers.errors.CommandRejected` and changes nothing.

``info`` carries ground truth for evaluation: ``tip_state`` (the simulator's), ``success``
(terminated with a truly good tip), ``damaged_nm2`` (area of all damage discs so far),
``frames`` (frames scanned) and ``actions``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import gymnasium as gym
import numpy as np

from drivers.commands import MoveTo
from drivers.errors import CommandRejected, ConfigError, DataError
from drivers.frame import Frame, ScanRegion, TipState
from drivers.observation import TipEstimate
from drivers.registry import open_instrument
from policies.base import require_positive
from policies.tip_actions import (
    CONDITIONING_ACTIONS,
    N_ACTIONS,
    NM,
    OBS_DIM,
    SiteMap,
    tip_observation,
)

BAD_STATES = (TipState.MULTIPLE, TipState.BLUNT, TipState.UNSTABLE, TipState.CRASHED)


class TipAssessor(Protocol):
    """What the environment needs from perception (``agent.perception`` assessors fit)."""

    name: str
    version: str

    def assess(self, frame: Frame) -> TipEstimate: ...


@dataclass(frozen=True)
class TipEnvConfig:
    """Settings of :class:`TipConditioningEnv` (lengths in metres)."""

    shape_px: int = 96
    frame_m: float = 6.0 * NM
    dwell_s: float = 1e-3
    max_actions: int = 100
    good_threshold: float = 0.9
    confirm: bool = True
    reward_step: float = -1.0
    reward_good: float = 10.0
    damage_penalty_per_nm2: float = 2e-3
    """Reward per nm² of surface a step damages: a strength-1 action (25 nm disc, 1,963 nm²)
    costs about four extra steps, the gentlest (0.8 nm dip, 317 nm²) about 0.6. 0 gives the
    DeepSPM reward (-1 per step, +10 when good)."""
    defect_density_per_nm2: float = 0.08
    pitch_m: float = 30 * NM
    area_m: float = 300 * NM

    def __post_init__(self) -> None:
        if not (isinstance(self.shape_px, int) and 16 <= self.shape_px <= 512):
            raise ConfigError(
                f"TipEnvConfig.shape_px must be an int in 16..512, got {self.shape_px!r}"
            )
        if not (isinstance(self.max_actions, int) and self.max_actions >= 1):
            raise ConfigError(
                f"TipEnvConfig.max_actions must be an int >= 1, got {self.max_actions!r}"
            )
        if not 0 < self.good_threshold < 1:
            raise ConfigError(
                f"TipEnvConfig.good_threshold must be in (0, 1), got {self.good_threshold!r}"
            )
        require_positive(
            self, ("frame_m", "dwell_s", "pitch_m", "area_m", "defect_density_per_nm2")
        )
        if not (math.isfinite(self.damage_penalty_per_nm2) and self.damage_penalty_per_nm2 >= 0):
            raise ConfigError(
                "TipEnvConfig.damage_penalty_per_nm2 must be finite and >= 0, got "
                f"{self.damage_penalty_per_nm2!r}"
            )


class TipConditioningEnv(gym.Env[np.ndarray, np.int64]):
    """Tip conditioning on ``sim:stm`` with the DeepSPM action set (see the module doc)."""

    metadata = {"render_modes": []}  # noqa: RUF012 (gymnasium declares it on Env)

    def __init__(self, assessor: TipAssessor, config: TipEnvConfig | None = None) -> None:
        if not callable(getattr(assessor, "assess", None)):
            raise ConfigError(
                f"assessor must have assess(frame) -> TipEstimate, got {type(assessor).__name__}"
            )
        self.assessor = assessor
        self.config = config or TipEnvConfig()
        self.observation_space = gym.spaces.Box(0.0, 2.0, shape=(OBS_DIM,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(N_ACTIONS)
        self._instrument: Any = None
        self._sites: SiteMap | None = None
        self._history: list[TipEstimate] = []
        self._estimate: TipEstimate | None = None
        self._frame: Frame | None = None
        self._last_action: int | None = None
        self._actions = 0
        self._frames = 0

    # -- gymnasium API ----------------------------------------------------------------------------

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Open a fresh simulator with a bad tip (``options={"tip": "blunt"}`` picks the state)."""
        super().reset(seed=seed)
        cfg = self.config
        rng = self.np_random
        sim_seed = int(rng.integers(0, 2**31 - 1))
        state = BAD_STATES[int(rng.integers(len(BAD_STATES)))]
        if options and "tip" in options:
            try:
                state = TipState(options["tip"])
            except ValueError:
                raise ConfigError(
                    f"options['tip'] must be a tip state, got {options['tip']!r}"
                ) from None
        self.close()
        region = ScanRegion(0.0, 0.0, cfg.frame_m, cfg.frame_m)
        self._instrument = open_instrument(
            "sim:stm",
            seed=sim_seed,
            shape_px=(cfg.shape_px, cfg.shape_px),
            region=region,
            dwell_s=cfg.dwell_s,
            lines_per_chunk=cfg.shape_px,
            initial_tip=state,
            defect_density_per_nm2=cfg.defect_density_per_nm2,
        )
        limits = self._instrument.info().limits
        self._sites = SiteMap(
            (0.0, 0.0), limits, frame_m=cfg.frame_m, pitch_m=cfg.pitch_m, area_m=cfg.area_m
        )
        self._history = []
        self._last_action = None
        self._actions = 0
        self._frames = 0
        self._estimate = self._scan()
        return self.observation(), self.info(terminated=False)

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._instrument is None or self._sites is None or self._estimate is None:
            raise CommandRejected("TipConditioningEnv.step called before reset()")
        index = _action_index(action)
        mask = self.action_masks()
        step = CONDITIONING_ACTIONS[index]
        if not mask[index]:
            raise CommandRejected(
                f"action {index} ({step.describe()}) is masked out here: the safety envelope or "
                f"the damaged-area map forbids it (free radius "
                f"{self._sites.free_radius_m(*self._position()) / NM:.1f} nm); valid actions: "
                f"{np.flatnonzero(mask).tolist()}"
            )
        cfg = self.config
        result = self._instrument.execute(step.command(source="env", reason="rl step"))
        detail = result.detail
        radius_m = float(detail["damage_radius_m"])
        self._sites.add_damage(float(detail["x_m"]), float(detail["y_m"]), radius_m)
        step_reward = cfg.reward_step - cfg.damage_penalty_per_nm2 * math.pi * (radius_m / NM) ** 2
        self._actions += 1
        self._last_action = index
        target = self._sites.next_site(self._position())
        if target is None:  # the whole stage is used up: nothing left to condition on
            return self.observation(), step_reward, False, True, self.info(terminated=False)
        self._instrument.execute(MoveTo(*target, source="env", reason="fresh site"))
        self._history.append(self._estimate)
        self._estimate = self._scan()
        reward = step_reward
        terminated = False
        if self._estimate.p_good >= cfg.good_threshold:
            confirmed = True
            if cfg.confirm:
                self._history.append(self._estimate)
                self._estimate = self._scan()
                confirmed = self._estimate.p_good >= cfg.good_threshold
            if confirmed:
                reward += cfg.reward_good
                terminated = True
        truncated = not terminated and self._actions >= cfg.max_actions
        return self.observation(), reward, terminated, truncated, self.info(terminated)

    def action_masks(self) -> np.ndarray:
        """``(12,) bool``: the actions allowed at the current site."""
        if self._sites is None:
            raise CommandRejected("TipConditioningEnv.action_masks called before reset()")
        return self._sites.mask(self._position())

    def close(self) -> None:
        if self._instrument is not None:
            self._instrument.close()
            self._instrument = None

    # -- helpers used by evaluation ---------------------------------------------------------------

    @property
    def estimate(self) -> TipEstimate:
        """The latest tip estimate (after reset)."""
        if self._estimate is None:
            raise CommandRejected("no estimate before reset()")
        return self._estimate

    @property
    def last_frame(self) -> Frame:
        """The latest frame (after reset)."""
        if self._frame is None:
            raise CommandRejected("no frame before reset()")
        return self._frame

    @property
    def history(self) -> tuple[TipEstimate, ...]:
        return tuple(self._history)

    @property
    def instrument(self) -> Any:
        return self._instrument

    def rescan(self) -> TipEstimate:
        """Scan again without acting (a baseline's "confirm" frame); no reward, no action."""
        if self._estimate is None:
            raise CommandRejected("rescan called before reset()")
        self._history.append(self._estimate)
        self._estimate = self._scan()
        return self._estimate

    # -- internals --------------------------------------------------------------------------------

    def _position(self) -> tuple[float, float]:
        x, y = self._instrument.state().position_m
        return (float(x), float(y))

    def _scan(self) -> TipEstimate:
        frame = self._instrument.acquire()
        self._frame = frame
        self._frames += 1
        estimate = self.assessor.assess(frame)
        if not isinstance(estimate, TipEstimate):
            raise DataError(
                f"assessor {getattr(self.assessor, 'name', '?')!r} returned "
                f"{type(estimate).__name__}, not a TipEstimate"
            )
        return estimate

    def observation(self) -> np.ndarray:
        """The current observation (as the last reset/step returned it)."""
        if self._sites is None or self._estimate is None:
            raise CommandRejected("no observation before reset()")
        return tip_observation(
            self._estimate,
            self._history,
            last_action=self._last_action,
            free_radius_m=self._sites.free_radius_m(*self._position()),
            actions_taken=self._actions,
            max_actions=self.config.max_actions,
        )

    def info(self, terminated: bool = False) -> dict[str, Any]:
        """Ground truth and counters (see the module doc)."""
        sim = self._instrument.simulator
        truth = sim.tip_state
        damaged = sum(math.pi * (r / NM) ** 2 for _, _, r in sim.damage_sites_m)
        return {
            "tip_state": str(truth),
            "p_good": float(self._estimate.p_good) if self._estimate else 0.0,
            "success": bool(terminated and truth is TipState.GOOD),
            "damaged_nm2": float(damaged),
            "frames": self._frames,
            "actions": self._actions,
            "area_moves": self._sites.area_moves if self._sites else 0,
            "time_s": float(sim.time_s),
        }


def _action_index(action: Any) -> int:
    try:
        value = int(action)
    except (TypeError, ValueError):
        raise CommandRejected(
            f"action must be an integer 0..{N_ACTIONS - 1}, got {action!r}"
        ) from None
    if value != action or not 0 <= value < N_ACTIONS:
        raise CommandRejected(f"action must be an integer 0..{N_ACTIONS - 1}, got {action!r}")
    return value
