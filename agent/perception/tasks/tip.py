"""``scopepilot train|evaluate|infer tip``: the tip-state model's commands.

    scopepilot train tip                       # simulate, train, calibrate: the shipped weights
                                               # (7,200 steps at ~0.1 s of CPU each on one
                                               # torch thread; see docs/benchmarks.md)
    scopepilot evaluate tip                    # held-out seeds + shifted simulator parameters
    scopepilot infer tip frame.npy --pixel-size-nm 0.0625

Training data: seeds 10,000,000 + i (Au(111) 70 %, H:Si(100) 30 %, 12–20 nm scans at 256²,
noise ×0.5–1.5, drift ×0.5–2); calibration seeds follow them, plus 300 calibration frames from
15,000,000 over both test sets' parameter ranges (for the frame temperature). Evaluation: seeds
from 20,000,000 with the training parameters ("heldout") and from 30,000,000 with shifted ones
("shifted": noise ×1.5–3, drift ×2–4, 11–24 nm, half H:Si(100)); mid-scan changes from
40,000,000, made by the simulator itself (see :func:`agent.perception.tip_data.natural_changes`);
the agent's decision over consecutive frames of one tip from 25,000,000 and 35,000,000.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

TRAIN_SEED0 = 10_000_000
CALIB_SEED0 = 15_000_000
HELDOUT_SEED0 = 20_000_000
SHIFTED_SEED0 = 30_000_000
CHANGE_SEED0 = 40_000_000
DEFAULT_OUT = "bench/out/tip"
CHECK_EVERY_LINES = 4
CALIB_FRAMES = 300


def _weights_default() -> str:
    from agent.perception.registry import WEIGHTS_DIR

    return str(WEIGHTS_DIR)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, default=900, help="training frames (default 900)")
    parser.add_argument(
        "--val-frames", type=int, default=150, help="calibration frames (default 150)"
    )
    parser.add_argument(
        "--calib-frames",
        type=int,
        default=CALIB_FRAMES,
        help=f"extra calibration frames over the training and shifted parameter ranges, for "
        f"the frame temperature (default {CALIB_FRAMES}; 0: none)",
    )
    parser.add_argument("--steps", type=int, default=7200, help="optimiser steps (default 7200)")
    parser.add_argument("--batch", type=int, default=24, help="batch size (default 24)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument(
        "--recent-weight",
        type=float,
        default=1.0,
        help="weight of the last-16-lines read-out's loss beside the frame read-out's "
        "(default 1.0, the recipe of 1.2)",
    )
    parser.add_argument(
        "--change-fraction",
        type=float,
        default=0.35,
        help="share of change crops (a tip change inside the crop) in the batches "
        "(default 0.35, the recipe of 1.2)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: a second thread costs 3-5x the CPU time per step on a "
        "shared machine, see docs/benchmarks.md)",
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="simulation processes (default 2; same frames)"
    )
    parser.add_argument("--weights-dir", help="where tip.pt/tip.json go (default: the package's)")
    parser.add_argument("--out-dir", default=DEFAULT_OUT, help=f"loss curve etc. ({DEFAULT_OUT})")
    parser.add_argument("--cache", help="reuse/store the simulated frames in this .npz")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, default=250, help="frames per test set (250)")
    parser.add_argument("--changes", type=int, default=100, help="mid-scan changes (100)")
    parser.add_argument(
        "--more-changes",
        type=int,
        default=0,
        help="also this many mid-scan changes on the shifted parameters and as many from a bad "
        "tip to another state (0: skip; needs --changes > 0)",
    )
    parser.add_argument(
        "--vote-tips",
        type=int,
        default=50,
        help="tips per test set scanned several times at different places, for the agent's "
        "decision over consecutive frames (50; 0: skip)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--weights-dir", help="model directory (default: the package's)")
    parser.add_argument("--out-dir", default=DEFAULT_OUT, help=f"metrics and plots ({DEFAULT_OUT})")
    parser.add_argument(
        "--write-card", action="store_true", help="store the metrics in the model card"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def train_recipe(frames: int, first: int = TRAIN_SEED0) -> Any:
    from agent.perception.tip_data import TipRecipe

    return TipRecipe(seeds=(first, first + frames))


def heldout_recipe(frames: int) -> Any:
    from agent.perception.tip_data import TipRecipe

    return TipRecipe(seeds=(HELDOUT_SEED0, HELDOUT_SEED0 + frames), pairs=False)


def calibration_recipe(frames: int) -> Any:
    """Calibration frames of their own seeds spanning both test sets' parameter ranges (the
    training ones and the shifted ones): noise x0.5-3, drift x0.5-4, 11-24 nm, 40 % H:Si(100)."""
    from agent.perception.tip_data import TipRecipe

    return TipRecipe(
        seeds=(CALIB_SEED0, CALIB_SEED0 + frames),
        surface_weights=(0.6, 0.4),
        size_nm=(11.0, 24.0),
        noise_scale=(0.5, 3.0),
        drift_scale=(0.5, 4.0),
        pairs=False,
    )


def shifted_recipe(frames: int, first: int = SHIFTED_SEED0) -> Any:
    from agent.perception.tip_data import TipRecipe

    return TipRecipe(
        seeds=(first, first + frames),
        surface_weights=(0.5, 0.5),
        size_nm=(11.0, 24.0),
        noise_scale=(1.5, 3.0),
        drift_scale=(2.0, 4.0),
        pairs=False,
    )


def _simulate_cached(
    recipe: Any, cache: str | None, desc: str, progress: bool, workers: int = 1
) -> list[Any]:
    from agent.perception.tip_data import TipSample, simulate

    # the label rule is part of the key: a cache from before it (no sim_label) is not reused
    key = json.dumps({**recipe.to_json(), "labels": "visible"}, sort_keys=True)
    if cache and Path(cache).is_file():
        with np.load(cache, allow_pickle=False) as z:
            if str(z["recipe"]) == key:
                n = int(z["count"])
                return [
                    TipSample(
                        data=z[f"d{i}"],
                        pixel_size_nm=float(z["pixel"][i]),
                        label=int(z["label"][i]),
                        seed=int(z["seed"][i]),
                        surface=str(z["surface"][i]),
                        good_twin=z[f"t{i}"] if f"t{i}" in z.files else None,
                        sim_label=int(z["sim_label"][i]),
                        noise_sigma_m=float(z["sigma"][i]),
                    )
                    for i in range(n)
                ]
    samples = simulate(recipe, progress=progress, desc=desc, workers=workers)
    if cache:
        arrays: dict[str, Any] = {
            "recipe": np.array(key),
            "count": np.array(len(samples)),
            "pixel": np.array([s.pixel_size_nm for s in samples]),
            "label": np.array([s.label for s in samples]),
            "sim_label": np.array([-1 if s.sim_label is None else s.sim_label for s in samples]),
            "sigma": np.array([s.noise_sigma_m for s in samples]),
            "seed": np.array([s.seed for s in samples]),
            "surface": np.array([s.surface for s in samples]),
        }
        for i, s in enumerate(samples):
            arrays[f"d{i}"] = s.data
            if s.good_twin is not None:
                arrays[f"t{i}"] = s.good_twin
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **arrays)
    return samples


def _cpu_s() -> float:
    """CPU time (user + system) of this process and its finished children (the simulation
    workers) so far."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def train(args: argparse.Namespace) -> int:
    import torch

    from agent.perception.registry import save_model
    from agent.perception.tip_train import TrainConfig, plot_history, train_model
    from drivers.errors import ConfigError

    if (
        args.frames < 10
        or args.val_frames < 5
        or args.calib_frames < 0
        or args.steps < 1
        or args.batch < 2
        or args.recent_weight <= 0
        or not 0 <= args.change_fraction <= 1
    ):
        raise ConfigError(
            "need --frames >= 10, --val-frames >= 5, --calib-frames >= 0, --steps >= 1, "
            "--batch >= 2, --recent-weight > 0, 0 <= --change-fraction <= 1"
        )
    torch.set_num_threads(max(1, args.threads))
    t0 = time.perf_counter()
    progress = not args.quiet
    recipe = train_recipe(args.frames + args.val_frames)
    samples = _simulate_cached(
        recipe, args.cache, "simulating training frames", progress, max(1, args.workers)
    )
    train_set, val_set = samples[: args.frames], samples[args.frames :]
    calib_set = []
    if args.calib_frames > 0:
        calib_cache = str(Path(args.cache).with_suffix("")) + "_calib.npz" if args.cache else None
        calib_set = _simulate_cached(
            calibration_recipe(args.calib_frames),
            calib_cache,
            "simulating calibration frames",
            progress,
            max(1, args.workers),
        )
    sim_s = time.perf_counter() - t0
    config = TrainConfig(
        steps=args.steps,
        batch=args.batch,
        seed=args.seed,
        recent_weight=args.recent_weight,
        change_fraction=args.change_fraction,
    )
    net, card, history = train_model(train_set, val_set, config, progress=progress, calib=calib_set)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_history(history, str(out / "tip_loss.png"))
    total_s = time.perf_counter() - t0
    recipe_json = {
        "command": (
            f"scopepilot train tip --frames {args.frames} --val-frames {args.val_frames} "
            f"--calib-frames {args.calib_frames} --steps {args.steps} --batch {args.batch} "
            f"--seed {args.seed} --recent-weight {args.recent_weight:g} "
            f"--change-fraction {args.change_fraction:g}"
        ),
        "data": recipe.to_json(),
        "calibration_data": calibration_recipe(args.calib_frames).to_json()
        if args.calib_frames > 0
        else None,
        "split": {
            "train": args.frames,
            "calibration": args.val_frames,
            "calibration_extra": args.calib_frames,
        },
        "config": config.__dict__,
        "simulate_s": round(sim_s, 1),
        "train_s": round(history["train_s"], 1),
        "train_cpu_s": round(history["train_cpu_s"], 1),
        "total_s": round(total_s, 1),
        "cpu_s": round(_cpu_s(), 1),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "threads": torch.get_num_threads(),
        "calibration": history["validation"],
    }
    import dataclasses

    card = dataclasses.replace(card, training=recipe_json)
    weights_dir = args.weights_dir or _weights_default()
    saved = save_model(net, card, weights_dir)
    (out / "tip_history.json").write_text(json.dumps({k: history[k] for k in ("step", "loss")}))
    print(
        f"tip model {saved.version} saved to {weights_dir} (sha256 {saved.sha256[:12]}); "
        f"calibration accuracy {history['validation']['frame_accuracy']:.3f}; "
        f"{total_s / 60:.1f} min; loss curve {out / 'tip_loss.png'}"
    )
    return 0


