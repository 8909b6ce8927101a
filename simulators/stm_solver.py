"""Vectorised root finding for the constant-current height, one root per pixel.

:func:`solve_decreasing` solves ``f_i(z_i) = 0`` for many independent, monotonically
decreasing functions at once (``f = ln(I / I_set)`` of every pixel): two plain Newton steps
over all of them, then a safeguarded Newton / Illinois false-position iteration on the few
that have not settled, each keeping a bracket around its root so that it cannot cycle.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

_SUBSET_RATIO = 4  # a second step over more than 1/4 of the pixels evaluates them all

Evaluate = Callable[[np.ndarray, np.ndarray | None], tuple[np.ndarray, np.ndarray]]
"""``evaluate(z, idx) -> (f, newton_step)`` at heights ``z`` of the pixels ``idx`` (None: all)."""


def solve_decreasing(z: np.ndarray, evaluate: Evaluate, *, tol: float, max_iter: int) -> None:
    """Move every ``z`` (float32, updated in place) onto the root of its decreasing ``f``.

    ``evaluate`` returns ``f`` and the (clipped) Newton step ``f / (-df/dz)``; a pixel stops
    when its step is below ``tol``. Plain Newton converges quadratically for almost every
    pixel; the bracketed fallback handles kinks (step edges, the contact floor, damage).
    """
    # Plain Newton steps over the whole frame first: they settle almost every pixel.
    _, step = evaluate(z, None)
    z += step
    moving = np.abs(step) > tol
    if np.count_nonzero(moving) * _SUBSET_RATIO >= z.size:
        # Most pixels still move: evaluating all of them is cheaper than gathering the
        # subset, and each pixel's f and step are the same either way (pixels are independent).
        _, step = evaluate(z, None)
        np.add(z, step, out=z, where=moving)
        moving &= np.abs(step) > tol
        act = np.flatnonzero(moving)
    else:
        act = np.flatnonzero(moving)
        _, step = evaluate(z[act], act)
        z[act] += step
        act = act[np.abs(step) > tol]
    # The few left keep a bracket (lo, f_lo > 0), (hi, f_hi < 0) around their root and
    # fall back on Illinois false position when a Newton step leaves it or stalls.
    n = act.size
    lo = np.full(n, -np.inf, dtype=np.float32)
    hi = np.full(n, np.inf, dtype=np.float32)
    f_lo = np.zeros(n, dtype=np.float32)
    f_hi = np.zeros(n, dtype=np.float32)
    step_prev = np.full(n, np.inf, dtype=np.float32)
    last_side = np.zeros(n, dtype=np.int8)  # +1: lo moved last, -1: hi moved last
    loc = np.arange(n)  # positions in the bracket arrays of the pixels still moving
    for it in range(max_iter):
        if loc.size == 0:
            break
        pix = act[loc]
        zs = z[pix]
        f, step = evaluate(zs, pix)
        close = f > 0
        side = np.where(close, 1, -1).astype(np.int8)
        again = side == last_side[loc]  # the same end moves twice: halve the other's f
        f_hi[loc] = np.where(again & close, 0.5 * f_hi[loc], f_hi[loc])
        f_lo[loc] = np.where(again & ~close, 0.5 * f_lo[loc], f_lo[loc])
        last_side[loc] = side
        lo[loc] = np.where(close, zs, lo[loc])
        f_lo[loc] = np.where(close, f, f_lo[loc])
        hi[loc] = np.where(close, hi[loc], zs)
        f_hi[loc] = np.where(close, f_hi[loc], f)
        la, ha, fla, fha = lo[loc], hi[loc], f_lo[loc], f_hi[loc]
        newton = zs + step
        bracketed = np.isfinite(la) & np.isfinite(ha)
        # Newton is trusted inside the bracket while its steps keep halving (as in rtsafe).
        good = ~bracketed | (
            (newton > la) & (newton < ha) & ((it < 2) | (np.abs(step) < 0.5 * step_prev[loc]))
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            false_pos = la + (ha - la) * fla / (fla - fha)
        new = np.where(good, newton, false_pos).astype(np.float32)
        step_prev[loc] = np.abs(new - zs)
        z[pix] = new
        # Done when an accepted Newton step is tiny, or the bracket itself is.
        settled = np.where(good, np.abs(step) <= tol, (ha - la) <= tol)
        loc = loc[~settled]
