"""Simulated STM frames with ground-truth tip states, for training and scoring the tip model.

Frames come only from the ``sim:stm`` instrument through :func:`drivers.registry.open_instrument`
(the agent never imports the simulators). A :class:`TipRecipe` fixes everything about a data
set: seeds, surfaces, scan sizes, noise and drift; the same recipe gives the same frames.

Each *seed* yields one frame whose tip starts in the state ``TipState[seed_index % 5]`` with
spontaneous tip changes switched off (a pure frame), and, for a bad state, also the frame a good
tip records at the same place (same seed, so the same surface, drift and region): the pair makes a
frame in which the tip changes at a known scan line (:func:`stitch`), which is what the model
must catch while scanning. :func:`natural_changes` instead lets the simulator change the tip by
itself (a high degradation rate) and keeps frames with exactly one change, at the line the ground
truth reports: the held-out test of mid-scan detection.

Labels say what the frame shows (docs/decisions/0009-tip-labels.md). Every bad-tip frame is
compared with the good-tip scan of the same place (same seed: same surface, drift and noise, so
the difference is the tip's doing alone): a pixel *shows* the tip when the two differ by more
than :data:`VISIBLE_SIGMAS` times the frame's white-noise σ, and a bad tip is *visible* once
:data:`VISIBLE_PIXELS` pixels show it. A frame whose bad tip is not visible anywhere (a weak
ghost apex over a defect-free patch of a periodic lattice, say) is labelled good; the simulator's
own state is kept beside the label (``sim_label``). In the same way a mid-scan change becomes
visible at the line where the pixels showing it since the change reach :data:`VISIBLE_PIXELS`
(``ChangeFrame.visible_line``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from drivers.errors import ConfigError, DataError
from drivers.frame import Frame, GroundTruth, ScanRegion, TipState
from drivers.registry import open_instrument

log = logging.getLogger(__name__)

STATES: tuple[TipState, ...] = tuple(TipState)
GOOD_INDEX = STATES.index(TipState.GOOD)

# STMConfig defaults the recipes scale (see simulators/stm_config.py; repeated here so that the
# agent does not import the simulator package)
_WHITE_NOISE = 9e-14
_LINE_NOISE = 2e-12
_DRIFT = 0.5e-9 / 60.0

VISIBLE_SIGMAS = 3.0
"""A pixel shows the tip when bad-tip and good-tip heights differ by more than this many σ."""
VISIBLE_PIXELS = 16
"""A bad tip is visible once this many pixels show it (about one ghost adatom at 0.06 nm/px)."""
SAME_TIP_STEP_M = 60e-9
"""Stage move between two frames of one tip (:func:`same_tip_frames`; the rule policy's
``move_step_m``): a fresh patch of surface each time."""


def shown_per_line(bad: np.ndarray, good: np.ndarray, sigma_m: float) -> np.ndarray:
    """``(H,)`` int32: per line, the pixels where ``bad`` and ``good`` (the good-tip scan of the
    same place with the same noise) differ by more than ``VISIBLE_SIGMAS * sigma_m`` after each
    line's median difference is removed (a constant height offset shows nothing)."""
    if bad.shape != good.shape:
        raise DataError(f"cannot compare frames of shapes {bad.shape} and {good.shape}")
    diff = bad.astype(np.float64) - good.astype(np.float64)
    diff -= np.median(diff, axis=1, keepdims=True)
    return np.asarray(np.sum(np.abs(diff) > VISIBLE_SIGMAS * sigma_m, axis=1), dtype=np.int32)


