"""The gallery of decisions on hand-made cases whose answer is known: which images a cell keeps as
chunks stream past, how folds merge, the PNG names and rows, and the journal round trip."""
from __future__ import annotations

import math
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from auditbench.pipeline import finish
from auditbench.pipeline.evaluate import _Evaluation
from auditbench.pipeline import gallery
from auditbench.pipeline.gallery import merge_folds
from auditbench.pipeline.journal import CellJournal
from auditbench.pipeline.records import SOURCE_KINDS, CellKey, CellResult, GalleryCandidate
from auditbench.report import tables

CLASSES = ["normal", "covid"]  # index 1 is the positive class
ODD_SPLIT = "ext/a b:c|d_é"  # every character a file name or an npz key could stumble on


def evaluation(fold: int = 0) -> _Evaluation:
    """An _Evaluation with just what choosing gallery candidates reads."""
    evaluate = object.__new__(_Evaluation)
    evaluate.context = SimpleNamespace(protocol=SimpleNamespace(report=SimpleNamespace(gallery_per_model=2)))
    evaluate.spec = SimpleNamespace(task=SimpleNamespace(class_names=CLASSES))
    evaluate.result = CellResult("m", fold)
    return evaluate


def offer(evaluate: _Evaluation, split: str, ids: list[str], labels, p, lung_mass=None, sources=None) -> SimpleNamespace:
    """One chunk of images; each image's pixels are its position in the chunk, to tell copies apart.
    ``sources``: each image's data source (all "src" unless given)."""
    n = len(ids)
    sources = ["src"] * n if sources is None else sources
    lung_mass = np.full(n, 0.5) if lung_mass is None else np.asarray(lung_mass, dtype=float)
    frames = SimpleNamespace(images=np.arange(n, dtype=np.float32)[:, None, None] * np.ones((n, 4, 4), np.float32),
                             lungs=np.ones((n, 4, 4), bool), artifacts=np.zeros((n, 4, 4), bool))
    heatmaps = frames.images.copy()
    evaluate._gallery_candidates(split, lung_mass, np.asarray(p, dtype=np.float32), heatmaps, frames,
                                 np.asarray(labels), [SimpleNamespace(sample_id=i, source=s) for i, s in zip(ids, sources)])
    return frames


def chosen(result: CellResult, split: str = "internal") -> dict[str, list[str]]:
    """kind -> sample ids held on ``split``, the per-source examples (:func:`by_source`) aside."""
    out: dict[str, list[str]] = {}
    for candidate in result.gallery.values():
        if candidate.split == split and candidate.kind not in SOURCE_KINDS:
            out.setdefault(candidate.kind, []).append(candidate.sample_id)
    return out


def test_a_cell_keeps_the_most_confident_decision_of_each_kind_ties_keep_the_first():
    evaluate = evaluation()
    #                                      tp    fp    tn    fn    fp (ties a1)
    first = offer(evaluate, "internal", ["a0", "a1", "a2", "a3", "a4"], [1, 0, 0, 1, 0],
                  [0.9, 0.8, 0.3, 0.2, 0.8], [0.5, math.nan, 0.7, 0.1, 0.4])
    assert chosen(evaluate.result) == {"best": ["a2"], "worst": ["a3"], "tp": ["a0"], "fp": ["a1"],
                                       "fn": ["a3"], "tn": ["a2"]}
    #                                  fp (ties a1) fp (beats) tp (below a0) tn (ties a2)
    offer(evaluate, "internal", ["b0", "b1", "b2", "b3"], [0, 0, 1, 0], [0.8, 0.95, 0.6, 0.3], [0.7, 0.9, math.nan, 0.2])
    assert chosen(evaluate.result) == {"best": ["b1"], "worst": ["a3"], "tp": ["a0"], "fp": ["b1"],
                                       "fn": ["a3"], "tn": ["a2"]}
    fp = next(c for c in evaluate.result.gallery.values() if c.kind == "fp")
    assert (fp.label, fp.prediction, fp.p_positive, fp.fold) == ("normal", "covid", pytest.approx(0.95), 0)
    # Only the winners' arrays are held, as copies: the chunk's buffers may be reused.
    first.images[:] = -1
    tp = next(c for c in evaluate.result.gallery.values() if c.kind == "tp")
    assert tp.image.min() == 0 and tp.image.shape == (4, 4)


