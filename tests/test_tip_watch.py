"""The line-statistics tip-change detector (agent/perception/tip_watch.py): known answers on
synthetic scans, statelessness, the threshold fit, its file, and its use by the tip watch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter1d

from agent.perception import tip_watch, tip_watch_fit
from agent.perception.registry import WEIGHTS_DIR
from agent.perception.tip_eval import as_frame
from agent.perception.tip_net import TipModel, TipNetAssessor
from agent.perception.tip_watch import (
    FEATURES,
    MIN_SCORED_LINES,
    LineChangeDetector,
    feature_scores,
    fit_thresholds,
)
from drivers.errors import ConfigError, DataError, ModelError
from drivers.frame import TipState

PIXEL_NM = 0.0625


def lattice(lines: int, width: int, shift_nm: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """``(lines, width)`` metres: a 10 pm corrugated hexagonal-ish lattice (0.29 nm) at 0.0625 nm
    per pixel, shifted by ``shift_nm`` (x, y)."""
    y, x = np.mgrid[0:lines, 0:width] * PIXEL_NM
    x, y = x - shift_nm[0], y - shift_nm[1]
    a = 0.29
    return 5e-12 * (
        np.cos(2 * np.pi * x / a)
        + np.cos(np.pi * (x + np.sqrt(3) * y) / a)
        + np.cos(np.pi * (x - np.sqrt(3) * y) / a)
    )


def lattice_scan(seed: int, lines: int = 256, width: int = 256) -> np.ndarray:
    """The lattice with 2 pm line noise and 1 pm white noise, like a good-tip STM frame."""
    rng = np.random.default_rng(seed)
    surface = lattice(lines, width)
    line_noise = 2e-12 * rng.standard_normal((lines, 1))
    return surface + line_noise + 1e-12 * rng.standard_normal((lines, width))


@pytest.fixture(scope="module")
def shipped() -> LineChangeDetector:
    detector = tip_watch.load(WEIGHTS_DIR)
    assert detector is not None, "tip_watch.json is missing beside the tip weights"
    return detector


def first_alarm(detector: LineChangeDetector, scan: np.ndarray, every: int = 4) -> int | None:
    for n in range(16, scan.shape[0] + 1, every):
        if detector.check(scan[:n]) is not None:
            return n
    return None


def test_shipped_detector_is_fitted_and_recorded(shipped: LineChangeDetector) -> None:
    assert set(shipped.thresholds) == set(FEATURES)
    fit = shipped.fit
    assert fit["command"].startswith("python -m agent.perception.tip_watch_fit")
    assert fit["good_scans_alarmed"] <= fit["false_alarm_budget"] == 0.02
    assert TipModel.load().change_detector == shipped


def test_a_height_step_is_detected_at_once_and_a_steady_scan_never(
    shipped: LineChangeDetector,
) -> None:
    for seed in range(3):
        scan = lattice_scan(seed)
        assert first_alarm(shipped, scan) is None
        stepped = scan.copy()
        stepped[120:] += 60e-12  # a second apex 60 pm higher takes over at line 120
        n = first_alarm(shipped, stepped)
        assert n is not None and 120 < n <= 124
        alarm = shipped.check(stepped[:n])
        assert alarm is not None and alarm.feature == "offset" and alarm.line == 121


def test_a_blunted_apex_is_detected_by_the_roughness(shipped: LineChangeDetector) -> None:
    scan = lattice_scan(7)
    blunt = scan.copy()
    blunt[100:] = gaussian_filter1d(scan[100:], 3.0, axis=1) + 0.3e-12
    n = first_alarm(shipped, blunt)
    assert n is not None and 100 < n <= 116
    alarm = shipped.check(blunt[:n])
    assert alarm is not None and alarm.feature == "roughness"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_slow_drift_of_the_corrugation_is_no_change_an_abrupt_one_is(
    shipped: LineChangeDetector, seed: int
) -> None:
    """The surface's corrugation halves over 96 lines (a drift, as over an H:Si(100) region or
    an Au herringbone): never an alarm. The same corrugation drops by 30 % from one line to the
    next at line 120 (a blunted apex): the roughness alarms within 16 lines. Against the whole
    reference alone the drift's shift is the larger one; against the last lines before the
    candidate it is small (``LOCAL_LINES``)."""
    rng = np.random.default_rng(seed)
    surface = lattice(256, 256)
    noise = 2e-12 * rng.standard_normal((256, 1)) + 1e-12 * rng.standard_normal((256, 256))
    drift = np.ones(256)
    drift[100:196] = np.linspace(1.0, 0.5, 96)
    drift[196:] = 0.5
    assert first_alarm(shipped, surface * drift[:, None] + noise) is None
    abrupt = np.where(np.arange(256) < 120, 1.0, 0.7)
    scan = surface * abrupt[:, None] + noise
    n = first_alarm(shipped, scan)
    assert n is not None and 120 < n <= 136
    alarm = shipped.check(scan[:n])
    assert alarm is not None and alarm.feature == "roughness"


@pytest.mark.parametrize("seed", [1, 5])
def test_a_weak_second_apex_is_detected_by_the_joint_score_alone(
    shipped: LineChangeDetector, seed: int
) -> None:
    """A double tip whose second apex is weak (a ghost lattice of 0.18 of the main image, shifted
    by (0.7, 0.4) nm, and a 12 pm height step: 6 line-noise sigma) from line 120: neither the
    step nor the corrugation change crosses its own threshold, their coincidence does. The same
    scan without the tip change never alarms."""
    scan = lattice_scan(seed)
    assert first_alarm(shipped, scan) is None
    double = scan.copy()
    double[120:] += 0.18 * lattice(256, 256, (0.7, 0.4))[120:] + 12e-12
    n = first_alarm(shipped, double)
    assert n is not None and 120 < n <= 136
    alarm = shipped.check(double[:n])
    assert alarm is not None and alarm.feature == "joint" and 120 <= alarm.line <= n
    without = {k: v for k, v in shipped.thresholds.items() if k not in ("joint", "level")}
    assert first_alarm(LineChangeDetector(without), double) is None


@pytest.mark.parametrize("seed", [1, 2])
def test_a_weaker_second_apex_is_detected_by_the_level_score_alone(
    shipped: LineChangeDetector, seed: int
) -> None:
    """A fainter ghost lattice (0.1 of the main image) with a 14 pm height step from line 120:
    the single step (5 sigma of the line-to-line offsets), the corrugation change and their
    coincidence at one step all stay below their thresholds; the level of the lines after the
    change, averaged, against the level before, with the same corrugation change, does not.
    The scan without the change never alarms."""
    scan = lattice_scan(seed)
    assert first_alarm(shipped, scan) is None
    double = scan.copy()
    double[120:] += 0.1 * lattice(256, 256, (0.7, 0.4))[120:] + 14e-12
    n = first_alarm(shipped, double)
    assert n is not None and 120 < n <= 136
    alarm = shipped.check(double[:n])
    assert alarm is not None and alarm.feature == "level" and 120 <= alarm.line <= n
    without = {k: v for k, v in shipped.thresholds.items() if k != "level"}
    assert first_alarm(LineChangeDetector(without), double) is None


def test_a_terrace_edge_ramping_the_level_is_no_level_change(
    shipped: LineChangeDetector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A curved terrace edge crosses the fast axis over 40 lines from line 120: the lines' level
    ramps by 250 pm (an Au(111) step). Without the level score's two conditions (a shift of at
    most LEVEL_CAP_M, carried by the steps into the candidate line and the next) the ramp scores
    as a level change; with them it does not, and the scan never alarms."""
    rng = np.random.default_rng(4)
    rows = np.arange(256)[:, None]
    ramp = 250e-12 * np.clip((rows - 120) / 40, 0.0, 1.0)
    noise = 2e-12 * rng.standard_normal((256, 1)) + 1e-12 * rng.standard_normal((256, 256))
    scan = lattice(256, 256) + ramp + noise
    limit = shipped.thresholds["level"]
    assert np.max(feature_scores(scan)["level"]) < limit
    assert first_alarm(shipped, scan) is None
    monkeypatch.setattr(tip_watch, "LEVEL_CAP_M", np.inf)
    monkeypatch.setattr(tip_watch, "LEVEL_CONCENTRATION", 0.0)
    assert np.max(feature_scores(scan)["level"]) > limit


