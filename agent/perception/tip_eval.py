"""Held-out evaluation of the tip model against the classical assessor (``scopepilot evaluate
tip`` and ``bench/perception_tip.py``).

Per test set (simulated frames from seeds never used in training): five-class accuracy,
good-vs-bad accuracy, macro-F1, per-class precision/recall/F1, expected calibration error
(15 bins, top label), the confusion matrix, the reject rate and the accuracy of the agent's
assessor as a session runs it (network, classical fallback for rejected frames, the
defect-pair cue on complete frames read as good). The classical assessor is scored on
the same frames. ``tipnet+pairs``: the network's read with a good read turned into ``multiple``
where the defect-pair cue of :mod:`agent.perception.tip_pairs` fires (``overridden`` counts
them; docs/decisions/0014-tip-defect-pairs.md).

Mid-scan tip changes (made by the simulator itself): the frame is revealed line by line; every
``check_every`` lines (network) or ``4 * check_every`` lines (classical, which is ~20x slower)
the detector looks at the lines so far. A change is *detected* at the first check where the
network's last-16-lines read-out (:meth:`TipNetAssessor.watch`) says a bad state with uncertainty
at most ``reject_uncertainty`` and a bad-state probability of at least the model's
``watch_p_bad``, or the classical assessor (on all lines so far) says a bad state
with uncertainty at most 0.6 (the rule policy's threshold). ``lines_to_detect`` is the detection
line minus the line at which the change became *visible* (``ChangeFrame.visible_line``: the
pixels showing the new tip reach ``VISIBLE_PIXELS``; a weak double tip over a defect-free
stretch shows nothing until the next defect passes under it, see
docs/decisions/0009-tip-labels.md); the same figure counted from the physical change line is
reported beside it (``..._from_change``). A detection before the change is a false alarm. Checks
stop 64 lines after the visible change (later counts as missed); changes that never become
visible within the frame are counted, not scored. Good-tip frames of the held-out set give the
false-alarm rate of a complete scan (checked as often as the loop looks: every 16 lines with
the read-out alone, every ``watch_every_lines`` of the assessor with the change detector,
classical every 64).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from agent.perception.classical import ClassicalTipAssessor
from agent.perception.tip_data import (
    STATES,
    TipRecipe,
    TipSample,
    natural_changes,
    same_tip_frames,
    simulate,
)
from agent.perception.tip_net import (
    READOUT_EVERY_LINES,
    TipModel,
    TipNetAssessor,
    expected_calibration_error,
    pairs_override_probabilities,
)
from agent.perception.tip_pairs import PairSettings, score_image
from drivers.errors import DataError, ModelError
from drivers.frame import Frame, ScanRegion, TipState

log = logging.getLogger(__name__)

CLASSICAL_MAX_UNCERTAINTY = 0.6
MAX_LATENCY_LINES = 64


def as_frame(data: np.ndarray, pixel_size_nm: float, lines_done: int | None = None) -> Frame:
    """A ``Frame`` around simulated pixels (rows from ``lines_done`` on become NaN)."""
    h, w = data.shape
    done = h if lines_done is None else lines_done
    arr = np.array(data, dtype=np.float32, copy=True)
    arr[done:] = np.nan
    p = pixel_size_nm * 1e-9
    return Frame(
        data=arr,
        channel="topography",
        pixel_size_m=(p, p),
        dwell_s=1e-3,
        scan_region=ScanRegion(0.0, 0.0, p * w, p * h),
        frame_index=0,
        timestamp_s=0.0,
        lines_done=done,
        instrument="sim:stm",
    )


def classification_metrics(truth: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
    n = len(STATES)
    matrix = np.zeros((n, n), dtype=np.int64)
    for t, p in zip(truth, predicted, strict=True):
        matrix[int(t), int(p)] += 1
    per_class: dict[str, dict[str, float]] = {}
    f1s = []
    for i, state in enumerate(STATES):
        tp = float(matrix[i, i])
        precision = tp / max(1.0, float(matrix[:, i].sum()))
        recall = tp / max(1.0, float(matrix[i].sum()))
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        per_class[str(state)] = {"precision": precision, "recall": recall, "f1": f1}
        if matrix[i].sum() > 0:
            f1s.append(f1)
    good = STATES.index(TipState.GOOD)
    return {
        "frames": len(truth),
        "accuracy": float(np.mean(truth == predicted)),
        "good_vs_bad_accuracy": float(np.mean((truth == good) == (predicted == good))),
        "macro_f1": float(np.mean(f1s)) if f1s else 0.0,
        "per_class": per_class,
        "confusion": matrix.tolist(),
    }


def score_set(
    samples: list[TipSample],
    assessor: TipNetAssessor,
    classical: ClassicalTipAssessor,
    *,
    progress: bool = True,
    desc: str = "scoring",
) -> dict[str, Any]:
    from tqdm import tqdm

    model = assessor.model
    good, double = STATES.index(TipState.GOOD), STATES.index(TipState.MULTIPLE)
    truth, net_pred, net_probs, agent_pred, cls_pred, cls_probs = [], [], [], [], [], []
    pairs_pred, pairs_probs = [], []
    for s in tqdm(samples, desc=desc, unit="frame", disable=not progress):
        frame = as_frame(s.data, s.pixel_size_nm)
        probs, _ = model.probabilities(model.prepare(s.data, s.pixel_size_nm))
        c = classical.assess(frame)
        agent = assessor.assess(frame)
        truth.append(s.label)
        net_probs.append(probs)
        net_pred.append(int(np.argmax(probs)))
        # tipnet+pairs: the network's read, a good read overridden when the defect-pair cue
        # fires (agent.perception.tip_pairs; what TipNetAssessor(pairs=...) does)
        fires = False
        if net_pred[-1] == good:
            try:
                fires = score_image(s.data, s.pixel_size_nm).fires
            except (DataError, ModelError) as exc:  # the net's read stands, as in the agent
                log.info("pair cue skipped on seed %d: %s", s.seed, exc)
        pairs_pred.append(double if fires else net_pred[-1])
        pairs_probs.append(pairs_override_probabilities(probs) if fires else probs)
        agent_pred.append(STATES.index(agent.state))
        cls_pred.append(STATES.index(c.state))
        cls_probs.append([c.probabilities[st] for st in STATES])
    y = np.array(truth)
    p_net = np.array(net_probs)
    p_cls = np.array(cls_probs)
    accepted = (1.0 - p_net.max(axis=1)) <= model.reject_uncertainty
    net = classification_metrics(y, np.array(net_pred))
    net["ece"] = expected_calibration_error(p_net, y)
    net["rejected_fraction"] = float(1.0 - accepted.mean())
    net["accuracy_accepted"] = (
        float(np.mean(y[accepted] == np.array(net_pred)[accepted])) if accepted.any() else 0.0
    )
    cls = classification_metrics(y, np.array(cls_pred))
    cls["ece"] = expected_calibration_error(p_cls, y)
    with_pairs = classification_metrics(y, np.array(pairs_pred))
    with_pairs["overridden"] = int(np.sum(np.array(pairs_pred) != np.array(net_pred)))
    with_pairs["ece"] = expected_calibration_error(np.array(pairs_probs), y)
    return {
        "tipnet": net,
        "tipnet+pairs": with_pairs,
        "agent_assessor": classification_metrics(y, np.array(agent_pred)),
        "classical": cls,
        "_probs": p_net,
        "_labels": y,
    }


def detection_run(
    data: np.ndarray, pixel_size_nm: float, change_line: int | None, detector: Any, step: int
) -> int | None:
    """First checked line count at which ``detector(frame) -> bool`` fires, or None."""
    h = data.shape[0]
    stop = h if change_line is None else min(h, change_line + MAX_LATENCY_LINES)
    for n in range(16, stop + 1, step):
        if detector(as_frame(data, pixel_size_nm, n)):
            return n
    return None


def score_changes(
    changes: list[Any],
    good_frames: list[TipSample],
    assessor: TipNetAssessor,
    classical: ClassicalTipAssessor,
    *,
    check_every: int = 4,
    progress: bool = True,
    only: tuple[str, ...] = ("tipnet", "tipwatch", "classical"),
) -> dict[str, Any]:
    """Mid-scan detection (see the module doc) on the same changes and good frames by those
    of these detectors named in ``only``: the network's recent read-out alone (``tipnet``,
    what ``watch`` did before the change detector), the assessor's ``watch`` with the model's
    line-statistics change detector (``tipwatch``, when the model has one), that detector on
    its own (``lines``: an alarm, whatever the state; for changes from a bad tip) and the
    classical assessor. Complete good frames are checked as often as the agent's loop looks:
    every :data:`~agent.perception.tip_net.READOUT_EVERY_LINES` lines for the read-out alone, every
    ``assessor.watch_every_lines`` with the change detector, every 64 for the classical
    assessor."""
    from tqdm import tqdm

    model = assessor.model
    recent_only = TipNetAssessor(copy.copy(model), baseline=False)
    recent_only.model.change_detector = None

    def watch_fires(watcher: TipNetAssessor) -> Any:
        def fires(frame: Frame) -> bool:
            est = watcher.watch(frame)
            return est is not None and est.state is not TipState.GOOD

        return fires

    def cls_fires(frame: Frame) -> bool:
        est = classical.assess(frame)
        return est.state is not TipState.GOOD and est.uncertainty <= CLASSICAL_MAX_UNCERTAINTY

    def lines_fire(frame: Frame) -> bool:
        detector = model.change_detector
        return detector is not None and detector.check(frame.done_data) is not None

    detectors: list[tuple[str, Any, int]] = [
        ("tipnet", watch_fires(recent_only), check_every),
        ("tipwatch", watch_fires(assessor), check_every),
        ("lines", lines_fire, check_every),
        ("classical", cls_fires, 4 * check_every),
    ]
    # complete good frames are looked at as often as the loop looks with that detector
    loop_every = {
        "tipnet": READOUT_EVERY_LINES,
        "tipwatch": assessor.watch_every_lines,
        "lines": assessor.watch_every_lines,
        "classical": 4 * READOUT_EVERY_LINES,
    }
    out: dict[str, Any] = {}
    for name, fires, step in detectors:
        if name not in only or (name in ("tipwatch", "lines") and model.change_detector is None):
            continue
        latencies: list[float] = []
        from_change: list[float] = []
        false_alarm = missed = invisible = 0
        by_state: dict[str, list[float]] = {}
        for c in tqdm(changes, desc=f"changes ({name})", unit="frame", disable=not progress):
            visible = c.visible_line
            if visible is None:
                invisible += 1
                continue
            n = detection_run(c.data, c.pixel_size_nm, max(c.change_line, visible), fires, step)
            if n is None:
                missed += 1
                by_state.setdefault(str(c.after), []).append(float("inf"))
                from_change.append(float("inf"))
            elif n < c.change_line:
                false_alarm += 1
            else:
                latencies.append(max(0, n - visible))
                from_change.append(float(n - c.change_line))
                by_state.setdefault(str(c.after), []).append(float(max(0, n - visible)))
        scored = max(1, len(changes) - invisible)
        fa_frames = 0
        for s in tqdm(
            good_frames, desc=f"good frames ({name})", unit="frame", disable=not progress
        ):
            if detection_run(s.data, s.pixel_size_nm, None, fires, loop_every[name]) is not None:
                fa_frames += 1
        lat = np.array(latencies) if latencies else np.array([np.inf])
        phys = np.array(from_change) if from_change else np.array([np.inf])
        out[name] = {
            "changes": len(changes),
            "never_visible": invisible,
            "check_every_lines": step,
            "detected_within_16_lines": float(np.sum(lat <= 16) / scored),
            "median_lines_to_detect": float(np.median(lat)),
            "p90_lines_to_detect": float(np.percentile(lat, 90)),
            "lines_to_detect": sorted(float(v) for v in latencies),
            "detected_within_16_lines_from_change": float(np.sum(phys <= 16) / scored),
            "median_lines_to_detect_from_change": float(np.median(phys)),
            "false_alarm_before_change": false_alarm / scored,
            "missed_within_64_lines": missed / scored,
            "good_frames": len(good_frames),
            "good_frames_with_false_alarm": fa_frames / max(1, len(good_frames)),
            "within_16_by_new_state": {
                k: float(np.mean(np.array(v) <= 16)) for k, v in sorted(by_state.items())
            },
        }
    return out


def agent_rule() -> tuple[int, float]:
    """``(bad_frames_to_act, max_uncertainty)`` of the agent's rule policy (its defaults)."""
    from policies.rule import RuleConfig

    config = RuleConfig()
    return config.bad_frames_to_act, config.max_uncertainty


