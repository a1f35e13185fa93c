"""Faithfulness (deletion, insertion, ROAD) in the run: per model x fold x explanation method, on the first
``metrics.faithfulness.images`` internal test images, deterministic; and the run's wrapper around
audit.faithfulness (greyscale frames, the bound across chunks, the explained class) on a case worked by hand.
The curves themselves are tested in tests/test_faithfulness.py."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from auditbench.audit.metrics import METRICS
from auditbench.pipeline.faithfulness_pass import FAITHFULNESS_METRICS, explained_class, faithfulness_values
from auditbench.protocol.loader import ProtocolError, load_protocol
from conftest import REPO, TINY_RUN, run_quick

FAITHFUL = ["deletion_auc", "insertion_auc", "road_morf_auc", "road_lerf_auc"]
# A frozen and a fine-tuned model (their p comes from different paths), two folds, two methods.
TINY = [
    *TINY_RUN,  # its metrics.faithfulness.images=0 is overridden by each run below
    "--set", "data.synthetic.shortcut_strength=[1]",
    "--set", "training.finetune=[false, true]",
    "--set", "training.finetune_phase.max_epochs=1",
    "--set", "sanity.images=0",
    "--set", "report.save_models=none",
    "--set", "explain.method=[gradcam, eigencam]",
    "--set", "metrics.faithfulness.steps=4",
]
DROP = ["run_id", "protocol_sha256"]


def _run(out, images: int):
    return run_quick(out, *TINY, "--set", f"metrics.faithfulness.images={images}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("faithfulness")
    return _run(base / "four", 4), _run(base / "again", 4), _run(base / "off", 0)


def test_results_have_every_faithfulness_metric_per_method_on_the_internal_split(runs):
    four, _, _ = runs
    results = pd.read_csv(four / "results.csv")
    rows = results[results["metric"].isin(FAITHFUL)]
    assert set(rows["split"]) == {"internal"}  # not train_distribution, which has no maps
    per_cell = rows.groupby(["model_id", "fold", "method"])["metric"].apply(sorted)
    assert len(per_cell) == 2 * 2 * 2 and all(metrics == sorted(FAITHFUL) for metrics in per_cell)
    models = pd.read_csv(four / "models.csv")
    for metric in FAITHFUL:
        assert {f"{metric}_{stat}" for stat in ("mean", "std", "ci_low", "ci_high")} <= set(models.columns)
    html = (four / "report.html").read_text(encoding="utf-8")
    assert "faithfulness of the maps (deletion, insertion, ROAD)" in html


def test_images_have_values_on_exactly_the_first_four_test_images(runs):
    four, _, _ = runs
    images = pd.read_csv(four / "images.csv")
    assert set(FAITHFUL) <= set(images.columns)
    assert images.loc[images["split"] != "internal", FAITHFUL].isna().all().all()
    internal = images[images["split"] == "internal"]
    measured = 0
    for _, rows in internal.groupby(["model_id", "fold", "method"], sort=False):
        first, rest = rows.iloc[:4], rows.iloc[4:]
        assert len(rest) and rest[FAITHFUL].isna().all().all()
        # Defined on each of the first four whose map is not blank (a blank map ranks no pixel; lung_mass
        # is NaN exactly there on these phantoms, which always have lungs).
        drawn = first["lung_mass"].notna().to_numpy()
        for metric in FAITHFUL:
            np.testing.assert_array_equal(np.isfinite(first[metric].to_numpy()), drawn)
        measured += int(drawn.sum())
    assert measured >= 16  # most of the 8 x 4 maps are not blank
    defined = internal[FAITHFUL].dropna()
    assert ((defined >= 0) & (defined <= 1)).all().all()  # mean heights of p curves
    # results.csv's per-fold value is the mean of the defined per-image values.
    results = pd.read_csv(four / "results.csv")
    for (model, fold, method), rows in internal.groupby(["model_id", "fold", "method"]):
        value = results[(results["model_id"] == model) & (results["fold"] == fold) & (results["method"] == method)
                        & (results["split"] == "internal") & (results["metric"] == "deletion_auc")]["value"].item()
        expected = rows["deletion_auc"].mean()  # pandas skips NaN
        assert (np.isnan(value) and np.isnan(expected)) or value == pytest.approx(expected, rel=1e-12)


def test_a_rerun_gives_the_same_values(runs):
    four, again, _ = runs
    for name in ("results.csv", "images.csv", "models.csv"):
        first, second = pd.read_csv(four / name).drop(columns=DROP), pd.read_csv(again / name).drop(columns=DROP)
        pd.testing.assert_frame_equal(first, second, check_exact=True, obj=name)


def test_zero_images_computes_nothing(runs):
    four, _, off = runs
    images, results, models = (pd.read_csv(off / name) for name in ("images.csv", "results.csv", "models.csv"))
    assert not set(FAITHFUL) & set(images.columns)
    assert not results["metric"].isin(FAITHFUL).any()
    assert not [c for c in models.columns if c.startswith(tuple(FAITHFUL))]
    # ... and changes nothing else: the other per-image values are the run with faithfulness's.
    with_four = pd.read_csv(four / "images.csv")
    pd.testing.assert_frame_equal(with_four[images.columns].drop(columns=DROP), images.drop(columns=DROP),
                                  check_exact=True)


def test_the_metrics_are_registered_as_faithfulness_not_detectors():
    assert FAITHFULNESS_METRICS == FAITHFUL
    directions = {name: METRICS.get(name).higher_is_better for name in FAITHFUL}
    assert directions == {"deletion_auc": False, "insertion_auc": True, "road_morf_auc": False, "road_lerf_auc": True}
    for name in FAITHFUL:
        info = METRICS.get(name)
        assert info.kind == "faithfulness" and info.detector is False and info.compute is None
        assert "faithful" in info.description and info.citation


def test_the_protocol_bounds_the_sample():
    protocol = load_protocol(REPO / "protocols" / "quick.yaml")
    assert protocol.metrics.faithfulness.images > 0 and protocol.metrics.faithfulness.steps > 0
    for bad in ("metrics.faithfulness.images=-1", "metrics.faithfulness.steps=0", "metrics.faithfulness.seeds=3"):
        with pytest.raises(ProtocolError):
            load_protocol(REPO / "protocols" / "quick.yaml", [bad])


# ----- the run's wrapper, by hand ----------------------------------------------------------------------------------

SIDE = 8
SQUARE = (slice(2, 4), slice(2, 4))  # 4 of 64 pixels


def square_mean(frames: np.ndarray) -> np.ndarray:
    """A "model" on greyscale frames (n, H, W), as the run's p(positive): the mean intensity in the square."""
    assert frames.ndim == 3
    return frames[:, SQUARE[0], SQUARE[1]].astype(np.float64).mean(axis=(1, 2))


