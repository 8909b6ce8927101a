"""Latency measurement for the perception benchmarks on a machine that may be shared.

Wall-clock times on a loaded machine mostly measure the other jobs, so each measurement reports
the minimum and the median wall time of the repeats and the process CPU time per call (all
threads together): on an idle machine with ``threads`` cores the wall time is about
``cpu_ms / threads`` or more.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn


def timing(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    """``min_ms``, ``median_ms`` (wall) and ``cpu_ms`` (process CPU time) per call of ``fn``
    over ``repeats`` calls after two warm-up calls."""
    fn()
    fn()
    wall = []
    cpu0 = time.process_time()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
    cpu = (time.process_time() - cpu0) / repeats
    return {
        "min_ms": 1e3 * float(np.min(wall)),
        "median_ms": 1e3 * float(np.median(wall)),
        "cpu_ms": 1e3 * cpu,
    }


def network_timing(model: nn.Module, x: torch.Tensor, repeats: int) -> dict[str, float | str]:
    """:func:`timing` of ``model(x)`` under ``torch.inference_mode`` in the faster of the
    contiguous and channels-last memory formats (each network gets its best layout)."""
    best: dict[str, float | str] = {}
    for fmt, name in (
        (torch.contiguous_format, "contiguous"),
        (torch.channels_last, "channels_last"),
    ):
        net = model.to(memory_format=fmt)  # type: ignore[call-overload]
        xf = x.contiguous(memory_format=fmt)

        def run(net: nn.Module = net, xf: torch.Tensor = xf) -> None:
            with torch.inference_mode():
                net(xf)

        t: dict[str, float | str] = {**timing(run, repeats), "layout": name}
        if not best or float(t["min_ms"]) < float(best["min_ms"]):
            best = t
    return best
