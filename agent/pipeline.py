"""Perception and policy of a session, built from its plain configuration mapping.

``scopepilot run`` stores its configuration in the session store (``Session.config``); replay
and ``--resume`` rebuild exactly the same perception and policy from that mapping with
:func:`build_pipeline`, so what runs again is what ran. The keys this module reads:

``policy``            policy name for :func:`policies.base.make_policy` (``rule``, ``none``, ...)
``policy_options``    keyword options of that policy (JSON-able; e.g. ``{"target_snr": 5.0}``)
``assessor``          tip assessor name (``classical``, ``tipnet``, ``none``); absent or None:
                      the default for the instrument kind (``classical`` on SPM, ``none`` on
                      STEM/SEM)
``assessor_options``  keyword options of the tip assessor (for ``classical``: fields of
                      :class:`~agent.perception.classical.ClassicalConfig`; for ``tipnet``:
                      see :func:`_tipnet`)
``quality``           image-quality assessor name (``snr``, ``none``); absent: ``snr``
``perception``        frame stages run and recorded on every complete frame, in order (names in
                      :data:`agent.perception.stages.STAGES`: ``sr``, ``defects``); absent:
                      none (``scopepilot run`` stores the default for the instrument kind,
                      :func:`~agent.perception.stages.default_stages`)
``perception_options`` keyword options per stage name (e.g. ``{"sr": {"record": "none"}}``;
                      ``{"defects": {"sample": "stm"}}`` picks the defects model, absent: the
                      one for the instrument kind, :func:`~agent.perception.stages.defects_sample`)
``early_abort``       true: while an SPM scan streams, the tip assessor's ``watch`` judges the
                      latest lines and a tip change aborts the scan (the assessor must have
                      ``watch``: ``tipnet``); absent: false

Other keys (instrument URI, seed, frames, ...) belong to the run and are ignored here.
New tip models register a factory in ``TIP_ASSESSORS``.

>>> pipe = build_pipeline({"policy": "rule", "policy_options": {}}, kind="stm")
>>> (pipe.assessor.name, pipe.quality.name, pipe.policy.name)
('classical', 'snr', 'rule')
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.loop import Agent, Assessor, QualityAssessor
from agent.perception.stages import FrameStage, build_stages
from drivers.errors import ConfigError
from drivers.protocol import SPM_KINDS, Instrument
from policies.base import Policy, make_policy


def _classical(**options: Any) -> Assessor:
    from agent.perception.classical import ClassicalConfig, ClassicalTipAssessor

    try:
        return ClassicalTipAssessor(ClassicalConfig(**options))
    except TypeError as exc:  # an unknown keyword
        raise ConfigError(f"classical tip assessor: {exc}; see ClassicalConfig") from None


def _tipnet(**options: Any) -> Assessor:
    """The tip-state network with the classical assessor as fallback and recorded baseline.

    Options: ``reject_uncertainty`` (0–1; above it the network defers to the classical
    assessor; default from the model card), ``weights_dir`` (default: the shipped weights),
    ``baseline`` (false: skip the classical verdict on frames the network is sure of),
    ``pairs`` (default true: a complete STM frame read as good is also given to the
    defect-pair double-tip cue, :mod:`agent.perception.tip_pairs`; false: the network alone;
    see docs/decisions/0014-tip-defect-pairs.md) and any
    :class:`~agent.perception.classical.ClassicalConfig` field for the fallback.
    """
    import math

    from agent.perception.classical import ClassicalConfig, ClassicalTipAssessor
    from agent.perception.registry import WEIGHTS_DIR
    from agent.perception.tip_net import TipModel, TipNetAssessor

    own = {"reject_uncertainty", "weights_dir", "baseline", "pairs"}
    classical = {k: v for k, v in options.items() if k not in own}
    try:
        fallback = ClassicalTipAssessor(ClassicalConfig(**classical))
    except TypeError as exc:  # an unknown keyword
        raise ConfigError(
            f"tipnet tip assessor: {exc}; it takes {sorted(own)} and ClassicalConfig fields"
        ) from None
    model = TipModel.load(options.get("weights_dir") or WEIGHTS_DIR)
    if "reject_uncertainty" in options:
        value = options["reject_uncertainty"]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not (math.isfinite(value) and 0 <= value <= 1)
        ):
            raise ConfigError(f"tipnet reject_uncertainty must be in [0, 1], got {value!r}")
        model.reject_uncertainty = float(value)
    pairs = options.get("pairs", True)
    if not isinstance(pairs, bool):
        raise ConfigError(f"tipnet pairs must be true or false, got {pairs!r}")
    from agent.perception.tip_pairs import PairSettings

    return TipNetAssessor(
        model,
        fallback=fallback,
        baseline=bool(options.get("baseline", True)),
        pairs=PairSettings() if pairs else None,
    )


def _snr(**options: Any) -> QualityAssessor:
    from agent.perception.quality import ImageQualityAssessor

    if options:
        raise ConfigError(f"quality assessor 'snr' takes no options, got {sorted(options)}")
    return ImageQualityAssessor()


TIP_ASSESSORS: dict[str, Callable[..., Assessor]] = {"classical": _classical, "tipnet": _tipnet}
"""Tip assessor factories by name; each takes the ``assessor_options`` as keywords."""

QUALITY_ASSESSORS: dict[str, Callable[..., QualityAssessor]] = {"snr": _snr}


@dataclass(frozen=True)
class Pipeline:
    """What judges frames (``assessor``, ``quality``; either may be None), the frame stages
    whose outputs are recorded (``stages``), whether a tip change aborts a scan early
    (``early_abort``) and what decides."""

    assessor: Assessor | None
    quality: QualityAssessor | None
    policy: Policy
    stages: tuple[FrameStage, ...] = ()
    early_abort: bool = False
    policy_trained_on: str | None = None
    """The tip assessor (``"name version"``) a trained tip policy learnt from, where it says."""

    def agent(self, instrument: Instrument, **options: Any) -> Agent:
        """An :class:`~agent.loop.Agent` on ``instrument`` with these parts; ``options`` are the
        agent's other keywords (``recorder``, ``config``, ``on_step``, ...)."""
        return Agent(
            instrument,
            self.policy,
            assessor=self.assessor,
            quality=self.quality,
            stages=self.stages,
            early_abort=self.early_abort,
            **options,
        )

    def versions(self) -> dict[str, str]:
        """Names and versions of each part, as recorded in the session's ``versions``."""

        def label(part: Any) -> str:
            if part is None:
                return "none"
            return f"{part.name} {getattr(part, 'version', '?')}"

        out = {
            "policy": label(self.policy),
            "assessor": label(self.assessor),
            "quality": label(self.quality),
        }
        for stage in self.stages:  # absent when none run: older sessions resume unchanged
            out[stage.name] = label(stage)
        watch = getattr(self.assessor, "watch_version", None)
        if watch is not None:  # the mid-scan watch's fitted detector (tipnet)
            out["tip_watch"] = watch
        pairs = getattr(self.assessor, "pairs_version", None)
        if pairs is not None:  # the defect-pair double-tip cue (tipnet)
            out["tip_pairs"] = pairs
        if self.policy_trained_on is not None:
            out["policy_trained_on"] = self.policy_trained_on
        return out

    def warnings(self) -> list[str]:
        """What a person starting this session should know before trusting it: a trained tip
        policy fed by another tip assessor than the one it learnt from (its observations then
        come from a different model; docs/benchmarks.md, Issue 4, measures one such pairing)."""
        used = (
            "none"
            if self.assessor is None
            else (f"{self.assessor.name} {getattr(self.assessor, 'version', '?')}")
        )
        if self.policy_trained_on is None or self.policy_trained_on == used:
            return []
        return [
            f"policy {self.policy.name!r} was trained on tip estimates from "
            f"{self.policy_trained_on}; this session's tip assessor is {used}"
        ]


