"""Do defect *pairs* with one shared displacement show the double tips that tip net 1.2 misses?

    python bench/tip_defect_pairs.py          # the table in docs/benchmarks.md

The cue (:mod:`agent.perception.tip_pairs`): the STM defects model's defect probability, its
local maxima as points (edge margin), and the largest number of disjoint point pairs with one
displacement of 0.4-2.6 nm. It fires at ``--fire-at`` pairs. Frames, each 256² at its own
pixel size (the defects model resamples to 0.06 nm):

- the bench's two test sets (``bench/perception_tip.py``: ``--frames`` heldout seeds from
  20,000,000, shifted from 30,000,000), every double tip with its good-tip twin
  (``pair_sets`` of ``bench/tip_double_visibility.py``); the tip net's read of every frame;
- good-tip frames from seeds no tip net was trained, calibrated or tested on, on the heldout
  (training) and the shifted parameters, both surfaces: ``tune`` (21,000,000 / 31,000,000, the
  frames the edge margin and the chain rule were chosen on) and ``check`` (22,000,000 /
  32,000,000, looked at only once, with the rule fixed).

Reported: separation of the 80 doubles from their twins (ROC AUC, doubles above the twins' and
all good frames' 95th / 99th percentile), the doubles the net reads as good that the cue
catches, the cue's firing rate on the good frames (all, per surface, and among those the net
reads as good: the frames the rule "net reads GOOD and cue fires -> MULTIPLE" would flip),
good-vs-bad accuracy of the net and of that rule on both test sets, and the CPU
(``time.thread_time``, one torch thread) per frame of the cue with and without the defects
model. Writes ``pairs_rows.json`` / ``pairs_summary.json`` under ``--out-dir`` and the plot
``--plot``. Fully fixed by the seeds.

    python bench/tip_defect_pairs.py --vote-tips 400 --only-votes

scores the agent's decision over three frames of one tip (the rule policy's "act after two bad
frames"; ``bench/perception_tip.py --vote-tips``) with the agent's assessor without and with the
cue, on the same frames (``votes_summary.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.perception.tasks import tip as tip_task  # noqa: E402
from agent.perception.tip_data import STATES, TipRecipe, sample_with_truth  # noqa: E402
from agent.perception.tip_pairs import (  # noqa: E402
    PairSettings,
    defect_probability,
    score_probability_map,
)
from bench._common import run_facts, write_json  # noqa: E402
from bench.tip_defect_autocorr import apex_lag_px, auc  # noqa: E402
from bench.tip_double_visibility import pair_sets  # noqa: E402
from drivers.frame import TipState  # noqa: E402

GOOD = STATES.index(TipState.GOOD)
DOUBLE = STATES.index(TipState.MULTIPLE)
MATCH_NM = 0.15  # a found offset "is the apex" within this distance of the true one (either sign)


def good_recipes(frames: int, heldout_seed0: int, shifted_seed0: int) -> dict[str, TipRecipe]:
    """Recipes whose seeds span ``frames`` good-tip frames (every fifth seed is good)."""
    span = len(STATES) * frames
    return {
        "heldout": dataclasses.replace(
            tip_task.heldout_recipe(span), seeds=(heldout_seed0, heldout_seed0 + span)
        ),
        "shifted": tip_task.shifted_recipe(span, shifted_seed0),
    }


def read_frame(
    model: Any, data: np.ndarray, pixel_size_nm: float, settings: PairSettings
) -> dict[str, Any]:
    """The tip net's read and the cue of one frame."""
    probs, _ = model.probabilities(model.prepare(data, pixel_size_nm))
    defect_p, work_px = defect_probability(data, pixel_size_nm)
    cue = score_probability_map(defect_p, work_px, settings)
    return {
        "read": str(STATES[int(np.argmax(probs))]),
        "p_good": float(probs[GOOD]),
        **cue.to_json(),
    }


def offset_matches(found: list[float] | None, apexes_m: list[list[float]]) -> bool:
    """Whether the cue's offset is (±) one extra apex's lateral offset within ``MATCH_NM``."""
    if found is None:
        return False
    main = apexes_m[0]
    for extra in apexes_m[1:]:
        true = np.array([extra[1] - main[1], extra[0] - main[0]]) * 1e9  # (dy, dx) nm
        if min(np.hypot(*(np.array(found) - s * true)) for s in (1, -1)) <= MATCH_NM:
            return True
    return False