def test_the_assessor_asks_the_loop_to_watch_as_often_as_its_detector_needs() -> None:
    model = TipModel.load()
    assert TipNetAssessor(model).watch_every_lines == tip_watch.CHECK_EVERY_LINES == 4
    assert TipNetAssessor(TipModel(model.net, model.card)).watch_every_lines == 16


def test_scores_depend_only_on_the_lines_so_far() -> None:
    scan = lattice_scan(3, lines=160)
    scan[90:] += 60e-12
    whole = feature_scores(scan)
    for n in (40, 91, 130):
        part = feature_scores(scan[:n], first=n - 15)
        for name in FEATURES:
            assert np.allclose(part[name][n - 15 :], whole[name][n - 15 : n + 1], rtol=1e-9)
            assert np.all(part[name][: n - 15 - 64] == 0)  # lines long before were not scored
    assert whole["offset"][91] > 10 and np.max(whole["offset"][:90]) < 6


def test_no_line_count_before_the_fitted_ones_is_scored(shipped: LineChangeDetector) -> None:
    """The thresholds are fitted on the scores from line count 16 on; the height-step scores of
    the line counts before (8 to 13 reference lines) alarmed on good lines the fit never saw.
    They are 0 now, so a check over the first 16 lines only sees line count 16: a step into
    line 12 is not flagged there (the scores after it, and the network, are left to see it)."""
    assert tip_watch_fit.MIN_LINES == MIN_SCORED_LINES == 16
    scan = lattice_scan(6, lines=40)
    scan[12:] += 60e-12
    scores = feature_scores(scan)
    for name in FEATURES:
        assert np.all(scores[name][:MIN_SCORED_LINES] == 0)
    assert shipped.check(scan[:16]) is None
    later = scan.copy()
    later[24:] += 60e-12
    alarm = shipped.check(later[:28])
    assert alarm is not None and alarm.feature == "offset" and alarm.line == 25