def vote_sequences(
    recipe: TipRecipe, tips: int, frames_per_tip: int, *, progress: bool = True, desc: str = ""
) -> list[list[TipSample]]:
    """``tips`` tips (seeds of ``recipe`` in order, so the five states in turn), each scanned
    ``frames_per_tip`` times at different places (:func:`tip_data.same_tip_frames`)."""
    from tqdm import tqdm

    first = recipe.seeds[0]
    return [
        same_tip_frames(recipe, seed, frames_per_tip)
        for seed in tqdm(
            range(first, first + tips), desc=desc or "same-tip frames", disable=not progress
        )
    ]


def score_votes(
    sequences: list[list[TipSample]],
    assessor: TipNetAssessor,
    *,
    k: int,
    max_uncertainty: float,
) -> dict[str, Any]:
    """The agent's decision on each tip from its consecutive frames, as the rule policy makes
    it: frames whose assessment is more uncertain than ``max_uncertainty`` are skipped (they
    neither count nor break a run); the first ``k`` others decide: *act* (bad tip) when all
    ``k`` are assessed bad, *keep scanning* (good tip) otherwise; a tip with fewer than ``k``
    usable frames counts as *keep scanning*. Scored against the tip's simulated state, next to
    the single-frame good-vs-bad accuracy of the same assessor on the same frames."""
    good = STATES.index(TipState.GOOD)
    decided_bad, truth_bad, undecided = [], [], 0
    single_right: list[bool] = []
    by_state: dict[str, list[bool]] = {}
    for frames in sequences:
        tip_bad = frames[0].label != good
        votes: list[bool] = []
        for s in frames:
            est = assessor.assess(as_frame(s.data, s.pixel_size_nm))
            said_bad = est.state is not TipState.GOOD
            single_right.append(said_bad == (s.label != good))
            if est.uncertainty <= max_uncertainty and len(votes) < k:
                votes.append(said_bad)
        if len(votes) < k:
            undecided += 1
        act = len(votes) == k and all(votes)
        decided_bad.append(act)
        truth_bad.append(tip_bad)
        by_state.setdefault(str(STATES[frames[0].label]), []).append(act == tip_bad)
    d, t = np.array(decided_bad), np.array(truth_bad)
    return {
        "tips": len(sequences),
        "frames_per_tip": len(sequences[0]) if sequences else 0,
        "k": k,
        "max_uncertainty": max_uncertainty,
        "good_vs_bad_accuracy": float(np.mean(d == t)) if len(d) else 0.0,
        "single_frame_good_vs_bad_accuracy": float(np.mean(single_right)) if single_right else 0.0,
        "bad_tips_acted_on": float(np.mean(d[t])) if t.any() else 0.0,
        "good_tips_acted_on": float(np.mean(d[~t])) if (~t).any() else 0.0,
        "undecided_tips": undecided,
        "accuracy_by_state": {k_: float(np.mean(v)) for k_, v in sorted(by_state.items())},
    }


