"""One background worker thread shared by the simulators.

Frame simulation has a few large, independent pieces (a frame's noise, half of a
constant-current solve) whose NumPy and FFT work releases the GIL. The forward models hand one of
them to this worker and do another on the calling thread, which uses a second core when there is
one. There is a single worker, so jobs run in the order they were submitted: a job that draws
from a random generator draws in the same order as it would on the calling thread, and every
result is bit for bit what the sequential code gives.

A job must never wait for another job (with one worker that would deadlock).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


def _new_worker() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="scopepilot-sim")


_WORKER = _new_worker()


def _after_fork_in_child() -> None:
    # A forked child inherits the executor but not its thread: jobs would wait forever.
    global _WORKER
    _WORKER = _new_worker()


os.register_at_fork(after_in_child=_after_fork_in_child)


def run_in_background(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
    """Queue ``fn(*args, **kwargs)`` on the worker; ``.result()`` waits for it (and re-raises)."""
    return _WORKER.submit(fn, *args, **kwargs)
