"""Frame stages: perception models the agent runs on every complete frame beside the tip and
quality assessors, and whose outputs it records (issue 8 item 7).

A stage turns a frame into a :class:`StageOutput`: small JSON-able ``fields`` that go into the
frame's ``perception`` event, and optional ``arrays`` (an image per frame) that the recorder
stores beside the event (:meth:`agent.recorder.SessionRecorder.append_array`). Two stages ship:

- ``sr`` (:class:`SrStage`): the sr model's recovered image and the summary of its per-pixel
  uncertainty; the image is recorded as float16 (``record="float16"``, the default; float32
  when the intensities exceed float16's range) or not at all (``record="none"``);
- ``defects`` (:class:`DefectsStage`): the defects model's defect list (position in pixels and
  nm, class, confidence, ``uncertain``) and the counts per class; the HAADF-STEM model
  (``defects``) or the STM-topograph model (``defects_stm``), chosen by the instrument kind
  (:func:`defects_sample`) or the stage option ``sample``.

The reject option: a frame the model cannot judge (pixel size outside the model card's range,
NaN pixels, ...) or judges with too much uncertainty is recorded with ``reject: true`` and the
reason, and nothing downstream acts on it. A stage error never stops the session.

Stages are built by :func:`agent.pipeline.build_pipeline` from the session config keys
``perception`` (a list of stage names) and ``perception_options`` (per stage name).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from drivers.errors import ConfigError, ScopePilotError
from drivers.frame import Frame
from drivers.protocol import SPM_KINDS

log = logging.getLogger(__name__)

FLOAT16_MAX = 65000.0  # below float16's largest finite value (65504), with some margin


@dataclass(frozen=True)
class StageOutput:
    """``fields`` go into the perception event (JSON-able); ``arrays`` are recorded beside it,
    each an ``(H, W)`` numeric array named by its key (e.g. ``"sr"``)."""

    fields: Mapping[str, Any]
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)


class FrameStage(Protocol):
    """A perception model run on complete frames whose output is recorded."""

    name: str
    version: str

    def run(self, frame: Frame) -> StageOutput: ...


def _pixel_nm(frame: Frame) -> Any:
    py, px = (abs(float(v)) * 1e9 for v in frame.pixel_size_m)
    return py if math.isclose(py, px, rel_tol=1e-6) else (py, px)


def _rejected(name: str, version: str, exc: ScopePilotError) -> StageOutput:
    return StageOutput(
        {
            name: {
                "model": version,
                "ran": False,
                "reject": True,
                "reason": f"{type(exc).__name__}: {exc}",
            }
        }
    )


class SrStage:
    """The ``sr`` model on each frame: recovered image (recorded) and its uncertainty summary.

    ``fields["sr"]``: ``model``, ``ran``, ``reject``, ``reason``, ``coverage`` (sampled fraction),
    ``relative_uncertainty`` (median σ over the recovered intensity range, the reject criterion),
    ``sigma_median``, ``sigma_p95`` (input units), ``image_min``, ``image_max``, ``recorded``
    (the dtype of the recorded image, or None).
    """

    name = "sr"

    def __init__(self, *, record: str = "float16", weights_dir: str | None = None) -> None:
        if record not in ("float16", "none"):
            raise ConfigError(f"sr stage option record must be 'float16' or 'none', got {record!r}")
        from agent.perception.registry import WEIGHTS_DIR
        from agent.perception.tasks import sr

        self._sr = sr
        self._model, self._card = sr.load(weights_dir or WEIGHTS_DIR)
        self.record = record
        # the card's sparse-line alignment changes partial-scan outputs with the same weights
        # (ADR 0017): recorded so that a session from before it is replayed, not resumed
        sparse = "+sparse" if self._card.training.get("align_sparse_lines") else ""
        self.version = f"{self._card.version}+{self._card.sha256[:8]}{sparse}"

    def run(self, frame: Frame) -> StageOutput:
        try:
            result = self._sr.recover(
                frame.data, _pixel_nm(frame), model=self._model, card=self._card
            )
        except ScopePilotError as exc:
            return _rejected(self.name, self.version, exc)
        sigma_median, sigma_p95 = np.percentile(result.sigma, (50.0, 95.0))  # one partition
        fields = {
            "model": self.version,
            "ran": True,
            "reject": bool(result.reject),
            "reason": result.reason,
            "coverage": float(result.coverage),
            "relative_uncertainty": float(result.relative_uncertainty),
            "sigma_median": float(sigma_median),
            "sigma_p95": float(sigma_p95),
            "image_min": float(result.image.min()),
            "image_max": float(result.image.max()),
            "recorded": None,
        }
        arrays: dict[str, np.ndarray] = {}
        if self.record != "none":
            peak = float(np.abs(result.image).max())
            dtype = np.float16 if peak < FLOAT16_MAX else np.float32
            arrays["sr"] = result.image.astype(dtype)
            fields["recorded"] = np.dtype(dtype).name
        return StageOutput({"sr": fields}, arrays)


DEFECT_SAMPLES = ("stem", "stm")
"""Values of the ``defects`` stage option ``sample``: which defects model runs."""
STM_DEFECTS_MODEL = "defects_stm"
"""Card name of the STM defects model; its stage version starts with it."""


def defects_sample(kind: str) -> str:
    """The defects model for an instrument of ``kind``: ``"stm"`` (STM topographs, trained at
    0.06 nm pixels) on the scanning probes (:data:`drivers.protocol.SPM_KINDS`), ``"stem"``
    (HAADF-STEM, 0.025 nm) on the others."""
    return "stm" if kind in SPM_KINDS else "stem"


class DefectsStage:
    """The ``defects`` model on each frame: the defect list and counts per class.

    ``sample`` picks the model: ``"stem"`` (the default) the HAADF-STEM model (classes vacancy,
    substitution, adatom), ``"stm"`` the STM-topograph model (vacancy, adatom, dangling_bond;
    frame data are heights in metres). :func:`build_stages` sets it from the instrument kind
    unless the session's ``perception_options`` give it.

    ``fields["defects"]`` is the list (``row_px``, ``col_px``, ``y_nm``, ``x_nm`` from the
    frame's top-left pixel, ``class``, ``confidence``, ``uncertain``) that the console draws;
    ``fields["defects_summary"]`` holds ``model``, ``sample``, ``ran``, ``reject``, ``reason``,
    ``counts`` (per class, all defects) and ``uncertain`` (how many are below the card's
    confidence bar).

    ``version`` (recorded in the session's ``versions`` and as ``model``): the STEM model's is
    ``"<card version>+<sha256[:8]>"`` as in sessions recorded before the STM model existed (so
    that they resume), the STM model's ``"defects_stm <card version>+<sha256[:8]>"``.
    """

    name = "defects"

    def __init__(self, *, sample: str = "stem", weights_dir: str | None = None) -> None:
        if sample not in DEFECT_SAMPLES:
            raise ConfigError(
                f"defects stage option sample must be one of {', '.join(DEFECT_SAMPLES)}, "
                f"got {sample!r}"
            )
        from agent.perception.registry import WEIGHTS_DIR

        self.sample = sample
        if sample == "stm":
            from agent.perception.tasks import defects_stm
            from agent.perception.tasks.defects_stm_data import CLASSES

            self._find: Callable[..., Any] = defects_stm.find_defects
            self._classes = tuple(CLASSES[1:])
            self._model, self._card = defects_stm.load(weights_dir or WEIGHTS_DIR)
            prefix = f"{self._card.name} "
        else:
            from agent.perception.tasks import defects
            from agent.perception.tasks.stem_data import DEFECT_CLASSES

            self._find = defects.find_defects
            self._classes = tuple(DEFECT_CLASSES[1:])
            self._model, self._card = defects.load(weights_dir or WEIGHTS_DIR)
            prefix = ""
        self.version = f"{prefix}{self._card.version}+{self._card.sha256[:8]}"

    def run(self, frame: Frame) -> StageOutput:
        try:
            result = self._find(frame.data, _pixel_nm(frame), model=self._model, card=self._card)
        except ScopePilotError as exc:
            out = _rejected("defects_summary", self.version, exc)
            summary = {**out.fields["defects_summary"], "sample": self.sample}
            return StageOutput({"defects": [], "defects_summary": summary})
        py, px = (abs(float(v)) * 1e9 for v in frame.pixel_size_m)
        counts = dict.fromkeys(self._classes, 0)
        listed = []
        for d, uncertain in zip(result.defects, result.uncertain, strict=True):
            counts[d.kind] = counts.get(d.kind, 0) + 1
            listed.append(
                {
                    "row_px": round(float(d.row_px), 2),
                    "col_px": round(float(d.col_px), 2),
                    "y_nm": round(float(d.row_px) * py, 4),
                    "x_nm": round(float(d.col_px) * px, 4),
                    "class": d.kind,
                    "confidence": round(float(d.confidence), 4),
                    "uncertain": bool(uncertain),
                }
            )
        summary = {
            "model": self.version,
            "sample": self.sample,
            "ran": True,
            "reject": bool(result.reject),
            "reason": result.reason,
            "counts": counts,
            "uncertain": int(sum(result.uncertain)),
        }
        return StageOutput({"defects": listed, "defects_summary": summary})


STAGES: dict[str, Callable[..., FrameStage]] = {"sr": SrStage, "defects": DefectsStage}
"""Frame stage factories by name; each takes that stage's ``perception_options`` as keywords."""


def default_stages(kind: str, *, pixel_size_nm: float | None = None) -> tuple[str, ...]:
    """The stages ``scopepilot run`` uses on an instrument of ``kind`` scanning pixels of
    ``pixel_size_nm`` (None: not known) unless told otherwise.

    STEM: sr and defects (both models are trained on HAADF-STEM at 0.0125–0.05 nm pixels;
    frames outside that are recorded as rejected). STM: defects (the STM model) when the pixels
    are inside the STM model card's ``pixel_size_range_nm`` (0.03–0.12 nm; the default
    ``sim:stm`` scan, 256² over 16 nm, is 0.0625 nm), none otherwise: there it would only reject.
    SEM and AFM: none (no model is trained on their images; they run when asked and reject).
    """
    if kind == "stem":
        return ("sr", "defects")
    if kind == "stm" and pixel_size_nm is not None:
        from agent.perception.registry import read_card

        low, high = read_card(STM_DEFECTS_MODEL).pixel_size_range_nm
        if low <= pixel_size_nm <= high:
            return ("defects",)
    return ()


def build_stages(
    names: Sequence[str],
    options: Mapping[str, Mapping[str, Any]],
    *,
    kind: str | None = None,
) -> tuple[FrameStage, ...]:
    """The stages ``names`` (in order) with their ``options`` on an instrument of ``kind``
    (the ``defects`` stage's model follows it, :func:`defects_sample`, unless its options give
    ``sample``; None: the STEM model); :class:`ConfigError` for an unknown or repeated name,
    options of a stage not asked for, or an option a stage does not take."""
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"perception must be a list of stage names, got {names!r}")
    known = ", ".join(sorted(STAGES))
    for name in names:
        if name not in STAGES:
            raise ConfigError(f"unknown perception stage {name!r}; known: {known}")
    if len(set(names)) != len(names):
        raise ConfigError(f"perception stages repeat: {list(names)!r}")
    extra = sorted(set(options) - set(names))
    if extra:
        raise ConfigError(f"perception_options for {extra} given without those stages")
    stages = []
    for name in names:
        opts = options.get(name) or {}
        if not isinstance(opts, Mapping):
            raise ConfigError(f"perception_options[{name!r}] must be a mapping, got {opts!r}")
        if name == "defects" and kind is not None and "sample" not in opts:
            opts = {**opts, "sample": defects_sample(kind)}
        try:
            stages.append(STAGES[name](**opts))
        except TypeError as exc:  # an unknown keyword
            raise ConfigError(f"perception stage {name!r}: {exc}") from None
    return tuple(stages)


@dataclass
class StageResults:
    """What :func:`run_stages` returns: perception event ``fields``, ``arrays`` to record and
    each stage's ``latency_s``."""

    fields: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    latency_s: dict[str, float] = field(default_factory=dict)


def run_stages(
    stages: Sequence[FrameStage],
    frame: Frame,
    *,
    clock: Callable[[], float] = time.perf_counter,
) -> StageResults:
    """Run ``stages`` on ``frame`` in order; each one's time goes into ``latency_s``."""
    out = StageResults()
    for stage in stages:
        t0 = clock()
        result = stage.run(frame)
        out.latency_s[stage.name] = clock() - t0
        out.fields.update(result.fields)
        out.arrays.update(result.arrays)
    return out