def evaluate_all(
    directory: str | Path,
    *,
    sets: dict[str, TipRecipe],
    changes: int,
    change_seed: int,
    out_dir: Path,
    progress: bool = True,
    vote_tips: int = 0,
    vote_seed_offset: int = 5_000_000,
    more_changes: int = 0,
) -> dict[str, Any]:
    model = TipModel.load(directory)
    # the agent's tipnet assessor as a session runs it: classical fallback, defect-pair cue
    assessor = TipNetAssessor(model, baseline=False, pairs=PairSettings())
    classical = ClassicalTipAssessor()
    results: dict[str, Any] = {
        "model": {
            "name": model.card.name,
            "version": model.card.version,
            "sha256": model.card.sha256,
        },
        "sets": {},
    }
    plots: dict[str, Any] = {}
    good_of: dict[str, list[TipSample]] = {}
    for name, recipe in sets.items():
        samples = simulate(recipe, progress=progress, desc=f"simulating {name}")
        scored = score_set(samples, assessor, classical, progress=progress, desc=f"scoring {name}")
        plots[name] = (scored.pop("_probs"), scored.pop("_labels"), scored)
        results["sets"][name] = {
            "recipe": recipe.to_json(),
            "bad_tip_not_visible": sum(s.label != s.sim_label for s in samples),
            **scored,
        }
        if vote_tips > 0:
            k, max_unc = agent_rule()
            vote_first = recipe.seeds[0] + vote_seed_offset
            vote_recipe = dataclasses.replace(recipe, seeds=(vote_first, vote_first + vote_tips))
            sequences = vote_sequences(
                vote_recipe, vote_tips, k + 1, progress=progress, desc=f"same-tip frames {name}"
            )
            results["sets"][name]["agent_decision"] = {
                "seeds": list(vote_recipe.seeds),
                **score_votes(sequences, assessor, k=k, max_uncertainty=max_unc),
            }
        good_of[name] = [s for s in samples if s.label == STATES.index(TipState.GOOD)][:50]
    good_frames = good_of.get("heldout", [])
    if changes > 0:
        first = next(iter(sets.values()))
        found = natural_changes(
            _change_recipe(first, change_seed), count=changes, progress=progress
        )
        results["changes"] = score_changes(
            found, good_frames, assessor, classical, progress=progress
        )
    if changes > 0 and more_changes > 0:
        # the same test on the shifted parameters (own seeds, its own good frames), and
        # changes from a bad tip to another state (the line detector alone: a bad tip before
        # the change is no false alarm of the network's read-out)
        more: dict[str, Any] = {}
        if "shifted" in sets:
            found = natural_changes(
                _change_recipe(sets["shifted"], change_seed + SHIFTED_CHANGE_OFFSET),
                count=more_changes,
                progress=progress,
            )
            more["shifted"] = score_changes(
                found,
                good_of["shifted"],
                assessor,
                classical,
                progress=progress,
                only=("tipnet", "tipwatch"),
            )
        from_bad: list[Any] = []
        for i, state in enumerate((TipState.MULTIPLE, TipState.BLUNT)):
            seed = change_seed + BAD_CHANGE_OFFSET + 500_000 * i
            from_bad += natural_changes(
                _change_recipe(first, seed),
                count=more_changes // 2,
                progress=progress,
                initial=state,
            )
        more["bad_to_other"] = score_changes(
            from_bad, [], assessor, classical, progress=progress, only=("lines",)
        )
        results["changes_more"] = more
    results["summary"] = summary(results)
    plot_results(plots, results, out_dir / "tip_eval.png")
    return results