def test_fit_thresholds_meets_the_budget() -> None:
    rng = np.random.default_rng(0)
    maxima = {name: rng.gamma(3.0, 2.0, 400) for name in FEATURES}
    for budget in (0.01, 0.02, 0.1):
        fit = fit_thresholds(maxima, budget)
        table = np.array([maxima[n] for n in FEATURES])
        limits = np.array([fit["thresholds"][n] for n in FEATURES])
        share = float(np.mean(np.any(table > limits[:, None], axis=0)))
        assert share == pytest.approx(fit["alarm_share"]) and share <= budget
        # not needlessly strict: one step of alpha moves every feature's quantile by one scan,
        # so the share moves by up to one scan per feature
        assert share >= budget - len(FEATURES) / 400
    with pytest.raises(ConfigError):
        fit_thresholds(maxima, 0.0)


def test_detector_file_round_trip_and_bad_files(tmp_path: Path) -> None:
    detector = LineChangeDetector({"offset": 10.0, "roughness": 12.0}, fit={"note": "test"})
    path = tip_watch.save(detector, tmp_path)
    assert tip_watch.load(tmp_path) == detector
    # the label recorded in sessions names the fitted thresholds, not the fit's notes
    loaded = tip_watch.load(tmp_path)
    assert loaded is not None and loaded.label == detector.label
    refit = LineChangeDetector({"offset": 10.0, "roughness": 12.5}, fit={"note": "test"})
    assert refit.label != detector.label and refit.label.startswith(f"{tip_watch.VERSION}+")
    assert LineChangeDetector(detector.thresholds, fit={}).label == detector.label
    obj = json.loads(path.read_text())
    obj["constants"]["ref_lines"] = 99
    path.write_text(json.dumps(obj))
    with pytest.raises(ModelError, match="refit"):
        tip_watch.load(tmp_path)
    # files of older scores (version 1: the roughness against the whole reference only;
    # version 2: no level score) are refused
    obj["constants"]["ref_lines"] = tip_watch.REF_LINES
    for old in ("1", "2"):
        path.write_text(json.dumps({**obj, "version": old}))
        with pytest.raises(ModelError, match="refit"):
            tip_watch.load(tmp_path)
    path.write_text("{")
    with pytest.raises(ModelError, match="JSON"):
        tip_watch.load(tmp_path)
    assert tip_watch.load(tmp_path / "none") is None
    with pytest.raises(ConfigError):
        LineChangeDetector({"offset": -1.0})
    with pytest.raises(ConfigError):
        LineChangeDetector({"colour": 1.0})


def test_bad_lines_are_data_errors(shipped: LineChangeDetector) -> None:
    scan = lattice_scan(1, lines=40)
    scan[30, 5] = np.nan
    with pytest.raises(DataError, match="non-finite"):
        shipped.check(scan)
    with pytest.raises(DataError, match="lines"):
        shipped.check(np.zeros((40, 4)))
    assert shipped.check(lattice_scan(1, lines=9)) is None  # too few lines for a reference


def test_the_watch_aborts_on_a_change_the_network_alone_does_not_flag() -> None:
    """The assessor's watch with the detector names a bad state at the change; the same
    network without it (its recent read-out and fitted ``watch_p_bad``) does not."""
    model = TipModel.load()
    assert model.change_detector is not None
    without = TipModel(model.net, model.card)
    scan = lattice_scan(11)
    scan[150:] += 60e-12
    flagged = []
    for watcher in (TipNetAssessor(model), TipNetAssessor(without)):
        seen = [watcher.watch(as_frame(scan, PIXEL_NM, n)) for n in range(144, 168, 4)]
        flagged.append([e is not None and e.state is not TipState.GOOD for e in seen])
    assert flagged[0][:2] == [False, False] and all(flagged[0][2:])  # 144, 148: before
    assert not any(flagged[1])
    est = TipNetAssessor(model).watch(as_frame(scan, PIXEL_NM, 156))
    assert est is not None and est.features["change_line"] == 151
    assert est.uncertainty == pytest.approx(est.probabilities[TipState.GOOD])
    assert "tip change" in est.source
