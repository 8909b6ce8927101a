"""A gymnasium environment for dose control on the simulated STEM or SEM.

An episode is a survey of ``frames`` frames at random stage positions of one session. What a
session needs is unknown in advance: each episode draws the beam current (log-uniform over
``beam_current_A``) and, on the STEM, the specimen (``specimens``: MoS2 needs about twice the dose
of WS2). Before each frame the policy picks the dwell from :data:`DWELL_LEVELS_S` (0.25–16 µs
in steps of sqrt 2), as a *margin* over a physics estimate: the action is one of
:data:`MARGINS`, levels added to the level that would just reach the target if the SNR grew as
sqrt(dwell) from the last frame's estimate (:func:`policies.dose_features.level_for_action`; the
first frame of a survey is scanned at 16 µs). The network learns how far to trust that estimate
from what it sees; :meth:`DoseControlEnv.step_level` scans at a given level (for baselines).

- Observation ``(DOSE_OBS_DIM,) float32`` (:func:`dose_observation`): whether a previous frame
  exists, its SNR as the *quality assessor* passed in by the caller estimates it (anything with
  ``assess(frame) -> QualityEstimate``, e.g. ``agent.perception.quality.ImageQualityAssessor``),
  the dwell used, the SNR per sqrt(µs) it implies, the mean signal per µs (brightness), the
  estimated level that just reaches the target, and the fraction of the survey done.
- Reward per frame: ``-dwell / 16 µs`` (the dose the policy controls: the beam current is fixed
  within a survey, so dose is proportional to dwell) minus ``miss_penalty`` when the frame's
  *true* SNR (from the noise-free ground truth, :func:`true_snr`) is below ``target_snr``.
- ``info``: ``true_snr``, ``met``, ``electrons_per_px``, ``dwell_s``.

All actions are always valid (levels are clipped to 0.25–16 µs, inside both instruments'
dwell limits);
:meth:`DoseControlEnv.action_masks` is provided for MaskablePPO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import gymnasium as gym
import numpy as np

from drivers.commands import MoveTo, SetDwell
from drivers.errors import CommandRejected, ConfigError
from drivers.frame import Frame, ScanRegion
from drivers.observation import QualityEstimate
from drivers.registry import open_instrument
from policies.base import require_positive
from policies.dose_features import (
    DOSE_OBS_DIM,
    DWELL_LEVELS_S,
    MARGINS,
    dose_observation,
    level_for_action,
    mean_signal,
    true_snr,
)


class QualityAssessor(Protocol):
    name: str
    version: str

    def assess(self, frame: Frame) -> QualityEstimate: ...


@dataclass(frozen=True)
class DoseEnvConfig:
    """Settings of :class:`DoseControlEnv`."""

    instrument: str = "sim:stem"
    shape_px: int = 64
    fov_m: float = 2e-9
    frames: int = 20
    target_snr: float = 5.0
    miss_penalty: float = 3.0
    beam_current_A: tuple[float, float] = (10e-12, 150e-12)
    specimens: tuple[str, ...] = ("mos2", "ws2", "srtio3")

    def __post_init__(self) -> None:
        if self.instrument not in ("sim:stem", "sim:sem"):
            raise ConfigError(
                f"DoseEnvConfig.instrument must be 'sim:stem' or 'sim:sem', got {self.instrument!r}"
            )
        if not (isinstance(self.frames, int) and self.frames >= 1):
            raise ConfigError(f"DoseEnvConfig.frames must be an int >= 1, got {self.frames!r}")
        low, high = self.beam_current_A
        if not 0 < low <= high < math.inf:
            raise ConfigError(
                f"DoseEnvConfig.beam_current_A must be 0 < low <= high, got {self.beam_current_A!r}"
            )
        require_positive(self, ("fov_m", "target_snr", "miss_penalty"))
        if not self.specimens:
            raise ConfigError("DoseEnvConfig.specimens must name at least one specimen")


class DoseControlEnv(gym.Env[np.ndarray, np.int64]):
    """Choose the dwell of each frame of a survey (see the module doc)."""

    metadata = {"render_modes": []}  # noqa: RUF012 (gymnasium declares it on Env)

    def __init__(self, quality: QualityAssessor, config: DoseEnvConfig | None = None) -> None:
        if not callable(getattr(quality, "assess", None)):
            raise ConfigError(
                f"quality must have assess(frame) -> QualityEstimate, got {type(quality).__name__}"
            )
        self.quality = quality
        self.config = config or DoseEnvConfig()
        self.observation_space = gym.spaces.Box(
            -10.0, 10.0, shape=(DOSE_OBS_DIM,), dtype=np.float32
        )
        self.action_space = gym.spaces.Discrete(len(MARGINS))
        self._instrument: Any = None
        self._done = 0
        self._snr: float | None = None
        self._dwell: float | None = None
        self._mean: float | None = None
        self._last_frame: Frame | None = None
        self._current = 0.0

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        cfg = self.config
        rng = self.np_random
        sim_seed = int(rng.integers(0, 2**31 - 1))
        low, high = cfg.beam_current_A
        self._current = float(math.exp(rng.uniform(math.log(low), math.log(high))))
        self.close()
        options = dict(options or {})
        extra: dict[str, Any] = {}
        if cfg.instrument == "sim:stem":
            extra["specimen"] = options.pop(
                "specimen", cfg.specimens[int(rng.integers(len(cfg.specimens)))]
            )
        self._current = float(options.pop("beam_current_A", self._current))
        if options:
            raise ConfigError(f"unknown reset options {sorted(options)}")
        fov = cfg.fov_m if cfg.instrument == "sim:stem" else max(cfg.fov_m, 2e-6)
        self._fov = fov
        self._instrument = open_instrument(
            cfg.instrument,
            seed=sim_seed,
            shape_px=(cfg.shape_px, cfg.shape_px),
            region=ScanRegion(0.0, 0.0, fov, fov),
            dwell_s=DWELL_LEVELS_S[6],
            lines_per_chunk=cfg.shape_px,
            beam_current_A=self._current,
            **extra,
        )
        self._done = 0
        self._snr = None
        self._dwell = None
        self._mean = None
        return self._observation(), {"beam_current_A": self._current, **extra}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Scan the next frame at the level :func:`level_for_action` gives for ``action``."""
        try:
            index = int(action)
        except (TypeError, ValueError):
            index = -1
        if index != action or not 0 <= index < len(MARGINS):
            raise CommandRejected(
                f"action must be an integer 0..{len(MARGINS) - 1}, got {action!r}"
            )
        return self.step_level(self.level_for(index))

    def level_for(self, action: int) -> int:
        """The dwell level ``action`` means now (see :func:`level_for_action`)."""
        return level_for_action(action, self._snr, self._dwell, target_snr=self.config.target_snr)

    def step_level(self, level: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Scan the next frame at dwell ``DWELL_LEVELS_S[level]`` (baselines use this)."""
        if self._instrument is None:
            raise CommandRejected("DoseControlEnv.step called before reset()")
        if not (isinstance(level, (int, np.integer)) and 0 <= level < len(DWELL_LEVELS_S)):
            raise CommandRejected(
                f"dwell level must be an integer 0..{len(DWELL_LEVELS_S) - 1}, got {level!r}"
            )
        index = int(level)
        cfg = self.config
        dwell = DWELL_LEVELS_S[index]
        limits = self._instrument.info().limits
        half = self._fov / 2
        x = float(
            self.np_random.uniform(limits.stage_x_m[0] + half, limits.stage_x_m[1] - half) * 0.5
        )
        y = float(
            self.np_random.uniform(limits.stage_y_m[0] + half, limits.stage_y_m[1] - half) * 0.5
        )
        self._instrument.execute(MoveTo(x, y, source="env", reason="next survey position"))
        self._instrument.execute(SetDwell(dwell, source="env", reason="rl dwell"))
        frame = self._instrument.acquire()
        self._last_frame = frame
        estimate = self.quality.assess(frame)
        snr = true_snr(frame)
        met = snr >= cfg.target_snr
        electrons = (
            float(frame.truth.extra.get("electrons_per_px", math.nan)) if frame.truth else math.nan
        )
        dose = dwell * self._current
        reward = -dwell / DWELL_LEVELS_S[-1] - (0.0 if met else cfg.miss_penalty)
        self._done += 1
        self._snr = float(estimate.snr) if math.isfinite(estimate.snr) else 0.0
        self._dwell = dwell
        self._mean = mean_signal(frame)
        terminated = self._done >= cfg.frames
        info = {
            "true_snr": snr,
            "snr_estimate": float(estimate.snr),
            "met": bool(met),
            "dose_As": dose,
            "electrons_per_px": electrons,
            "dwell_s": dwell,
        }
        return self._observation(), float(reward), terminated, False, info

    @property
    def instrument(self) -> Any:
        return self._instrument

    @property
    def last_frame(self) -> Frame:
        """The latest frame (after the first step)."""
        if self._last_frame is None:
            raise CommandRejected("no frame before the first step()")
        return self._last_frame

    def action_masks(self) -> np.ndarray:
        return np.ones(len(MARGINS), dtype=bool)

    def close(self) -> None:
        if self._instrument is not None:
            self._instrument.close()
            self._instrument = None

    def _observation(self) -> np.ndarray:
        return dose_observation(
            self._snr,
            self._dwell,
            self._mean,
            self._done,
            self.config.frames,
            target_snr=self.config.target_snr,
        )