def test_an_external_set_keeps_its_two_most_confident_errors_of_each_kind():
    evaluate = evaluation()
    offer(evaluate, ODD_SPLIT, ["e0", "e1", "e2", "e3"], [0, 0, 0, 1], [0.7, 0.9, 0.2, 0.1])
    assert chosen(evaluate.result, ODD_SPLIT) == {"fp": ["e1", "e0"], "fn": ["e3"]}
    # f0 ties e1 and stays out (the earlier wins); f1 is more confident than both.
    offer(evaluate, ODD_SPLIT, ["f0", "f1", "f2"], [0, 0, 0], [0.9, 0.95, 0.6])
    assert chosen(evaluate.result, ODD_SPLIT) == {"fp": ["f1", "e1"], "fn": ["e3"]}
    assert chosen(evaluate.result) == {}  # no internal image was offered


def candidate(sample_id: str, kind: str, p: float, fold: int, split: str = "internal", lung_mass: float = 0.5):
    called = int(p > 0.5)
    label = called if kind in ("tp", "tn") else 1 - called
    size = 3 + fold  # tells the folds' arrays apart
    return GalleryCandidate(lung_mass, fold, sample_id, CLASSES[label], p, np.full((size, size), p, np.float32),
                            np.ones((size, size), np.float32), np.ones((size, size), bool), np.zeros((size, size), bool),
                            split, kind, CLASSES[called])


def cell(fold: int, *candidates: GalleryCandidate, model_id: str = "m") -> CellResult:
    return CellResult(model_id, fold, gallery={f"{c.split}|{c.kind}|{i}": c for i, c in enumerate(candidates)})


def test_folds_merge_by_the_same_strict_rule_and_an_external_image_is_shown_once():
    fold0 = cell(0, candidate("x", "fp", 0.8, 0), candidate("t0", "tp", 0.7, 0),
                 candidate("a", "fp", 0.9, 0, "ext"), candidate("b", "fp", 0.8, 0, "ext"))
    fold1 = cell(1, candidate("y", "fp", 0.8, 1), candidate("t1", "tp", 0.9, 1), candidate("n1", "tn", 0.1, 1),
                 candidate("a", "fp", 0.95, 1, "ext"), candidate("c", "fp", 0.8, 1, "ext"))
    other = cell(0, candidate("z", "fn", 0.3, 0), model_id="other")
    merged = merge_folds([fold0, other, fold1])
    assert list(merged) == ["m", "other"]
    rows = [(c.split, c.kind, c.sample_id, c.fold) for c in merged["m"]]
    assert rows == [
        ("internal", "tp", "t1", 1),  # more confident in fold 1
        ("internal", "fp", "x", 0),  # tie: the earlier fold
        ("internal", "tn", "n1", 1),
        ("ext", "fp", "a", 1),  # scored by both folds' models: once, with the more confident fold's map
        ("ext", "fp", "b", 0),  # ties c: the earlier fold
    ]
    assert [(c.kind, c.sample_id) for c in merged["other"]] == [("fn", "z")]