SHIFTED_CHANGE_OFFSET = 2_000_000
"""Seeds of the mid-scan changes on the shifted parameters: the change seed plus this."""
BAD_CHANGE_OFFSET = 4_000_000
"""Seeds of changes from a bad tip (multiple, then blunt 500,000 later): change seed plus this."""


def _change_recipe(like: TipRecipe, seed: int) -> TipRecipe:
    return TipRecipe(
        seeds=(seed, seed + 1),
        surfaces=like.surfaces,
        surface_weights=like.surface_weights,
        size_nm=like.size_nm,
        noise_scale=like.noise_scale,
        drift_scale=like.drift_scale,
        pairs=False,
    )


def summary(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, r in results["sets"].items():
        for who in ("tipnet", "tipnet+pairs", "classical", "agent_assessor"):
            m = r[who]
            out[f"{name}/{who}"] = {
                k: m[k] if isinstance(m[k], int) else round(float(m[k]), 4)
                for k in (
                    "accuracy",
                    "good_vs_bad_accuracy",
                    "macro_f1",
                    "ece",
                    "rejected_fraction",
                    "overridden",
                )
                if k in m
            }
        if "agent_decision" in r:
            m = r["agent_decision"]
            out[f"{name}/agent_decision"] = {
                key: round(float(m[key]), 4) if isinstance(m[key], float) else m[key]
                for key in (
                    "k",
                    "tips",
                    "good_vs_bad_accuracy",
                    "single_frame_good_vs_bad_accuracy",
                    "good_tips_acted_on",
                    "bad_tips_acted_on",
                )
            }
    blocks = [("changes", results.get("changes", {}))]
    blocks += [(f"changes_{k}", v) for k, v in results.get("changes_more", {}).items()]
    for key, block in blocks:
        for who, m in block.items():
            out[f"{key}/{who}"] = {
                k: m[k]
                for k in (
                    "detected_within_16_lines",
                    "median_lines_to_detect",
                    "detected_within_16_lines_from_change",
                    "false_alarm_before_change",
                    "good_frames_with_false_alarm",
                )
            }
    return out


def write_metrics_to_card(directory: str | Path, results: dict[str, Any]) -> None:
    """Store the summary as the card's ``metrics`` (the weights and their hash are unchanged)."""
    path = Path(directory) / "tip.json"
    card = json.loads(path.read_text())
    card["metrics"] = results["summary"]
    path.write_text(json.dumps(card, indent=2) + "\n")


def plot_results(plots: dict[str, Any], results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(plots)
    fig, axes = plt.subplots(1, n + 1, figsize=(4.6 * (n + 1), 4.2))
    labels = [str(s) for s in STATES]
    for ax, (name, (_, _, scored)) in zip(axes[:n], plots.items(), strict=True):
        m = np.array(scored["tipnet"]["confusion"], dtype=float)
        share = m / np.maximum(1, m.sum(axis=1, keepdims=True))
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(labels)), labels, rotation=30)
        ax.set_yticks(range(len(labels)), labels)
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(
                    j,
                    i,
                    str(int(m[i, j])),
                    ha="center",
                    va="center",
                    color="white" if share[i, j] > 0.5 else "black",
                )
        ax.set_title(f"tip net, {name}: acc {scored['tipnet']['accuracy']:.3f}")
        ax.set_xlabel("predicted")
        ax.set_ylabel("truth")
    ax = axes[n]
    edges = np.linspace(0, 1, 11)
    for name, (probs, y, _) in plots.items():
        conf = probs.max(axis=1)
        correct = probs.argmax(axis=1) == y
        xs, ys = [], []
        for lo, hi in itertools.pairwise(edges):
            sel = (conf > lo) & (conf <= hi)
            if sel.sum() >= 3:
                xs.append(conf[sel].mean())
                ys.append(correct[sel].mean())
        ax.plot(xs, ys, "o-", label=name)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability (tip net)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
