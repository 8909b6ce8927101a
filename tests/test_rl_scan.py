"""Scan planning: the sparse-patch STEM sample, the environment, its baselines and the deployed
``rl-scan`` policy (tiny configurations)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from agent.cli import main
from drivers.errors import CommandRejected, ConfigError, DataError, ModelError
from drivers.frame import ScanRegion
from drivers.registry import open_instrument
from policies.base import Policy, make_policy
from policies.env_scan import ScanEnvConfig, ScanPlanningEnv
from policies.rl_net import PolicyNet, save_policy
from policies.scan_eval import (
    random_scan_chooser,
    rule_scan_chooser,
    run_raster_episode,
    run_scan_episode,
)
from policies.scan_map import (
    SURVEY,
    SURVEY_COST,
    ZOOM,
    ScanMap,
    bright_pixels,
    detect_dopants,
    scan_n_actions,
    scan_obs_dim,
)
from policies.scan_policy import SCAN_WEIGHTS, RLScanPolicy
from simulators.stem import STEMConfig, STEMSimulator

ROOT = Path(__file__).resolve().parents[1]
TINY = ScanEnvConfig(grid=2, budget=6, patch_density_per_um2=200.0)
PATCHY = {"defect_density_scale": 0.005, "patch_density_per_um2": 20.0}


def _frame_data(sim: STEMSimulator, region: ScanRegion, px: int, dwell_s: float) -> tuple:
    scan = sim.begin_frame(region, (px, px), dwell_s)
    rows = []
    while not scan.done:
        rows.append(scan.next_line())
    return np.array(rows), scan.truth()


# -- the simulator's patches -----------------------------------------------------------------


def test_patches_are_off_by_default_and_leave_frames_unchanged() -> None:
    region = ScanRegion(0.0, 0.0, 3.2e-9, 3.2e-9)
    a, _ = _frame_data(STEMSimulator(seed=4), region, 32, 2e-6)
    b, _ = _frame_data(STEMSimulator(STEMConfig(patch_radius_m=30e-9), seed=4), region, 32, 2e-6)
    assert np.array_equal(a, b)
    assert STEMSimulator(seed=4).patch_centres_m(-1e-6, 1e-6, -1e-6, 1e-6).shape == (0, 2)
    with pytest.raises(ConfigError, match="patch_density_per_um2"):
        STEMConfig(patch_density_per_um2=-1.0)


def test_patches_are_sparse_dense_in_dopants_and_placed_lazily() -> None:
    sim = STEMSimulator(STEMConfig(**PATCHY), seed=3)
    big = sim.patch_centres_m(-1e-6, 1e-6, -1e-6, 1e-6)
    # a Poisson process of 20 per µm² over 4 µm² (plus the 15 nm rim)
    assert 50 <= big.shape[0] <= 115
    small = sim.patch_centres_m(-100e-9, 100e-9, -100e-9, 100e-9)
    for c in small:  # the same patches, whichever box asks first
        assert np.min(np.hypot(*(big - c).T)) < 1e-15
    centre = big[np.argmin(np.hypot(*big.T))]
    inside = sim.scattered_fraction(ScanRegion(*centre, 3.2e-9, 3.2e-9), (64, 64))
    _, truth_in = _frame_data(sim, ScanRegion(*centre, 3.2e-9, 3.2e-9), 64, 1e-6)
    far = centre + 300e-9 * (1 if centre[0] < 0 else -1)
    while np.min(np.hypot(*(big - far).T)) < 50e-9:
        far = far + 40e-9
    _, truth_out = _frame_data(sim, ScanRegion(*far, 3.2e-9, 3.2e-9), 64, 1e-6)
    n_in = sum(d.kind == "w_substitution" for d in truth_in.defects)
    n_out = sum(d.kind == "w_substitution" for d in truth_out.defects)
    # 3.2 nm field: ~117 Mo sites, 15 % substituted inside, 0.005 % outside
    assert n_in >= 8 and n_out <= 1
    assert inside.shape == (64, 64)


# -- the map and its detectors ---------------------------------------------------------------


def test_survey_counts_bright_pixels_on_a_patch_and_none_off_it() -> None:
    sim = STEMSimulator(STEMConfig(**PATCHY), seed=3)
    centres = sim.patch_centres_m(-400e-9, 400e-9, -400e-9, 400e-9)
    on, _ = _frame_data(sim, ScanRegion(*centres[0], 64e-9, 64e-9), 128, 1e-6)
    off_xy = centres[0] + 130e-9
    while np.min(np.hypot(*(centres - off_xy).T)) < 60e-9:
        off_xy = off_xy + 50e-9
    off, _ = _frame_data(sim, ScanRegion(*off_xy, 64e-9, 64e-9), 128, 1e-6)
    assert bright_pixels(on).sum() >= 8 > bright_pixels(off).sum()
    with pytest.raises(DataError, match="finite"):
        bright_pixels(np.full((8, 8), np.nan))


def test_dopant_detector_matches_ground_truth_on_a_patch() -> None:
    sim = STEMSimulator(STEMConfig(**PATCHY), seed=5)
    centres = sim.patch_centres_m(-300e-9, 300e-9, -300e-9, 300e-9)
    tp = n_det = n_true = 0
    for k in range(6):
        region = ScanRegion(centres[0][0] + k * 1.6e-9, centres[0][1], 1.6e-9, 1.6e-9)
        data, truth = _frame_data(sim, region, 64, 2e-6)
        det = detect_dopants(data)
        gt = np.array([(d.row_px, d.col_px) for d in truth.defects if "substitution" in d.kind])
        n_det += det.shape[0]
        n_true += gt.shape[0]
        if det.shape[0] and gt.shape[0]:
            d = np.hypot(*(det[:, None, :] - gt[None, :, :]).transpose(2, 0, 1))
            tp += int((d.min(axis=1) <= 4.0).sum())
    assert n_true >= 10
    assert tp / n_det >= 0.8 and tp / n_true >= 0.6


def test_map_masks_covered_tiles_the_stage_and_the_budget() -> None:
    m = ScanMap(
        (0.0, 0.0),
        grid=3,
        tile_m=64e-9,
        stage_x_m=(-50e-9, 1e-6),
        stage_y_m=(-1e-6, 1e-6),
        budget=3,
    )
    mask = m.action_masks()
    # tiles of column 0 have centres at x = -64 nm, outside the stage
    assert not mask[SURVEY * 9 + 0] and not mask[SURVEY * 9 + 3]
    assert mask[SURVEY * 9 + 4]
    assert not mask[ZOOM * 9 :].any()  # nothing surveyed yet: nowhere to zoom
    m.tiles[4].surveyed = m.tiles[3].surveyed = True
    mask = m.action_masks()
    assert mask[ZOOM * 9 + 4] and not mask[ZOOM * 9 + 3] and not mask[ZOOM * 9 + 5]
    m.spent = 2  # one unit left: a survey (2 units) no longer fits, a zoom does
    mask = m.action_masks()
    assert not mask[:9].any() and mask[9 + 4]
    with pytest.raises(DataError, match="integer"):
        m.decode(18)
    assert scan_obs_dim(3) == m.observation().shape[0]


# -- the environment -------------------------------------------------------------------------


def test_scan_env_passes_the_gymnasium_checker() -> None:
    env = ScanPlanningEnv(TINY)
    check_env(env, skip_render_check=True)
    env.close()


def _rollout(seed: int) -> list[tuple]:
    env = ScanPlanningEnv(TINY)
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(0)
    out = [(obs.copy(),)]
    while True:
        action = int(rng.choice(np.flatnonzero(env.action_masks())))
        obs, reward, terminated, _, info = env.step(action)
        out.append((obs.copy(), reward, info["found"], info["time_s"], info["kind"]))
        if terminated:
            env.close()
            return out


def test_scan_env_same_seed_same_episode() -> None:
    a, b = _rollout(11), _rollout(11)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x[0], y[0]) and x[1:] == y[1:]
    c = _rollout(12)
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, c, strict=False))


def test_masked_action_raises_and_changes_nothing() -> None:
    env = ScanPlanningEnv(TINY)
    env.reset(seed=1)
    env.step(SURVEY * 4 + 0)  # survey tile 0
    assert env.scan_map.spent == SURVEY_COST
    before = env.scan_map.observation().copy()
    t = env.instrument.state().time_s
    with pytest.raises(CommandRejected, match="masked"):
        env.step(SURVEY * 4 + 0)
    with pytest.raises(CommandRejected, match="integer"):
        env.step(scan_n_actions(2))
    assert np.array_equal(env.scan_map.observation(), before)
    assert env.instrument.state().time_s == t
    env.close()


def test_episode_spends_the_budget_and_rewards_ground_truth_finds() -> None:
    env = ScanPlanningEnv(TINY)
    episode = run_scan_episode(env, rule_scan_chooser(), seed=3, policy="rule")
    assert episode.frames >= TINY.budget // SURVEY_COST
    assert env.scan_map.spent == TINY.budget
    assert episode.true_positives >= episode.found >= 0
    raster = run_raster_episode(env, seed=3)
    assert raster.frames == TINY.budget and raster.surveys == 0
    rnd = run_scan_episode(env, random_scan_chooser(0), seed=3, policy="random")
    assert rnd.dose_As > 0 and rnd.time_s > 0
    env.close()


# -- the deployed policy ---------------------------------------------------------------------


def _untrained(tmp_path: Path, grid: int = 6) -> Path:
    path = tmp_path / "scan.pt"
    net = PolicyNet(scan_obs_dim(grid), scan_n_actions(grid), (8,))
    save_policy(path, "scan", net, {"grid": grid, "tile_m": 64e-9, "budget": 6})
    return path


def test_deployed_policy_scans_valid_frames_and_stops_when_the_budget_is_spent(
    tmp_path: Path,
) -> None:
    policy = RLScanPolicy(_untrained(tmp_path))
    assert isinstance(policy, Policy) and policy.name == "rl-scan"
    from drivers.observation import Observation

    inst = open_instrument(
        "sim:stem",
        seed=2,
        shape_px=(64, 64),
        region=ScanRegion(0.0, 0.0, 1.6e-9, 1.6e-9),
        dwell_s=2e-6,
        lines_per_chunk=1024,
        **PATCHY,
    )
    decisions = []
    for _ in range(12):
        obs = Observation(frame=inst.acquire(), tip=None, state=inst.state(), info=inst.info())
        decision = policy.decide(obs)
        decisions.append(decision)
        if decision.stop:
            break
        (command,) = decision.commands
        inst.execute(command)
    inst.close()
    assert decisions[-1].stop and "budget" in decisions[-1].reason
    assert policy.scan_map is not None and policy.scan_map.spent <= 6
    with pytest.raises(ModelError, match="not a 'scan' policy"):
        RLScanPolicy(ROOT / "policies" / "weights" / "rl_dose.pt")
    with pytest.raises(ConfigError, match="no options"):
        make_policy("rl-scan", weights=str(tmp_path / "scan.pt"), bogus=1)


@pytest.mark.slow
def test_rl_scan_loads_without_gymnasium_or_stable_baselines() -> None:
    code = (
        "import sys; from policies.base import make_policy; make_policy('rl-scan'); "
        "bad = [m for m in ('gymnasium', 'stable_baselines3', 'sb3_contrib') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert SCAN_WEIGHTS.stat().st_size <= 5 * 2**20


@pytest.mark.slow
def test_run_with_rl_scan_against_sim_stem(tmp_path: Path) -> None:
    store = tmp_path / "scan.zarr"
    code = main(
        [
            "run", "--instrument", "sim:stem", "--policy", "rl-scan", "--frames", "5",
            "--out", str(store), "--seed", "3", "--perception", "none",
            "--sim", "patch_density_per_um2=20", "--sim", "defect_density_scale=0.005", "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    from agent.session import Session

    decisions = [e["payload"] for e in Session(str(store)).events("decision")]
    assert decisions and all(d["policy"] == "rl-scan" for d in decisions)
    scans = [c for d in decisions for c in d["commands"] if c["type"] == "Scan"]
    assert len(scans) == len(decisions)


@pytest.mark.slow
def test_evaluate_policy_scan_compares_with_raster(tmp_path: Path) -> None:
    weights = _untrained(tmp_path)
    out = tmp_path / "eval"
    code = main(
        [
            "evaluate-policy", "scan", "--episodes", "1", "--weights", str(weights),
            "--out-dir", str(out), "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    assert set(report["summary"]) == {"raster", "random", "rule", "rl"}
    dose = {n: eps[0]["dose_As"] for n, eps in report["per_episode"].items()}
    assert max(dose.values()) == pytest.approx(min(dose.values()))  # same budget for all
    assert (out / "found.png").stat().st_size > 0
