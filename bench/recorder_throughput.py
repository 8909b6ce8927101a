"""Crash-safe session recording throughput vs writing the same frames as raw TIFF pages.

    .venv/bin/python bench/recorder_throughput.py --frames 600 --shape 512 --dtype uint16

Both runs write the same in-memory frames to the same disk in the same process: the baseline
appends them as uncompressed pages to one TIFF file with tifffile (the practical disk limit for
a frame stream, with no crash safety), the recorder appends them to a zarr session store with
its crash-safe ordering (pixels, then the record; atomic key writes). Issue 7 target: at least
250 frames/s of 512² uint16 on local disk.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import tifffile
from tqdm import tqdm

from agent.recorder import SessionRecorder
from bench._common import machine
from drivers.frame import Frame, GroundTruth, ScanRegion, TipState


def make_frames(n: int, shape: int, dtype: str) -> list[Frame]:
    rng = np.random.default_rng(0)
    pool = [(rng.random((shape, shape)) * 4000).astype(dtype) for _ in range(8)]
    truth = GroundTruth(TipState.GOOD, tip_states=(TipState.GOOD,))
    return [
        Frame(
            pool[i % 8],
            "haadf",
            (1e-11, 1e-11),
            1e-6,
            ScanRegion(),
            i,
            i * 0.1,
            shape,
            "bench",
            {"pattern": "raster"},
            truth,
        )
        for i in range(n)
    ]


def tiff_rate(frames: list[Frame], out: Path) -> float:
    t0 = time.perf_counter()
    with tifffile.TiffWriter(out) as tif:
        for frame in tqdm(frames, desc="tiff", leave=False):
            tif.write(frame.data, contiguous=True)
    return len(frames) / (time.perf_counter() - t0)


def recorder_rate(frames: list[Frame], out: Path) -> float:
    t0 = time.perf_counter()
    with SessionRecorder(out) as recorder:
        for frame in tqdm(frames, desc="zarr", leave=False):
            recorder.append_frame(frame, extra={"acquire_s": 0.001})
    return len(frames) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=600)
    parser.add_argument("--shape", type=int, default=512)
    parser.add_argument("--dtype", default="uint16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    frames = make_frames(args.frames, args.shape, args.dtype)
    root = Path(tempfile.mkdtemp(prefix="scopepilot-rec-", dir=args.dir))
    tiff, zarr_ = [], []
    try:
        for k in range(args.repeats):  # alternate so both see the same disk state
            tiff.append(tiff_rate(frames, root / f"b{k}.tif"))
            zarr_.append(recorder_rate(frames, root / f"s{k}.zarr"))
            shutil.rmtree(root / f"s{k}.zarr")
            (root / f"b{k}.tif").unlink()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    t, z = float(np.median(tiff)), float(np.median(zarr_))
    print(
        f"{args.frames} frames of {args.shape}x{args.shape} {args.dtype}, "
        f"median of {args.repeats} alternating runs, in {root.parent}"
    )
    print(f"  raw TIFF pages (baseline)   {t:8.0f} frames/s")
    print(f"  crash-safe session store    {z:8.0f} frames/s   (target >= 250)")
    print(f"  ratio store / TIFF          {z / t:8.2f}")
    print(f"  machine: {machine()}")


if __name__ == "__main__":
    main()
