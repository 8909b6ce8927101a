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

**Relying on sr** (``DoseEnvConfig(sr=True)``, off by default; ``scopepilot train-policy dose
--sr``): the caller also passes the agent's ``sr`` frame stage (anything with ``run(frame)``
returning ``fields["sr"]`` and the recovered image ``arrays["sr"]``, e.g.
``agent.perception.stages.SrStage``), which runs on every frame as in a session. The actions are
the 13 margins × {raw frame, sr's recovered image} (:data:`SR_N_ACTIONS`,
:func:`~policies.dose_features.split_sr_action`); a frame for which sr is relied on is judged by
the true SNR of sr's image, unless sr rejected that frame (then the raw frame is what a session
gets, and is judged). The observation gains :func:`~policies.dose_features.sr_features` of the
last frame (``(10,)``), and :meth:`~DoseControlEnv.action_masks` masks the sr half after a frame
whose sr output was unusable. ``info`` adds ``sr`` (the frame was judged on sr's image),
``sr_chosen`` and ``sr_true_snr`` (NaN when sr's output was unusable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
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
    DOSE_SR_OBS_DIM,
    DWELL_LEVELS_S,
    MARGINS,
    SR_N_ACTIONS,
    SR_STAGE,
    dose_observation,
    level_for_action,
    mean_signal,
    split_sr_action,
    sr_action_mask,
    sr_features,
    sr_usable,
    true_snr,
)


class QualityAssessor(Protocol):
    name: str
    version: str

    def assess(self, frame: Frame) -> QualityEstimate: ...


class SrStageLike(Protocol):
    """The agent's ``sr`` frame stage as the environment uses it: ``run(frame)`` returns an
    object with ``fields["sr"]`` (the recorded fields) and ``arrays["sr"]`` (the image)."""

    name: str
    version: str

    def run(self, frame: Frame) -> Any: ...


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
    sr: bool = False
    """Add the "rely on sr" choice (see the module doc); needs the ``sr`` stage."""

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

    def __init__(
        self,
        quality: QualityAssessor,
        config: DoseEnvConfig | None = None,
        *,
        sr: SrStageLike | None = None,
    ) -> None:
        if not callable(getattr(quality, "assess", None)):
            raise ConfigError(
                f"quality must have assess(frame) -> QualityEstimate, got {type(quality).__name__}"
            )
        self.quality = quality
        self.config = config or DoseEnvConfig()
        if self.config.sr and not callable(getattr(sr, "run", None)):
            raise ConfigError(
                "DoseEnvConfig(sr=True) needs the sr frame stage (sr=..., anything with "
                f"run(frame), e.g. agent.perception.stages.SrStage), got {type(sr).__name__}"
            )
        if sr is not None and not self.config.sr:
            raise ConfigError("an sr stage was given but DoseEnvConfig.sr is False")
        self.sr = sr
        obs_dim = DOSE_SR_OBS_DIM if self.config.sr else DOSE_OBS_DIM
        self.observation_space = gym.spaces.Box(-10.0, 10.0, shape=(obs_dim,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(SR_N_ACTIONS if self.config.sr else len(MARGINS))
        self._sr_fields: Any = None
        self._sr_relied = False
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
        self._sr_fields = None
        self._sr_relied = False
        return self._observation(), {"beam_current_A": self._current, **extra}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Scan the next frame at the level :func:`level_for_action` gives for ``action``
        (with ``sr``: for its margin, relying on sr for the upper half of the actions)."""
        n = SR_N_ACTIONS if self.config.sr else len(MARGINS)
        try:
            index = int(action)
        except (TypeError, ValueError):
            index = -1
        if index != action or not 0 <= index < n:
            raise CommandRejected(f"action must be an integer 0..{n - 1}, got {action!r}")
        if not self.config.sr:
            return self.step_level(self.level_for(index))
        if not self.action_masks()[index]:
            raise CommandRejected(
                f"action {index} relies on sr, which rejected the last frame (masked)"
            )
        margin, rely = split_sr_action(index)
        return self.step_level(self.level_for(margin), sr=rely)

    def level_for(self, action: int) -> int:
        """The dwell level ``action`` means now (see :func:`level_for_action`)."""
        return level_for_action(action, self._snr, self._dwell, target_snr=self.config.target_snr)

    def step_level(
        self, level: int, *, sr: bool = False
    ) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Scan the next frame at dwell ``DWELL_LEVELS_S[level]`` (baselines use this); with
        ``sr`` (only when the config has it) rely on sr's recovered image for that frame."""
        if self._instrument is None:
            raise CommandRejected("DoseControlEnv.step called before reset()")
        if sr and not self.config.sr:
            raise CommandRejected("step_level(sr=True) needs DoseEnvConfig(sr=True)")
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
        extra_info: dict[str, Any] = {}
        if cfg.sr:
            snr, extra_info = self._judge_with_sr(frame, snr, relied=sr)
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
            **extra_info,
        }
        return self._observation(), float(reward), terminated, False, info

    def _judge_with_sr(
        self, frame: Frame, raw_snr: float, *, relied: bool
    ) -> tuple[float, dict[str, Any]]:
        """Run the sr stage on ``frame``; the SNR the frame is judged by (sr's image when it is
        relied on and usable, else the raw frame's) and the sr keys of ``info``."""
        if self.sr is None:  # pragma: no cover - __init__ guarantees it with config.sr
            raise ConfigError("DoseEnvConfig(sr=True) needs the sr stage")
        output = self.sr.run(frame)
        fields = output.fields.get(SR_STAGE)
        usable = sr_usable(fields)
        sr_snr = math.nan
        if usable:
            image = output.arrays.get(SR_STAGE)
            if image is None:
                raise ConfigError(
                    "the sr stage records no image (record='none'); the dose environment needs it"
                )
            sr_snr = true_snr(replace(frame, data=np.asarray(image, dtype=np.float64)))
        self._sr_fields = fields
        self._sr_relied = bool(relied)
        judged_on_sr = bool(relied and usable)
        info = {"sr": judged_on_sr, "sr_chosen": bool(relied), "sr_true_snr": sr_snr}
        return (sr_snr if judged_on_sr else raw_snr), info

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
        """All actions; with ``sr``, the sr half only if sr's output on the last frame was
        usable (:func:`~policies.dose_features.sr_action_mask`)."""
        if self.config.sr:
            return sr_action_mask(self._sr_fields)
        return np.ones(len(MARGINS), dtype=bool)

    def close(self) -> None:
        if self._instrument is not None:
            self._instrument.close()
            self._instrument = None

    def _observation(self) -> np.ndarray:
        obs = dose_observation(
            self._snr,
            self._dwell,
            self._mean,
            self._done,
            self.config.frames,
            target_snr=self.config.target_snr,
        )
        if not self.config.sr:
            return obs
        return np.concatenate([obs, sr_features(self._sr_fields, self._sr_relied)])
