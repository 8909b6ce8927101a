"""Live view cost: agent loop speed with and without a console page streaming 512² frames.

    /tmp/venv/bin/python bench/console_live.py --frames 300 --repeats 3

The agent runs flat out (lockstep: every frame is decided; autonomous, image SNR estimate, rule
policy with dose control, zarr recording, as in a STEM session) on 512x512 frames replayed from
``sim:stem`` (the simulator itself is slower than 10 frames/s at 512²; replaying real simulated
frames makes the agent loop, not the physics, the thing measured; ``--instrument sim:stm`` adds
the classical tip assessor, which alone takes seconds per 512² frame on a small machine). With
the console, a websocket client in a separate process (as a browser would be) receives every
frame the console pushes (at most ``--console-fps``); its CPU time is reported too. Runs
alternate without / with console, ``--repeats`` times each; the figure is the ratio of the
median agent frame rates (target: with / without >= 0.95) and the frame rate the client got
(target >= 10 frames/s).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from tqdm import tqdm

from agent.console.server import ConsoleServer
from agent.control import Controller
from agent.gate import Mode
from agent.loop import Agent, AgentConfig
from agent.perception.classical import ClassicalTipAssessor
from agent.perception.quality import ImageQualityAssessor
from agent.recorder import SessionRecorder
from bench._common import machine
from drivers.commands import Command
from drivers.frame import Frame
from drivers.protocol import CommandResult, InstrumentInfo, InstrumentState
from drivers.registry import open_instrument
from policies.base import make_policy

OUT = Path(__file__).resolve().parent / "out"

CLIENT = r"""
import json, sys, time
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect
url, seconds = sys.argv[1], float(sys.argv[2])
times, size = [], 0
with connect(url, max_size=None, open_timeout=20) as ws:
    print("connected", flush=True)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            message = ws.recv(timeout=max(0.01, end - time.monotonic()))
        except (TimeoutError, ConnectionClosed):
            break
        if isinstance(message, bytes):
            times.append(time.monotonic()); size = len(message)
print(json.dumps({"frames": len(times), "first": times[0] if times else None,
                  "last": times[-1] if times else None, "bytes": size}), flush=True)
