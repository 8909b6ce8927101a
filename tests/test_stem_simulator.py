"""Known-answer physics tests of the HAADF-STEM forward model (simulators.stem)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from drivers.errors import CommandRejected, ConfigError
from drivers.frame import ScanRegion, TipState
from simulators.scan_patterns import sampling_mask
from simulators.stem import DEFECT_CLASSES, STEMConfig, STEMSimulator, wavelength_m
from simulators.stem_probe import ProbeOptics, probe_profile
from simulators.stem_render import ScanGeometry

ANG = 1e-10
STILL = {"drift_m_per_s": 0.0, "line_jitter_m": 0.0, "flyback_amplitude_m": 0.0}


def _scan(sim: STEMSimulator, region: ScanRegion, shape: tuple[int, int], dwell_s: float, **kw):
    scan = sim.begin_frame(region, shape, dwell_s, **kw)
    data = np.stack([scan.next_line() for _ in range(shape[0])])
    return data, scan.truth(), scan


# -- optics ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kv", "lam_ang"), [(80, 0.0418), (200, 0.0251), (300, 0.0197)])
def test_relativistic_wavelength(kv: float, lam_ang: float) -> None:
    assert wavelength_m(kv * 1e3) / ANG == pytest.approx(lam_ang, abs=1e-4)


def test_aberration_free_probe_shrinks_as_the_aperture_opens() -> None:
    widths = [probe_profile(ProbeOptics(80e3, a, 0.0, 0.0)).fwhm_ang for a in (10e-3, 20e-3, 30e-3)]
    assert widths[0] > widths[1] > widths[2]
    # Airy disc: FWHM of |psi|^2 = 0.514 lambda / alpha.
    lam = wavelength_m(80e3) / ANG
    assert widths[1] == pytest.approx(0.514 * lam / 20e-3, rel=0.03)


def test_with_spherical_aberration_the_probe_is_smallest_at_an_optimal_aperture() -> None:
    # Cs = 1.2 mm at 80 kV, no defocus: optimum near (lambda / Cs)^(1/4) = 7.7 mrad.
    d50 = {a: probe_profile(ProbeOptics(80e3, a, 0.0, 1.2e-3)).d50_ang for a in (3e-3, 7e-3, 15e-3)}
    assert d50[3e-3] > d50[7e-3] < d50[15e-3]
    assert d50[15e-3] > 3 * d50[7e-3]  # aberrations dominate well past the optimum


# -- contrast, lattice, defects --------------------------------------------------------------------


@pytest.mark.parametrize("n", [1.7, 2.0])
def test_z_contrast_of_mo_and_s2_columns(n: float) -> None:
    cfg = STEMConfig(lattice_angle_deg=0.0, defect_density_scale=0.0, z_exponent=n)
    sim = STEMSimulator(cfg, seed=1)
    model = sim._model
    cell = model.origin_ang + 3 * model.cell_ang[0] + 3 * model.cell_ang[1]
    sites = np.array(
        [cell + model.basis_ang[0], cell + model.basis_ang[1], cell + model.interstitial_ang[0]]
    )
    geom = ScanGeometry(sites, np.zeros((1, 2)), np.array([0.0, 1.0]), np.array([1.0, 0.0]), (1, 1))
    mo, s2, hollow = sim._renderer.perfect(geom)[:, 0]
    # Above the empty hollow site, the three sublattices see identical neighbourhoods, so the
    # contrast is the ratio of the column cross-sections: 42^n / (2 16^n).
    assert (mo - hollow) / (s2 - hollow) == pytest.approx(42**n / (2 * 16**n), rel=0.02)


def test_mos2_lattice_period_in_the_fft() -> None:
    cfg = STEMConfig(lattice_angle_deg=0.0, defect_density_scale=0.0)
    sim = STEMSimulator(cfg, seed=2)
    size = 128 * 0.5 * ANG
    image = sim.render_clean(ScanRegion(0.0, 0.0, size, size), (128, 128))
    spectrum = np.abs(np.fft.rfft2(image - image.mean()))
    ky = np.fft.fftfreq(128, d=0.5)
    kx = np.fft.rfftfreq(128, d=0.5)
    iy, ix = np.unravel_index(np.argmax(spectrum), spectrum.shape)
    k_peak = math.hypot(ky[iy], kx[ix])
    k_lattice = 2 / (math.sqrt(3) * 3.19)  # first ring of the hexagonal lattice, 1/2.76 Å
    assert k_peak == pytest.approx(k_lattice, abs=1.5 / (128 * 0.5))


def test_fast_model_matches_the_brute_force_fft_convolution() -> None:
    for specimen in ("mos2", "srtio3"):
        sim = STEMSimulator(STEMConfig(specimen=specimen, defect_density_scale=5.0), seed=3)
        region = ScanRegion(10 * ANG, -5 * ANG, 24 * ANG, 24 * ANG)
        fast = sim.scattered_fraction(region, (96, 96))
        reference = sim.render_reference(region, (96, 96))
        assert np.corrcoef(fast.ravel(), reference.ravel())[0, 1] > 0.9999
        assert np.max(np.abs(fast - reference)) < 0.01 * reference.max()


def test_defects_appear_where_the_truth_says() -> None:
    cfg = STEMConfig(lattice_angle_deg=0.0, defect_density_scale=4.0, **STILL)
    sim = STEMSimulator(cfg, seed=4)
    region = ScanRegion(0.0, 0.0, 48 * ANG, 48 * ANG)
    _data, truth, _ = _scan(sim, region, (192, 192), 2e-6)
    clean, classes = truth.clean, truth.extra["class_mask"]
    kinds = {d.kind for d in truth.defects}
    assert {"w_substitution", "s_vacancy"} <= kinds
    # Regular Mo columns: local maxima of the clean image that are not defects.
    peak = clean == np.maximum.reduce(
        [np.roll(clean, (dr, dc), (0, 1)) for dr in (-1, 0, 1) for dc in (-1, 0, 1)]
    )
    mo_level = np.percentile(clean[peak & (classes == 0)], 90)
    for d in truth.defects:
        r, c = round(d.row_px), round(d.col_px)
        if not (2 <= r < 190 and 2 <= c < 190):
            continue
        assert DEFECT_CLASSES[classes[r, c]] in d.kind or classes[r, c] > 0
        if d.kind == "w_substitution":
            assert clean[r, c] > 1.8 * mo_level  # (74 / 42)^1.7 = 2.6 times the cross-section
    vacancies = [d for d in truth.defects if d.kind == "mo_vacancy"]
    for d in vacancies:
        assert clean[round(d.row_px), round(d.col_px)] < 0.5 * mo_level


def test_class_mask_marks_every_defect_and_nothing_else() -> None:
    cfg = STEMConfig(defect_density_scale=3.0, **STILL)
    _data, truth, _ = _scan(
        STEMSimulator(cfg, seed=5), ScanRegion(0, 0, 4e-9, 4e-9), (80, 80), 2e-6
    )
    classes = truth.extra["class_mask"]
    names = truth.extra["class_names"]
    inside = [d for d in truth.defects if 0 <= round(d.row_px) < 80 and 0 <= round(d.col_px) < 80]
    assert inside
    for d in inside:
        klass = names[classes[round(d.row_px), round(d.col_px)]]
        assert klass in {"vacancy", "substitution", "adatom"}
        assert klass in d.kind or (klass == "vacancy" and "vacancy" in d.kind)
    # A disc of class_radius (0.8 Å at 0.5 Å pixels) holds a handful of pixels per defect.
    assert 0 < np.count_nonzero(classes) <= 12 * len(truth.defects)


# -- dose and noise --------------------------------------------------------------------------------


def test_halving_the_dwell_doubles_the_relative_noise_variance() -> None:
    region = ScanRegion(0.0, 0.0, 32 * ANG, 32 * ANG)
    rel = []
    for dwell in (4e-6, 2e-6):
        sim = STEMSimulator(STEMConfig(**STILL), seed=6)
        data, truth, _ = _scan(sim, region, (128, 128), dwell)
        rel.append(np.mean((data - truth.clean) ** 2) / np.mean(truth.clean) ** 2)
    assert rel[1] / rel[0] == pytest.approx(2.0, rel=0.1)


def test_counts_follow_the_dose() -> None:
    sim = STEMSimulator(STEMConfig(read_noise_counts=0.0, **STILL), seed=7)
    data, _truth, scan = _scan(sim, ScanRegion(0, 0, 3.2e-9, 3.2e-9), (64, 64), 2e-6)
    # 30 pA x 2 us = 374 electrons per pixel; a MoS2 monolayer sends ~3 % to the detector.
    assert scan.electrons_per_px == pytest.approx(30 * 2 * 6.2415, rel=1e-3)
    assert np.mean(data) == pytest.approx(0.03 * scan.electrons_per_px, rel=0.15)
    assert np.all(data == np.round(data))  # gain 1, no read noise: whole electrons


# -- scanning --------------------------------------------------------------------------------------


def test_a_shifted_scan_region_shifts_the_image() -> None:
    sim = STEMSimulator(STEMConfig(**STILL), seed=8)
    px = 0.25 * ANG
    a = sim.render_clean(ScanRegion(0.0, 0.0, 64 * px, 64 * px), (64, 64))
    b = sim.render_clean(ScanRegion(5 * px, 3 * px, 64 * px, 64 * px), (64, 64))
    # +x moves columns left by 5, +y (slow axis) moves rows up by 3.
    np.testing.assert_allclose(b[:-3, :-5], a[3:, 5:], rtol=1e-4, atol=1e-3)
    assert not np.allclose(a, b, rtol=1e-2)


def test_line_time_and_simulated_clock() -> None:
    cfg = STEMConfig(flyback_s=50e-6)
    sim = STEMSimulator(cfg, seed=9)
    scan = sim.begin_frame(ScanRegion(0, 0, 3.2e-9, 3.2e-9), (32, 64), 2e-6)
    scan.next_line()
    assert sim.time_s == pytest.approx(64 * 2e-6 + 50e-6)
    assert scan.frame_time_s == pytest.approx(32 * (64 * 2e-6 + 50e-6))


def test_drift_moves_the_specimen_between_frames_in_simulated_time() -> None:
    cfg = STEMConfig(drift_m_per_s=1e-9, line_jitter_m=0.0, flyback_amplitude_m=0.0)
    sim = STEMSimulator(cfg, seed=10)
    region = ScanRegion(0.0, 0.0, 4e-9, 4e-9)
    _, first, _ = _scan(sim, region, (64, 64), 2e-6)
    sim.advance(1.0)
    _, second, _ = _scan(sim, region, (64, 64), 2e-6)
    dx, dy = sim.offset_m(second.extra["t_start_s"])
    dx0, dy0 = sim.offset_m(first.extra["t_start_s"])
    moved = {(d.x_m, d.y_m): (d.row_px, d.col_px) for d in first.defects}
    pairs = [
        (moved[(d.x_m, d.y_m)], (d.row_px, d.col_px))
        for d in second.defects
        if (d.x_m, d.y_m) in moved
    ]
    assert pairs
    px = 4e-9 / 64
    for (r0, c0), (r1, c1) in pairs:
        # The specimen drifts by +d under the beam; it appears at -d in the image.
        assert c1 - c0 == pytest.approx(-float(dx - dx0) / px, abs=0.3)
        assert r1 - r0 == pytest.approx(-float(dy - dy0) / px, abs=0.3)


def test_flyback_distorts_only_the_start_of_each_line() -> None:
    cfg = STEMConfig(drift_m_per_s=0.0, line_jitter_m=0.0, flyback_amplitude_m=2e-10)
    sim = STEMSimulator(cfg, seed=11)
    region = ScanRegion(0.0, 0.0, 4e-9, 4e-9)
    _, truth, _ = _scan(sim, region, (64, 64), 2e-6)
    ideal = sim.render_clean(region, (64, 64), dwell_s=2e-6)
    diff = np.abs(truth.clean - ideal).max(axis=0)
    # The lag, 2 Å exp(-t / 15 us), is 1.9 Å at the first pixel and 0.001 Å at the last ones.
    assert diff[:3].min() > 0.05 * ideal.max()
    assert diff[-8:].max() < 0.01 * diff[:3].min()
    assert np.all(np.diff(diff[::8]) < 0)  # fading along the line


def test_same_seed_same_frames() -> None:
    region = ScanRegion(0.0, 0.0, 3e-9, 3e-9)
    runs = []
    for _ in range(2):
        sim = STEMSimulator(seed=12)
        runs.append(_scan(sim, region, (48, 48), 1e-6)[:2])
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1].clean, runs[1][1].clean)
    assert runs[0][1].defects == runs[1][1].defects
    other = _scan(STEMSimulator(seed=13), region, (48, 48), 1e-6)[0]
    assert not np.array_equal(runs[0][0], other)


def test_truth_has_no_tip_and_the_frame_units() -> None:
    sim = STEMSimulator(seed=14)
    data, truth, _ = _scan(sim, ScanRegion(0, 0, 2e-9, 2e-9), (32, 32), 2e-6)
    assert truth.tip_state is TipState.GOOD and truth.usable
    assert truth.clean.dtype == np.float32 and truth.clean.shape == data.shape
    assert abs(float(np.mean(data)) / float(np.mean(truth.clean)) - 1) < 0.1


# -- partial scans ---------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["random", "lines", "spiral"])
@pytest.mark.parametrize("fraction", [0.05, 0.25])
def test_partial_scan_masks(pattern: str, fraction: float) -> None:
    shape = (96, 128)
    mask = sampling_mask(pattern, fraction, shape, np.random.default_rng(0))
    assert mask.shape == shape and mask.dtype == bool
    tolerance = 1 / shape[0] if pattern == "lines" else 1 / mask.size
    assert mask.mean() == pytest.approx(fraction, abs=tolerance + 1e-12)
    rows = mask.any(axis=1)
    if pattern == "lines":
        assert np.all(mask[rows]) and rows.sum() == round(fraction * shape[0])
    elif pattern == "spiral":
        assert mask[47:49, 63:65].any()  # starts at the centre
        assert rows.mean() > 0.5  # reaches most rows
    else:
        assert rows.mean() > 0.9


@pytest.mark.parametrize("pattern", ["random", "lines", "spiral"])
def test_partial_scan_data_are_nan_exactly_where_unsampled(pattern: str) -> None:
    sim = STEMSimulator(seed=15)
    data, truth, _ = _scan(
        sim, ScanRegion(0, 0, 3e-9, 3e-9), (64, 64), 2e-6, pattern=pattern, fraction=0.1
    )
    mask = truth.extra["sampling_mask"]
    np.testing.assert_array_equal(np.isfinite(data), mask)
    assert np.all(np.isfinite(truth.clean))
    assert truth.extra["pattern"] == pattern and truth.extra["fraction"] == 0.1


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"specimen": "unobtainium"}, "unobtainium"),
        ({"dopant": "Xx"}, "Xx"),
        ({"beam_current_A": -30e-12}, "beam_current_A"),
        ({"z_exponent": 3.5}, "z_exponent"),
        ({"convergence_rad": float("nan")}, "convergence_rad"),
        ({"thickness_cells": 0}, "thickness_cells"),
        ({"voltage_V": "80kV"}, "voltage_V"),
    ],
)
def test_nonsense_configuration_is_a_config_error_naming_the_value(
    options: dict[str, object], named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        STEMConfig(**options)  # type: ignore[arg-type]


def test_nonsense_scan_requests_are_rejected() -> None:
    sim = STEMSimulator(seed=16)
    region = ScanRegion(0, 0, 2e-9, 2e-9)
    with pytest.raises(CommandRejected, match="dwell_s"):
        sim.begin_frame(region, (32, 32), -1e-6)
    with pytest.raises(CommandRejected, match="shape_px"):
        sim.begin_frame(region, (0, 32), 1e-6)
    with pytest.raises(CommandRejected, match="fraction"):
        sim.begin_frame(region, (32, 32), 1e-6, pattern="random", fraction=0.0)
    assert sim.time_s == 0.0
