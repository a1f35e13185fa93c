"""Report tables, overlays and HTML rendering on a small hand-made output folder."""
from __future__ import annotations

import io
import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from auditbench.report.html import render_report
from auditbench.report.overlays import ARTIFACT_COLOUR, LUNG_COLOUR, overlay_png
from auditbench.report.tables import ResultsError, ResultTables, read_tables, write_tables

XSS = "<script>alert(1)</script>"
METRICS = ["accuracy", "balanced_accuracy", "roc_auc", "lung_mass", "border_mass", "artifact_mass",
           "lung_enrichment", "pointing_game", "artifact_occlusion_effect", "shortcut_reliance"]
# model id -> (crop, shortcut_strength, rank, selected, meets, violations, not_applicable, pareto, unverified)
MODELS = {
    "r18-crop-s0": (True, 0.0, 1, True, True, "", "artifact_mass", True, ""),
    "r18-nocrop-s0": (False, 0.0, 2, False, True, "", "", True, "artifact_occlusion_effect"),
    "r18-nocrop-s1": (False, 1.0, 3, False, False, "lung_mass=0.31 < min 0.5", "", False, ""),
}
MEANS = {  # model id -> metric means
    "r18-crop-s0": [0.80, 0.79, 0.85, 0.66, 0.02, math.nan, 1.30, 0.9, math.nan, 0.0],
    "r18-nocrop-s0": [0.84, 0.83, 0.90, 0.58, 0.10, 0.01, 1.10, 0.8, math.nan, 0.02],
    "r18-nocrop-s1": [0.90, 0.89, 0.95, 0.31, 0.40, 0.20, 0.60, 0.4, 0.95, 0.40],
}


def phantom(size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:size, :size] / size
    image = 0.3 + 0.4 * yy
    lung = (np.abs(xx - 0.5) > 0.1) & (np.abs(xx - 0.5) < 0.35) & (yy > 0.2) & (yy < 0.8)
    artifact = np.zeros((size, size), bool)
    artifact[2:6, 2:8] = True
    heat = np.exp(-((xx - 0.3) ** 2 + (yy - 0.5) ** 2) / 0.02) * 3.0
    return image, heat, lung, artifact