def _frames(n: int) -> np.ndarray:
    frames = np.zeros((n, SIDE, SIDE), dtype=np.float32)
    frames[:, SQUARE[0], SQUARE[1]] = 1.0
    return frames


def _maps(n: int, square_first: bool) -> np.ndarray:
    ramp = np.arange(SIDE * SIDE, dtype=float).reshape(SIDE, SIDE) / SIDE**2  # distinct values below 1
    one = ramp.copy()
    one[SQUARE] = 2.0 if square_first else -1.0
    return np.repeat(one[None], n, axis=0)


def test_deletion_is_lower_when_the_map_points_at_what_the_model_reads():
    """Steps of 16 pixels (steps = 4). Square first: it is gone after one step, p = 1, 0, 0, 0, 0, mean height
    0.5 x 0.25 = 0.125. Square last: it goes in the last step, p = 1, 1, 1, 1, 0: 0.875. ROAD keeps the
    square while removing the least relevant 80% (51 of the 60 black pixels): LeRF 1 exactly; MoRF fills the
    square from black neighbours, p near 0 (plus the imputation's noise)."""
    frames = _frames(2)
    maps = {"points": _maps(2, True), "misses": _maps(2, False)}
    values = faithfulness_values(square_mean, frames, maps, np.ones(2, int), first=0, bound=2, steps=4, seed=0,
                                 batch_size=8)
    np.testing.assert_allclose(values["points"]["deletion_auc"], 0.125)
    np.testing.assert_allclose(values["misses"]["deletion_auc"], 0.875)
    np.testing.assert_array_equal(values["points"]["road_lerf_auc"], 1.0)
    assert np.all(np.abs(values["points"]["road_morf_auc"]) < 0.05)
    assert np.all(values["misses"]["road_morf_auc"] == 1.0)  # 80% most relevant of 60 + 4: the square stays
    assert np.all(values["points"]["insertion_auc"] > values["misses"]["insertion_auc"])