TIPNET_POLICIES = ("rl", "rl-tip")
"""Policies trained on the tip network's outputs: on an SPM they default to that assessor."""


def default_assessor(kind: str, policy: str = "rule") -> str:
    """The tip assessor a session with ``policy`` on an instrument of ``kind`` uses unless told
    otherwise: none without a tip; on an SPM the tip network for the trained tip policies (the
    observations they were trained on), the classical assessor for the others."""
    if kind not in SPM_KINDS:
        return "none"
    return "tipnet" if policy in TIPNET_POLICIES else "classical"


def default_policy_options(policy: str, kind: str, target_snr: float | None) -> dict[str, Any]:
    """The ``policy_options`` ``scopepilot run`` stores for ``policy`` on ``kind``.

    The rule policy gets dose control: ``target_snr`` when given (0 or less switches it off),
    else 5 on STEM/SEM and off on SPM. Other policies get no options.
    """
    if policy != "rule":
        return {}
    if target_snr is None:
        target_snr = None if kind in SPM_KINDS else 5.0
    elif target_snr <= 0:
        target_snr = None
    return {"target_snr": target_snr}


def _options(config: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"session config {key!r} must be a mapping of names, got {value!r}")
    return dict(value)


def _name(config: Mapping[str, Any], key: str, default: str) -> str:
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, str) or not value:
        raise ConfigError(f"session config {key!r} must be a name, got {value!r}")
    return value


