"""The dose policy's action set and observation, shared by :mod:`policies.env_dose` (training)
and :mod:`policies.rl` (deployment, which must not import gymnasium)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from drivers.errors import DataError
from drivers.frame import Frame

DWELL_LEVELS_S: tuple[float, ...] = tuple(0.25e-6 * 2 ** (k / 2) for k in range(13))
"""0.25 µs to 16 µs in steps of sqrt(2) (13 levels): the dwell choices (inside both STEM and
SEM limits). One step changes the shot-noise SNR by 2 ** (1/4), about 19 %."""
DOSE_OBS_DIM = 7
MARGINS: tuple[int, ...] = tuple(range(-4, 9))
"""The 13 actions: how many dwell levels to add to the sqrt-law estimate of the level that just
reaches the target (:func:`level_for_action`); negative margins trust a pessimistic estimate."""
FIRST_LEVEL = len(DWELL_LEVELS_S) - 1
"""The first frame of a survey, with no SNR known yet, is scanned at the longest dwell."""


def true_snr(frame: Frame) -> float:
    """The frame's SNR against its noise-free ground truth: the clean image is fitted to the
    data (gain and offset by least squares); SNR = std(fitted signal) / std(residual)."""
    truth = frame.truth
    if truth is None or truth.clean is None:
        raise DataError("true_snr needs a simulated frame with a clean ground-truth image")
    data = np.asarray(frame.data, dtype=np.float64)
    clean = np.asarray(truth.clean, dtype=np.float64)
    ok = np.isfinite(data)
    x, y = clean[ok], data[ok]
    xc = x - x.mean()
    denom = float(np.dot(xc, xc))
    if denom <= 0:
        return 0.0
    gain = float(np.dot(xc, y - y.mean())) / denom
    signal = gain * xc
    residual = (y - y.mean()) - signal
    noise = float(np.std(residual))
    return float(np.std(signal) / noise) if noise > 0 else math.inf


def level_index(dwell_s: float) -> float:
    """The (fractional) index of ``dwell_s`` on :data:`DWELL_LEVELS_S` (0 = 0.25 µs, 12 = 16 µs)."""
    return 2.0 * math.log2(dwell_s / DWELL_LEVELS_S[0])


def level_for_action(
    action: int, snr_estimate: float | None, dwell_s: float | None, *, target_snr: float
) -> int:
    """The dwell level of the next frame: :data:`FIRST_LEVEL` before any frame, else the level
    that would just reach ``target_snr`` if the SNR grows as sqrt(dwell) from the last frame's
    (``snr_estimate`` at ``dwell_s``), rounded up, plus ``MARGINS[action]``, clipped to the
    levels. Raises :class:`DataError` for an action outside ``0..12`` or a NaN estimate."""
    if isinstance(action, bool) or not isinstance(action, (int, np.integer)):
        raise DataError(f"dose action must be an integer 0..{len(MARGINS) - 1}, got {action!r}")
    if not 0 <= int(action) < len(MARGINS):
        raise DataError(f"dose action must be an integer 0..{len(MARGINS) - 1}, got {action!r}")
    if snr_estimate is None or dwell_s is None:
        return FIRST_LEVEL
    if math.isnan(snr_estimate):
        raise DataError("SNR estimate is NaN: the dose policy needs an image-quality estimate")
    snr = min(max(snr_estimate, 1e-3), 1e3)
    needed = math.ceil(level_index(dwell_s) + 4.0 * math.log2(target_snr / snr) - 1e-9)
    return int(min(max(needed + MARGINS[int(action)], 0), len(DWELL_LEVELS_S) - 1))


def dose_observation(
    snr_estimate: float | None,
    dwell_s: float | None,
    mean_signal: float | None,
    frames_done: int,
    frames: int,
    *,
    target_snr: float,
) -> np.ndarray:
    """``(7,) float32``: [has previous frame, log2(SNR)/4, dwell level / 12,
    log2(SNR / sqrt(dwell in µs)) / 4, log2(mean signal per µs of dwell) / 8, the level that
    would just reach ``target_snr`` if the SNR grows as sqrt(dwell) / 12, fraction done].

    ``snr_estimate``, ``dwell_s`` and ``mean_signal`` (the previous frame's SNR estimate, dwell
    and mean pixel value) are None before the first frame. Raises :class:`DataError` for a NaN
    input or a non-positive dwell."""
    done = min(frames_done / max(frames, 1), 1.0)
    if snr_estimate is None or dwell_s is None or mean_signal is None:
        return np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, done], dtype=np.float32)
    if math.isnan(mean_signal):
        raise DataError("mean signal is NaN: the dose policy needs a frame with finite pixels")
    if math.isnan(snr_estimate):
        raise DataError("SNR estimate is NaN: the dose policy needs an image-quality estimate")
    if not (math.isfinite(dwell_s) and dwell_s > 0):
        raise DataError(f"dwell_s must be positive and finite, got {dwell_s!r}")
    snr = min(max(snr_estimate, 1e-3), 1e3)
    level = level_index(dwell_s)
    needed = level + 4.0 * math.log2(target_snr / snr)
    efficiency = math.log2(snr / math.sqrt(dwell_s * 1e6))
    brightness = math.log2(max(mean_signal, 1e-3) / (dwell_s * 1e6))
    n = len(DWELL_LEVELS_S) - 1
    values = [1.0, math.log2(snr) / 4, level / n, efficiency / 4, brightness / 8]
    values += [min(max(needed, -n), 2 * n) / n, done]
    return np.array(values, dtype=np.float32)


def mean_signal(frame: Frame) -> float:
    """Mean of the frame's finite pixels (NaN when there are none)."""
    data = np.asarray(frame.done_data, dtype=np.float64)
    finite = data[np.isfinite(data)]
    return float(finite.mean()) if finite.size else math.nan