@dataclass(frozen=True)
class TipRecipe:
    """A simulated data set: ``seeds`` frames of ``shape_px`` pixels, square scans of
    ``size_nm`` (uniform range), surfaces drawn with ``surface_weights``, white and line noise
    times a factor in ``noise_scale``, drift times a factor in ``drift_scale``."""

    seeds: tuple[int, int]  # [first, last) simulator seeds
    surfaces: tuple[str, ...] = ("au111", "hsi100")
    surface_weights: tuple[float, ...] = (0.7, 0.3)
    size_nm: tuple[float, float] = (12.0, 20.0)
    shape_px: tuple[int, int] = (256, 256)
    noise_scale: tuple[float, float] = (0.5, 1.5)
    drift_scale: tuple[float, float] = (0.5, 2.0)
    pairs: bool = True  # also scan each bad-tip place with a good tip (for stitched changes)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        first, last = self.seeds
        if not 0 <= first < last:
            raise ConfigError(
                f"TipRecipe.seeds must be [first, last) with 0 <= first < last, got {self.seeds}"
            )
        if len(self.surfaces) != len(self.surface_weights) or not self.surfaces:
            raise ConfigError("TipRecipe.surfaces and surface_weights must have the same length")

    def to_json(self) -> dict[str, Any]:
        return {
            "seeds": list(self.seeds),
            "surfaces": list(self.surfaces),
            "surface_weights": list(self.surface_weights),
            "size_nm": list(self.size_nm),
            "shape_px": list(self.shape_px),
            "noise_scale": list(self.noise_scale),
            "drift_scale": list(self.drift_scale),
            "pairs": self.pairs,
            **self.extra,
        }


@dataclass(frozen=True)
class TipSample:
    """One simulated frame: ``data`` ``(H, W) float32`` metres, its pixel size (nm), the label
    (the simulator's majority state, or good where that bad tip is not visible, see the module
    doc), the simulator's state ``sim_label``, the white-noise σ (m) and, when ``pairs`` is on and
    the tip is bad, the good-tip frame of the same place (``good_twin``)."""

    data: np.ndarray
    pixel_size_nm: float
    label: int
    seed: int
    surface: str
    good_twin: np.ndarray | None = None
    sim_label: int | None = None
    noise_sigma_m: float = 0.0


def state_for(seed_index: int) -> TipState:
    return STATES[seed_index % len(STATES)]


def _options(recipe: TipRecipe, rng: np.random.Generator) -> dict[str, Any]:
    weights = np.asarray(recipe.surface_weights, dtype=np.float64)
    surface = str(rng.choice(recipe.surfaces, p=weights / weights.sum()))
    noise = float(rng.uniform(*recipe.noise_scale))
    drift = float(rng.uniform(*recipe.drift_scale))
    return {
        "surface": surface,
        "white_noise_m_per_sqrt_hz": _WHITE_NOISE * noise,
        "line_noise_m": _LINE_NOISE * noise,
        "drift_m_per_s": _DRIFT * drift,
    }


def _scan(
    seed: int,
    state: TipState,
    options: dict[str, Any],
    region: ScanRegion,
    shape_px: tuple[int, int],
    **overrides: Any,
) -> Frame:
    instrument = open_instrument(
        "sim:stm",
        seed=seed,
        initial_tip=str(state),
        region=region,
        shape_px=shape_px,
        **{"degradation_rate_per_s": 0.0, "bad_tip_change_rate_per_s": 0.0, **options, **overrides},
    )
    try:
        return instrument.acquire()
    finally:
        instrument.close()


def simulate(
    recipe: TipRecipe, *, progress: bool = True, desc: str = "simulating", workers: int = 1
) -> list[TipSample]:
    """Every frame of ``recipe`` (deterministic: each seed is simulated on its own, so the
    frames do not depend on ``workers``, the number of processes)."""
    from tqdm import tqdm

    first, last = recipe.seeds
    seeds = range(first, last)
    if workers <= 1:
        return [
            sample(recipe, seed)
            for seed in tqdm(seeds, desc=desc, unit="frame", disable=not progress)
        ]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    context = multiprocessing.get_context("spawn")  # no forked torch / BLAS threads
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        done = pool.map(partial(sample, recipe), seeds, chunksize=8)
        return list(tqdm(done, total=len(seeds), desc=desc, unit="frame", disable=not progress))


def sample(recipe: TipRecipe, seed: int) -> TipSample:
    """The frame of ``recipe`` for ``seed``: tip state ``state_for(seed)``."""
    return sample_with_truth(recipe, seed)[0]


