"""DFT-backed STM: the cube reader and constant-current images from a cube LDOS."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import brentq

from drivers.errors import DataError
from drivers.frame import ScanRegion, TipState
from simulators.cube import ANGSTROM_M, BOHR_M, CubeData, parse_cube, read_cube
from simulators.stm_dft import DEFAULT_CUBE_GAP_M, GRAPHENE_CUBE, CubeSTM, synthetic_cube
from simulators.stm_tip import Apex, TipConfig

A_GRAPHENE_M = 2.46e-10


def _cube_text(
    counts: tuple[int, int, int] = (2, 3, 4),
    steps: tuple[float, float, float] = (0.5, 0.5, 0.4),
    values: list[str] | None = None,
    origin: tuple[float, float, float] = (0.0, 0.0, 1.0),
) -> str:
    n = abs(counts[0] * counts[1] * counts[2])
    vals = values if values is not None else [f"{0.1 * (i + 1):.4e}" for i in range(n)]
    lines = ["comment one", "comment two", f"1 {origin[0]} {origin[1]} {origin[2]}"]
    for i, (c, s) in enumerate(zip(counts, steps, strict=True)):
        v = [0.0, 0.0, 0.0]
        v[i] = s
        lines.append(f"{c} {v[0]} {v[1]} {v[2]}")
    lines.append("6 0.0 0.1 0.2 0.3")
    lines += [" ".join(vals[k : k + 6]) for k in range(0, len(vals), 6)]
    return "\n".join(lines) + "\n"


# -- reader ----------------------------------------------------------------------------------


def test_cube_round_trip_through_ase(tmp_path: Path) -> None:
    from ase import Atoms
    from ase.io import write
    from ase.io.cube import read_cube_data

    rng = np.random.default_rng(0)
    data = rng.random((5, 6, 7))
    atoms = Atoms("CO", positions=[(1.0, 1.0, 2.0), (1.0, 1.0, 3.1)], cell=[3.0, 3.6, 4.2])
    path = tmp_path / "x.cube"
    write(path, atoms, data=data)  # ase writes Bohr (positive counts)
    cube = read_cube(path)
    ref, _ = read_cube_data(str(path))
    assert cube.data.shape == (5, 6, 7)
    np.testing.assert_allclose(cube.data, ref)
    np.testing.assert_allclose(cube.data, data, rtol=1e-5)
    np.testing.assert_allclose(cube.cell_m, np.diag([3.0, 3.6, 4.2]) * 1e-10, rtol=1e-6)
    np.testing.assert_allclose(cube.positions_m, atoms.positions * 1e-10, rtol=1e-6)
    assert cube.atomic_numbers.tolist() == [6, 8]
    assert cube.source == str(path)


def test_cube_units_follow_the_sign_of_the_counts() -> None:
    bohr = parse_cube(_cube_text((2, 3, 4)))
    angstrom = parse_cube(_cube_text((-2, -3, -4)))
    assert bohr.shape == angstrom.shape == (2, 3, 4)
    assert bohr.axes_m[0, 0] == pytest.approx(0.5 * BOHR_M)
    assert angstrom.axes_m[0, 0] == pytest.approx(0.5 * ANGSTROM_M)
    assert angstrom.origin_m[2] == pytest.approx(1.0 * ANGSTROM_M)
    assert angstrom.positions_m[0].tolist() == pytest.approx([1e-11, 2e-11, 3e-11], rel=1e-9, abs=0)
    # z is the fastest index
    assert bohr.data[0, 0, 1] == pytest.approx(0.2)
    assert bohr.data[0, 1, 0] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        (_cube_text(values=["1.0"] * 23), ["truncated", "23", "24"]),
        (_cube_text(values=["1.0"] * 25), ["too long", "25", "24"]),
        (_cube_text(counts=(2, 0, 4)), ["n2=0"]),
        (_cube_text(counts=(2, -3, 4)), ["[2, -3, 4]", "mix signs"]),
        (_cube_text(values=["1.0"] * 5 + ["nan"] + ["1.0"] * 18), ["nan", "(0, 1, 1)"]),
        (_cube_text(values=["1.0"] * 5 + ["inf"] + ["1.0"] * 18), ["inf"]),
        (_cube_text(values=["1.0"] * 5 + ["x1"] + ["1.0"] * 18), ["'x1'", "not a number"]),
        (_cube_text(steps=(0.5, 0.0, 0.4)), ["axis 2", "zero length"]),
        ("a\nb\n1 0 0 0\n", ["3 lines"]),
    ],
)
def test_malformed_cube_raises_naming_the_value(text: str, names: list[str]) -> None:
    with pytest.raises(DataError) as err:
        parse_cube(text, name="bad.cube")
    msg = str(err.value)
    assert "bad.cube" in msg
    for name in names:
        assert name in msg


def test_missing_cube_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_cube(tmp_path / "nope.cube")


def _with_axes(cube: CubeData, axes_m: np.ndarray) -> CubeData:
    return CubeData(
        cube.origin_m, axes_m, cube.data, cube.atomic_numbers, cube.positions_m, source="t.cube"
    )


def test_cube_that_is_not_a_slab_is_refused() -> None:
    cube = synthetic_cube()
    tilted = cube.axes_m.copy()
    tilted[2, 0] = 0.3 * tilted[2, 2]  # third axis leans out of the surface normal
    with pytest.raises(DataError, match=r"axis 3 .* not normal to the surface plane"):
        CubeSTM(_with_axes(cube, tilted))
    upright = cube.axes_m.copy()
    upright[0, 2] = upright[0, 0]  # first axis leaves the surface plane
    with pytest.raises(DataError, match=r"axis 1 .* leaves the surface"):
        CubeSTM(_with_axes(cube, upright))
    flipped = cube.data[:, :, ::-1]  # LDOS grows towards the top: no vacuum there
    bad = CubeData(cube.origin_m, cube.axes_m, flipped, cube.atomic_numbers, cube.positions_m)
    with pytest.raises(DataError, match="does not decay into the vacuum"):
        CubeSTM(bad)


# -- imaging (synthetic LDOS) ------------------------------------------------------------------


def test_atoms_appear_as_maxima_and_tile_periodically() -> None:
    stm = CubeSTM(synthetic_cube(), gap_m=2.4e-10)
    a = 2.88e-10
    region = ScanRegion(width_m=4 * a, height_m=4 * a * math.sqrt(3) / 2)
    img = stm.render_region(region, (64, 64))
    shifted = stm.render_region(region.moved_to(a, 0.0), (64, 64))
    np.testing.assert_allclose(shifted, img, atol=1e-14)
    on_atom = stm.render_region(ScanRegion(width_m=1e-12, height_m=1e-12), (1, 1))[0, 0]
    hollow = stm.render_region(ScanRegion(a / 2, a / (2 * math.sqrt(3)), 1e-12, 1e-12), (1, 1))[
        0, 0
    ]
    assert on_atom > hollow + 1e-12
    assert on_atom == pytest.approx(float(img.max()), abs=2e-13)


def test_higher_setpoint_brings_the_tip_closer() -> None:
    cube = synthetic_cube()
    region = ScanRegion(width_m=2e-9, height_m=2e-9)
    heights = [
        float(CubeSTM(cube, conductance_ratio=r).render_region(region, (32, 32)).mean())
        for r in (0.1, 1.0, 10.0)
    ]
    assert heights[0] > heights[1] > heights[2]
    assert abs(heights[1]) < 5e-12  # the reference conductance puts the tip at gap_m
    # Far from the atoms the lattice sum of exp(-alpha r) is its G = 0 term (Poisson),
    # ~ (1 + alpha h) exp(-alpha h): a decade less current lifts the tip from h0 = gap to h1
    alpha, h0 = 2 * 1.05e10, DEFAULT_CUBE_GAP_M

    def log_rho(h: float) -> float:
        return math.log1p(alpha * h) - alpha * h

    h1 = brentq(lambda h: log_rho(h) - log_rho(h0) + math.log(10.0), h0, h0 + 5e-10)
    assert heights[0] - heights[1] == pytest.approx(h1 - h0, rel=0.02)


def test_double_tip_repeats_features_at_the_apex_offset() -> None:
    cube = synthetic_cube()
    stm = CubeSTM(cube, gap_m=2.4e-10)
    a = 2.88e-10
    region = ScanRegion(width_m=6 * a, height_m=6 * a)
    good = stm.render_region(region, (48, 48))
    double = TipConfig(1, TipState.MULTIPLE, (Apex(), Apex(a / 2, 0.0, 0.0, 1.0)))
    img = stm.render_region(region, (48, 48), double)
    assert not np.allclose(img, good, atol=1e-13)
    # with the second apex a whole lattice vector away the tip sees twice the LDOS: exactly
    # the image of a single apex at half the setpoint
    same = TipConfig(2, TipState.MULTIPLE, (Apex(), Apex(a, 0.0, 0.0, 1.0)))
    lifted = stm.render_region(region, (48, 48), same)
    half = CubeSTM(cube, gap_m=2.4e-10, conductance_ratio=0.5).render_region(region, (48, 48))
    assert float(np.mean(lifted - good)) > 2e-11
    np.testing.assert_allclose(lifted, half, atol=1e-14)
    # a second apex half a lattice vector away fills the hollows: less corrugation
    assert np.ptp(img) < 0.8 * np.ptp(good)


# -- the shipped DFT cube ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def graphene() -> CubeSTM:
    return CubeSTM.from_file(GRAPHENE_CUBE)


def test_shipped_cube_is_a_real_graphene_calculation() -> None:
    cube = read_cube(GRAPHENE_CUBE)
    assert GRAPHENE_CUBE.stat().st_size < 2_000_000
    assert "GPAW" in cube.comment[0]
    assert sorted(set(cube.atomic_numbers.tolist())) == [6]
    cell = cube.cell_m
    assert cell[0, 0] == pytest.approx(A_GRAPHENE_M, rel=1e-4)
    assert cell[1, 1] == pytest.approx(A_GRAPHENE_M * math.sqrt(3), rel=1e-4)


def test_images_from_the_dft_cube_show_the_graphene_lattice(graphene: CubeSTM) -> None:
    # 16 x 9 rectangular cells (a x a sqrt(3)) on 256 x 256 pixels: every lattice frequency
    # k = (m / a, n / b) falls on the FFT bin (row 9 n, column 16 m).
    a, b = A_GRAPHENE_M, A_GRAPHENE_M * math.sqrt(3)
    region = ScanRegion(center_x_m=0.37e-9, center_y_m=-0.81e-9, width_m=16 * a, height_m=9 * b)
    img = graphene.render_region(region, (256, 256)).astype(np.float64)
    assert np.all(np.isfinite(img))
    assert 5e-12 < np.ptp(img) < 1e-10  # a real corrugation, below an ångström
    power = np.abs(np.fft.fft2(img - img.mean())) ** 2
    signed = (np.arange(256) + 128) % 256 - 128
    n = np.where(signed % 9 == 0, signed // 9, 999)[:, None]  # 999: not a lattice row
    m = np.where(signed % 16 == 0, signed // 16, 999)[None, :]
    on_cell = (n != 999) & (m != 999)
    # graphene's hexagonal reciprocal lattice is the rectangular one with m + n even
    hexagonal = on_cell & ((n + m) % 2 == 0)
    cell_only = on_cell & ~hexagonal
    total = float(power.sum())
    assert power[hexagonal].sum() > 0.999 * total  # periodic with the graphene lattice
    assert power[cell_only].max() < 1e-3 * power.max()  # not merely with the DFT cell
    # the fundamental, |k| = 1 / (a sqrt(3) / 2): the first-shell peaks (±1/a, ±1/b) are
    # strong (the (0, ±2/b) pair, equal to them by C3 symmetry in an exact calculation, is
    # weak here: the 12 x 7 rectangular k-mesh samples the Dirac cones anisotropically)
    shell = [(9, 16), (9, 240), (247, 16), (247, 240)]
    first = np.array([power[i, j] for i, j in shell])
    assert first.min() > 0.1 * power.max()
    k = np.hypot(signed[:, None] / region.height_m, signed[None, :] / region.width_m)
    strong = (power > 0.05 * power.max()) & (k > 0)
    assert float(k[strong].min()) == pytest.approx(
        1.0 / (A_GRAPHENE_M * math.sqrt(3) / 2), rel=1e-9
    )


def test_dft_images_are_periodic_under_rotation_and_deterministic(graphene: CubeSTM) -> None:
    region = ScanRegion(width_m=3e-9, height_m=3e-9, rotation_deg=23.0)
    img = graphene.render_region(region, (128, 128))
    again = CubeSTM.from_file(GRAPHENE_CUBE).render_region(region, (128, 128))
    np.testing.assert_array_equal(img, again)
    # translating by a primitive lattice vector of graphene (not a cell vector) changes nothing
    a = A_GRAPHENE_M
    moved = region.moved_to(a / 2, a * math.sqrt(3) / 2)
    diff = np.abs(graphene.render_region(moved, (128, 128)) - img)
    assert float(diff.max()) < 0.01 * float(np.ptp(img))


def test_dft_setpoint_moves_the_tip(graphene: CubeSTM) -> None:
    region = ScanRegion(width_m=1e-9, height_m=1e-9)
    low = CubeSTM.from_file(GRAPHENE_CUBE, conductance_ratio=0.1).render_region(region, (16, 16))
    high = CubeSTM.from_file(GRAPHENE_CUBE, conductance_ratio=10.0).render_region(region, (16, 16))
    ref = graphene.render_region(region, (16, 16))
    # a decade of current is ~0.6 Å here (graphene's states near K decay fast, ~3.6 / Å)
    assert float(low.mean()) > float(ref.mean()) + 3e-11
    assert float(ref.mean()) > float(high.mean()) + 3e-11
    assert abs(float(ref.mean())) < 0.1e-10  # the reference conductance puts the tip at gap_m


def test_cube_simulator_scans_the_dft_sample_with_the_parent_machinery() -> None:
    from simulators.stm_dft import CubeSTMSimulator

    region = ScanRegion(width_m=2e-9, height_m=2e-9)
    sims = [CubeSTMSimulator(seed=3) for _ in range(2)]
    frames = []
    for sim in sims:
        scan = sim.begin_frame(region, (32, 32), 1e-3)
        frames.append(np.stack([scan.next_line() for _ in range(32)]))
        truth = scan.truth()
        assert truth.clean is not None and truth.clean.shape == (32, 32)
        same_place = sim.render_clean(region, (32, 32)).ravel()  # up to drift
        assert np.corrcoef(truth.clean.ravel(), same_place)[0, 1] > 0.9
        assert truth.defects == ()
    np.testing.assert_array_equal(frames[0], frames[1])  # seeded determinism
    clean = sims[0].render_clean(region, (32, 32))
    direct = CubeSTM.from_file(GRAPHENE_CUBE).render_region(region, (32, 32))
    np.testing.assert_allclose(clean, direct, atol=1e-15)
    # the noisy frame follows the clean image (drift and noise are the parent's)
    assert np.corrcoef(frames[0].ravel(), clean.ravel())[0, 1] > 0.5
