"""Known-answer physics and contract tests of the STM forward model (simulators.stm)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from drivers.errors import CommandRejected, ConfigError, LimitViolation
from drivers.frame import Defect, GroundTruth, ScanRegion, TipState
from simulators.stm import DEFAULT_FRAME_TIME_S, STMConfig, STMSimulator

QUIET = {
    "drift_m_per_s": 0.0,
    "white_noise_m_per_sqrt_hz": 0.0,
    "flicker_noise_m_per_decade": 0.0,
    "line_noise_m": 0.0,
    "degradation_rate_per_s": 0.0,
    "bad_tip_change_rate_per_s": 0.0,
}
A = 1e-10  # one ångström


def quiet(**kw: object) -> STMConfig:
    return STMConfig(**{**QUIET, **kw})  # type: ignore[arg-type]


def scan(
    sim: STMSimulator,
    region: ScanRegion,
    shape: tuple[int, int] = (128, 128),
    dwell_s: float = 1e-3,
) -> tuple[np.ndarray, GroundTruth]:
    frame = sim.begin_frame(region, shape, dwell_s)
    rows = [frame.next_line() for _ in range(shape[0])]
    assert frame.done
    return np.stack(rows), frame.truth()


def plane_level(z: np.ndarray) -> np.ndarray:
    yy, xx = np.mgrid[: z.shape[0], : z.shape[1]]
    basis = np.c_[xx.ravel(), yy.ravel(), np.ones(z.size)]
    coef, *_ = np.linalg.lstsq(basis, z.ravel().astype(np.float64), rcond=None)
    return np.asarray(z - (basis @ coef).reshape(z.shape))


def strongest_period_m(z: np.ndarray, pixel_m: float, min_freq_per_m: float) -> float:
    """Real-space period of the strongest Fourier peak above ``min_freq_per_m``."""
    win = np.outer(np.hanning(z.shape[0]), np.hanning(z.shape[1]))
    power = np.abs(np.fft.fft2(plane_level(z) * win)) ** 2
    fy = np.fft.fftfreq(z.shape[0], pixel_m)[:, None]
    fx = np.fft.fftfreq(z.shape[1], pixel_m)[None, :]
    f = np.hypot(fx, fy)
    power[f < min_freq_per_m] = 0.0
    k = np.unravel_index(np.argmax(power), power.shape)
    return float(1.0 / f[k])


# -- configuration and arguments ---------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"surface": "graphite"},
        {"kappa_per_m": -1.0},
        {"degradation_rate_per_s": float("nan")},
        {"bias_V": 0.0},
        {"gap_m": 5e-9},
        {"initial_tip": "wobbly"},
        {"drift_m_per_s": -1e-12},
        {"creep_fraction": 0.9},
        {"setpoint_A": "100 pA"},
    ],
)
def test_bad_config_raises_config_error_naming_the_value(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as err:
        STMConfig(**bad)  # type: ignore[arg-type]
    name = next(iter(bad))
    assert name in str(err.value) or str(bad[name]) in str(err.value)


def test_bad_seed_and_arguments_are_rejected_without_side_effects() -> None:
    with pytest.raises(ConfigError):
        STMSimulator(seed=-3)
    sim = STMSimulator(quiet(), seed=1)
    with pytest.raises(CommandRejected):
        sim.pulse(float("nan"), 0.2)
    with pytest.raises(CommandRejected):
        sim.dip(-1e-9, 0.02)
    with pytest.raises(CommandRejected):
        sim.begin_frame(ScanRegion(), (0, 64), 1e-3)
    with pytest.raises(CommandRejected):
        sim.begin_frame(ScanRegion(), (64, 64), 0.0)
    with pytest.raises(LimitViolation):
        sim.move_to(5e-6, 0.0)
    assert sim.time_s == 0.0 and sim.position_m == (0.0, 0.0) and sim.damage_sites_m == ()
    frame = sim.begin_frame(ScanRegion(), (4, 8), 1e-3)
    for _ in range(4):
        frame.next_line()
    with pytest.raises(CommandRejected):
        frame.next_line()


def test_lines_are_float32_metres_and_time_is_simulated() -> None:
    sim = STMSimulator(seed=2)
    frame = sim.begin_frame(ScanRegion(), (32, 64), 2e-3)
    line = frame.next_line()
    assert line.shape == (64,) and line.dtype == np.float32 and np.all(np.isfinite(line))
    assert sim.time_s == pytest.approx(2 * 64 * 2e-3)  # trace + retrace
    assert abs(float(np.median(line))) < 5 * A


# -- determinism and laziness ------------------------------------------------------------------


def _session(seed: int) -> list[np.ndarray]:
    sim = STMSimulator(seed=seed)
    out = []
    frame = sim.begin_frame(ScanRegion(), (48, 48), 1e-3)
    out += [frame.next_line() for _ in range(20)]
    out.append(np.array([float(v) for v in sim.pulse(4.0, 0.2).values() if isinstance(v, float)]))
    out += [frame.next_line() for _ in range(28)]
    sim.advance(30.0)
    sim.move_to(40e-9, -20e-9)
    data, truth = scan(sim, ScanRegion(40e-9, -20e-9, 10e-9, 10e-9), (48, 48))
    assert truth.clean is not None
    return [*out, data, truth.clean, np.array([truth.damaged_fraction])]


def test_same_seed_gives_bit_identical_frames_and_different_seed_does_not() -> None:
    a, b, c = _session(7), _session(7), _session(8)
    assert len(a) == len(b)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_lazy_tiles_give_the_same_atoms_whatever_the_visiting_order() -> None:
    regions = [
        ScanRegion(100e-9, -50e-9, 12e-9, 12e-9),
        ScanRegion(-300e-9, 200e-9, 12e-9, 12e-9),
        ScanRegion(31e-9, 33e-9, 12e-9, 12e-9),
    ]  # the last straddles tile corners

    def visit(order: list[int]) -> dict[int, tuple[np.ndarray, tuple[object, ...]]]:
        sim = STMSimulator(quiet(defect_density_per_nm2=0.2), seed=5)
        out = {}
        for i in order:
            truth = sim.begin_frame(regions[i], (64, 64), 1e-3).truth()
            out[i] = (sim.render_clean(regions[i], (64, 64)), truth.defects)
        return out

    first, second = visit([0, 1, 2]), visit([2, 1, 0])
    for i in range(3):
        assert np.array_equal(first[i][0], second[i][0])
        assert first[i][1] == second[i][1]
    assert len(first[2][1]) > 5


def test_a_region_split_in_halves_matches_the_whole() -> None:
    sim = STMSimulator(quiet(defect_density_per_nm2=0.2, terrace_width_m=10e-9), seed=9)
    whole = sim.render_clean(ScanRegion(32e-9, 0.0, 8e-9, 4e-9), (64, 128))
    left = sim.render_clean(ScanRegion(30e-9, 0.0, 4e-9, 4e-9), (64, 64))
    right = sim.render_clean(ScanRegion(34e-9, 0.0, 4e-9, 4e-9), (64, 64))
    np.testing.assert_allclose(np.hstack([left, right]), whole, atol=3e-13)


# -- imaging physics -----------------------------------------------------------------------------


def test_good_tip_au111_shows_the_hexagonal_lattice_period() -> None:
    sim = STMSimulator(
        STMConfig(drift_m_per_s=0.0, degradation_rate_per_s=0.0, defect_density_per_nm2=0.0), seed=3
    )
    data, _ = scan(sim, ScanRegion(0, 0, 12e-9, 12e-9), (256, 256))
    period = strongest_period_m(data, 12e-9 / 256, 1 / (6 * A))
    # Rows of a hexagonal lattice with nearest neighbour 2.88 Å are 2.88 · √3/2 = 2.494 Å apart.
    assert period == pytest.approx(2.88 * A * np.sqrt(3) / 2, rel=0.03)


def test_good_tip_hsi100_shows_dimer_rows_7p68_angstrom_apart() -> None:
    sim = STMSimulator(
        quiet(surface="hsi100", defect_density_per_nm2=0.0, terrace_width_m=1e-6), seed=3
    )
    data, _ = scan(sim, ScanRegion(0, 0, 12e-9, 12e-9), (128, 128))
    assert strongest_period_m(data, 12e-9 / 128, 1 / (20 * A)) == pytest.approx(7.68 * A, rel=0.04)


@pytest.mark.parametrize(("surface", "step_m"), [("au111", 2.35 * A), ("hsi100", 1.36 * A)])
def test_monatomic_step_height(surface: str, step_m: float) -> None:
    sim = STMSimulator(
        quiet(
            surface=surface,
            defect_density_per_nm2=0.0,
            terrace_width_m=7e-9,
            herringbone_amplitude_m=0.0,
        ),
        seed=4,
    )
    sim.set_tip(TipState.BLUNT)  # smooths away the atomic corrugation, keeps the terraces
    data, _ = scan(sim, ScanRegion(0, 0, 20e-9, 20e-9), (128, 128))
    counts, edges = np.histogram(
        data, bins=np.arange(data.min() - 0.2 * A, data.max() + 0.2 * A, 0.05 * A)
    )
    centres = 0.5 * (edges[1:] + edges[:-1])
    smooth = np.convolve(counts, np.ones(3) / 3, mode="same")
    peaks = [
        i
        for i in range(1, smooth.size - 1)
        if smooth[i] >= smooth[i - 1]
        and smooth[i] > smooth[i + 1]
        and counts[i - 1 : i + 2].sum() > 0.05 * data.size
    ]
    levels = centres[peaks]
    assert len(levels) >= 2
    np.testing.assert_allclose(np.diff(levels), step_m, atol=0.12 * A)


def test_multiple_tip_repeats_features_at_the_apex_offset() -> None:
    cfg = quiet(defect_density_per_nm2=0.06, herringbone_amplitude_m=0.0)
    region = ScanRegion(0, 0, 16e-9, 16e-9)
    good, _ = scan(STMSimulator(cfg, seed=12), region, (256, 256))
    sim = STMSimulator(cfg, seed=12)
    offset = (1.2e-9, 0.5e-9)  # second apex: 1.2 nm along x, 0.5 nm along y, 0.3 Å higher
    sim.set_tip(TipState.MULTIPLE, apexes_m=[(0.0, 0.0, 0.0), (*offset, 0.3 * A)])
    double, truth = scan(sim, region, (256, 256))
    assert truth.tip_state is TipState.MULTIPLE
    pixel = 16e-9 / 256
    shift = np.array([offset[1], offset[0]]) / pixel  # (row, col) = (8, 19.2) px
    pos = np.array([[d.row_px, d.col_px] for d in truth.defects])
    checked = 0
    for d in truth.defects:
        if d.kind != "adatom":
            continue
        ghost = np.array([d.row_px, d.col_px]) + shift
        if np.any(ghost < 6) or np.any(ghost > 249):
            continue
        if np.min(np.hypot(*(pos - ghost).T)) * pixel < 1.0e-9:
            continue  # another defect too close to tell them apart
        r, c = np.rint(ghost).astype(int)
        window = double[r - 4 : r + 5, c - 4 : c + 5]
        peak = np.add(np.unravel_index(np.argmax(window), window.shape), (r - 4, c - 4))
        assert np.all(np.abs(peak - ghost) <= 1.0), (peak, ghost)
        local = np.median(double[r - 12 : r + 13, c - 12 : c + 13])
        assert double[tuple(peak)] - local > 0.5 * A  # a ghost adatom where none is
        assert good[tuple(peak)] - np.median(good[r - 12 : r + 13, c - 12 : c + 13]) < 0.2 * A
        checked += 1
    assert checked >= 2


def test_blunt_tip_loses_the_atomic_corrugation_first() -> None:
    cfg = quiet(defect_density_per_nm2=0.0)
    region = ScanRegion(0, 0, 8e-9, 8e-9)

    def lattice_power(z: np.ndarray) -> float:
        win = np.outer(np.hanning(128), np.hanning(128))
        power = np.abs(np.fft.fft2(plane_level(z) * win)) ** 2
        f = np.hypot(*np.meshgrid(np.fft.fftfreq(128, 8e-9 / 128), np.fft.fftfreq(128, 8e-9 / 128)))
        return float(power[(f > 0.3 / A) & (f < 0.5 / A)].sum())

    good, _ = scan(STMSimulator(cfg, seed=6), region)
    sim = STMSimulator(cfg, seed=6)
    sim.set_tip(TipState.BLUNT)
    blunt, _ = scan(sim, region)
    assert lattice_power(blunt) < 1e-3 * lattice_power(good)
    # Long-wavelength structure (the herringbone) survives.
    assert np.ptp(gaussian_filter(blunt, 8)) > 0.3 * np.ptp(gaussian_filter(good, 8))


def test_crashed_tip_gives_a_nearly_flat_saturated_image() -> None:
    sim = STMSimulator(seed=13)
    sim.set_tip(TipState.CRASHED)
    data, truth = scan(sim, ScanRegion(), (64, 64))
    assert np.all(np.isfinite(data))
    assert 0.0 < float(np.std(data)) < 0.2 * A
    assert float(np.mean(data)) > sim.config.z_limit_m - 6e-9
    assert truth.tip_state is TipState.CRASHED
    assert truth.clean is not None and np.all(np.isfinite(truth.clean))


def _line_jumps(z: np.ndarray) -> int:
    steps = np.median(np.diff(z.astype(np.float64), axis=0), axis=1)
    return int(np.sum(np.abs(steps) > 0.15 * A))


def test_unstable_tip_shows_discontinuities_between_lines() -> None:
    cfg = STMConfig(
        degradation_rate_per_s=0.0, bad_tip_change_rate_per_s=0.0, unstable_switch_rate_per_s=2.0
    )
    region = ScanRegion(0, 0, 16e-9, 16e-9)
    good, _ = scan(STMSimulator(cfg, seed=21), region)
    sim = STMSimulator(cfg, seed=21)
    sim.set_tip(TipState.UNSTABLE)
    unstable, truth = scan(sim, region)
    assert _line_jumps(good) == 0
    assert _line_jumps(unstable) >= 3
    assert truth.tip_state is TipState.UNSTABLE and int(truth.extra["apex_switches"]) >= 3


def test_white_noise_variance_doubles_when_dwell_halves() -> None:
    cfg = quiet(white_noise_m_per_sqrt_hz=9e-14)
    variances = []
    for dwell in (1e-3, 0.5e-3):
        data, truth = scan(STMSimulator(cfg, seed=30), ScanRegion(), (128, 128), dwell)
        assert truth.clean is not None
        variances.append(float(np.var(data.astype(np.float64) - truth.clean)))
    assert variances[1] / variances[0] == pytest.approx(2.0, rel=0.06)
    assert variances[0] == pytest.approx(9e-14**2 / (2 * 1e-3), rel=0.05, abs=0)


def test_noise_free_frame_without_drift_is_the_clean_render() -> None:
    sim = STMSimulator(quiet(), seed=31)
    region = ScanRegion(5e-9, -3e-9, 10e-9, 10e-9, rotation_deg=30.0)
    data, truth = scan(sim, region, (64, 64))
    np.testing.assert_allclose(data, sim.render_clean(region, (64, 64)), atol=1e-14)
    assert truth.clean is not None
    np.testing.assert_allclose(data, truth.clean, atol=1e-14)


def test_drift_distorts_the_frame_and_truth_follows_it() -> None:
    cfg = quiet(drift_m_per_s=5e-9 / 60, defect_density_per_nm2=0.1)  # 2.8 nm over the frame
    sim = STMSimulator(cfg, seed=32)
    region = ScanRegion(0, 0, 10e-9, 10e-9)
    nominal = sim.render_clean(region, (128, 128))
    data, truth = scan(sim, region)
    assert truth.clean is not None
    np.testing.assert_allclose(data, truth.clean, atol=1e-14)  # clean lines up with the data
    top = slice(100, 128)
    assert np.abs(data[top] - nominal[top]).max() > 0.5 * A  # late lines have moved
    # Defect pixels are where the drifted scan saw them.
    adatoms = [d for d in truth.defects if d.kind == "adatom"]
    assert adatoms
    for d in adatoms:
        r, c = round(d.row_px), round(d.col_px)
        patch = data[max(r - 3, 0) : r + 4, max(c - 3, 0) : c + 4]
        assert data[r, c] >= patch.max() - 0.5 * A


def test_defect_truth_positions_sit_on_the_features() -> None:
    sim = STMSimulator(quiet(defect_density_per_nm2=0.1), seed=33)
    data, truth = scan(sim, ScanRegion(0, 0, 16e-9, 16e-9), (160, 160))
    pos = np.array([[d.row_px, d.col_px] for d in truth.defects])
    pixel = 16e-9 / 160

    def isolated(d: Defect) -> bool:  # no other defect within 1.2 nm
        dist = np.hypot(pos[:, 0] - d.row_px, pos[:, 1] - d.col_px) * pixel
        return int(np.sum(dist < 1.2e-9)) == 1

    adatoms = [d for d in truth.defects if d.kind == "adatom" and isolated(d)]
    vacancies = [d for d in truth.defects if d.kind == "vacancy" and isolated(d)]
    assert len(adatoms) >= 3 and len(vacancies) >= 3
    for d in adatoms:
        r, c = round(d.row_px), round(d.col_px)
        patch = data[max(r - 4, 0) : r + 5, max(c - 4, 0) : c + 5]
        assert data[r, c] >= patch.max() - 0.3 * A
        assert data[r, c] > np.median(data) + 0.8 * A
    for d in vacancies:
        r, c = round(d.row_px), round(d.col_px)
        assert data[r, c] < np.median(data) - 0.4 * A


def test_retracted_tip_reads_the_z_limit_until_it_approaches() -> None:
    sim = STMSimulator(seed=34)
    sim.retract()
    assert sim.tip_retracted
    with pytest.raises(CommandRejected):
        sim.pulse(4.0, 0.2)
    data, truth = scan(sim, ScanRegion(), (8, 32))
    assert np.all(np.abs(data - sim.config.z_limit_m) < 1e-10)
    assert truth.extra["retracted_lines"] == 8
    sim.approach()
    data, _ = scan(sim, ScanRegion(), (8, 32))
    assert np.all(np.abs(data) < 1e-9)


# -- tip dynamics, conditioning, damage ----------------------------------------------------------


def test_tip_change_between_lines_shows_in_the_remaining_lines() -> None:
    sim = STMSimulator(quiet(), seed=40)
    frame = sim.begin_frame(ScanRegion(), (64, 64), 1e-3)
    for _ in range(40):
        frame.next_line()
    sim.set_tip(TipState.CRASHED)
    while not frame.done:
        frame.next_line()
    truth = frame.truth()
    assert truth.tip_states == (TipState.GOOD, TipState.CRASHED)
    assert truth.tip_state is TipState.GOOD  # the majority of lines
    assert truth.extra["lines_per_state"] == {"good": 40, "crashed": 24}
    assert np.all(frame.data[40:] > 1e-7) and np.all(np.abs(frame.data[:40]) < 1e-9)
    assert not truth.usable


def test_good_tip_lasts_about_twenty_default_frames() -> None:
    sim = STMSimulator(seed=41)
    lives = []
    first_bad = set()
    for _ in range(400):
        sim.set_tip(TipState.GOOD)
        frames = 0
        while sim.tip_state is TipState.GOOD:
            sim.advance(DEFAULT_FRAME_TIME_S)
            frames += 1
        lives.append(frames)
        first_bad.add(sim.tip_state)
    assert np.mean(lives) == pytest.approx(20.5, rel=0.15)
    assert first_bad == {TipState.MULTIPLE, TipState.BLUNT, TipState.UNSTABLE, TipState.CRASHED}


def test_never_conditioning_leaves_a_bad_tip_bad() -> None:
    still_bad = 0
    for seed in range(40):
        sim = STMSimulator(seed=seed, config=STMConfig(initial_tip=TipState.BLUNT))
        sim.advance(30 * DEFAULT_FRAME_TIME_S)
        still_bad += sim.tip_state is not TipState.GOOD
    assert still_bad >= 38


def _fix_rate(action: str, state: TipState, n: int = 200) -> tuple[float, set[str]]:
    fixed, outcomes = 0, set()
    for seed in range(n):
        sim = STMSimulator(quiet(initial_tip=state), seed=1000 + seed)
        detail = sim.dip(5e-9, 0.02) if action == "dip5nm" else sim.pulse(2.5, 0.2)
        outcomes.add(str(detail["tip_after"]))
        fixed += detail["tip_after"] == "good"
        assert detail["tip_before"] == state.value and sim.time_s > 0.2
    return fixed / n, outcomes


def test_conditioning_is_stochastic_and_depends_on_the_action() -> None:
    dip, dip_outcomes = _fix_rate("dip5nm", TipState.BLUNT)
    pulse, pulse_outcomes = _fix_rate("pulse2.5V", TipState.BLUNT)
    assert dip > pulse + 0.3  # dips are the cure for a blunt tip
    assert len(dip_outcomes) >= 3 and len(pulse_outcomes) >= 2  # outcomes vary
    small_pulse_fix, _ = _fix_rate("pulse2.5V", TipState.MULTIPLE)
    assert 0.15 < small_pulse_fix < 0.5  # small pulses fix a double tip sometimes


def test_damage_shows_in_a_later_scan_of_the_area_and_not_elsewhere() -> None:
    sim = STMSimulator(quiet(), seed=50)
    here, away = ScanRegion(0, 0, 16e-9, 16e-9), ScanRegion(300e-9, 0, 16e-9, 16e-9)
    before, t0 = scan(sim, here)
    away_before = sim.render_clean(away, (128, 128))
    assert t0.damaged_fraction == 0.0
    detail = sim.pulse(4.0, 0.2)
    assert 10e-9 <= float(detail["damage_radius_m"]) <= 25e-9  # type: ignore[arg-type]
    sim.set_tip(TipState.GOOD)
    after, t1 = scan(sim, here)
    assert t1.damaged_fraction > 0.9
    assert not t1.usable
    assert np.sqrt(np.mean((after - before) ** 2)) > 1 * A
    assert len(t1.defects) < max(len(t0.defects), 1)
    np.testing.assert_array_equal(sim.render_clean(away, (128, 128)), away_before)
    _, t2 = scan(sim, away)
    assert t2.damaged_fraction == 0.0


def test_conditioning_consumes_simulated_time() -> None:
    sim = STMSimulator(quiet(), seed=51)
    sim.pulse(4.0, 0.2)
    t_pulse = sim.time_s
    assert t_pulse == pytest.approx(0.2 + sim.config.pulse_settle_s)
    sim.move_to(0.0, 100e-9)
    assert sim.time_s == pytest.approx(t_pulse + 100e-9 / sim.config.move_speed_m_per_s)
    t_move = sim.time_s
    sim.dip(2e-9, 0.02)
    assert sim.time_s == pytest.approx(
        t_move + 2 * 2e-9 / sim.config.dip_speed_m_per_s + sim.config.dip_settle_s
    )


def test_config_is_a_frozen_dataclass_with_units_in_names() -> None:
    cfg = STMConfig()
    assert cfg.gap_m == pytest.approx(2.4e-10)  # resolved per surface
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.bias_V = 1.0  # type: ignore[misc]
    unitless = {"surface", "initial_tip", "creep_fraction"}
    for f in dataclasses.fields(STMConfig):
        if f.name not in unitless:
            assert "_" in f.name, f.name
