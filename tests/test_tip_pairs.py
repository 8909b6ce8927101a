"""The double-tip cue from repeated defects (agent/perception/tip_pairs.py): synthetic point
sets with a known answer, bad input, and one simulated double tip against its good-tip twin."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from agent.perception.tasks import tip as tip_task
from agent.perception.tip_data import TipSample, sample_with_truth
from agent.perception.tip_pairs import (
    PairSettings,
    defect_points,
    pair_score,
    score_image,
    score_probability_map,
)
from drivers.errors import DataError
from drivers.frame import GroundTruth

PX_NM = 0.06
AU_NM = 0.288  # Au(111) nearest-neighbour distance


def lattice_points(rng: np.random.Generator, n: int, size_nm: float = 15.0) -> np.ndarray:
    """``n`` distinct random sites of a hexagonal lattice (Au(111) spacing) inside a square of
    ``size_nm``, as (row, column) pixels at :data:`PX_NM`."""
    a1, a2 = np.array([0.0, AU_NM]), np.array([AU_NM * np.sqrt(3) / 2, AU_NM / 2])
    k = int(size_nm / AU_NM) + 2
    ij = np.stack(np.meshgrid(np.arange(-k, 2 * k), np.arange(k)), -1).reshape(-1, 2)
    sites = ij[:, 1, None] * a2 + ij[:, 0, None] * a1
    sites = sites[(sites >= 1.0).all(1) & (sites <= size_nm - 1.0).all(1)]
    return sites[rng.choice(len(sites), n, replace=False)] / PX_NM


def test_a_repeated_offset_scores_the_number_of_copies_and_finds_the_offset() -> None:
    rng = np.random.default_rng(3)
    first = lattice_points(rng, 8)
    v_nm = np.array([0.7, -1.1])  # (dy, dx)
    points = np.concatenate([first, first + v_nm / PX_NM])
    score = pair_score(points, PX_NM)
    assert score.pairs == 8 and score.fires and score.points == 16
    assert score.offset_nm is not None
    # v and -v are one displacement: compare up to the sign
    found = np.array(score.offset_nm)
    assert min(np.hypot(*(found - v_nm)), np.hypot(*(found + v_nm))) < 0.01


def test_random_lattice_points_do_not_fire() -> None:
    rng = np.random.default_rng(11)
    scores = [pair_score(lattice_points(rng, 15), PX_NM).pairs for _ in range(40)]
    # 15 defects on a 15 nm Au(111) frame share displacements by chance, but rarely as 3
    # disjoint pairs (the fire threshold)
    assert max(scores) < PairSettings().fire_at
    assert sum(s >= 1 for s in scores) > 0  # chance pairs do occur: the count is not trivially 0


def test_a_chain_of_equally_spaced_points_counts_nothing() -> None:
    row = np.stack([np.full(10, 100.0), 50.0 + np.arange(10) * 0.9 / PX_NM], 1)
    assert pair_score(row, PX_NM).pairs == 0
    plain = dataclasses.replace(PairSettings(), fire_at=1)
    # two separate copies of the same row do count: one pair per point
    shifted = row[:1] + np.array([30.0, 0.0])
    assert pair_score(np.concatenate([row[:1], shifted]), PX_NM, plain).pairs == 1


def test_empty_single_and_nan_points() -> None:
    for pts in (np.zeros((0, 2)), np.array([[5.0, 5.0]]), np.array([[np.nan, 1.0], [2.0, 3.0]])):
        score = pair_score(pts, PX_NM)
        assert score.pairs == 0 and score.offset_nm is None and not score.fires
    with pytest.raises(DataError, match=r"shape \(N, 2\)"):
        pair_score(np.zeros((4, 3)), PX_NM)
    with pytest.raises(DataError, match="pixel_size_nm"):
        pair_score(np.zeros((4, 2)), float("nan"))
    with pytest.raises(ValueError, match="threshold"):
        PairSettings(threshold=1.5)
    with pytest.raises(ValueError, match="offset_nm"):
        PairSettings(offset_nm=(2.0, 1.0))


def blobs(shape: tuple[int, int], centres: np.ndarray, peak: float = 0.9) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    out = np.zeros(shape)
    for r, c in centres:
        out = np.maximum(out, peak * np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * 1.5**2)))
    return out


def test_points_of_a_probability_map_skip_the_edges_and_nan() -> None:
    inner = np.array([[40.0, 50.0], [90.0, 120.0]])
    edge = np.array([[2.0, 60.0], [100.0, 157.0]])  # within 0.48 nm (8 px) of an edge
    d = blobs((160, 160), np.concatenate([inner, edge]))
    d[10, 10] = np.nan
    pts = defect_points(d, PX_NM)
    assert pts.tolist() == inner.tolist()
    assert len(defect_points(blobs((160, 160), inner, peak=0.4), PX_NM)) == 0  # under 0.5
    with pytest.raises(DataError, match="2-D"):
        defect_points(np.zeros((3, 4, 5)), PX_NM)


def test_a_doubled_probability_map_fires_and_its_single_copy_does_not() -> None:
    rng = np.random.default_rng(5)
    first = lattice_points(rng, 6, size_nm=12.0)
    v_px = np.array([12.0, 20.0])
    shape = (220, 220)
    assert score_probability_map(blobs(shape, first), PX_NM).pairs < PairSettings().fire_at
    doubled = score_probability_map(blobs(shape, np.concatenate([first, first + v_px])), PX_NM)
    assert doubled.fires and doubled.offset_nm is not None
    assert np.allclose(np.abs(doubled.offset_nm), v_px * PX_NM, atol=0.07)


@pytest.fixture(scope="module")
def misread_double() -> tuple[TipSample, GroundTruth]:
    """Heldout seed 20,000,131 with its good-tip twin (Au(111), second apex 1.25 nm away; tip
    net 1.2 reads it as good)."""
    recipe = dataclasses.replace(
        tip_task.heldout_recipe(1), seeds=(20_000_131, 20_000_132), pairs=True
    )
    return sample_with_truth(recipe, 20_000_131)


def test_a_simulated_double_tip_fires_and_its_good_twin_does_not(
    misread_double: tuple[TipSample, GroundTruth],
) -> None:
    """Known answer on the simulator: heldout seed 20,000,131 (Au(111), second apex 1.25 nm
    away; tip net 1.2 reads it as good) images its adatoms twice; its good-tip twin (same seed,
    one apex) does not fire. Needs the shipped defects_stm weights."""
    s, truth = misread_double
    assert s.good_twin is not None
    double = score_image(s.data, s.pixel_size_nm)
    twin = score_image(s.good_twin, s.pixel_size_nm)
    assert double.fires and not twin.fires
    main, extra = truth.extra["apexes_m"][0], truth.extra["apexes_m"][1]
    apex = np.array([extra[1] - main[1], extra[0] - main[0]]) * 1e9  # (dy, dx) nm
    assert double.offset_nm is not None
    found = np.array(double.offset_nm)
    assert min(np.hypot(*(found - apex)), np.hypot(*(found + apex))) < 0.15


class AlwaysGood:
    """A stand-in tip model that reads every frame as good (P(good) 0.9), so the assessor's
    pair-cue wiring is tested apart from the network's weights."""

    reject_uncertainty = 0.3
    change_detector = None

    class card:  # noqa: N801 - mimics ModelCard's two fields the assessor reads
        version = "test"
        sha256 = "0" * 64

    def prepare(self, image: np.ndarray, pixel_size_nm: object) -> np.ndarray:
        return np.asarray(image)

    def probabilities(self, prepared: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = np.array([0.9, 0.04, 0.03, 0.02, 0.01])
        return p, p


def test_the_assessor_overrides_a_good_read_only_where_the_cue_fires(
    misread_double: tuple[TipSample, GroundTruth],
) -> None:
    from agent.perception.tip_eval import as_frame
    from agent.perception.tip_net import PAIRS_P_GOOD, TipNetAssessor
    from drivers.frame import TipState

    s, _ = misread_double
    assert s.good_twin is not None
    model = AlwaysGood()
    on = TipNetAssessor(model, baseline=False, pairs=PairSettings())  # type: ignore[arg-type]
    off = TipNetAssessor(model, baseline=False)  # type: ignore[arg-type]
    assert on.version == off.version  # the network's version; the cue is labelled apart
    assert off.pairs_version is None and on.pairs_version is not None
    assert on.pairs_version.startswith("pairs>=3 on defects_stm ")

    est = on.assess(as_frame(s.data, s.pixel_size_nm))
    assert est.state is TipState.MULTIPLE and est.features["pairs_override"] == 1.0
    assert est.p_good == PAIRS_P_GOOD and abs(sum(est.probabilities.values()) - 1) < 1e-9
    assert est.features["tipnet_p_good"] == 0.9 and est.features["pairs_count"] >= 3
    assert "imaged twice" in est.source

    twin = on.assess(as_frame(s.good_twin, s.pixel_size_nm))
    assert twin.state is TipState.GOOD and "pairs_override" not in twin.features
    assert twin.features["pairs_count"] < PairSettings().fire_at
    assert off.assess(as_frame(s.data, s.pixel_size_nm)).state is TipState.GOOD
    # a partial frame is the watch's business, not the cue's
    partial = on.assess(as_frame(s.data, s.pixel_size_nm, lines_done=128))
    assert partial.state is TipState.GOOD and "pairs_count" not in partial.features
    # a pixel size the defects model does not take: the network's read stands, marked
    tiny = on.assess(as_frame(s.data, 0.01))
    assert tiny.state is TipState.GOOD and tiny.features["pairs_skipped"] == 1.0


def test_the_pipeline_runs_the_cue_by_default_and_records_it() -> None:
    from agent.perception.tip_net import TipNetAssessor
    from agent.pipeline import build_pipeline
    from drivers.errors import ConfigError

    on = build_pipeline({"assessor": "tipnet"}, kind="stm")
    assert isinstance(on.assessor, TipNetAssessor) and on.assessor.pairs == PairSettings()
    versions = on.versions()
    assert versions["tip_pairs"] == on.assessor.pairs_version
    assert versions["assessor"] == f"tipnet {on.assessor.version}"
    off = build_pipeline({"assessor": "tipnet", "assessor_options": {"pairs": False}}, kind="stm")
    assert isinstance(off.assessor, TipNetAssessor) and off.assessor.pairs is None
    assert "tip_pairs" not in off.versions()
    with pytest.raises(ConfigError, match="pairs must be true or false"):
        build_pipeline({"assessor": "tipnet", "assessor_options": {"pairs": "yes"}}, kind="stm")


def test_sessions_recorded_without_the_cue_are_rebuilt_without_it() -> None:
    from agent.pipeline import build_pipeline, recorded_config

    now = build_pipeline({"assessor": "tipnet"}, kind="stm")
    # a tipnet session from before the cue ran by default: no tip_pairs in its versions
    old_versions = {k: v for k, v in now.versions().items() if k != "tip_pairs"}
    old = recorded_config({"assessor": "tipnet", "assessor_options": {}}, old_versions)
    assert old["assessor_options"] == {"pairs": False}
    assert build_pipeline(old, kind="stm").assessor.pairs is None  # type: ignore[union-attr]
    # sessions that ran it, that chose explicitly, or that used another assessor: unchanged
    assert recorded_config({"assessor": "tipnet"}, now.versions()) == {"assessor": "tipnet"}
    chosen = {"assessor": "tipnet", "assessor_options": {"pairs": True}}
    assert recorded_config(chosen, old_versions) == chosen
    classical = {"assessor": "classical"}
    assert recorded_config(classical, {"assessor": "classical 1"}) == classical


def test_the_evaluation_scores_the_cue_and_the_agent_assessor_with_it(
    misread_double: tuple[TipSample, GroundTruth],
) -> None:
    """``score_set``: the ``tipnet+pairs`` row overrides the double's good read (and not the
    twin's), with the override's probabilities in its ECE; the agent's assessor, built with
    the cue as sessions run it, reads the double as multiple too."""
    from agent.perception.classical import ClassicalTipAssessor
    from agent.perception.tip_eval import score_set
    from agent.perception.tip_net import PAIRS_P_GOOD, TipNetAssessor, pairs_override_probabilities

    s, _ = misread_double
    assert s.good_twin is not None
    twin = dataclasses.replace(s, data=s.good_twin, label=0, good_twin=None)
    assessor = TipNetAssessor(AlwaysGood(), baseline=False, pairs=PairSettings())  # type: ignore[arg-type]
    scored = score_set([s, twin], assessor, ClassicalTipAssessor(), progress=False)
    net, pairs, agent = scored["tipnet"], scored["tipnet+pairs"], scored["agent_assessor"]
    assert net["good_vs_bad_accuracy"] == 0.5 and pairs["good_vs_bad_accuracy"] == 1.0
    assert pairs["overridden"] == 1 and agent["good_vs_bad_accuracy"] == 1.0
    # both reads right: the twin's at 0.9, the double's (overridden) at 0.93, one ECE bin
    p = pairs_override_probabilities(np.array([0.9, 0.04, 0.03, 0.02, 0.01]))
    assert p[0] == PAIRS_P_GOOD and abs(p.sum() - 1) < 1e-12
    expected = 0.5 * abs(1 - 0.9) + 0.5 * abs(1 - p.max())
    assert abs(pairs["ece"] - expected) < 1e-9
    assert abs(net["ece"] - abs(0.5 - 0.9)) < 1e-9  # one of two right, both at 0.9


def test_the_cue_and_the_defects_stage_share_one_network_pass_per_frame(
    misread_double: tuple[TipSample, GroundTruth], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pair cue and then ``find_defects`` (the defects stage) on the same frame run the STM
    defects network once; another frame, or the same array changed in place, runs it again;
    the kept map gives the same defects as a fresh pass and cannot be written to."""
    from agent.perception.tasks import defects_stm

    s, _ = misread_double
    assert s.good_twin is not None
    image = s.data + 1e-12
    fresh = defects_stm.find_defects(image.copy(), s.pixel_size_nm)
    defects_stm.find_defects(s.good_twin, s.pixel_size_nm)  # another frame: the map is its
    calls = []
    real = defects_stm.class_probabilities

    def counting(*args: object, **kwargs: object) -> np.ndarray:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(defects_stm, "class_probabilities", counting)
    score_image(image, s.pixel_size_nm)
    kept = defects_stm.find_defects(image, s.pixel_size_nm)
    assert len(calls) == 1
    assert [(d.row_px, d.col_px, d.kind) for d in kept.defects] == [
        (d.row_px, d.col_px, d.kind) for d in fresh.defects
    ]
    np.testing.assert_array_equal(kept.class_map, fresh.class_map)
    _, _, prob = defects_stm.probability_map(image, s.pixel_size_nm, *defects_stm.load())
    assert len(calls) == 1 and not prob.flags.writeable
    defects_stm.find_defects(s.good_twin, s.pixel_size_nm)
    assert len(calls) == 2
    image[10, 10] += 1e-10  # the same array object, changed: its bytes are the key
    defects_stm.find_defects(image, s.pixel_size_nm)
    assert len(calls) == 3
