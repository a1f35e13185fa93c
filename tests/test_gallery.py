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
from auditbench.pipeline.gallery import merge_folds
from auditbench.pipeline.journal import CellJournal
from auditbench.pipeline.records import CellKey, CellResult, GalleryCandidate
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


def offer(evaluate: _Evaluation, split: str, ids: list[str], labels, p, lung_mass=None) -> SimpleNamespace:
    """One chunk of images; each image's pixels are its position in the chunk, to tell copies apart."""
    n = len(ids)
    lung_mass = np.full(n, 0.5) if lung_mass is None else np.asarray(lung_mass, dtype=float)
    frames = SimpleNamespace(images=np.arange(n, dtype=np.float32)[:, None, None] * np.ones((n, 4, 4), np.float32),
                             lungs=np.ones((n, 4, 4), bool), artifacts=np.zeros((n, 4, 4), bool))
    heatmaps = frames.images.copy()
    evaluate._gallery_candidates(split, lung_mass, np.asarray(p, dtype=np.float32), heatmaps, frames,
                                 np.asarray(labels), [SimpleNamespace(sample_id=i) for i in ids])
    return frames


def chosen(result: CellResult, split: str = "internal") -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for candidate in result.gallery.values():
        if candidate.split == split:
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
    assert len(written.gallery) == 6 + 3
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
        for name in ("fold", "sample_id", "label", "p_positive", "split", "kind", "prediction"):
            assert getattr(back, name) == getattr(original, name), name
        assert back.lung_mass == original.lung_mass or (math.isnan(back.lung_mass) and math.isnan(original.lung_mass))
        for name in ("image", "heatmap", "lung", "artifact"):
            np.testing.assert_array_equal(getattr(back, name), getattr(original, name))
    fp = next(c for c in read.gallery.values() if (c.split, c.kind) == ("internal", "fp"))
    assert fp.sample_id == "a1" and math.isnan(fp.lung_mass)
    # The resumed cell merges and is written exactly as the computed one.
    resumed, computed = write_gallery(tmp_path / "a", [read]), write_gallery(tmp_path / "b", [written])
    pd.testing.assert_frame_equal(pd.DataFrame(resumed), pd.DataFrame(computed))  # NaN lung_mass equal too
    assert len(resumed) == 9
    for row in computed:
        assert (tmp_path / "a" / row["file"]).read_bytes() == (tmp_path / "b" / row["file"]).read_bytes()
