"""Simulated HAADF-STEM frames with ground truth, for training and scoring the sr and defects
networks.

Frames come from the ``sim:stem`` instrument through :func:`drivers.registry.open_instrument`
(the agent never imports the simulators): each recipe opens instruments with its own seeds,
moves the stage to random areas, and sets dwell and scan pattern with ordinary commands, as an
operator collecting a data set would. Held-out recipes differ from the training recipe in their
seeds *and* in simulator parameters (beam current, drift, source size, defect density), so the
evaluation measures generalisation, not memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from drivers.commands import MoveTo, Scan, SetScanPattern
from drivers.errors import DataError
from drivers.frame import Defect, ScanRegion
from drivers.registry import open_instrument

PIXEL_SIZE_M = 0.25e-10
"""Pixel size the sr and defects networks are trained at (0.25 Å, the sim:stem default)."""
DEFECT_CLASSES: tuple[str, ...] = ("lattice", "vacancy", "substitution", "adatom")
"""Classes of the defects network (index = value of the simulator's ``class_mask``)."""
STAGE_RANGE_M = 0.9e-6
"""Random areas are drawn within ±0.9 µm (the sim:stem stage allows ±1 µm)."""


@dataclass(frozen=True)
class StemRecipe:
    """How to simulate a data set.

    ``seed`` seeds everything (instrument seeds and the random areas, dwells and patterns);
    ``frames_per_instrument`` frames are taken from each instrument before a new one (new seed:
    new lattice orientation and defects) is opened. ``dwell_s`` is a log-uniform range;
    ``patterns`` are (pattern, fraction) pairs drawn uniformly; ``pixel_size_m`` a uniform range.
    ``sim_options`` go to ``open_instrument`` unchanged (``STEMConfig`` fields), and
    ``specimens`` are cycled through instrument by instrument.
    """

    seed: int
    frames: int
    shape_px: tuple[int, int] = (256, 256)
    pixel_size_m: tuple[float, float] = (0.23e-10, 0.27e-10)
    dwell_s: tuple[float, float] = (0.25e-6, 8e-6)
    patterns: tuple[tuple[str, float], ...] = (("raster", 1.0),)
    specimens: tuple[str, ...] = ("mos2", "ws2")
    frames_per_instrument: int = 8
    sim_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StemSample:
    """One simulated frame: ``image`` ``(H, W) float32`` detector counts (NaN where a partial
    scan skipped), ``clean`` the noise-free expected counts, ``sampled`` ``(H, W) bool``,
    ``class_mask`` ``(H, W) uint8`` (index into :data:`DEFECT_CLASSES`), the ground-truth
    defect list, the incident ``electrons_per_px`` and the pixel size in metres."""

    image: np.ndarray
    clean: np.ndarray
    sampled: np.ndarray
    class_mask: np.ndarray
    defects: tuple[Defect, ...]
    electrons_per_px: float
    pixel_size_m: float
    pattern: str
    fraction: float
    specimen: str


def simulate(
    recipe: StemRecipe, *, progress: bool = True, desc: str = "simulating"
) -> list[StemSample]:
    """All frames of ``recipe`` (deterministic for a given recipe)."""
    if recipe.frames < 1:
        raise DataError(f"a data set needs at least one frame, got frames={recipe.frames!r}")
    rng = np.random.default_rng(recipe.seed)
    samples: list[StemSample] = []
    instrument: Any = None
    specimen = recipe.specimens[0]
    n_instruments = 0
    try:
        for i in tqdm(range(recipe.frames), desc=desc, disable=not progress, unit="frame"):
            if i % recipe.frames_per_instrument == 0:
                if instrument is not None:
                    instrument.close()
                specimen = recipe.specimens[n_instruments % len(recipe.specimens)]
                instrument = open_instrument(
                    "sim:stem",
                    seed=int(rng.integers(2**31)),
                    specimen=specimen,
                    **recipe.sim_options,
                )
                n_instruments += 1
            samples.append(_take(instrument, recipe, rng, specimen))
    finally:
        if instrument is not None:
            instrument.close()
    return samples


def _take(
    instrument: Any, recipe: StemRecipe, rng: np.random.Generator, specimen: str
) -> StemSample:
    h_px, w_px = recipe.shape_px
    pixel_m = float(rng.uniform(*recipe.pixel_size_m))
    dwell_s = float(math.exp(rng.uniform(math.log(recipe.dwell_s[0]), math.log(recipe.dwell_s[1]))))
    pattern, fraction = recipe.patterns[int(rng.integers(len(recipe.patterns)))]
    x_m, y_m = rng.uniform(-STAGE_RANGE_M, STAGE_RANGE_M, 2)
    instrument.execute(MoveTo(float(x_m), float(y_m), source="dataset"))
    region = ScanRegion(float(x_m), float(y_m), w_px * pixel_m, h_px * pixel_m)
    instrument.execute(Scan(region, (h_px, w_px), dwell_s, source="dataset"))
    instrument.execute(SetScanPattern(pattern, fraction, source="dataset"))
    frame = instrument.acquire()
    truth = frame.truth
    if truth is None or truth.clean is None:
        raise DataError("sim:stem returned a frame without ground truth; cannot build a data set")
    return StemSample(
        image=frame.data.astype(np.float32),
        clean=np.asarray(truth.clean, dtype=np.float32),
        sampled=np.asarray(truth.extra["sampling_mask"], dtype=bool),
        class_mask=np.asarray(truth.extra["class_mask"], dtype=np.uint8),
        defects=truth.defects,
        electrons_per_px=float(truth.extra["electrons_per_px"]),
        pixel_size_m=pixel_m,
        pattern=pattern,
        fraction=fraction,
        specimen=specimen,
    )


def image_scale(image: np.ndarray) -> float:
    """The normalisation of a frame: the mean of its finite pixels (> 0), so that the networks
    see dose-independent values. :class:`DataError` when there is nothing to normalise by."""
    values = image[np.isfinite(image)]
    if values.size == 0:
        raise DataError("the image has no finite pixels to normalise by")
    scale = float(values.mean())
    if not scale > 0:
        raise DataError(
            f"the image mean is {scale:g}; HAADF counts must be positive on average "
            "(is this a background-subtracted or inverted image?)"
        )
    return scale


def shuffled_crops(
    samples: Sequence[StemSample], crop_px: int, count: int, rng: np.random.Generator
) -> list[tuple[int, int, int]]:
    """``count`` random (sample index, row, col) crop origins of ``crop_px`` squares."""
    out = []
    for _ in range(count):
        k = int(rng.integers(len(samples)))
        h_px, w_px = samples[k].image.shape
        out.append(
            (k, int(rng.integers(h_px - crop_px + 1)), int(rng.integers(w_px - crop_px + 1)))
        )
    return out


def defect_class(kind: str) -> str:
    """The class (an entry of :data:`DEFECT_CLASSES`) of a ground-truth defect kind such as
    ``s_vacancy`` or ``w_substitution``; :class:`DataError` for a kind of no known class."""
    for klass in DEFECT_CLASSES[1:]:
        if kind.endswith(klass):
            return klass
    raise DataError(f"defect kind {kind!r} belongs to none of the classes {DEFECT_CLASSES[1:]}")
