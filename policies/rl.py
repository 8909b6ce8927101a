"""Deployed RL policies: the trained networks behind the :class:`~policies.base.Policy` protocol.

They load plain state_dicts (:mod:`policies.rl_net`, ``torch.load(weights_only=True)``) and need
neither gymnasium nor stable-baselines3. Each builds exactly the observation and action mask its
training environment built (:mod:`policies.tip_actions`, :mod:`policies.env_dose`).

- :class:`RLTipPolicy` (``rl-tip``): one of the 12 DeepSPM conditioning actions per frame whose
  P(good) is below ``good_threshold``, then a move to a fresh site of its damaged-area map.
- :class:`RLDosePolicy` (``rl-dose``): the dwell of the next frame; with the option ``sr`` (a
  file trained with ``scopepilot train-policy dose --sr``) also whether to rely on the sr
  model's recovered image for it, from the ``sr`` frame stage's output on the frame just taken
  (``Observation.stages["sr"]``, the same fields its training environment saw).
- :class:`FallbackPolicy` wraps either: when perception is too uncertain it rescans, when the
  network's own confidence (probability of its chosen action) is low it hands the frame to the
  rule policy, and the decision's reason says which and why.
- ``rl``: the tip policy on instruments with tip conditioning, the dose policy on the others.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from drivers.commands import Capability, Command, MoveTo, SetDwell
from drivers.errors import ConfigError, DataError, ModelError
from drivers.observation import Decision, Observation
from policies.base import Policy, named_decision
from policies.dose_features import (
    DOSE_OBS_DIM,
    DOSE_SR_OBS_DIM,
    DWELL_LEVELS_S,
    MARGINS,
    SR_FEATURES_VERSION,
    SR_N_ACTIONS,
    SR_STAGE,
    dose_observation,
    level_for_action,
    split_sr_action,
    sr_action_mask,
    sr_features,
)
from policies.rl_net import WEIGHTS_DIR, PolicyNet, load_policy
from policies.tip_actions import (
    CONDITIONING_ACTIONS,
    N_ACTIONS,
    NM,
    OBS_DIM,
    SiteMap,
    footprint_m,
    tip_observation,
)

TIP_WEIGHTS = WEIGHTS_DIR / "rl_tip.pt"
DOSE_WEIGHTS = WEIGHTS_DIR / "rl_dose.pt"
DOSE_SR_WEIGHTS = WEIGHTS_DIR / "rl_dose_sr.pt"
"""Where ``train-policy dose --sr`` writes by default (not shipped: no trained sr-aware policy
has beaten the shipped one, docs/decisions/0018-dose-sr-choice.md)."""


def load_dose_policy(weights: str | Path, *, sr: bool) -> tuple[PolicyNet, dict[str, Any]]:
    """The dose network in ``weights`` and its meta, checked to be the variant asked for:
    raw only (``sr`` false: 7 inputs, 13 actions) or sr-aware (10 inputs, 26 actions, meta
    ``sr_features`` = :data:`~policies.dose_features.SR_FEATURES_VERSION`). A file of the other
    variant raises :class:`ModelError` saying so and what to do."""
    shapes = {False: (DOSE_OBS_DIM, len(MARGINS)), True: (DOSE_SR_OBS_DIM, SR_N_ACTIONS)}
    obs_dim, n_actions = shapes[sr]
    try:
        net, meta = load_policy(weights, kind="dose", obs_dim=obs_dim, n_actions=n_actions)
    except ModelError as exc:
        try:
            load_policy(
                weights, kind="dose", obs_dim=shapes[not sr][0], n_actions=shapes[not sr][1]
            )
        except (ConfigError, ModelError):
            raise exc from None
        if sr:
            raise ModelError(
                f"{weights}: a raw-only dose policy (no sr choice); run it without the rl-dose "
                "option sr, or train an sr-aware one with `scopepilot train-policy dose --sr`"
            ) from None
        raise ModelError(
            f"{weights}: an sr-aware dose policy (trained with `train-policy dose --sr`); it "
            "runs only with the rl-dose option sr=true and the sr frame stage"
        ) from None
    if sr and meta.get("sr_features") != SR_FEATURES_VERSION:
        raise ModelError(
            f"{weights}: sr feature layout {meta.get('sr_features')!r}, this scopepilot builds "
            f"layout {SR_FEATURES_VERSION}; retrain with `scopepilot train-policy dose --sr`"
        )
    return net, meta


def tip_policy_perception(weights: str | Path = TIP_WEIGHTS) -> str | None:
    """The tip assessor (``"name version"``, e.g. ``"tipnet 1.1+577f79d8"``) whose estimates the
    tip policy in ``weights`` was trained on, as its training recorded it; None when the file
    does not say or cannot be read (loading the policy reports that)."""
    try:
        _, meta = load_policy(weights, kind="tip", obs_dim=OBS_DIM, n_actions=N_ACTIONS)
    except (ConfigError, ModelError):
        return None
    value = meta.get("perception")
    return value if isinstance(value, str) and value else None


def _short(sha: str) -> str:
    return sha[:10] if isinstance(sha, str) else "?"


class RLTipPolicy:
    """Tip conditioning by the trained network (see the module doc)."""

    name = "rl-tip"

    def __init__(
        self,
        weights: str | Path = TIP_WEIGHTS,
        *,
        good_threshold: float = 0.9,
        max_actions: int = 100,
    ) -> None:
        self.net: PolicyNet
        self.net, self.meta = load_policy(weights, kind="tip", obs_dim=OBS_DIM, n_actions=N_ACTIONS)
        self.version = f"1+{_short(self.meta['sha256'])}"
        if not 0 < good_threshold < 1:
            raise ConfigError(f"good_threshold must be in (0, 1), got {good_threshold!r}")
        self.good_threshold = float(good_threshold)
        self.max_actions = int(max_actions)
        self.reset()

    def reset(self) -> None:
        self._sites: SiteMap | None = None
        self._last_action: int | None = None
        self._actions = 0

    def decide(self, observation: Observation) -> Decision:
        label = f"frame {observation.frame.frame_index}"
        if observation.problems:
            return named_decision(
                self.name, f"{label} not acted on ({'; '.join(observation.problems)}): rescan", 0.0
            )
        if Capability.TIP_CONDITIONING not in observation.info.capabilities:
            return named_decision(
                self.name,
                f"{label}: instrument {observation.info.id!r} has no tip to condition",
                1.0,
            )
        tip = observation.tip
        if tip is None:
            return named_decision(self.name, f"{label} has no tip estimate: rescan", 0.0)
        if tip.p_good >= self.good_threshold:
            done = f"; conditioning done after {self._actions} actions" if self._actions else ""
            self._last_action, self._actions = None, 0
            return named_decision(
                self.name,
                f"tip P(good)={tip.p_good:.2f} >= {self.good_threshold:g}: keep scanning{done}",
                tip.p_good,
            )
        position = (float(observation.state.position_m[0]), float(observation.state.position_m[1]))
        if self._sites is None:  # sites are spaced for the frames this session scans
            region = observation.state.scan_region
            frame_m = max(region.width_m, region.height_m)
            self._sites = SiteMap(
                position,
                observation.info.limits,
                frame_m=frame_m,
                pitch_m=max(30 * NM, 2 * frame_m),
            )
        sites = self._sites
        free = sites.free_radius_m(*position)
        obs = tip_observation(
            tip,
            observation.history,
            last_action=self._last_action,
            free_radius_m=free,
            actions_taken=self._actions,
            max_actions=self.max_actions,
        )
        mask = sites.mask(position)
        stage = Capability.STAGE in observation.info.capabilities
        if not mask.any():
            target = sites.next_site(position) if stage else None
            if target is None:
                return named_decision(
                    self.name,
                    "no conditioning action fits the free area or the limits here and no fresh "
                    "site is left: operator attention needed",
                    1.0,
                    stop=True,
                )
            return named_decision(
                self.name,
                f"no conditioning action fits here (free radius {free / NM:.0f} nm): move to "
                f"fresh site ({target[0] / NM:.0f}, {target[1] / NM:.0f}) nm",
                1.0,
                commands=(MoveTo(*target, source=self.name, reason="no room to condition here"),),
            )
        index, probs = self.net.act(obs, mask)
        step = CONDITIONING_ACTIONS[index]
        confidence = float(probs[index])
        why = (
            f"tip P(good)={tip.p_good:.2f}, most likely {tip.state.value}: {step.describe()} "
            f"(network p={confidence:.2f} over {int(mask.sum())} valid actions)"
        )
        commands: list[Command] = [step.command(source=self.name, reason=why)]
        if observation.advisory:  # manual mode: nothing happens, so nothing is counted or marked
            why += "; advice only (manual mode): not counted as an action"
            return named_decision(self.name, why, confidence, commands=tuple(commands))
        sites.add_damage(position[0], position[1], footprint_m(step))
        if stage:
            target = sites.next_site(position)
            if target is not None:
                commands.append(
                    MoveTo(*target, source=self.name, reason="fresh site after conditioning")
                )
                why += f"; move to fresh site ({target[0] / NM:.0f}, {target[1] / NM:.0f}) nm"
        self._last_action = index
        self._actions += 1
        return named_decision(self.name, why, confidence, commands=tuple(commands))


class RLDosePolicy:
    """The dwell of each next frame, chosen by the trained network (see the module doc).

    The SNR target is the one the network was trained for (``meta["target_snr"]``). With
    ``sr`` the weights must be an sr-aware file (default :data:`DOSE_SR_WEIGHTS`), each decision
    also says whether the next frame relies on sr's recovered image or on the raw frame, and a
    frame without the ``sr`` stage's output is not acted on (the session needs ``perception``
    ``sr``, the default on STEM)."""

    name = "rl-dose"

    def __init__(
        self, weights: str | Path | None = None, *, frames: int = 20, sr: bool = False
    ) -> None:
        if not isinstance(sr, bool):
            raise ConfigError(f"rl-dose option sr must be true or false, got {sr!r}")
        if weights is None:
            weights = DOSE_SR_WEIGHTS if sr else DOSE_WEIGHTS
            if sr and not Path(weights).is_file():
                raise ConfigError(
                    f"no sr-aware dose policy at {weights} (none ships); train one with "
                    "`scopepilot train-policy dose --sr` and give it as the option weights"
                )
        self.net, self.meta = load_dose_policy(weights, sr=sr)
        self.sr = sr
        self.version = f"1+{_short(self.meta['sha256'])}"
        self.frames = int(frames)
        self.target_snr = float(self.meta.get("target_snr", 5.0))
        self.reset()

    def reset(self) -> None:
        self._done = 0
        self._relied = False

    def decide(self, observation: Observation) -> Decision:
        if observation.problems:
            return named_decision(
                self.name, f"frame not acted on ({'; '.join(observation.problems)})", 0.0
            )
        quality = observation.quality
        if quality is None or not math.isfinite(quality.snr):
            return named_decision(self.name, "no image-quality estimate: dwell unchanged", 0.0)
        frame = observation.frame
        stage = observation.stages.get(SR_STAGE)
        sr_fields = stage if self.sr and isinstance(stage, Mapping) else None
        if self.sr and sr_fields is None:
            return named_decision(
                self.name,
                "no sr stage output on this frame (the sr-aware dose policy needs perception "
                "'sr'): dwell unchanged",
                0.0,
            )
        data = np.asarray(frame.done_data, dtype=np.float64)
        finite = data[np.isfinite(data)]
        if finite.size == 0:
            raise DataError(f"frame {frame.frame_index} has no finite pixels")
        self._done += 1
        obs = dose_observation(
            float(quality.snr),
            float(frame.dwell_s),
            float(finite.mean()),
            min(self._done, self.frames - 1),  # as in training: the survey never looks finished
            self.frames,
            target_snr=self.target_snr,
        )
        rely = False
        if sr_fields is not None:
            obs = np.concatenate([obs, sr_features(sr_fields, self._relied)])
            action, probs = self.net.act(obs, sr_action_mask(sr_fields))
            confidence = float(probs[action])
            action, rely = split_sr_action(action)
        else:
            action, probs = self.net.act(obs)
            confidence = float(probs[action])
        level = level_for_action(
            action, float(quality.snr), float(frame.dwell_s), target_snr=self.target_snr
        )
        low, high = observation.info.limits.dwell_s
        allowed = [i for i, d in enumerate(DWELL_LEVELS_S) if low <= d <= high]
        if not allowed:
            return named_decision(
                self.name,
                f"no dwell level fits the instrument's dwell limits {low:g}..{high:g} s",
                1.0,
            )
        level = min(allowed, key=lambda i: abs(i - level))
        dwell = DWELL_LEVELS_S[level]
        current = float(observation.state.dwell_s)
        why = (
            f"SNR estimate {quality.snr:.2f} at {frame.dwell_s * 1e6:.3g} µs: next dwell "
            f"{dwell * 1e6:.3g} µs (margin {MARGINS[action]:+d} levels over the sqrt-law "
            f"estimate, network p={confidence:.2f})"
        )
        unchanged = math.isclose(dwell, current, rel_tol=0.01)
        if unchanged:
            why += ", unchanged"
        if sr_fields is not None:
            self._relied = rely
            why += self._sr_reason(sr_fields, rely)
        if unchanged:
            return named_decision(self.name, why, confidence)
        return named_decision(
            self.name, why, confidence, commands=(SetDwell(dwell, source=self.name, reason=why),)
        )

    def _sr_reason(self, fields: Mapping[str, Any], rely: bool) -> str:
        """What the decision says about sr (relied on or not, and why it could not be)."""
        ran = fields.get("model")
        trained = self.meta.get("sr_model")
        note = (
            f"; trained with sr {trained}, this session runs sr {ran}"
            if isinstance(trained, str) and isinstance(ran, str) and trained != ran
            else ""
        )
        if rely:
            sigma = fields.get("relative_uncertainty")
            sigma_text = f"{sigma:.3f}" if isinstance(sigma, (int, float)) else "?"
            return (
                f"; rely on sr: the next frame's product is sr's recovered image (sr relative "
                f"uncertainty {sigma_text} on this frame){note}"
            )
        if fields.get("ran") is not True or fields.get("reject") is not False:
            why_not = fields.get("reason") or "not run"
            return f"; raw frame (sr unusable on this frame: {why_not}){note}"
        return f"; raw frame (sr not relied on){note}"


class FallbackPolicy:
    """Run ``primary``; rescan when perception is too uncertain, hand over to ``fallback`` when
    the primary's confidence is low. Every decision says which policy decided and why.

    The fallback is consulted on every observation, so its bad-frame counter follows the session;
    its decision is used only when the primary's confidence is below ``min_confidence``. (Its
    ladder position therefore advances as if its unused proposals had been carried out.)
    """

    def __init__(
        self,
        primary: Policy,
        fallback: Policy | None,
        *,
        max_uncertainty: float = 0.6,
        min_confidence: float = 0.25,
    ) -> None:
        for name, value in (
            ("max_uncertainty", max_uncertainty),
            ("min_confidence", min_confidence),
        ):
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise ConfigError(f"{name} must be in [0, 1], got {value!r}")
        self.primary = primary
        self.fallback = fallback
        self.max_uncertainty = float(max_uncertainty)
        self.min_confidence = float(min_confidence)
        self.name = primary.name
        self.version = primary.version
        self.fallbacks: dict[str, int] = {"uncertain": 0, "low_confidence": 0}

    def reset(self) -> None:
        self.primary.reset()
        if self.fallback is not None:
            self.fallback.reset()
        self.fallbacks = {"uncertain": 0, "low_confidence": 0}

    def decide(self, observation: Observation) -> Decision:
        backup = self.fallback.decide(observation) if self.fallback is not None else None
        tip = observation.tip
        if tip is not None and not (
            math.isfinite(tip.uncertainty) and tip.uncertainty <= self.max_uncertainty
        ):
            self.fallbacks["uncertain"] += 1
            return Decision(
                reason=f"fallback: perception uncertainty {tip.uncertainty:.2f} > "
                f"{self.max_uncertainty:.2f} (most likely {tip.state.value}): not acting, rescan",
                confidence=0.0,
                policy=self.name,
            )
        decision = self.primary.decide(observation)
        if not decision.commands or decision.confidence >= self.min_confidence:
            return decision
        self.fallbacks["low_confidence"] += 1
        if backup is None:
            return Decision(
                reason=f"fallback: {decision.reason}; confidence {decision.confidence:.2f} < "
                f"{self.min_confidence:.2f}: not acting, operator attention needed",
                confidence=decision.confidence,
                policy=self.name,
            )
        return dataclasses.replace(
            backup,
            reason=f"fallback to {backup.policy or 'rule'}: {self.primary.name} confidence "
            f"{decision.confidence:.2f} < {self.min_confidence:.2f}; {backup.reason}",
            policy=self.name,
        )


class RLPolicy:
    """``rl``: the tip policy where the instrument has tip conditioning, else the dose policy.

    Each sub-policy loads its weights on first use, so ``rl`` works on an STM without the dose
    weights and on a STEM without the tip weights.
    """

    name = "rl"

    def __init__(self, **options: Any) -> None:
        dose_keys = {"dose_weights": "weights", "dose_sr": "sr"}
        self._tip_options = {k: v for k, v in options.items() if k not in dose_keys}
        if "tip_weights" in self._tip_options:
            self._tip_options["weights"] = self._tip_options.pop("tip_weights")
        self._dose_options = {new: options[old] for old, new in dose_keys.items() if old in options}
        self._tip: Policy | None = None
        self._dose: Policy | None = None
        self.version = "1"

    def reset(self) -> None:
        for policy in (self._tip, self._dose):
            if policy is not None:
                policy.reset()

    def decide(self, observation: Observation) -> Decision:
        if Capability.TIP_CONDITIONING in observation.info.capabilities:
            if self._tip is None:
                self._tip = make_rl_tip(**self._tip_options)
                self.version = self._tip.version
            return self._tip.decide(observation)
        if self._dose is None:
            self._dose = make_rl_dose(**self._dose_options)
            self.version = self._dose.version
        return self._dose.decide(observation)


def make_rl_tip(**options: Any) -> Policy:
    """``rl-tip`` with its fallback: options ``weights``, ``good_threshold``,
    ``max_uncertainty`` (perception), ``min_confidence`` (network), ``fallback``
    (``"rule"``, default, or ``"operator"``)."""
    from policies.rule import RulePolicy

    opts = dict(options)
    fallback_name = opts.pop("fallback", "rule")
    max_uncertainty = opts.pop("max_uncertainty", 0.6)
    min_confidence = opts.pop("min_confidence", 0.25)
    opts.pop("target_snr", None)
    unknown = set(opts) - {"weights", "good_threshold", "max_actions"}
    if unknown:
        raise ConfigError(f"policy 'rl-tip' has no options {sorted(unknown)}")
    if fallback_name not in ("rule", "operator"):
        raise ConfigError(f"fallback must be 'rule' or 'operator', got {fallback_name!r}")
    fallback = RulePolicy.from_options() if fallback_name == "rule" else None
    return FallbackPolicy(
        RLTipPolicy(**opts),
        fallback,
        max_uncertainty=max_uncertainty,
        min_confidence=min_confidence,
    )


def make_rl_dose(**options: Any) -> Policy:
    """``rl-dose``: options ``weights``, ``frames``, ``sr`` (an sr-aware policy file)."""
    opts = dict(options)
    opts.pop("target_snr", None)  # the trained target is in the weights' meta
    unknown = set(opts) - {"weights", "frames", "sr"}
    if unknown:
        raise ConfigError(f"policy 'rl-dose' has no options {sorted(unknown)}")
    return RLDosePolicy(**opts)


def make_rl(**options: Any) -> Policy:
    """``rl``: options ``tip_weights``, ``dose_weights``, ``dose_sr`` (the ``sr`` option of
    ``rl-dose``) and the fallback thresholds (``max_uncertainty``, ``min_confidence``,
    ``fallback``) of ``rl-tip``."""
    opts = dict(options)
    opts.pop("target_snr", None)
    unknown = set(opts) - {
        "tip_weights",
        "dose_weights",
        "dose_sr",
        "max_uncertainty",
        "min_confidence",
        "fallback",
    }
    if unknown:
        raise ConfigError(f"policy 'rl' has no options {sorted(unknown)}")
    return RLPolicy(**opts)
