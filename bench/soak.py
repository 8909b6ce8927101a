"""Soak: a long simulated session with injected faults, at accelerated simulated time.

    .venv/bin/python bench/soak.py --frames 10000 --shape 32 --fault-rate 0.1

One process runs two sessions of the real agent (acquisition, decision and recorder threads,
rule policy, classical tip assessor, crash-safe recorder) against ``sim:stm``: first a
fault-free baseline of ``--baseline-frames``, then the soak of ``--frames`` with
:class:`drivers.faults.FaultInjector` drawing one fault per frame attempt with probability
``--fault-rate`` spread evenly over every fault kind. Time is simulated: the simulator's clock
advances by the scan and conditioning times, and the agent's fault backoff and the injected
delays go to a fake ``sleep`` that adds to a simulated-seconds counter instead of waiting. The
frames are small (``--shape``, default 32x32) so that 10,000 of them fit in minutes; what is
soaked is the agent's machinery, not the renderer.

Checked and printed:

- lost frames: every frame attempt must end as a recorded frame or a recorded acquisition
  fault (``attempts == frames recorded + acquisition faults``), and the store must read back
  every frame the agent counted;
- unhandled exceptions: the run must return normally, with no policy faults and no internal
  error in a thread;
- memory: RSS sampled every 100 frames; the least-squares slope in MiB per 1,000 frames over
  the second half (after warm-up) and the growth over the whole run. With ``--trim`` each sample
  is followed by ``gc.collect()`` and glibc's ``malloc_trim(0)`` and a second reading, so the
  run also reports the slope of what the process still holds once the allocator has returned
  its free pages (separating real growth from heap high-water marks);
- command latency: the gate's latency (envelope + instrument.execute) of decisions that issued
  commands, median of the first vs the last quartile of the session; also per-frame decision
  latency, and both as ratios to the fault-free baseline.

Outputs ``bench/out/soak.json``. Not run in CI (it takes minutes).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from tqdm import tqdm

from agent.gate import Mode
from agent.loop import AgentConfig, Step
from agent.pipeline import build_pipeline
from agent.recorder import SessionRecorder
from agent.session import Session
from bench._common import machine
from drivers.commands import Command, Scan
from drivers.faults import FaultInjector, FaultKind
from drivers.frame import ScanRegion
from drivers.registry import open_instrument

OUT = Path(__file__).resolve().parent / "out"
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE / 2**20


def trimmed_rss_mib() -> float:
    """RSS after a full garbage collection and glibc's ``malloc_trim(0)`` (NaN without glibc)."""
    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return float("nan")
    libc.malloc_trim(0)
    return rss_mib()


def _slope(samples: list[tuple[int, float]], frames: int) -> float:
    """Least-squares MiB per 1,000 frames over the second half of the run."""
    arr = np.array(samples)
    half = arr[arr[:, 0] >= frames / 2]
    return float(np.polyfit(half[:, 0], half[:, 1], 1)[0] * 1000) if len(half) > 2 else math.nan


