"""Accuracy of the classical tip assessor on simulated STM frames from held-out seeds.

    python bench/assessor_accuracy.py                      # Au(111), 16 nm, 256 x 256, 40/state
    python bench/assessor_accuracy.py --surface hsi100     # another surface
    python bench/assessor_accuracy.py --size-nm 24 --noise-scale 3 --lines 64

For every tip state it simulates ``--frames-per-state`` frames, each from its own simulator
(seed ``--seed + 1000 * state_index + i``) started in that state, at a random stage position
after a random wait. The label is the simulator's ground truth (the state during most lines,
which can differ from the requested one when the tip changed by itself). It prints the
accuracy, per-class recall and precision and the 5 x 5 confusion matrix (rows = truth), and
writes ``confusion.png`` and ``results.json`` under ``--out-dir``.

The thresholds of :class:`agent.perception.classical.ClassicalConfig` were tuned on seeds
10000-79999; keep ``--seed`` outside that range (the default is 1000000).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.perception.classical import ClassicalTipAssessor  # noqa: E402
from drivers.frame import Frame, ScanRegion, TipState  # noqa: E402
from simulators.stm import STMConfig, STMSimulator  # noqa: E402

STATES = tuple(TipState)
TRAINING_SEEDS = range(10_000, 80_000)


def simulated_frame(
    state: TipState,
    seed: int,
    *,
    surface: str = "au111",
    size_m: float = 16e-9,
    shape_px: tuple[int, int] = (256, 256),
    dwell_s: float = 1e-3,
    noise_scale: float = 1.0,
) -> Frame:
    """One complete frame of a fresh simulator whose tip starts in ``state`` (deterministic)."""
    defaults = STMConfig()
    config = STMConfig(
        surface=surface,
        initial_tip=state,
        white_noise_m_per_sqrt_hz=defaults.white_noise_m_per_sqrt_hz * noise_scale,
        line_noise_m=defaults.line_noise_m * noise_scale,
    )
    sim = STMSimulator(config, seed=seed)
    rng = np.random.default_rng([seed, 7])
    x_m, y_m = (float(v) for v in rng.uniform(-400e-9, 400e-9, 2))
    sim.move_to(x_m, y_m)
    sim.advance(float(rng.uniform(0.0, 300.0)))
    region = ScanRegion(x_m, y_m, size_m, size_m)
    scan = sim.begin_frame(region, shape_px, dwell_s)
    while not scan.done:
        scan.next_line()
    return Frame(
        data=scan.data.copy(),
        channel="topography",
        pixel_size_m=(size_m / shape_px[0], size_m / shape_px[1]),
        dwell_s=dwell_s,
        scan_region=region,
        frame_index=0,
        timestamp_s=sim.time_s,
        lines_done=shape_px[0],
        instrument="sim:stm",
        truth=scan.truth(),
    )


def partial(frame: Frame, lines: int) -> Frame:
    """``frame`` as it was after its first ``lines`` lines (later rows NaN)."""
    data = frame.data.copy()
    data[lines:] = np.nan
    return Frame(
        data=data,
        channel=frame.channel,
        pixel_size_m=frame.pixel_size_m,
        dwell_s=frame.dwell_s,
        scan_region=frame.scan_region,
        frame_index=frame.frame_index,
        timestamp_s=frame.timestamp_s,
        lines_done=lines,
        instrument=frame.instrument,
        truth=frame.truth,
    )


def confusion_matrix(truth: list[TipState], predicted: list[TipState]) -> np.ndarray:
    """``(5, 5)`` int counts, rows = truth, columns = prediction, in :class:`TipState` order."""
    matrix = np.zeros((len(STATES), len(STATES)), dtype=np.int64)
    for t, p in zip(truth, predicted, strict=True):
        matrix[STATES.index(t), STATES.index(p)] += 1
    return matrix


def format_matrix(matrix: np.ndarray) -> str:
    head = "truth \\ predicted " + "".join(f"{s.value:>10s}" for s in STATES) + "    recall"
    lines = [head]
    for i, state in enumerate(STATES):
        total = int(matrix[i].sum())
        recall = f"{matrix[i, i] / total:9.2f}" if total else "      n/a"
        cells = "".join(f"{int(v):10d}" for v in matrix[i])
        lines.append(f"{state.value:>17s} {cells} {recall}")
    precision = []
    for j in range(len(STATES)):
        col = int(matrix[:, j].sum())
        precision.append(f"{matrix[j, j] / col:10.2f}" if col else "       n/a")
    lines.append(f"{'precision':>17s} " + "".join(precision))
    return "\n".join(lines)


def plot_matrix(matrix: np.ndarray, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    fig, ax = plt.subplots(figsize=(6.2, 5.2))
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    labels = [s.value for s in STATES]
    ax.set_xticks(range(len(STATES)), labels, rotation=30)
    ax.set_yticks(range(len(STATES)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    for i in range(len(STATES)):
        for j in range(len(STATES)):
            ax.text(
                j,
                i,
                str(int(matrix[i, j])),
                ha="center",
                va="center",
                color="white" if share[i, j] > 0.5 else "black",
            )
    fig.colorbar(im, ax=ax, label="fraction of the true class")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames-per-state", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1_000_000, help="first held-out seed")
    parser.add_argument("--surface", default="au111", help="au111 or hsi100")
    parser.add_argument("--size-nm", type=float, default=16.0, help="scan size (square)")
    parser.add_argument("--shape", type=int, default=256, help="pixels per side")
    parser.add_argument("--noise-scale", type=float, default=1.0, help="x white and line noise")
    parser.add_argument("--lines", type=int, default=0, help="assess only the first N lines")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "out" / "assessor")
    args = parser.parse_args(argv)
    if args.frames_per_state < 1:
        parser.error("--frames-per-state must be >= 1")
    if not 0 <= args.lines <= args.shape:
        parser.error(f"--lines must be in 0..{args.shape}")
    last_seed = args.seed + 1000 * (len(STATES) - 1) + args.frames_per_state - 1
    if args.seed <= TRAINING_SEEDS.stop - 1 and last_seed >= TRAINING_SEEDS.start:
        print(f"warning: seeds {args.seed}..{last_seed} overlap the tuning seeds {TRAINING_SEEDS}")

    from tqdm import tqdm

    assessor = ClassicalTipAssessor()
    truth: list[TipState] = []
    predicted: list[TipState] = []
    records: list[dict[str, Any]] = []
    t_sim = t_assess = 0.0
    jobs = [(s, i) for s in STATES for i in range(args.frames_per_state)]
    for state, i in tqdm(jobs, desc="simulate + assess", unit="frame"):
        seed = args.seed + 1000 * STATES.index(state) + i
        t0 = time.perf_counter()
        frame = simulated_frame(
            state,
            seed,
            surface=args.surface,
            size_m=args.size_nm * 1e-9,
            shape_px=(args.shape, args.shape),
            noise_scale=args.noise_scale,
        )
        if args.lines:
            frame = partial(frame, args.lines)
        t1 = time.perf_counter()
        estimate = assessor.assess(frame)
        t2 = time.perf_counter()
        t_sim += t1 - t0
        t_assess += t2 - t1
        if frame.truth is None:  # the simulator always attaches ground truth
            raise RuntimeError("simulated frame without ground truth")
        label = frame.truth.tip_state
        truth.append(label)
        predicted.append(estimate.state)
        records.append(
            {
                "seed": seed,
                "requested": state.value,
                "truth": label.value,
                "states_seen": [str(x) for x in frame.truth.tip_states],
                "predicted": estimate.state.value,
                "uncertainty": estimate.uncertainty,
                "probabilities": {k.value: v for k, v in estimate.probabilities.items()},
                "features": dict(estimate.features),
            }
        )

    matrix = confusion_matrix(truth, predicted)
    n = len(truth)
    accuracy = float(np.trace(matrix) / n)
    sure = [r for r in records if r["uncertainty"] <= 0.6]
    sure_acc = float(np.mean([r["truth"] == r["predicted"] for r in sure])) if sure else math.nan
    recall = {
        s.value: (float(matrix[k, k] / matrix[k].sum()) if matrix[k].sum() else None)
        for k, s in enumerate(STATES)
    }
    setting = (
        f"{args.surface}, {args.size_nm:g} nm, {args.shape}x{args.shape} px, "
        f"noise x{args.noise_scale:g}, "
        + (f"first {args.lines} lines, " if args.lines else "")
        + f"seeds {args.seed}+, {n} frames"
    )
    print(f"\nclassical tip assessor on held-out simulated frames ({setting})")
    print(f"accuracy {accuracy:.3f}")
    print(
        f"with uncertainty <= 0.6: {len(sure)}/{n} frames ({len(sure) / n:.0%}), "
        f"accuracy {sure_acc:.3f}"
    )
    print(
        "per-class recall: " + ", ".join(f"{k} {v:.2f}" for k, v in recall.items() if v is not None)
    )
    print(format_matrix(matrix))
    print(f"time per frame: simulate {1e3 * t_sim / n:.0f} ms, assess {1e3 * t_assess / n:.0f} ms")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    plot_matrix(
        matrix,
        f"classical assessor, accuracy {accuracy:.3f}\n{setting}",
        args.out_dir / "confusion.png",
    )
    summary = {
        "setting": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "assessor": {
            "name": assessor.name,
            "version": assessor.version,
            "config": dataclasses.asdict(assessor.config),
        },
        "states": [s.value for s in STATES],
        "confusion_rows_truth": matrix.tolist(),
        "accuracy": accuracy,
        "confident_fraction": len(sure) / n,
        "confident_accuracy": sure_acc,
        "recall": recall,
        "ms_per_frame": {"simulate": 1e3 * t_sim / n, "assess": 1e3 * t_assess / n},
        "frames": records,
    }
    (args.out_dir / "results.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out_dir / 'confusion.png'} and {args.out_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