def make_tables() -> ResultTables:
    grid = {"backbone": "resnet18", "weights": "none", "hidden": 256, "finetune": False, "augment": False,
            "task": "covid_vs_non_covid"}
    models, results, images, gallery = [], [], [], []
    for model_id, (crop, strength, rank, selected, meets, violations, na, pareto, unverified) in MODELS.items():
        config = {"model_id": model_id, **grid, "crop": crop, "shortcut_strength": strength}
        row = {**config, "n_folds": 2, "input_size": 128, "frame": "128px crop" if crop else "128px",
               "cam_layer": "layer4", "cam_map_size": 4, "cam_stride": 32}
        for metric, mean in zip(METRICS, MEANS[model_id]):
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean, 0.01
            row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = mean - 0.02, mean + 0.02
        row.update(not_applicable=na, meets_constraints=meets, verified=not unverified, violations=violations,
                   unverified=unverified, rank=rank, selected=selected, pareto=pareto)
        models.append(row)
        for fold in (0, 1):
            for metric, value in (("accuracy", MEANS[model_id][0]), ("tn", 4), ("fp", 1), ("fn", 2), ("tp", 3)):
                results.append({**config, "split": "internal", "fold": fold, "metric": metric, "value": value})
            results.append({**config, "split": "ext_normal", "fold": fold, "metric": "accuracy", "value": 0.25})
            for split, sample_id, label, index, mask_source in (
                ("internal", XSS, "covid", 1, "dataset"),
                ("internal", "NA", "normal", 0, "predicted"),
                ("ext_normal", "ext-1", "normal", 0, "predicted"),
            ):
                predicted = 1 if split == "ext_normal" else index
                images.append({
                    "model_id": model_id, "fold": fold, "split": split, "sample_id": sample_id,
                    "source": "ieee8023" if index else "kermany", "patient_id": "p1", "path": f"img/{sample_id}.png",
                    "label": label, "label_index": index, "prediction": predicted, "p_positive": 0.7 if predicted else 0.2,
                    "correct": predicted == index, "mask_source": mask_source, "has_artifact": False,
                    "artifact_status": "absent", "border_in_view": not crop, "lung_mass": 0.6, "artifact_mass": math.nan,
                })
        # As a run writes it: best / worst lung_mass, the internal decisions that occur (a true positive
        # and a true negative) and the external set's one error, a false positive.
        for split, kind, sample_id, label, prediction, p, lung_mass in (
            ("internal", "best", XSS, "covid", "covid", 0.7, 0.9), ("internal", "worst", XSS, "covid", "covid", 0.7, 0.1),
            ("internal", "tp", XSS, "covid", "covid", 0.7, 0.6), ("internal", "tn", "NA", "normal", "normal", 0.2, 0.6),
            ("ext_normal", "fp", "ext-1", "normal", "covid", 0.7, 0.6),
        ):
            file = f"gallery/{model_id}_{kind}.png" if split == "internal" else f"gallery/{model_id}__{split}__{kind}1.png"
            gallery.append({"model_id": model_id, "sample_id": sample_id, "fold": 0, "split": split, "kind": kind,
                            "label": label, "prediction": prediction, "p_positive": p, "lung_mass": lung_mass,
                            "file": file})
    def validation_row(metric, higher, kind, frame, n, means, auroc, auroc_ci, spearman, spearman_ci, separates):
        return {"metric": metric, "higher_is_better": higher, "kind": kind, "frame": frame, "n_models": sum(n),
                "n_relying": n[0], "n_not_relying": n[1], "mean_relying": means[0], "mean_not_relying": means[1],
                "auroc": auroc, "auroc_ci_low": auroc_ci[0], "auroc_ci_high": auroc_ci[1], "spearman": spearman,
                "spearman_ci_low": spearman_ci[0], "spearman_ci_high": spearman_ci[1], "separates": separates}

    validation = pd.DataFrame([
        validation_row("lung_mass", True, "attention", "all", (1, 2), (0.31, 0.62), 0.62, (0.40, 0.85),
                       0.30, (-0.20, 0.70), False),
        validation_row("artifact_occlusion_effect", False, "occlusion", "all", (1, 1), (0.95, 0.02), 1.0,
                       (0.93, 1.0), 0.88, (0.55, 1.0), True),
        validation_row("lung_mass", True, "attention", "128px", (1, 1), (0.31, 0.58), 0.97, (0.41, 1.0),
                       0.50, (-0.10, 0.90), False),
        validation_row("lung_mass", True, "attention", "128px crop", (0, 1), (math.nan, 0.66), math.nan,
                       (math.nan, math.nan), math.nan, (math.nan, math.nan), False),
    ])
    skipped = pd.DataFrame([{"path": "data/<b>bad</b>.png", "reason": "cannot identify image file", "source": "kermany"}])
    summary = {
        "name": "quick <demo>", "seed": 7, "selected_model": "r18-crop-s0", "device": "cpu",
        "selection": {"primary": "accuracy",
                      "constraints": {"lung_mass": {"min": 0.5}, "artifact_occlusion_effect": {"max": 0.1}},
                      "pareto": ["accuracy", "lung_mass"]},
        "metric_directions": {"accuracy": "higher", "lung_mass": "higher", "border_mass": "lower",
                              "artifact_occlusion_effect": "lower"},
        "notes": ["artifact_mass is not applicable for r18-crop-s0 (no artifact in view after the crop); "
                  "its constraint counted as met"],
        "warnings": {"all-zero Grad-CAM map": 3}, "stage_seconds": {"train": 12.5}, "finished": "2024-05-01T10:00:00",
    }
    return ResultTables(results=pd.DataFrame(results), models=pd.DataFrame(models), images=pd.DataFrame(images),
                        validation=validation, skipped=skipped, gallery=pd.DataFrame(gallery), summary=summary)


@pytest.fixture
def run_dir(tmp_path):
    tables = make_tables()
    write_tables(tables, tmp_path)
    image, heat, lung, artifact = phantom()
    (tmp_path / "gallery").mkdir()
    for file in tables.gallery["file"]:
        (tmp_path / file).write_bytes(overlay_png(image, heat, lung, artifact))
    return tmp_path