def sample_with_truth(recipe: TipRecipe, seed: int) -> tuple[TipSample, GroundTruth]:
    """:func:`sample` and the simulator's ground truth of the frame (apex geometry in
    ``truth.extra["apexes_m"]``: ``[dx_m, dy_m, dz_m, weight]`` per apex, the main one first)."""
    rng = np.random.default_rng([seed, 8_101])
    options = _options(recipe, rng)
    size_m = float(rng.uniform(*recipe.size_nm)) * 1e-9
    x_m, y_m = (float(v) for v in rng.uniform(-500e-9, 500e-9, 2))
    region = ScanRegion(x_m, y_m, size_m, size_m)
    state = state_for(seed)
    frame = _scan(seed, state, options, region, recipe.shape_px)
    if frame.truth is None:
        raise DataError(f"sim:stm seed {seed} returned a frame without ground truth")
    sim_label = label = STATES.index(frame.truth.tip_state)
    sigma = _sigma(options, frame.dwell_s)
    twin = None
    if label != GOOD_INDEX:
        twin = _scan(seed, TipState.GOOD, options, region, recipe.shape_px).data.astype(np.float32)
        if int(shown_per_line(frame.data, twin, sigma).sum()) < VISIBLE_PIXELS:
            label = GOOD_INDEX
    out = TipSample(
        data=frame.data.astype(np.float32),
        pixel_size_nm=size_m * 1e9 / recipe.shape_px[1],
        label=label,
        seed=seed,
        surface=str(options["surface"]),
        good_twin=twin if recipe.pairs else None,
        sim_label=sim_label,
        noise_sigma_m=sigma,
    )
    return out, frame.truth


def same_tip_frames(
    recipe: TipRecipe, seed: int, count: int, step_m: float = SAME_TIP_STEP_M
) -> list[TipSample]:
    """``count`` frames of ONE tip (state ``state_for(seed)``, spontaneous changes off) at scan
    positions ``step_m`` apart: one instrument scans, moves the stage (``MoveTo``), scans again,
    as the agent does when it looks elsewhere before acting. Each label is the simulator's state
    (the tip does not change; no good-tip twins, so no visibility relabelling)."""
    from drivers.commands import MoveTo

    rng = np.random.default_rng([seed, 8_103])
    options = _options(recipe, rng)
    size_m = float(rng.uniform(*recipe.size_nm)) * 1e-9
    x_m, y_m = (float(v) for v in rng.uniform(-500e-9, 500e-9, 2))
    angle = float(rng.uniform(0.0, 2.0 * np.pi))
    instrument = open_instrument(
        "sim:stm",
        seed=seed,
        initial_tip=str(state_for(seed)),
        region=ScanRegion(x_m, y_m, size_m, size_m),
        shape_px=recipe.shape_px,
        **{"degradation_rate_per_s": 0.0, "bad_tip_change_rate_per_s": 0.0, **options},
    )
    out = []
    try:
        for i in range(count):
            if i:
                x_m += step_m * float(np.cos(angle))
                y_m += step_m * float(np.sin(angle))
                instrument.execute(MoveTo(x_m, y_m, source="evaluate"))
            frame = instrument.acquire()
            if frame.truth is None:
                raise DataError(f"sim:stm seed {seed} returned a frame without ground truth")
            label = STATES.index(frame.truth.tip_state)
            out.append(
                TipSample(
                    data=frame.data.astype(np.float32),
                    pixel_size_nm=size_m * 1e9 / recipe.shape_px[1],
                    label=label,
                    seed=seed,
                    surface=str(options["surface"]),
                    sim_label=label,
                    noise_sigma_m=_sigma(options, frame.dwell_s),
                )
            )
    finally:
        instrument.close()
    return out


def _sigma(options: dict[str, Any], dwell_s: float) -> float:
    """White-noise σ of one pixel (m), as :func:`simulators.noise.white_sigma_m` has it."""
    return float(options["white_noise_m_per_sqrt_hz"]) / float(np.sqrt(2.0 * dwell_s))