# -- the optional "rely on sr" choice (``DoseEnvConfig(sr=True)``, ``rl-dose`` option ``sr``) --

SR_STAGE = "sr"
"""The frame stage whose output the sr-aware dose policy reads (``Observation.stages["sr"]``,
:class:`agent.perception.stages.SrStage`): the same fields in training and in a session."""
SR_EXTRA_DIM = 3
DOSE_SR_OBS_DIM = DOSE_OBS_DIM + SR_EXTRA_DIM
SR_N_ACTIONS = 2 * len(MARGINS)
"""Actions of the sr-aware dose policy: ``a < 13`` scans at margin ``MARGINS[a]`` and uses the
raw frame, ``a >= 13`` scans at margin ``MARGINS[a - 13]`` and relies on sr's recovered image."""
SR_FEATURES_VERSION = 1
"""Layout of :func:`sr_features` (recorded in an sr-aware policy file's meta ``sr_features``;
a file with another layout does not load)."""


def split_sr_action(action: int) -> tuple[int, bool]:
    """``(margin action 0..12, rely on sr)`` of an sr-aware action ``0..25``; raises
    :class:`DataError` for anything else."""
    if isinstance(action, bool) or not isinstance(action, (int, np.integer)):
        raise DataError(
            f"sr-aware dose action must be an integer 0..{SR_N_ACTIONS - 1}, got {action!r}"
        )
    if not 0 <= int(action) < SR_N_ACTIONS:
        raise DataError(
            f"sr-aware dose action must be an integer 0..{SR_N_ACTIONS - 1}, got {action!r}"
        )
    return int(action) % len(MARGINS), int(action) >= len(MARGINS)


def sr_usable(fields: Any) -> bool:
    """Whether the sr stage's output on a frame (its recorded fields, ``stages["sr"]``) can be
    relied on: the model ran and did not reject the frame."""
    return (
        isinstance(fields, Mapping) and fields.get("ran") is True and fields.get("reject") is False
    )


def sr_features(fields: Any, relied: bool) -> np.ndarray:
    """``(3,) float32`` appended to :func:`dose_observation` by the sr-aware policy: [sr was
    relied on for the last frame, 20 × sr's relative uncertainty on it (median σ over the
    intensity range, clipped to 0..10), sr's output on it usable (:func:`sr_usable`)].

    ``fields`` is the sr stage's output on the last frame (None before the first frame: zeros).
    """
    if fields is None:
        return np.zeros(SR_EXTRA_DIM, dtype=np.float32)
    if not isinstance(fields, Mapping):
        raise DataError(f"sr stage output must be a mapping of its fields, got {fields!r}")
    relative = fields.get("relative_uncertainty")
    sigma = float(relative) if isinstance(relative, (int, float)) else math.nan
    scaled = min(max(20.0 * sigma, 0.0), 10.0) if math.isfinite(sigma) else 10.0
    return np.array([float(relied), scaled, float(sr_usable(fields))], dtype=np.float32)


def sr_action_mask(fields: Any) -> np.ndarray:
    """``(26,) bool``: the raw half always; the sr half unless sr's output on the last frame
    was unusable (failed or rejected; before the first frame, ``fields`` None, it is allowed)."""
    mask = np.ones(SR_N_ACTIONS, dtype=bool)
    if fields is not None and not sr_usable(fields):
        mask[len(MARGINS) :] = False
    return mask