def test_tables_round_trip_keeps_text_ids_and_booleans(run_dir):
    tables = read_tables(run_dir)
    assert set(tables.images["sample_id"]) == {XSS, "NA", "ext-1"}  # "NA" stays text, not NaN
    assert tables.models["selected"].dtype == bool and tables.models["selected"].sum() == 1
    assert tables.models.loc[0, "violations"] == ""
    assert tables.grid_columns[-1] == "shortcut_strength" and tables.data_axes == ["shortcut_strength"]
    assert tables.metrics == METRICS
    assert tables.selected_model == "r18-crop-s0"


def test_optional_files_may_be_absent_or_empty(run_dir):
    (run_dir / "validation.csv").unlink()
    (run_dir / "gallery.csv").write_text("")
    (run_dir / "skipped.csv").write_text("path,reason,source\n")
    tables = read_tables(run_dir)
    assert tables.validation.empty and tables.gallery.empty and tables.skipped.empty
    html = render_report(run_dir).read_text()
    assert "No validation table" in html and "Every file could be read" in html


@pytest.mark.parametrize("name", ["models.csv", "summary.json"])
def test_missing_required_file_is_named(run_dir, name):
    (run_dir / name).unlink()
    with pytest.raises(ResultsError, match=re.escape(name)):
        read_tables(run_dir)


def test_corrupt_files_are_named(run_dir):
    (run_dir / "summary.json").write_text("{not json")
    with pytest.raises(ResultsError, match="summary.json"):
        read_tables(run_dir)
    (run_dir / "summary.json").write_text("{}")
    models = pd.read_csv(run_dir / "models.csv").drop(columns=["rank"])
    models.to_csv(run_dir / "models.csv", index=False)
    with pytest.raises(ResultsError, match=r"models.csv lacks column\(s\) rank"):
        read_tables(run_dir)


def test_overlay_png_draws_heatmap_and_both_contours():
    image, heat, lung, artifact = phantom(32)
    png = Image.open(io.BytesIO(overlay_png(image, heat, lung, artifact)))
    assert png.size == (192, 192)  # 32 px enlarged x6, nearest
    pixels = np.asarray(png.convert("RGB"))
    colours = {tuple(c) for c in pixels.reshape(-1, 3)}
    assert LUNG_COLOUR in colours and ARTIFACT_COLOUR in colours
    # Where the map is zero the image stays grey; at the map's peak it is coloured.
    corner = pixels[-1, -1]
    assert corner[0] == corner[1] == corner[2]
    peak = pixels[6 * 16, 6 * 9 + 3]
    assert len(set(peak)) > 1
    flat = np.asarray(Image.open(io.BytesIO(overlay_png(image, np.zeros_like(heat), None, None))))
    assert (flat[..., 0] == flat[..., 1]).all()  # an all-zero map adds no colour


def test_overlay_png_rejects_mismatched_shapes():
    image, heat, lung, _ = phantom(32)
    with pytest.raises(ValueError, match="lung_mask shape"):
        overlay_png(image, heat, lung[:10], None)


def test_report_is_self_contained_and_escapes_data(run_dir):
    html = render_report(run_dir).read_text()
    assert (run_dir / "report.html").is_file()
    assert XSS not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<b>bad</b>" not in html and "data/&lt;b&gt;bad&lt;/b&gt;.png" in html
    assert "quick &lt;demo&gt;" in html
    assert "http://" not in html and "https://" not in html
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", html)  # only data URIs and anchors
    # 3 models x (best/worst, decisions tp/tn, external fp) + colour bar
    assert html.count('src="data:image/png;base64,') == 3 * (2 + 2 + 1) + 1