def stitch(first: np.ndarray, second: np.ndarray, change_line: int) -> np.ndarray:
    """Rows ``< change_line`` from ``first``, the rest from ``second`` (a tip change at that
    line; both frames image the same place, so the surface continues)."""
    if first.shape != second.shape:
        raise DataError(f"cannot stitch frames of shapes {first.shape} and {second.shape}")
    out = second.copy()
    out[:change_line] = first[:change_line]
    return out


@dataclass(frozen=True)
class ChangeFrame:
    """A frame in which the simulator changed the tip by itself once, at ``change_line``
    (lines scanned before the change); the change is visible once ``visible_line`` lines are
    scanned (None: never within the frame, see the module doc)."""

    data: np.ndarray
    pixel_size_nm: float
    change_line: int
    before: TipState
    after: TipState
    seed: int
    visible_line: int | None = None


def natural_changes(
    recipe: TipRecipe,
    *,
    count: int,
    degradation_rate_per_s: float = 1.0 / 80.0,
    max_seeds: int = 100_000,
    min_line: int = 16,
    progress: bool = True,
    initial: TipState = TipState.GOOD,
) -> list[ChangeFrame]:
    """``count`` frames that start with an ``initial`` tip which the simulator itself changes
    once mid-scan, with the change line from the ground truth (``lines_per_state`` of the first
    state). A good tip degrades at ``degradation_rate_per_s`` (a 256-line frame at 1 ms dwell
    takes 131 s); a bad one (``initial`` double/multiple or blunt: the states whose geometry
    holds still until it changes) changes to another state at the same rate (the simulator's
    ``bad_tip_change_rate_per_s``). Seeds are taken in order from ``recipe.seeds[0]``; frames
    with no change, several changes or a change before ``min_line`` are skipped. Visibility is
    judged against a scan of the same place by the ``initial`` tip that does not change."""
    if initial not in (TipState.GOOD, TipState.MULTIPLE, TipState.BLUNT):
        raise ConfigError(
            f"natural_changes starts from good, multiple or blunt tips, got {initial}"
        )
    rates = (
        {"degradation_rate_per_s": degradation_rate_per_s}
        if initial is TipState.GOOD
        else {"bad_tip_change_rate_per_s": degradation_rate_per_s}
    )
    from tqdm import tqdm

    out: list[ChangeFrame] = []
    seed = recipe.seeds[0]
    bar = tqdm(total=count, desc="tip changes", unit="frame", disable=not progress)
    while len(out) < count:
        if seed - recipe.seeds[0] > max_seeds:
            raise DataError(
                f"found only {len(out)} of {count} single-change frames in {max_seeds} seeds"
            )
        rng = np.random.default_rng([seed, 8_102])
        options = _options(recipe, rng)
        size_m = float(rng.uniform(*recipe.size_nm)) * 1e-9
        x_m, y_m = (float(v) for v in rng.uniform(-500e-9, 500e-9, 2))
        region = ScanRegion(x_m, y_m, size_m, size_m)
        frame = _scan(seed, initial, options, region, recipe.shape_px, **rates)
        seed += 1
        truth = frame.truth
        if (
            truth is None
            or int(truth.extra.get("tip_changes", 0)) != 1
            or len(truth.tip_states) != 2
        ):
            continue
        before, after = truth.tip_states
        lines = truth.extra.get("lines_per_state", {})
        change = int(lines.get(str(before), 0))
        if before is not initial or change < min_line or change >= recipe.shape_px[0] - 16:
            continue
        twin = _scan(seed - 1, initial, options, region, recipe.shape_px).data
        shown = shown_per_line(frame.data, twin, _sigma(options, frame.dwell_s))
        reached = np.flatnonzero(np.cumsum(shown[change:]) >= VISIBLE_PIXELS)
        out.append(
            ChangeFrame(
                data=frame.data.astype(np.float32),
                pixel_size_nm=size_m * 1e9 / recipe.shape_px[1],
                change_line=change,
                before=before,
                after=after,
                seed=seed - 1,
                visible_line=change + int(reached[0]) + 1 if len(reached) else None,
            )
        )
        bar.update(1)
    bar.close()
    return out


def iter_labels(samples: Sequence[TipSample]) -> Iterator[int]:
    return (s.label for s in samples)