class ExecTimer:
    """Passes everything to ``inner`` and times each ``execute`` by command id.

    The times are kept compactly (16 bytes per command: the id's hash and the seconds) so that
    the bench's own bookkeeping does not show in the RSS slope it measures; a dict of 17,000 id
    strings would add about 0.25 MiB per 1,000 frames. :meth:`seconds` builds the dict after the
    run.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._id_hashes = array("q")
        self._seconds = array("d")

    def info(self) -> Any:
        return self.inner.info()

    def state(self) -> Any:
        return self.inner.state()

    def acquire(self) -> Any:
        return self.inner.acquire()

    def stream(self) -> Any:
        return self.inner.stream()

    def execute(self, command: Command) -> Any:
        t0 = time.perf_counter()
        try:
            return self.inner.execute(command)
        finally:
            self._id_hashes.append(hash(command.id))
            self._seconds.append(time.perf_counter() - t0)

    def seconds(self) -> dict[int, float]:
        """``hash(command.id)`` -> seconds ``execute`` took."""
        return dict(zip(self._id_hashes, self._seconds, strict=True))

    def close(self) -> None:
        self.inner.close()


class SimClock:
    """A fake ``sleep``: adds the requested seconds to simulated time, returns at once."""

    def __init__(self) -> None:
        self.slept_s = 0.0

    def sleep(self, seconds: float) -> None:
        self.slept_s += max(0.0, float(seconds))


def run_session(
    frames: int,
    shape: int,
    seed: int,
    fault_rate: float,
    store: Path,
    *,
    desc: str,
    trim: bool = False,
) -> dict[str, Any]:
    clock = SimClock()
    inner = open_instrument("sim:stm", seed=seed)
    inner.execute(
        Scan(
            region=ScanRegion(0.0, 0.0, 4e-9, 4e-9),
            shape_px=(shape, shape),
            source="console",
            reason="soak settings",
        )
    )
    kinds = list(FaultKind)
    probabilities = {kind: fault_rate / len(kinds) for kind in kinds} if fault_rate else {}
    injector = FaultInjector(
        inner, seed=seed, probabilities=probabilities, delay_s=2.0, sleep=clock.sleep
    )
    instrument = ExecTimer(injector)
    config = {
        "policy": "rule",
        # A night-long session: failed episodes are reported, not a reason to stop, and the
        # conditioning sites are packed tighter than the default (60 nm apart) so that 10,000
        # small frames do not use up the simulator's 2 um stage (the rule policy stops then).
        "policy_options": {
            "max_failed_episodes": 1_000_000,
            "damage_radius_m": 4e-9,
            "move_step_m": 8e-9,
        },
        "assessor": "classical",
        "quality": "snr",
    }
    pipeline = build_pipeline(config, kind="stm")
    recorder = SessionRecorder(store, config={**config, "frames": frames, "soak": True})
    rss: list[tuple[int, float]] = [(0, rss_mib())]
    trimmed: list[tuple[int, float]] = [(0, trimmed_rss_mib())] if trim else []
    bar = tqdm(total=frames, desc=desc, unit="frame", dynamic_ncols=True)

    def on_step(step: Step) -> None:
        bar.update(1)
        if step.seq % 100 == 99:
            rss.append((step.seq + 1, rss_mib()))
            if trim:
                trimmed.append((step.seq + 1, trimmed_rss_mib()))

    agent = pipeline.agent(
        instrument,
        recorder=recorder,
        config=AgentConfig(frames=frames, mode=Mode.AUTONOMOUS, lockstep=True),
        on_step=on_step,
        sleep=clock.sleep,
    )
    t0 = time.perf_counter()
    error = None
    try:
        result = agent.run()
    except Exception as exc:  # reported, not hidden: the soak fails on it
        error = f"{type(exc).__name__}: {exc}"
        result = agent.result
    wall_s = time.perf_counter() - t0
    bar.close()
    sim_time_s = inner.state().time_s + clock.slept_s
    recorder.close()
    instrument.close()

    session = Session(store)
    events = session.events()
    acquire_faults = [
        e for e in events if e["kind"] == "fault" and e["payload"]["stage"] == "acquire"
    ]
    decide_faults = [
        e for e in events if e["kind"] == "fault" and e["payload"]["stage"] != "acquire"
    ]
    decisions = [e["payload"] for e in events if e["kind"] == "decision"]
    # command latency of one command mix, so that quartiles compare like with like
    mix = ("TipDip", "MoveTo")
    issuing = [d for d in decisions if tuple(c["type"] for c in d["commands"]) == mix]
    gate_ms = [1e3 * d["latency_s"]["gate_s"] for d in issuing]
    # the agent's own share: gate time minus the instrument's execute time
    executed_s = instrument.seconds()
    overhead_ms = [
        1e3
        * (
            d["latency_s"]["gate_s"]
            - sum(executed_s.get(hash(c["id"]), 0.0) for c in d["commands"])
        )
        for d in decisions
        if d["commands"]
    ]
    slope = _slope(rss, result.frames)
    injected: dict[str, int] = {}
    for _, kind in injector.log:
        injected[kind.value] = injected.get(kind.value, 0) + 1
    return {
        "frames_requested": frames,
        "frames_counted": result.frames,
        "frames_recorded": len(session),
        "attempts": injector.attempts,
        "acquire_faults": len(acquire_faults),
        "other_faults": len(decide_faults),
        "lost_frames": injector.attempts - len(session) - len(acquire_faults),
        "stop_reason": result.stop_reason,
        "error": error,
        "injected": injected,
        "pauses": sum(
            1 for e in events if e["kind"] == "operator" and e["payload"]["action"] == "pause"
        ),
        "commands": sum(len(d["commands"]) for d in decisions),
        "wall_s": wall_s,
        "frames_per_s": result.frames / wall_s,
        "simulated_s": sim_time_s,
        "acceleration": sim_time_s / wall_s,
        "rss_mib": {"start": rss[0][1], "end": rss[-1][1], "samples": rss},
        "rss_slope_mib_per_1000_frames": slope,
        **(
            {
                "trimmed_rss_mib": {
                    "start": trimmed[0][1],
                    "end": trimmed[-1][1],
                    "samples": trimmed,
                },
                "trimmed_rss_slope_mib_per_1000_frames": _slope(trimmed, result.frames),
            }
            if trim
            else {}
        ),
        "gate_ms_first_quartile": _median_quartile(gate_ms, 0),
        "gate_ms_last_quartile": _median_quartile(gate_ms, 3),
        "overhead_ms_first_quartile": _median_quartile(overhead_ms, 0),
        "overhead_ms_last_quartile": _median_quartile(overhead_ms, 3),
        "gate_ms_median": float(np.median(gate_ms)) if gate_ms else float("nan"),
        "overhead_ms_median": float(np.median(overhead_ms)) if overhead_ms else float("nan"),
        "command_mix": list(mix),
        "mix_decisions": len(gate_ms),
    }


def _median_quartile(values: list[float], quartile: int) -> float:
    if len(values) < 4:
        return float("nan")
    n = len(values)
    part = values[quartile * n // 4 : (quartile + 1) * n // 4]
    return float(np.median(part))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=10_000)
    parser.add_argument("--baseline-frames", type=int, default=1_000)
    parser.add_argument("--shape", type=int, default=32, help="frame size in pixels (square)")
    parser.add_argument("--fault-rate", type=float, default=0.1, help="faults per frame attempt")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--dir", help="where to write the stores (default: a temporary folder)")
    parser.add_argument(
        "--trim",
        action="store_true",
        help="also read the RSS after gc.collect() and malloc_trim(0) at every sample",
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="scopepilot-soak-", dir=args.dir))
    try:
        base = run_session(
            args.baseline_frames, args.shape, args.seed, 0.0, root / "base.zarr", desc="baseline"
        )
        soak = run_session(
            args.frames,
            args.shape,
            args.seed,
            args.fault_rate,
            root / "soak.zarr",
            desc="soak",
            trim=args.trim,
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "soak.json").write_text(
        json.dumps(
            {"baseline": base, "soak": soak, "args": vars(args), "machine": machine()}, indent=1
        )
    )
    ok_frames = (
        soak["lost_frames"] == 0
        and soak["frames_recorded"] == soak["frames_counted"] == soak["frames_requested"]
    )
    ok_errors = soak["error"] is None and soak["other_faults"] == 0
    print(
        f"soak: {soak['frames_counted']} frames of {args.shape}x{args.shape} (requested "
        f"{args.frames}), fault rate {args.fault_rate:g}; baseline: {base['frames_counted']} "
        f"fault-free frames; machine: {machine()}"
    )
    print(f"  injected faults          {sum(soak['injected'].values())}  {soak['injected']}")
    print(
        f"  attempts {soak['attempts']} = {soak['frames_recorded']} recorded frames + "
        f"{soak['acquire_faults']} acquisition faults; lost frames {soak['lost_frames']}"
        f"  [{'ok' if ok_frames else 'FAILED'}]"
    )
    print(
        f"  unhandled exceptions     {soak['error'] or 'none'}; policy/other faults "
        f"{soak['other_faults']}  [{'ok' if ok_errors else 'FAILED'}]; stop: {soak['stop_reason']}"
    )
    print(f"  fault pauses (alerts)    {soak['pauses']}; commands issued {soak['commands']}")
    print(
        f"  RSS                      {soak['rss_mib']['start']:.0f} -> "
        f"{soak['rss_mib']['end']:.0f} MiB; slope over the second half "
        f"{soak['rss_slope_mib_per_1000_frames']:+.2f} MiB per 1000 frames "
        f"(baseline {base['rss_slope_mib_per_1000_frames']:+.2f})"
    )
    if args.trim:
        print(
            f"  RSS after gc + malloc_trim {soak['trimmed_rss_mib']['start']:.0f} -> "
            f"{soak['trimmed_rss_mib']['end']:.0f} MiB; slope over the second half "
            f"{soak['trimmed_rss_slope_mib_per_1000_frames']:+.2f} MiB per 1000 frames"
        )
    print(
        f"  command latency          {'+'.join(soak['command_mix'])} decisions "
        f"({soak['mix_decisions']}), gate incl. instrument: first quartile "
        f"{soak['gate_ms_first_quartile']:.2f} ms, last {soak['gate_ms_last_quartile']:.2f} ms, "
        f"ratio {soak['gate_ms_last_quartile'] / soak['gate_ms_first_quartile']:.2f}; median vs "
        f"fault-free baseline {soak['gate_ms_median']:.2f} / {base['gate_ms_median']:.2f} ms = "
        f"{soak['gate_ms_median'] / base['gate_ms_median']:.2f}"
    )
    print(
        f"  agent overhead (gate minus instrument, all commands): first quartile "
        f"{soak['overhead_ms_first_quartile']:.3f} ms, last "
        f"{soak['overhead_ms_last_quartile']:.3f} ms, ratio "
        f"{soak['overhead_ms_last_quartile'] / soak['overhead_ms_first_quartile']:.2f}; "
        f"baseline median {base['overhead_ms_median']:.3f} ms"
    )
    print(
        f"  throughput               {soak['frames_per_s']:.1f} frames/s vs baseline "
        f"{base['frames_per_s']:.1f} = {soak['frames_per_s'] / base['frames_per_s']:.2f}; "
        f"simulated time {soak['simulated_s'] / 3600:.2f} h in {soak['wall_s'] / 60:.1f} min "
        f"({soak['acceleration']:.0f}x real time)"
    )
    print(f"  details: {OUT / 'soak.json'}")
    if not (ok_frames and ok_errors):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