def test_report_content(run_dir):
    html = render_report(run_dir).read_text()
    # Header: selected model and the rule with directions.
    assert "Selected model: <b class=\"id\">r18-crop-s0</b>" in html
    assert "<code>lung_mass</code> ≥ 0.5" in html and "<code>artifact_occlusion_effect</code> ≤ 0.1" in html
    assert "its constraint counted as met" in html
    # Ranking: rank order, mean ± std, arrows, the violated constraint in red, n/a counted as met.
    ranking = html[html.index('id="ranking"'):html.index('id="scatter"')]
    assert ranking.index("r18-crop-s0") < ranking.index("r18-nocrop-s0") < ranking.index("r18-nocrop-s1")
    assert '0.800 <span class="ci">[0.78, 0.82]</span><span class="sd">± 0.010</span>' in ranking
    assert "lung_<wbr>mass&nbsp;↑" in ranking and "border_<wbr>mass&nbsp;↓" in ranking
    assert '<td class="num bad">0.310 <span class="ci">[0.29, 0.33]</span><span class="sd">± 0.010</span></td>' in ranking
    assert "n/a by construction, counted as met: artifact_mass" in ranking
    assert "? unverified: artifact_occlusion_effect" in ranking and ranking.count("✓ meets all") == 1
    assert "128px crop" in ranking and "4×4 map, stride 32 px" in ranking
    assert "lung_mass=0.31 &lt; min 0.5" in ranking
    # Scatter: one point per model, shortcut-trained marked, Pareto step line, selected ring.
    svg = html[html.index("<svg"):html.index("</svg>")]
    assert svg.count("<title>") == 3 and svg.count('class="shortcut"') == 1 and svg.count('class="ring"') == 1
    assert svg.count('class="whisker"') == 6  # x and y CI per model
    assert "relies on the marker (shortcut_reliance &gt; 0.1)" in html
    assert re.search(r'class="front" d="M[\d.]+,[\d.]+ V[\d.]+ H[\d.]+"', svg)
    # Crop pairs, validation verdicts, external sets, confusion, gallery captions, data.
    crop = html[html.index('id="crop"'):html.index('id="validation"')]
    assert "mean (1 pair)" in crop and "0.660" in crop and "0.580" in crop
    validation = html[html.index('id="validation"'):html.index('id="external"')]
    assert "does not separate" in validation and ">separates<" in validation and "1.00" in validation
    assert "shortcut mean − clean mean" not in validation and "clean twin" in validation
    main = validation[:validation.index("<details>")]
    assert main.count("<tr><td><code>") == 2 and "128px" not in main
    assert '0.62 <span class="ci">[0.40, 0.85]</span>' in main and '+0.88 <span class="ci">[+0.55, +1.00]</span>' in main
    per_frame = validation[validation.index("<details>"):]
    assert per_frame.count('class="frame-row"') == 2
    assert "<td class=\"id\">128px</td>" in per_frame and "<td class=\"id\">128px crop</td>" in per_frame
    assert "does not separate (CI reaches 0.5)" in per_frame and "cannot tell" in per_frame
    external = html[html.index('id="external"'):html.index('id="confusion"')]
    assert "ext_normal" in external and "covid 100% · normal 0%" in external and "-0.550" in external
    confusion = html[html.index('id="confusion"'):html.index('id="decisions"')]
    assert '<td class="diag">8</td>' in confusion and "<td>2</td>" in confusion
    assert "lung_mass = 0.900" in html and "for display only" in html
    data = html[html.index('id="data"'):]
    assert "Skipped files: 1" in data and "cannot identify image file" in data


def test_no_selected_model_is_loud(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["selected_model"] = None
    (run_dir / "summary.json").write_text(json.dumps(summary))
    html = render_report(run_dir).read_text()
    assert "No model meets the constraints" in html


def test_older_tables_without_new_optional_columns_still_render():
    from auditbench.report.html import render_html

    tables = make_tables()
    new = [c for c in tables.models if c.endswith(("_ci_low", "_ci_high")) or c.startswith("shortcut_reliance")]
    tables.models = tables.models.drop(columns=[*new, "frame", "cam_map_size", "cam_stride", "verified", "unverified"])
    tables.validation = tables.validation[tables.validation["frame"] == "all"].drop(
        columns=["frame", "auroc_ci_low", "auroc_ci_high", "spearman", "spearman_ci_low", "spearman_ci_high"])
    html = render_html(tables)
    ranking = html[html.index('id="ranking"'):html.index('id="scatter"')]
    assert 'class="ci"' not in ranking and "unverified:" not in ranking and "frame / map" not in ranking
    svg = html[html.index("<svg"):html.index("</svg>")]
    assert 'class="whisker"' not in svg and svg.count('class="shortcut"') == 1  # shortcut_strength colouring
    assert "shortcut in training (shortcut_strength &gt; 0)" in html
    validation = html[html.index('id="validation"'):html.index('id="external"')]
    assert ">separates<" in validation and "<details>" not in validation
