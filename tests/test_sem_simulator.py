"""Known-answer physics tests of the SEM forward model (simulators/sem.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage

from drivers.errors import CommandRejected, ConfigError, LimitViolation
from drivers.frame import ScanRegion, TipState
from simulators.sem import SEMConfig, SEMSimulator, backscatter_coefficient
from tests.contract.simulator import frame_data

FLAT = {
    "particle_densities_per_um2": (0.0, 0.0, 0.0),
    "pore_density_per_um2": 0.0,
    "groove_depth_m": 0.0,
    "grain_contrast": 0.0,
}
BIG_PARTICLES = {
    "particle_radii_m": (300e-9,),
    "particle_densities_per_um2": (0.3,),
    "particle_aspect_max": 1.0,
    "pore_density_per_um2": 0.0,
    "groove_depth_m": 0.0,
    "grain_contrast": 0.0,
}
REGION = ScanRegion(0.0, 0.0, 4e-6, 4e-6)


def clean(config: SEMConfig, *, seed: int = 1, region: ScanRegion = REGION, n: int = 128):
    return SEMSimulator(config, seed=seed).render_clean(region, (n, n))


def test_dose_is_beam_current_times_dwell_over_e() -> None:
    sim = SEMSimulator(seed=0)
    assert sim.electrons_per_pixel(1e-6) == pytest.approx(100e-12 * 1e-6 / 1.602176634e-19)
    assert sim.electrons_per_pixel(1e-6) == pytest.approx(624.15, rel=1e-4)


def test_flat_substrate_is_uniform_and_tilt_brightens_it_by_sec_theta() -> None:
    flat = clean(SEMConfig(**FLAT))
    assert float(np.ptp(flat)) == pytest.approx(0.0, abs=1e-3 * float(flat.mean()))
    for tilt in (30.0, 60.0):
        tilted = clean(SEMConfig(**FLAT, stage_tilt_deg=tilt))
        ratio = float(tilted.mean() / flat.mean())
        assert ratio == pytest.approx(1.0 / math.cos(math.radians(tilt)), rel=1e-4)


def test_heavier_material_is_brighter_by_its_backscatter_yield() -> None:
    gold = SEMConfig(**BIG_PARTICLES, particle_materials=("Au",), particle_material_weights=(1,))
    oxide = SEMConfig(
        **BIG_PARTICLES, particle_materials=("Al2O3",), particle_material_weights=(1,)
    )
    sim = SEMSimulator(gold, seed=3)
    _, truth = frame_data(sim, REGION, (128, 128), 1e-6)
    mask = np.asarray(truth.extra["particle_mask"])
    assert mask.any()
    centre = scipy.ndimage.distance_transform_edt(mask) >= 4  # flat tops
    assert centre.sum() > 20
    au, ox = clean(gold, seed=3), clean(oxide, seed=3)
    ratio = float(np.median(au[centre] / ox[centre]))
    eta_au, eta_ox = backscatter_coefficient(79.0), backscatter_coefficient(10.65)
    assert ratio == pytest.approx((1 + 3 * eta_au) / (1 + 3 * eta_ox), rel=0.02)
    assert eta_au > 0.45 and 0.1 < backscatter_coefficient(14.0) < 0.2  # Reuter's fit


def test_particle_edges_are_brighter_than_their_flat_centres() -> None:
    config = SEMConfig(**BIG_PARTICLES)
    sim = SEMSimulator(config, seed=4)
    _, truth = frame_data(sim, REGION, (128, 128), 1e-6)
    image = np.asarray(truth.clean)
    mask = np.asarray(truth.extra["particle_mask"])
    dist = scipy.ndimage.distance_transform_edt(mask)
    rim, centre = mask & (dist <= 1.0), dist >= 4
    assert rim.sum() > 20 and centre.sum() > 20
    assert float(np.median(image[rim])) > 1.5 * float(np.median(image[centre]))


def test_a_larger_probe_blurs_edges() -> None:
    found = SEMSimulator(SEMConfig(**BIG_PARTICLES), seed=5).sample.features_in_box(
        "particle", -3e-6, 3e-6, -3e-6, 3e-6
    )
    x_m, y_m, a_m = float(found.x_m[0]), float(found.y_m[0]), float(found.a_m[0])
    region = ScanRegion(x_m + a_m, y_m, 600e-9, 600e-9)  # 4.7 nm pixels across the rim
    sharpness = []
    for probe in (2e-9, 10e-9, 30e-9):
        image = clean(SEMConfig(**BIG_PARTICLES, probe_size_m=probe), seed=5, region=region)
        gy, gx = np.gradient(image.astype(np.float64))
        sharpness.append(float(np.mean(gx**2 + gy**2) / np.var(image)))
    assert sharpness[0] > sharpness[1] > sharpness[2]
    assert sharpness[2] < 0.5 * sharpness[0]


def test_noise_is_poisson_and_its_relative_variance_goes_as_one_over_dwell() -> None:
    config = SEMConfig(**FLAT)
    rel = {}
    for dwell in (1e-6, 0.5e-6, 0.25e-6):
        data, truth = frame_data(SEMSimulator(config, seed=6), REGION, (128, 128), dwell)
        mean = float(np.mean(truth.clean))
        noise = data - truth.clean
        assert float(np.var(noise)) == pytest.approx(mean, rel=0.03)  # Fano factor 1
        assert abs(float(noise.mean())) < 4 * math.sqrt(mean / noise.size)
        rel[dwell] = float(np.var(noise)) / mean**2
    assert rel[0.5e-6] / rel[1e-6] == pytest.approx(2.0, rel=0.05)
    assert rel[0.25e-6] / rel[1e-6] == pytest.approx(4.0, rel=0.05)


def test_detector_gain_scales_counts_and_noise() -> None:
    data, truth = frame_data(
        SEMSimulator(SEMConfig(**FLAT, detector_gain=4.0), seed=7), REGION, (64, 64), 1e-6
    )
    mean = float(np.mean(truth.clean))
    assert float(np.var(data - truth.clean)) == pytest.approx(4.0 * mean, rel=0.06)


def _charging_residuals(charging: bool) -> tuple[float, float, float, list[float]]:
    config = SEMConfig(
        **BIG_PARTICLES,
        particle_materials=("Al2O3",),
        particle_material_weights=(1.0,),
        charging=charging,
        charge_deflection_m_per_um2=0.0,
    )
    sim = SEMSimulator(config, seed=8)
    residual = np.zeros((128, 128))
    for _ in range(4):
        data, truth = frame_data(sim, REGION, (128, 128), 1e-6)
        residual += (data - truth.clean) / 4
    mask = np.asarray(truth.extra["particle_mask"])
    grown = scipy.ndimage.binary_dilation(mask, iterations=2)
    right = np.zeros_like(mask)
    left = np.zeros_like(mask)
    for k in range(3, 12):  # a band 3..11 px after / before the particles along the fast axis
        right[:, k:] |= mask[:, :-k]
        left[:, :-k] |= mask[:, k:]
    right &= ~grown
    left &= ~grown
    noise_se = float(np.sqrt(np.mean(truth.clean) / 4 / right.sum()))
    shift = list(truth.extra.get("charge_shift_m", []))
    return float(residual[right].mean()), float(residual[left].mean()), noise_se, shift


def test_charging_streaks_appear_after_insulators_only_when_enabled() -> None:
    right, left, se, _ = _charging_residuals(charging=False)
    assert abs(right) < 5 * se and abs(left) < 5 * se
    right, left, se, _ = _charging_residuals(charging=True)
    # 8 standard errors: clearly significant for every seed tried (12-20 se), while the same
    # statistic stays under 5 se without charging
    assert right > 8 * se, "no bright streak after the charged particles"
    assert right > 5 * abs(left), "streaks must trail the particles along the fast scan"


def test_charging_deflects_lines_progressively() -> None:
    config = SEMConfig(
        **BIG_PARTICLES,
        particle_materials=("SiO2",),
        particle_material_weights=(1.0,),
        charging=True,
    )
    sim = SEMSimulator(config, seed=9)
    shifts = []
    for _ in range(3):
        _, truth = frame_data(sim, REGION, (64, 64), 1e-6)
        shifts.append(truth.extra["charge_shift_m"])
    first, last = np.asarray(shifts[0]), np.asarray(shifts[-1])
    assert first[0] == 0.0 and np.all(np.diff(first) >= 0) and first[-1] > 0
    assert last[0] >= first[-1] * 0.9  # the charge stays between frames (slow leak)
    sim.advance(10 * config.charge_leak_s)
    _, truth = frame_data(sim, REGION, (64, 64), 1e-6)
    assert truth.extra["charge_shift_m"][0] < 0.01 * last[-1]  # ... and leaks away


def test_ground_truth_lists_particles_and_pores_on_their_pixels() -> None:
    sim = SEMSimulator(seed=10)
    _, truth = frame_data(sim, REGION, (128, 128), 1e-6)
    assert truth.tip_state is TipState.GOOD and truth.usable
    kinds = {d.kind for d in truth.defects}
    assert kinds == {"particle", "pore"}
    mask = np.asarray(truth.extra["particle_mask"])
    assert mask.dtype == np.bool_ and mask.shape == (128, 128)
    hits = [mask[round(d.row_px), round(d.col_px)] for d in truth.defects if d.kind == "particle"]
    assert np.mean(hits) > 0.8  # small or overlapped ones may miss their centre pixel


def test_sample_is_the_same_whichever_way_it_is_generated() -> None:
    sim = SEMSimulator(seed=11)
    big = sim.sample.features_in_box("particle", -3e-6, 3e-6, -3e-6, 3e-6)
    small = sim.sample.features_in_box("particle", 0.0, 1e-6, 0.0, 1e-6)
    common = np.intersect1d(big.id, small.id)
    assert common.size > 0
    for pid in common:
        i, j = np.nonzero(big.id == pid)[0][0], np.nonzero(small.id == pid)[0][0]
        assert big.x_m[i] == small.x_m[j] and big.a_m[i] == small.a_m[j]
    far = sim.render_clean(ScanRegion(45e-6, -45e-6, 2e-6, 2e-6), (64, 64))
    assert np.all(np.isfinite(far)) and float(np.std(far)) > 0


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("beam_current_A", -1e-12, "beam_current_A"),
        ("probe_size_m", -2e-9, "probe_size_m"),
        ("default_dwell_s", 0.0, "default_dwell_s"),
        ("max_fov_m", 200e-6, "larger than the stage"),
        ("substrate", "unobtainium", "unobtainium"),
        ("particle_materials", ("Au", "kryptonite"), "kryptonite"),
        ("particle_radii_m", (1e-8,), "one entry per size class"),
        ("collection_efficiency", 1.5, "collection_efficiency"),
        ("drift_m_per_s", math.nan, "drift_m_per_s"),
        ("charging", "yes", "charging"),
    ],
)
def test_bad_config_is_a_config_error_naming_the_value(
    option: str, value: object, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        SEMConfig(**{option: value})


def test_bad_scan_requests_are_refused() -> None:
    sim = SEMSimulator(seed=12)
    with pytest.raises(CommandRejected, match="dwell_s"):
        sim.begin_frame(REGION, (64, 64), -1e-6)
    with pytest.raises(CommandRejected, match="shape_px"):
        sim.begin_frame(REGION, (0, 64), 1e-6)
    with pytest.raises(LimitViolation, match="field of view"):
        sim.begin_frame(ScanRegion(0, 0, 200e-6, 200e-6), (64, 64), 1e-6)
    with pytest.raises(LimitViolation):
        sim.move_to(60e-6, 0.0)
    assert sim.time_s == 0.0 and sim.position_m == (0.0, 0.0)