def percentile_rank(
    values: np.ndarray, reference: np.ndarray, qs: tuple[int, ...]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for q in qs:
        thr = float(np.percentile(reference, q))
        out[f"p{q}"] = thr
        out[f"above_p{q}"] = int(np.sum(values > thr))
    return out


def summarise(
    tests: list[dict[str, Any]], goods: list[dict[str, Any]], fire_at: int
) -> dict[str, Any]:
    doubles = [r for r in tests if "twin" in r]
    f = np.array([r["pairs"] for r in doubles])
    t = np.array([r["twin"]["pairs"] for r in doubles])
    all_good = np.concatenate([t, [r["pairs"] for r in goods]])
    misread = [r for r in doubles if r["read"] == "good"]
    out: dict[str, Any] = {
        "doubles_vs_twins": {
            "pairs": len(doubles),
            "auc": auc(f, t),
            "pair_win": float(np.mean(f > t)),
            "doubles_fire": int(np.sum(f >= fire_at)),
            "twins_fire": int(np.sum(t >= fire_at)),
            "fired_offset_is_apex": sum(
                r["fires"] and r["offset_is_apex"] for r in doubles if "offset_is_apex" in r
            ),
            "twins": percentile_rank(f, t, (95, 99)),
            "all_good": percentile_rank(f, all_good, (95, 99)),
            "per_set": {
                name: {
                    "auc": auc(
                        np.array([r["pairs"] for r in doubles if r["set"] == name]),
                        np.array([r["twin"]["pairs"] for r in doubles if r["set"] == name]),
                    ),
                    "doubles_fire": sum(r["fires"] for r in doubles if r["set"] == name),
                    "twins_fire": sum(r["twin"]["fires"] for r in doubles if r["set"] == name),
                }
                for name in ("heldout", "shifted")
            },
        },
        "misread_by_net": {
            "seeds": [r["seed"] for r in misread],
            "caught": [r["seed"] for r in misread if r["fires"]],
            "pairs": [r["pairs"] for r in misread],
            "offset_is_apex": [r["offset_is_apex"] for r in misread],
        },
        "pairs_histogram": {
            "doubles": np.bincount(f, minlength=8).tolist(),
            "twins": np.bincount(t, minlength=8).tolist(),
            "good_frames": np.bincount([r["pairs"] for r in goods], minlength=8).tolist(),
        },
    }
    for group in ("tune", "check"):
        mine = [r for r in goods if r["group"] == group]
        read_good = [r for r in mine if r["read"] == "good"]
        out[f"good_{group}"] = {
            "frames": len(mine),
            "fire": sum(r["fires"] for r in mine),
            "by_surface": {
                s: f"{sum(r['fires'] for r in mine if r['surface'] == s)}/"
                f"{sum(r['surface'] == s for r in mine)}"
                for s in ("au111", "hsi100")
            },
            "read_good": len(read_good),
            "flipped": sum(r["fires"] for r in read_good),
            "fired_seeds": [r["seed"] for r in mine if r["fires"]],
        }
    for name in ("heldout", "shifted"):
        mine = [r for r in tests if r["set"] == name]
        y = np.array([r["label"] for r in mine])
        net = np.array([STATES.index(TipState(r["read"])) for r in mine])
        ruled = np.where((net == GOOD) & np.array([r["fires"] for r in mine]), DOUBLE, net)
        out[f"test_{name}"] = {
            "frames": len(mine),
            "net_good_vs_bad": float(np.mean((net == GOOD) == (y == GOOD))),
            "net_pairs_good_vs_bad": float(np.mean((ruled == GOOD) == (y == GOOD))),
            "good_flipped": int(np.sum((y == GOOD) & (net == GOOD) & (ruled != GOOD))),
            "bad_caught": int(np.sum((y != GOOD) & (net == GOOD) & (ruled != GOOD))),
            "good_frames": int(np.sum(y == GOOD)),
            "good_fire": sum(r["fires"] for r in mine if r["label"] == GOOD),
        }
    return out


def cost_ms(
    frames: list[tuple[np.ndarray, float]], settings: PairSettings, repeats: int
) -> dict[str, float]:
    """Median CPU (thread) ms per frame of the defects model and of the cue on its map."""
    model_t, cue_t = [], []
    for _ in range(repeats):
        for data, px in frames:
            c0 = time.thread_time()
            defect_p, work_px = defect_probability(data, px)
            c1 = time.thread_time()
            score_probability_map(defect_p, work_px, settings)
            c2 = time.thread_time()
            model_t.append(c1 - c0)
            cue_t.append(c2 - c1)
    m, c = 1000.0 * float(np.median(model_t)), 1000.0 * float(np.median(cue_t))
    return {
        "cue_only_ms": c,
        "cue_p90_ms": 1000.0 * float(np.percentile(cue_t, 90)),
        "defects_model_ms": m,
        "with_model_ms": m + c,
    }


def plot(
    tests: list[dict[str, Any]], goods: list[dict[str, Any]], fire_at: int, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doubles = [r for r in tests if "twin" in r]
    groups = {
        "double tips (80)": [r["pairs"] for r in doubles],
        "their good twins (80)": [r["twin"]["pairs"] for r in doubles],
        f"good tips, tune seeds ({sum(r['group'] == 'tune' for r in goods)})": [
            r["pairs"] for r in goods if r["group"] == "tune"
        ],
        f"good tips, check seeds ({sum(r['group'] == 'check' for r in goods)})": [
            r["pairs"] for r in goods if r["group"] == "check"
        ],
        f"doubles the net reads good ({sum(r['read'] == 'good' for r in doubles)})": [
            r["pairs"] for r in doubles if r["read"] == "good"
        ],
    }
    top = max(8, max(max(v, default=0) for v in groups.values()) + 1)
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 5))
    width = 0.8 / len(groups)
    for k, (name, vals) in enumerate(groups.items()):
        frac = np.bincount(np.asarray(vals, dtype=int), minlength=top)[:top] / max(1, len(vals))
        ax0.bar(np.arange(top) + (k - len(groups) / 2 + 0.5) * width, frac, width, label=name)
    ax0.axvline(fire_at - 0.5, color="k", ls=":", lw=1)
    ax0.text(fire_at - 0.4, 0.9, f"fires at {fire_at}", fontsize=8)
    ax0.set_xlabel("disjoint defect pairs sharing one displacement (0.4-2.6 nm)")
    ax0.set_ylabel("fraction of frames")
    ax0.set_yscale("log")
    ax0.set_ylim(1e-3, 1.1)
    ax0.legend(fontsize=8)
    ax0.set_title("the cue's score, double tips vs good tips")
    for r in doubles:
        col = "tab:red" if r["read"] == "good" else "tab:green"
        mk = "o" if r["set"] == "heldout" else "s"
        ax1.scatter(r["apex_dist_nm"], r["pairs"], c=col, marker=mk, s=30, edgecolors="k", lw=0.4)
    ax1.axhline(fire_at - 0.5, color="k", ls=":", lw=1)
    ax1.set_xlabel("second apex's lateral distance (nm)")
    ax1.set_ylabel("pairs (score)")
    ax1.set_title(
        "the 80 double tips (o heldout, s shifted)\nred: tip net reads good, green: reads otherwise"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def agent_votes(
    sets: dict[str, TipRecipe], tips: int, settings: PairSettings, model: Any, progress: bool
) -> dict[str, Any]:
    """The agent's decision over consecutive frames of one tip (the rule policy's: act after
    ``k`` bad frames in a row, :func:`agent.perception.tip_eval.score_votes`), with the agent's
    assessor (network + classical fallback) without and with the pair cue, on the same frames:
    ``tips`` tips per set from the set's first seed + 5,000,000 (as ``bench/perception_tip.py
    --vote-tips``)."""
    from agent.perception.tip_eval import agent_rule, score_votes, vote_sequences
    from agent.perception.tip_net import TipNetAssessor

    k, max_unc = agent_rule()
    out: dict[str, Any] = {}
    for name, recipe in sets.items():
        first = recipe.seeds[0] + 5_000_000
        votes = dataclasses.replace(recipe, seeds=(first, first + tips), pairs=False)
        sequences = vote_sequences(
            votes, tips, k + 1, progress=progress, desc=f"same-tip frames {name}"
        )
        out[name] = {
            who: score_votes(
                sequences,
                TipNetAssessor(model, baseline=False, pairs=pairs),
                k=k,
                max_uncertainty=max_unc,
            )
            for who, pairs in (("agent", None), ("agent+pairs", settings))
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--frames", type=int, default=200, help="frames per test set, as the bench")
    p.add_argument("--heldout-seed0", type=int, default=tip_task.HELDOUT_SEED0)
    p.add_argument("--shifted-seed0", type=int, default=tip_task.SHIFTED_SEED0)
    p.add_argument(
        "--good-frames", type=int, default=200, help="good frames per parameter set and group"
    )
    p.add_argument("--tune-seed0", type=int, nargs=2, default=(21_000_000, 31_000_000))
    p.add_argument("--check-seed0", type=int, nargs=2, default=(22_000_000, 32_000_000))
    p.add_argument("--weights-dir", help="tip net whose reading is recorded (default: shipped)")
    d = PairSettings()
    p.add_argument("--threshold", type=float, default=d.threshold)
    p.add_argument("--margin-nm", type=float, default=d.margin_nm)
    p.add_argument("--tolerance-nm", type=float, default=d.tolerance_nm)
    p.add_argument("--fire-at", type=int, default=d.fire_at)
    p.add_argument(
        "--vote-tips",
        type=int,
        default=0,
        help="also the agent's decision over consecutive frames of this many tips per set, "
        "without and with the cue (0: skip)",
    )
    p.add_argument(
        "--only-votes", action="store_true", help="only the --vote-tips part (votes_summary.json)"
    )
    p.add_argument("--cost-frames", type=int, default=40, help="frames timed (test frames)")
    p.add_argument("--cost-repeats", type=int, default=2)
    p.add_argument("--out-dir", default="bench/out/tip_double")
    p.add_argument("--plot", default="docs/img/tip_defect_pairs.png")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    import torch
    from tqdm import tqdm

    from agent.perception.registry import WEIGHTS_DIR
    from agent.perception.tip_net import TipModel

    torch.set_num_threads(1)
    settings = dataclasses.replace(
        d,
        threshold=args.threshold,
        margin_nm=args.margin_nm,
        tolerance_nm=args.tolerance_nm,
        fire_at=args.fire_at,
    )
    model = TipModel.load(args.weights_dir or WEIGHTS_DIR)
    t0, c0 = time.perf_counter(), time.process_time()
    if args.vote_tips > 0:
        sets = pair_sets(args.frames, args.heldout_seed0, args.shifted_seed0)
        voted = agent_votes(sets, args.vote_tips, settings, model, not args.quiet)
        result = {
            **run_facts("bench/tip_defect_pairs.py", argv or sys.argv[1:], t0, c0),
            "settings": dataclasses.asdict(settings),
            "tip_net": f"{model.card.version}+{model.card.sha256[:8]}",
            "votes": voted,
        }
        write_json(args.out_dir, {"votes_summary.json": result})
        if not args.quiet:
            print(json.dumps(result, indent=1))
        if args.only_votes:
            return 0
        t0, c0 = time.perf_counter(), time.process_time()
    jobs: list[tuple[str, str, TipRecipe, int]] = [
        ("test", name, recipe, seed)
        for name, recipe in pair_sets(args.frames, args.heldout_seed0, args.shifted_seed0).items()
        for seed in range(*recipe.seeds)
    ]
    for group, seeds in (("tune", args.tune_seed0), ("check", args.check_seed0)):
        for name, recipe in good_recipes(args.good_frames, *seeds).items():
            jobs += [
                (group, name, recipe, seed)
                for seed in range(*recipe.seeds)
                if STATES[seed % len(STATES)] is TipState.GOOD
            ]
    tests: list[dict[str, Any]] = []
    goods: list[dict[str, Any]] = []
    timed: list[tuple[np.ndarray, float]] = []
    for group, name, recipe, seed in tqdm(jobs, desc="frames", unit="frame", disable=args.quiet):
        s, truth = sample_with_truth(recipe, seed)
        row: dict[str, Any] = {
            "group": group,
            "set": name,
            "seed": seed,
            "surface": s.surface,
            "pixel_size_nm": s.pixel_size_nm,
            "label": int(s.label),
            **read_frame(model, s.data, s.pixel_size_nm, settings),
        }
        if group == "test":
            if len(timed) < args.cost_frames:
                timed.append((s.data, s.pixel_size_nm))
            if s.good_twin is not None and STATES[seed % len(STATES)] is TipState.MULTIPLE:
                apexes = truth.extra["apexes_m"]
                row["apexes_m"] = apexes
                row["apex_dist_nm"] = float(
                    np.hypot(*apex_lag_px(apexes, s.pixel_size_nm)) * s.pixel_size_nm
                )
                row["offset_is_apex"] = offset_matches(row["offset_nm"], apexes)
                twin = read_frame(model, s.good_twin, s.pixel_size_nm, settings)
                row["twin"] = {k: twin[k] for k in ("pairs", "offset_nm", "points", "fires")}
            tests.append(row)
        else:
            goods.append(row)
    summary = summarise(tests, goods, settings.fire_at)
    cost = cost_ms(timed, settings, args.cost_repeats)
    plot(tests, goods, settings.fire_at, Path(args.plot))
    result = {
        **run_facts("bench/tip_defect_pairs.py", argv or sys.argv[1:], t0, c0),
        "settings": dataclasses.asdict(settings),
        "tip_net": f"{model.card.version}+{model.card.sha256[:8]}",
        "cpu_ms_per_256_frame": cost,
        "summary": summary,
    }
    write_json(args.out_dir, {"pairs_rows.json": tests + goods, "pairs_summary.json": result})
    if not args.quiet:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