@lru_cache(maxsize=4)
def _model(directory: str) -> Any:
    from agent.perception.tip_net import TipModel

    return TipModel.load(directory)


def infer(image: np.ndarray, pixel_size_nm: float) -> dict[str, Any]:
    """Tip state of one topography image (metres), frame and last-16-lines read-outs."""
    result: dict[str, Any] = _model(_weights_default()).predict(image, pixel_size_nm)
    return result


def evaluate(args: argparse.Namespace) -> int:
    import torch

    from agent.perception.tip_eval import evaluate_all

    torch.set_num_threads(max(1, args.threads))
    directory = args.weights_dir or _weights_default()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = evaluate_all(
        directory,
        sets={"heldout": heldout_recipe(args.frames), "shifted": shifted_recipe(args.frames)},
        changes=args.changes,
        change_seed=CHANGE_SEED0,
        out_dir=out,
        progress=not args.quiet,
        vote_tips=args.vote_tips,
        more_changes=args.more_changes,
    )
    (out / "tip_metrics.json").write_text(json.dumps(results, indent=2))
    if args.write_card:
        from agent.perception.tip_eval import write_metrics_to_card

        write_metrics_to_card(directory, results)
    print(json.dumps(results["summary"], indent=2))
    print(f"metrics: {out / 'tip_metrics.json'}; plots in {out}")
    return 0