def test_the_bound_holds_across_chunks_and_each_method_stands_alone():
    """Images 0..5, bound 4: one chunk or two (0-2, 3-5) give the same values (ROAD's noise is seeded by
    the image's number in the split, not in the chunk); 4 and 5 are NaN; a method's values are the same
    with or without another method beside it."""
    rng = np.random.default_rng(0)
    frames = np.clip(_frames(6) + 0.2 * rng.random((6, SIDE, SIDE)), 0, 1).astype(np.float32)
    maps = {"a": rng.random((6, SIDE, SIDE)), "b": rng.random((6, SIDE, SIDE))}
    classes = np.ones(6, int)
    whole = faithfulness_values(square_mean, frames, maps, classes, first=0, bound=4, steps=4, seed=3, batch_size=8)
    parts = [faithfulness_values(square_mean, frames[s], {k: m[s] for k, m in maps.items()}, classes[s],
                                 first=s.start, bound=4, steps=4, seed=3, batch_size=2)
             for s in (slice(0, 3), slice(3, 6))]
    alone = faithfulness_values(square_mean, frames, {"b": maps["b"]}, classes, first=0, bound=4, steps=4, seed=3,
                                batch_size=8)
    for method in ("a", "b"):
        for name in FAITHFULNESS_METRICS:
            joined = np.concatenate([part[method][name] for part in parts])
            np.testing.assert_allclose(joined, whole[method][name], rtol=1e-12, equal_nan=True)
            assert np.isfinite(whole[method][name][:4]).all() and np.isnan(whole[method][name][4:]).all()
    for name in FAITHFULNESS_METRICS:
        np.testing.assert_array_equal(alone["b"][name], whole["b"][name])
    # ROAD's noise follows the protocol's seed.
    other = faithfulness_values(square_mean, frames, maps, classes, first=0, bound=4, steps=4, seed=4, batch_size=8)
    assert not np.array_equal(other["a"]["road_morf_auc"], whole["a"]["road_morf_auc"])
    # Past the bound nothing is computed: not a single call of the model.
    calls = []
    none = faithfulness_values(lambda x: calls.append(1) or square_mean(x), frames, maps, classes, first=4, bound=4,
                               steps=4, seed=3, batch_size=8)
    assert not calls and all(np.isnan(v).all() for per_method in none.values() for v in per_method.values())


def test_a_map_of_the_negative_class_is_scored_on_its_probability():
    """explain.target: predicted explains class 0 where p <= 0.5: the curve of p(negative) = 1 - p, whose
    mean height is 1 minus that of p."""
    np.testing.assert_array_equal(explained_class(np.array([0.2, 0.5, 0.7]), "predicted"), [0, 0, 1])
    np.testing.assert_array_equal(explained_class(np.array([0.2, 0.7]), "positive"), [1, 1])
    frames, maps = _frames(2), {"points": _maps(2, True)}
    values = faithfulness_values(square_mean, frames, maps, np.array([1, 0]), first=0, bound=2, steps=4, seed=0,
                                 batch_size=8)
    np.testing.assert_allclose(values["points"]["deletion_auc"], [0.125, 0.875])