def _without_pairs_if_not_run(
    config: Mapping[str, Any], versions: Mapping[str, Any]
) -> dict[str, Any]:
    out = dict(config)
    ran = versions.get("assessor")
    if not isinstance(ran, str) or not ran.startswith("tipnet ") or "tip_pairs" in versions:
        return out
    options = out.get("assessor_options")
    if options is not None and not isinstance(options, Mapping):
        return out  # build_pipeline names the malformed value
    if "pairs" not in (options or {}):
        out["assessor_options"] = {**(options or {}), "pairs": False}
    return out


def recorded_config(config: Mapping[str, Any], versions: Mapping[str, Any]) -> dict[str, Any]:
    """A recorded session's ``config`` such that :func:`build_pipeline` rebuilds what ran, given
    the session's recorded ``versions`` (replay and ``--resume`` call this).

    Sessions recorded before the ``defects`` stage chose its model by instrument kind ran the
    STEM model on every instrument and stored no choice: where the recorded ``defects`` version
    does not name the STM model, the stage gets ``sample: "stem"`` (a session whose versions do
    not mention the stage keeps the default for its kind). Sessions recorded before the
    ``tipnet`` assessor ran the defect-pair cue by default ran the network alone: where a
    ``tipnet`` session's versions name no ``tip_pairs``, its assessor gets ``pairs: false``.
    """
    from agent.perception.stages import STM_DEFECTS_MODEL

    out = _without_pairs_if_not_run(config, versions)
    names = out.get("perception")
    ran = versions.get("defects")
    if not isinstance(names, list) or "defects" not in names or not isinstance(ran, str):
        return out
    if STM_DEFECTS_MODEL in ran:
        return out
    options = out.get("perception_options")
    if options is not None and not isinstance(options, Mapping):
        return out  # build_pipeline names the malformed value
    options = dict(options or {})
    defects = options.get("defects") or {}
    if not isinstance(defects, Mapping) or "sample" in defects:
        return out
    options["defects"] = {**defects, "sample": "stem"}
    out["perception_options"] = options
    return out


def build_pipeline(config: Mapping[str, Any], *, kind: str) -> Pipeline:
    """Perception and policy for a session on an instrument of ``kind`` from ``config``.

    Raises :class:`ConfigError` naming the key for an unknown name, a malformed value or an
    option the part does not take.
    """
    if not isinstance(config, Mapping):
        raise ConfigError(f"session config must be a mapping, got {type(config).__name__}")
    policy_name = _name(config, "policy", "rule")
    policy = make_policy(policy_name, **_options(config, "policy_options"))
    tip_name = _name(config, "assessor", default_assessor(kind, policy_name))
    tip_options = _options(config, "assessor_options")
    assessor: Assessor | None = None
    if tip_name != "none":
        factory = TIP_ASSESSORS.get(tip_name)
        if factory is None:
            known = ", ".join(sorted([*TIP_ASSESSORS, "none"]))
            raise ConfigError(f"unknown tip assessor {tip_name!r}; known: {known}")
        assessor = factory(**tip_options)
    elif tip_options:
        raise ConfigError(f"assessor_options {sorted(tip_options)} given without a tip assessor")
    quality_name = _name(config, "quality", "snr")
    quality: QualityAssessor | None = None
    if quality_name != "none":
        quality_factory = QUALITY_ASSESSORS.get(quality_name)
        if quality_factory is None:
            known = ", ".join(sorted([*QUALITY_ASSESSORS, "none"]))
            raise ConfigError(f"unknown quality assessor {quality_name!r}; known: {known}")
        quality = quality_factory()
    names = config.get("perception")
    if names is None:
        names = []
    stage_options = _options(config, "perception_options")
    stages = build_stages(names, stage_options, kind=kind)
    early_abort = config.get("early_abort", False)
    if not isinstance(early_abort, bool):
        raise ConfigError(
            f"session config 'early_abort' must be true or false, got {early_abort!r}"
        )
    if early_abort and not callable(getattr(assessor, "watch", None)):
        raise ConfigError(
            f"early_abort needs a tip assessor that watches partial frames (tipnet), got "
            f"{tip_name!r}"
        )
    trained_on = None
    if policy_name in TIPNET_POLICIES and kind in SPM_KINDS:
        from policies.rl import TIP_WEIGHTS, tip_policy_perception

        policy_options = _options(config, "policy_options")
        weights = policy_options.get("tip_weights" if policy_name == "rl" else "weights")
        trained_on = tip_policy_perception(weights or TIP_WEIGHTS)
    return Pipeline(
        assessor=assessor,
        quality=quality,
        policy=policy,
        stages=stages,
        early_abort=early_abort,
        policy_trained_on=trained_on,
    )
