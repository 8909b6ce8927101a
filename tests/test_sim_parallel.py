"""The STM model's background worker changes speed, never results."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest

from drivers.frame import ScanRegion, TipState
from simulators.parallel import run_in_background
from simulators.stm import STMSimulator
from simulators.stm_config import STMConfig
from simulators.stm_grid import Grid


@pytest.mark.parametrize("surface", ["au111", "hsi100"])
@pytest.mark.parametrize("state", [TipState.GOOD, TipState.MULTIPLE, TipState.BLUNT])
def test_split_render_is_bit_identical_to_one_piece(surface: str, state: TipState) -> None:
    sim = STMSimulator(STMConfig(surface=surface), seed=4)
    sim.set_tip(state)
    scan = sim.begin_frame(ScanRegion(0, 0, 12e-9, 12e-9), (96, 96), 1e-3)
    grid = Grid(scan._rows_m, scan._step_m, 96)
    config = sim.tip_config
    split = sim._ldos.render(grid, config)  # 96 rows: two halves, one on the worker
    whole = sim._ldos._render_part(grid, config)
    assert split.shape == (96, 96)
    assert np.array_equal(split, whole)


def _frame_mean(seed: int) -> float:
    sim = STMSimulator(seed=seed)
    scan = sim.begin_frame(ScanRegion(0, 0, 8e-9, 8e-9), (64, 64), 1e-3)
    while not scan.done:
        scan.next_line()
    return float(scan.data.mean())


# Python >= 3.12 warns about fork() in a process with threads; forking is what this test checks.
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_forked_child_gets_its_own_worker() -> None:
    run_in_background(int).result()  # make sure the parent's worker thread exists
    expected = [_frame_mean(1), _frame_mean(2)]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        got = pool.map(_frame_mean, [1, 2])
    assert got == expected