def write_gallery(tmp_path, cells: list[CellResult]) -> list[dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    state = SimpleNamespace(protocol=SimpleNamespace(report=SimpleNamespace(gallery_per_model=2)), out_dir=tmp_path,
                            cells=cells, provenance={"run_id": "run-1", "protocol_sha256": "0" * 64})
    return finish._write_gallery(state)


def test_gallery_rows_and_png_names_are_safe_unique_and_complete(tmp_path):
    splits = ["ext a", "ext_a", "EXT_A", "x" * 300]  # the same safe name, case aside, and a very long one
    cells = [cell(0, candidate("b", "best", 0.7, 0), candidate("t", "tp", 0.9, 0),
                  *[candidate(f"e{i}", "fp", 0.9, 0, split) for i, split in enumerate(splits)],
                  candidate("e9", "fp", 0.8, 0, "ext a"))]
    rows = write_gallery(tmp_path, cells)
    assert finish.GALLERY_COLUMNS == tables.GALLERY_COLUMNS and all(list(r) == tables.GALLERY_COLUMNS for r in rows)
    files = [r["file"] for r in rows]
    assert files[:2] == ["gallery/m__best.png", "gallery/m__tp.png"]  # internal names as before
    assert "gallery/m__ext_a__fp2.png" in files  # the second error on "ext a"
    assert len({f.lower() for f in files}) == len(files) == 7
    for file in files:
        assert re.fullmatch(r"gallery/[A-Za-z0-9._-]{1,200}\.png", file), file
        with Image.open(tmp_path / file) as png:
            assert png.text["auditbench-run-id"] == "run-1"
    ext = next(r for r in rows if r["split"] == "ext a" and r["sample_id"] == "e0")
    assert (ext["kind"], ext["label"], ext["prediction"], ext["p_positive"]) == ("fp", "normal", "covid", 0.9)


def test_a_journalled_cell_gives_back_every_gallery_kind(tmp_path):
    evaluate = evaluation(fold=1)
    offer(evaluate, "internal", ["a0", "a1", "a2", "a3"], [1, 0, 0, 1], [0.9, 0.8, 0.3, 0.2], [0.5, math.nan, 0.7, 0.1])
    offer(evaluate, ODD_SPLIT, ["e0", "e1", "e2"], [0, 0, 1], [0.7, 0.9, 0.1])
    written = evaluate.result
    # and the per-source examples of "src": internal a correct and a wrong call, ODD_SPLIT only wrong ones
    assert len(written.gallery) == 6 + 3 + 2 + 1
    journal = CellJournal(tmp_path, {"run_id": "r"})
    journal.open()
    journal.write(written)
    (path,) = journal.folder.glob("cell-*.npz")
    with np.load(path) as data:
        assert all(re.fullmatch(r"record|gallery\d+_(image|heatmap|lung|artifact)", key) for key in data.files)
    read = journal.read(CellKey("m", 1))
    assert read is not None and list(read.gallery) == list(written.gallery)
    for key, original in written.gallery.items():
        back = read.gallery[key]
        for name in ("fold", "sample_id", "label", "p_positive", "split", "kind", "prediction", "source"):
            assert getattr(back, name) == getattr(original, name), name
        assert back.lung_mass == original.lung_mass or (math.isnan(back.lung_mass) and math.isnan(original.lung_mass))
        for name in ("image", "heatmap", "lung", "artifact"):
            np.testing.assert_array_equal(getattr(back, name), getattr(original, name))
    fp = next(c for c in read.gallery.values() if (c.split, c.kind) == ("internal", "fp"))
    assert fp.sample_id == "a1" and math.isnan(fp.lung_mass)
    # The resumed cell merges and is written exactly as the computed one.
    resumed, computed = write_gallery(tmp_path / "a", [read]), write_gallery(tmp_path / "b", [written])
    pd.testing.assert_frame_equal(pd.DataFrame(resumed), pd.DataFrame(computed))  # NaN lung_mass equal too
    assert len(resumed) == 12
    for row in computed:
        assert (tmp_path / "a" / row["file"]).read_bytes() == (tmp_path / "b" / row["file"]).read_bytes()


def by_source(result: CellResult, split: str = "internal") -> dict[tuple[str, str], str]:
    """(source, kind) -> sample id of the per-source examples held on ``split``."""
    return {(c.source, c.kind): c.sample_id for c in result.gallery.values()
            if c.split == split and c.kind in SOURCE_KINDS}


def test_each_source_keeps_its_most_confident_correct_and_wrong_call_ties_keep_the_first():
    evaluate = evaluation()
    odd = "<script>|x"  # a source's name may hold any character
    #                       tp   tn   fp   fn (ties s0's fp)   tp    fp
    offer(evaluate, "internal", ["s0", "s1", "s2", "s3", "s4", "s5"], [1, 0, 0, 1, 1, 0],
          [0.9, 0.05, 0.8, 0.2, 0.7, 0.6], sources=["a", "a", "a", "a", odd, odd])
    assert by_source(evaluate.result) == {("a", "source_correct"): "s1", ("a", "source_wrong"): "s2",
                                          (odd, "source_correct"): "s4", (odd, "source_wrong"): "s5"}
    # A later chunk: t0 ties s1 (stays out), t1 beats s5; source "b" appears.
    offer(evaluate, "internal", ["t0", "t1", "t2"], [0, 1, 1], [0.05, 0.3, 0.9], sources=["a", odd, "b"])
    assert by_source(evaluate.result) == {("a", "source_correct"): "s1", ("a", "source_wrong"): "s2",
                                          (odd, "source_correct"): "s4", (odd, "source_wrong"): "t1",
                                          ("b", "source_correct"): "t2"}
    held = next(c for c in evaluate.result.gallery.values() if c.sample_id == "t1" and c.kind == "source_wrong")
    assert (held.source, held.label, held.prediction, held.split) == (odd, "covid", "normal", "internal")
    # The other kinds are chosen as before, over all sources.
    assert chosen(evaluate.result)["tn"] == ["s1"] and chosen(evaluate.result)["tp"] == ["s0"]


def test_only_the_first_sources_by_name_keep_examples_in_a_cell_and_over_folds():
    limit = gallery.SOURCE_EXAMPLE_SOURCES
    names = [f"src{i:02d}" for i in range(limit + 3)]
    evaluate = evaluation()
    offer(evaluate, "ext", [f"x{i}" for i in range(limit)], [0] * limit, [0.2] * limit, sources=names[3:3 + limit])
    assert sorted({s for s, _ in by_source(evaluate.result, "ext")}) == names[3:3 + limit]
    offer(evaluate, "ext", ["y0", "y1"], [0, 0], [0.1, 0.1], sources=[names[0], names[-1]])  # one enters, one not
    kept = sorted({s for s, _ in by_source(evaluate.result, "ext")})
    assert kept == [names[0], *names[3:2 + limit]] and len(kept) == limit
    # Over folds: the first sources by name of the union, each once, after the split's other kinds.
    fold0 = cell(0, candidate("e0", "fp", 0.9, 0, "ext"),
                 *[source_candidate(f"a{i}", names[i], "source_correct", 0.2, 0, "ext") for i in range(1, limit + 1)])
    fold1 = cell(1, source_candidate("b0", names[0], "source_correct", 0.3, 1, "ext"),
                 source_candidate("b1", names[1], "source_correct", 0.1, 1, "ext"))
    merged = merge_folds([fold0, fold1])["m"]
    assert [(c.kind, c.source, c.sample_id) for c in merged] == [
        ("fp", "", "e0"), ("source_correct", names[0], "b0"), ("source_correct", names[1], "b1"),
        *[("source_correct", names[i], f"a{i}") for i in range(2, limit)]]


def source_candidate(sample_id: str, source: str, kind: str, p: float, fold: int, split: str = "internal"):
    called = int(p > 0.5)
    label = called if kind == "source_correct" else 1 - called
    return GalleryCandidate(0.5, fold, sample_id, CLASSES[label], p, np.full((3, 3), p, np.float32),
                            np.ones((3, 3), np.float32), np.ones((3, 3), bool), np.zeros((3, 3), bool),
                            split, kind, CLASSES[called], source)


def test_per_source_examples_get_their_own_png_names_and_source_column(tmp_path):
    cells = [cell(0, candidate("t", "tp", 0.9, 0),
                  source_candidate("s1", "kermany", "source_correct", 0.1, 0),
                  source_candidate("s2", "kermany", "source_wrong", 0.8, 0),
                  source_candidate("s3", "<b>x</b>", "source_wrong", 0.7, 0, ODD_SPLIT))]
    rows = write_gallery(tmp_path, cells)
    assert [(r["kind"], r["source"], r["file"]) for r in rows] == [
        ("tp", "", "gallery/m__tp.png"),
        ("source_correct", "kermany", "gallery/m__internal__kermany__source_correct.png"),
        ("source_wrong", "kermany", "gallery/m__internal__kermany__source_wrong.png"),
        ("source_wrong", "<b>x</b>", "gallery/m__ext_a_b_c_d_____b_x__b___source_wrong.png"),
    ]
    for row in rows:
        assert (tmp_path / row["file"]).is_file()
