"""The exact order statistics behind sr.recover's reject rule agree with numpy's on arrays of
every kind: random, tied, periodic (a lattice), sorted, adversarial to the subsample, with NaN."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from agent.perception.tasks.sr_quantiles import STEP, median, order_statistics, percentiles

QS = (0.1, 99.9)


def _arrays(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    normal = rng.normal(size=n).astype(np.float32)
    fooled = normal.copy()
    fooled[::STEP] = 1e6  # the subsample sees only outliers: the bracket misses every rank
    return {
        "normal": normal,
        "ties": rng.integers(0, 4, n).astype(np.float32),
        "lattice": (np.sin(np.arange(n) * 2 * np.pi / 13.0) ** 2).astype(np.float32),
        "sorted": np.sort(normal),
        "reversed": np.sort(normal)[::-1],
        "fooled": fooled,
        "constant": np.full(n, 2.5, np.float32),
    }


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 64 * STEP + 1, 262_144])
def test_order_statistics_percentiles_and_median_equal_numpys(n: int) -> None:
    for name, a in _arrays(n, n).items():
        for ranks in ([0], [n - 1], [(n - 1) // 2, n // 2], [n // 1000, n // 1000 + 1]):
            ranks = [min(r, n - 1) for r in ranks]
            assert np.array_equal(order_statistics(a, ranks), np.partition(a, ranks)[ranks]), name
        # the order statistics are exact; numpy may interpolate between two in float32
        tol = 4 * float(np.finfo(np.float32).eps) * float(np.max(np.abs(a)))
        np.testing.assert_allclose(
            percentiles(a, QS), np.percentile(a, QS), rtol=0, atol=tol, err_msg=name
        )
        assert median(a) == pytest.approx(float(np.median(a)), rel=1e-7, abs=0), name


def test_an_image_shaped_array_is_read_flattened() -> None:
    a = _arrays(512 * 512, 3)["lattice"].reshape(512, 512)[:, ::-1]  # a non-contiguous view
    np.testing.assert_allclose(percentiles(a, QS), np.percentile(a, QS), rtol=1e-9, atol=1e-9)
    assert median(a) == pytest.approx(float(np.median(a)), rel=1e-7, abs=0)


def test_nan_makes_the_results_nan_as_in_numpy() -> None:
    a = _arrays(262_144, 1)["normal"]
    a[12_345] = np.nan
    assert np.isnan(percentiles(a, QS)).all() and np.isnan(np.percentile(a, QS)).all()
    assert np.isnan(median(a)) and np.isnan(np.median(a))
    assert np.isnan(order_statistics(a[12_300:12_400], [3])).all()


def test_bad_ranks_and_percentiles_raise() -> None:
    a = np.arange(10.0)
    with pytest.raises(ValueError, match="out of range"):
        order_statistics(a, [10])
    with pytest.raises(ValueError, match="outside 0-100"):
        percentiles(a, (101.0,))
    with pytest.raises(ValueError, match="no values"):
        median(np.empty(0))


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        st.integers(1, 5000),
        elements=st.floats(-1e6, 1e6, width=32, allow_nan=False),
    ),
    st.floats(0, 100),
)
def test_any_finite_array_and_percentile(a: np.ndarray, q: float) -> None:
    n = a.size
    rank = int(q / 100 * (n - 1))
    assert order_statistics(a, [rank]) == np.partition(a, rank)[rank]
    expected = float(np.percentile(a, q))
    assert float(percentiles(a, (q,))[0]) == pytest.approx(expected, rel=1e-6, abs=1e-6)