"""


class ReplayInstrument:
    """Replays ``frames`` (real simulated frames) as fast as they are asked for."""

    def __init__(self, inner: Any, frames: list[Frame]) -> None:
        self.inner = inner
        self.frames = frames
        self.count = 0

    def info(self) -> InstrumentInfo:
        return self.inner.info()  # type: ignore[no-any-return]

    def state(self) -> InstrumentState:
        return self.inner.state()  # type: ignore[no-any-return]

    def acquire(self) -> Frame:
        return list(self.stream())[-1]

    def stream(self) -> Iterator[Frame]:
        frame = self.frames[self.count % len(self.frames)]
        self.count += 1
        yield Frame(**{**frame.__dict__, "frame_index": self.count})

    def execute(self, command: Command) -> CommandResult:
        return self.inner.execute(command)  # type: ignore[no-any-return]

    def close(self) -> None:
        self.inner.close()


def one_run(
    inner: Any, frames: list[Frame], n: int, console: bool, fps: float, workdir: Path, spm: bool
) -> dict[str, Any]:
    store = workdir / f"s{time.monotonic_ns()}.zarr"
    recorder = SessionRecorder(store)
    agent = Agent(
        ReplayInstrument(inner, frames),  # type: ignore[arg-type]
        make_policy("rule", target_snr=None if spm else 5.0),
        assessor=ClassicalTipAssessor() if spm else None,
        quality=ImageQualityAssessor(),
        recorder=recorder,
        config=AgentConfig(frames=n, mode=Mode.AUTONOMOUS),
    )
    result: dict[str, Any] = {"console": console}
    client = None
    server = None
    if console:
        server = ConsoleServer(Controller(agent), port=0, token="bench", max_fps=fps).start()
        url = server.base_url.replace("http://", "ws://") + "/ws?token=bench"
        client = subprocess.Popen(
            [sys.executable, "-c", CLIENT, url, "600"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert client.stdout is not None
        client.stdout.readline()  # "connected"
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    agent.run()
    elapsed = time.perf_counter() - t0
    result["agent_fps"] = n / elapsed
    result["process_cpu_s_per_frame"] = (time.process_time() - cpu0) / n
    if client is not None and server is not None:
        server.stop()  # closes the websocket; the client prints what it got
        children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        out, _ = client.communicate(timeout=60)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        result["client_cpu_s"] = (children.ru_utime + children.ru_stime) - (
            children0.ru_utime + children0.ru_stime
        )
        got = json.loads(out.strip().splitlines()[-1])
        span = (got["last"] - got["first"]) if got["frames"] > 1 else float("nan")
        result["client_fps"] = (got["frames"] - 1) / span if got["frames"] > 1 else 0.0
        result["client_frames"] = got["frames"]
        result["message_bytes"] = got["bytes"]
    recorder.close()
    shutil.rmtree(store, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300, help="frames per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shape", type=int, default=512)
    parser.add_argument("--console-fps", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument(
        "--instrument", default="sim:stem", choices=["sim:stem", "sim:sem", "sim:stm"]
    )
    args = parser.parse_args()
    inner = open_instrument(args.instrument, seed=args.seed, shape_px=(args.shape, args.shape))
    spm = inner.info().kind in ("stm", "afm")
    frames = [inner.acquire() for _ in tqdm(range(8), desc="simulating frames", leave=False)]
    workdir = Path(tempfile.mkdtemp(prefix="scopepilot-bench-"))
    runs: list[dict[str, Any]] = []
    try:
        one_run(inner, frames, 20, False, args.console_fps, workdir, spm)  # warm-up
        # ABBA order (without, with, with, without, ...): neither kind always runs right after
        # the other, whose teardown (server thread, client process, store) may still be going on
        pairs = [(False, True), (True, False)]
        order = list(itertools.chain.from_iterable(pairs[i % 2] for i in range(args.repeats)))
        for console in tqdm(order, desc="runs", leave=False):
            gc.collect()
            time.sleep(0.2)  # let the previous run's threads and processes finish
            runs.append(
                one_run(inner, frames, args.frames, console, args.console_fps, workdir, spm)
            )
    finally:
        inner.close()
        shutil.rmtree(workdir, ignore_errors=True)
    without = [r["agent_fps"] for r in runs if not r["console"]]
    with_console = [r["agent_fps"] for r in runs if r["console"]]
    client = [r["client_fps"] for r in runs if r["console"]]
    ratio = float(np.median(with_console) / np.median(without))
    print(
        f"{args.frames} frames of {args.shape}x{args.shape} from {args.instrument} per run, "
        f"{args.repeats} runs each"
    )
    print(f"  agent without console   {', '.join(f'{v:.1f}' for v in without)} frames/s")
    print(f"  agent with console      {', '.join(f'{v:.1f}' for v in with_console)} frames/s")
    print(
        f"  page received           {', '.join(f'{v:.1f}' for v in client)} frames/s "
        f"(cap {args.console_fps:g}; {runs[1].get('message_bytes', 0)} bytes a frame)"
    )
    cpu = [r["process_cpu_s_per_frame"] * 1e3 for r in runs]
    print(
        "  agent process CPU/frame "
        + ", ".join(
            f"{v:.1f}{' (console)' if r['console'] else ''}" for v, r in zip(cpu, runs, strict=True)
        )
        + " ms; client process CPU "
        + ", ".join(f"{r['client_cpu_s']:.1f}" for r in runs if r["console"])
        + " s"
    )
    cpu_without = float(np.median([v for v, r in zip(cpu, runs, strict=True) if not r["console"]]))
    cpu_with = float(np.median([v for v, r in zip(cpu, runs, strict=True) if r["console"]]))
    print(
        f"  agent process CPU/frame, medians: {cpu_without:.1f} ms without, {cpu_with:.1f} ms "
        f"with the console ({cpu_with / cpu_without:.3f}×)"
    )
    print(f"  ratio agent speed with / without console (medians): {ratio:.3f} (target >= 0.95)")
    print(f"  machine: {machine()}")
    OUT.mkdir(exist_ok=True)
    out = OUT / "console_live.json"
    out.write_text(
        json.dumps(
            {
                "runs": runs,
                "ratio": ratio,
                "cpu_ms_per_frame": {"without": cpu_without, "with": cpu_with},
                "machine": machine(),
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
