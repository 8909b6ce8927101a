"""Exact order statistics of a large array for less CPU than a full ``np.partition``.

:func:`~agent.perception.tasks.sr.recover` needs the 0.1 and 99.9 percentiles of the recovered
image and the median of its σ map: 3 ms each with ``np.percentile`` / ``np.median`` on a 512²
frame, a tenth of the network's time. Here the ranks wanted are first bracketed on a strided
subsample (every :data:`STEP`-th value); one pass over the array counts the values below the
bracket and picks those inside it, and only those few thousand are partitioned. Every value
outside the bracket is known to lie below or above all of it, so the ranks inside it are the
ranks of the whole array: the result is the same order statistic ``np.partition`` finds, not an
estimate. When the bracket misses a rank (an unlucky subsample) a full ``np.partition`` answers
instead. NaN anywhere makes every result NaN, as with ``np.percentile`` and ``np.median``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

STEP = 17
"""Subsample stride (odd and prime, so rows of an image with a lattice are not all sampled at the
same columns)."""
_MIN_SIZE = 64 * STEP  # below this a full partition is as cheap


def order_statistics(values: np.ndarray, ranks: Sequence[int]) -> np.ndarray:
    """The values of 0-based ascending ``ranks`` of ``values`` (any shape, read flattened):
    the same values as ``np.partition(values.ravel(), ranks)[ranks]``, as ``values.dtype`` (all
    NaN when ``values`` holds NaN).

    The ranks should be close together (one bracket is formed around all of them); call once per
    cluster of ranks.
    """
    flat = np.asarray(values).ravel()
    wanted = np.asarray(ranks, dtype=np.intp)
    n = flat.size
    if wanted.size == 0 or wanted.min() < 0 or wanted.max() >= n:
        raise ValueError(f"ranks {list(wanted)} out of range for {n} values")
    first, last = int(wanted.min()), int(wanted.max())
    if n < _MIN_SIZE:
        return _full_partition(flat, wanted)
    sample = flat[::STEP].copy()
    m = sample.size
    # sample rank of a rank-r value ~ r m / n with sd sqrt(m p (1 - p)); bracket by 6 sd + 4
    spread = [6.0 * math.sqrt(m * p * (1 - p)) + 4.0 for p in (first / n, last / n)]
    j_low = math.floor(first * m / n - spread[0])
    j_high = math.ceil(last * m / n + spread[1])
    kth = [j for j in (j_low, j_high) if 0 <= j < m]
    if kth:
        sample.partition(kth)
    low = sample[j_low] if 0 <= j_low < m else None
    high = sample[j_high] if 0 <= j_high < m else None
    if low is None and high is None:
        return _full_partition(flat, wanted)
    if low is None:
        inside = flat <= high
        below = 0
        above = int(np.count_nonzero(flat > high))
    elif high is None:
        inside = flat >= low
        below = int(np.count_nonzero(flat < low))
        above = 0
    else:
        inside = (flat >= low) & (flat <= high)
        below = int(np.count_nonzero(flat < low))
        above = int(np.count_nonzero(flat > high))
    band = flat[inside]
    # NaN is neither below, inside nor above: the counts then miss it
    if below + band.size + above != n or below > first or below + band.size <= last:
        return _full_partition(flat, wanted)
    return np.partition(band, wanted - below)[wanted - below]


def _full_partition(flat: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    if np.isnan(flat).any():
        return np.full(wanted.shape, np.nan, dtype=np.result_type(flat.dtype, np.float32))
    return np.partition(flat, wanted)[wanted]


def percentiles(values: np.ndarray, q: Sequence[float]) -> np.ndarray:
    """``np.percentile(values, q)`` (its default linear method), each percentile from the two
    exact order statistics around it; equal to numpy's up to float rounding of the
    interpolation. ``float64``."""
    flat = np.asarray(values).ravel()
    n = flat.size
    out = np.empty(len(q), dtype=np.float64)
    for i, pct in enumerate(q):
        if not 0 <= pct <= 100:
            raise ValueError(f"percentile {pct} is outside 0-100")
        position = pct / 100 * (n - 1)
        rank = min(math.floor(position), n - 1)
        frac = position - rank
        pair = order_statistics(flat, [rank, min(rank + 1, n - 1)]).astype(np.float64)
        diff = pair[1] - pair[0]
        out[i] = pair[0] + diff * frac if frac < 0.5 else pair[1] - diff * (1 - frac)
    return out


def median(values: np.ndarray) -> float:
    """``np.median(values)``: the middle value, or the mean of the two middle ones."""
    flat = np.asarray(values).ravel()
    n = flat.size
    if n == 0:
        raise ValueError("the median of no values is undefined")
    middle = order_statistics(flat, [(n - 1) // 2, n // 2]).astype(np.float64)
    return float(middle.mean())
