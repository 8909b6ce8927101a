"""The optional abTEM backend of the HAADF-STEM simulator (simulators.stem_multislice).

The abTEM comparison runs only where abTEM is installed; the specimen hand-over and the missing-
package error are checked everywhere.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest

import simulators.stem
from drivers.errors import ConfigError
from drivers.frame import ScanRegion
from drivers.registry import open_instrument
from drivers.sim_stem import SimulatedSTEM
from simulators.stem import STEMConfig, STEMSimulator
from simulators.stem_multislice import (
    MultisliceResult,
    MultisliceSettings,
    render_simulator,
    specimen_box,
    specimen_columns,
)
from simulators.stem_specimen import SPECIMENS, SpecimenModel

ANG = 1e-10


def _mos2(defect_scale: float) -> SpecimenModel:
    return SpecimenModel(
        SPECIMENS["mos2"](1, None),
        key=7,
        angle_rad=0.4,
        origin_ang=(0.3, -1.1),
        z_exponent=1.7,
        cross_section_ref_ang2=0.19,
        density_scale=defect_scale,
    )


def test_without_abtem_the_backend_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "abtem", None)  # makes `import abtem` raise ImportError
    sim = STEMSimulator(seed=0)
    with pytest.raises(ConfigError, match=r"pip install 'scopepilot\[multislice\]'"):
        render_simulator(sim, ScanRegion(0.0, 0.0, 1e-9, 1e-9), (8, 8))


def test_the_multislice_specimen_holds_the_fast_models_atoms_and_defects() -> None:
    # Dense defects so that every kind occurs; the box's atoms must carry exactly the HAADF
    # cross-section the fast model images (perfect columns plus every defect's change).
    model = _mos2(defect_scale=10.0)
    box = (-20.0, 25.0, -15.0, 30.0)
    xy, columns = specimen_columns(model, *box)
    _, sigma = model.columns_in_box(*box)
    defects = model.defects_in_box(*box)
    assert {"vacancy", "substitution", "adatom"} <= {k.split("_")[-1] for k in defects.kinds}
    expected = sigma.sum() + defects.dsigma_ang2.sum()
    assert sum(model.sigma(c) for c in columns) == pytest.approx(expected, rel=1e-9)
    assert xy.shape == (len(columns), 2)


def test_the_box_places_sulphur_above_and_below_the_metal_plane() -> None:
    model = _mos2(defect_scale=0.0)
    region = ScanRegion(0.0, 0.0, 1.2e-9, 0.8e-9, rotation_deg=30.0)
    atoms = specimen_box(model, region, margin_ang=5.0)
    assert atoms.cell.lengths()[:2] == pytest.approx([22.0, 18.0])
    z_mid = atoms.cell.lengths()[2] / 2
    dz = atoms.positions[:, 2] - z_mid
    assert np.allclose(dz[atoms.numbers == 42], 0.0)
    assert np.allclose(np.abs(dz[atoms.numbers == 16]), 1.595)
    # Two S per Mo in a perfect MoS2 monolayer (up to the box edges).
    ratio = np.sum(atoms.numbers == 16) / np.sum(atoms.numbers == 42)
    assert ratio == pytest.approx(2.0, rel=0.1)


def test_bad_settings_name_the_value() -> None:
    with pytest.raises(ConfigError, match="method='bloch'"):
        MultisliceSettings(method="bloch")
    with pytest.raises(ConfigError, match="detector_mrad"):
        MultisliceSettings(detector_mrad=(200.0, 70.0))


@pytest.mark.slow
def test_abtem_image_matches_the_fast_model_on_mos2() -> None:
    pytest.importorskip("abtem")
    sim = STEMSimulator(STEMConfig(defect_density_scale=0.0), seed=3)
    region = ScanRegion(0.0, 0.0, 12 * 0.3 * ANG, 12 * 0.3 * ANG)
    settings = MultisliceSettings(method="prism", sampling_ang=0.06, margin_ang=4.0)
    result = render_simulator(sim, region, (12, 12), settings=settings)
    fast = sim.scattered_fraction(region, (12, 12))
    assert result.fraction.shape == (12, 12)
    assert np.all(np.isfinite(result.fraction))
    assert np.corrcoef(fast.ravel(), result.fraction.ravel())[0, 1] > 0.9


# -- the backend of sim:stem ---------------------------------------------------------------------


def test_an_unknown_backend_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="backend='bloch'"):
        STEMConfig(backend="bloch")
    with pytest.raises(ConfigError, match="backend"):
        open_instrument("sim:stem", backend=3)


def test_the_multislice_backend_without_abtem_fails_at_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "abtem", None)
    with pytest.raises(ConfigError, match=r"pip install 'scopepilot\[multislice\]'"):
        open_instrument("sim:stem", backend="multislice")
    open_instrument("sim:stem").close()  # the fast backend needs no abTEM


def test_multislice_frames_add_noise_to_a_cached_ideal_render(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # abTEM stands in for the fast model here, so the plumbing is checked without it.
    calls: list[tuple[ScanRegion, tuple[int, int]]] = []

    def fake_render(
        sim: STEMSimulator,
        region: ScanRegion,
        shape_px: tuple[int, int],
        *,
        settings: MultisliceSettings | None = None,
    ) -> MultisliceResult:
        calls.append((region, shape_px))
        no_atoms: Any = None
        assert settings is not None
        return MultisliceResult(sim.scattered_fraction(region, shape_px), no_atoms, settings)

    monkeypatch.setattr(simulators.stem, "import_abtem", lambda: None)
    monkeypatch.setattr(simulators.stem, "render_simulator", fake_render)
    region = ScanRegion(0.0, 0.0, 2e-9, 2e-9)
    inst = SimulatedSTEM(seed=2, backend="multislice", region=region, shape_px=(32, 32))
    sim = inst.simulator
    first, second = inst.acquire(), inst.acquire()
    assert calls == [(region, (32, 32))]  # the same area twice: rendered once
    for frame in (first, second):
        truth = frame.truth
        assert truth is not None and truth.clean is not None
        assert truth.extra["backend"] == "multislice"
        # Ideal positions: the clean truth is the ideal render, drift or not.
        assert np.allclose(truth.clean, sim.render_clean(region, (32, 32)), rtol=1e-5)
        assert not np.allclose(frame.data, truth.clean)  # Poisson and read noise on top
    assert not np.array_equal(first.data, second.data)
    assert inst.info().details["backend"] == "multislice"
    inst.close()


@pytest.mark.slow
def test_a_multislice_frame_of_sim_stem_matches_the_fast_model() -> None:
    pytest.importorskip("abtem")
    config = STEMConfig(defect_density_scale=0.0, backend="multislice", beam_current_A=1e-9)
    sim = STEMSimulator(config, seed=3)
    region = ScanRegion(0.0, 0.0, 16 * 0.3 * ANG, 16 * 0.3 * ANG)
    scan = sim.begin_frame(region, (16, 16), 2e-5)
    data = np.stack([scan.next_line() for _ in range(16)])
    truth = scan.truth()
    clean = truth.clean
    assert clean is not None and truth.extra["backend"] == "multislice"
    fast = sim.scattered_fraction(region, (16, 16))
    assert np.corrcoef(fast.ravel(), clean.ravel())[0, 1] > 0.9
    assert np.corrcoef(fast.ravel(), data.ravel())[0, 1] > 0.9
    # Poisson noise: the residual's variance is about the mean count (gain 1).
    residual = data - clean
    assert np.var(residual) == pytest.approx(clean.mean(), rel=0.35)
    # The same area again is served from the cache, with fresh noise.
    again = sim.begin_frame(region, (16, 16), 2e-5)
    again_clean = again.truth().clean
    assert again_clean is not None and np.array_equal(again_clean, clean)
    assert not np.array_equal(np.stack([again.next_line() for _ in range(16)]), data)
