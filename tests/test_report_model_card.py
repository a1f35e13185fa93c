"""model_card.md and model_card.json: written beside report.html from the tables alone, plain JSON,
Markdown whose data cannot break a table or inject markup."""
from __future__ import annotations

import json
import math
import re

import pandas as pd
import pytest
from test_report import MEANS, METRICS, XSS, make_tables

from auditbench.report.html import REPORT_FILES, render_files, render_report
from auditbench.report.model_card import build_model_card
from auditbench.report.model_card_markdown import card_markdown, md
from auditbench.report.tables import read_tables, write_tables

PROVENANCE = {"run_id": "20261203T101500Z-1a2b3c4d", "protocol_sha256": "ab" * 32, "data_fingerprint": "cd" * 32,
              "git_commit": "0123abcd+dirty", "auditbench_version": "0.1.0"}
HOSTILE_PATH = "data/a|b\nc<script>x</script>_*[y](z).png"


@pytest.fixture
def run_dir(tmp_path):
    tables = make_tables()
    tables.summary.update(PROVENANCE)
    tables.skipped = pd.DataFrame([{"path": HOSTILE_PATH, "reason": "cannot | identify\r\nimage", "source": "kermany"}])
    write_tables(tables, tmp_path)
    return tmp_path


def test_render_report_writes_the_cards_beside_report_html(run_dir):
    assert render_report(run_dir) == run_dir / "report.html"
    assert sorted(p.name for p in run_dir.iterdir() if p.name in REPORT_FILES) == sorted(REPORT_FILES)
    written = {name: (run_dir / name).read_bytes().decode("utf-8") for name in REPORT_FILES}  # CR kept
    assert render_files(read_tables(run_dir)) == written  # from the tables alone, and the same every time


def test_json_card_of_the_selected_model(run_dir):
    render_report(run_dir)
    card = json.loads((run_dir / "model_card.json").read_text())
    assert card["model_id"] == "r18-crop-s0" and card["selected"] is True and card["rank"] == 1
    assert card["provenance"] == {"run_name": "quick <demo>", **PROVENANCE, "seed": 7, "device": "cpu",
                                  "started": None, "finished": "2024-05-01T10:00:00"}
    metrics = {m["metric"]: m for m in card["metrics"]}
    assert list(metrics) == METRICS  # every metric of models.csv (confusion counts apart)
    accuracy = metrics["accuracy"]
    assert accuracy["mean"] == MEANS["r18-crop-s0"][0] and accuracy["higher_is_better"] is True
    assert math.isclose(accuracy["ci_low"], 0.78) and math.isclose(accuracy["ci_high"], 0.82)
    assert metrics["artifact_mass"]["mean"] is None and metrics["artifact_mass"]["ci_low"] is None  # NaN -> null
    assert card["confusion_internal"] == {"tn": 8, "fp": 2, "fn": 4, "tp": 6}
    assert card["selection"]["constraints"] == [
        {"metric": "lung_mass", "bound": "min", "value": 0.5, "model_value": 0.66, "status": "met"},
        {"metric": "artifact_occlusion_effect", "bound": "max", "value": 0.1, "model_value": None,
         "status": "undefined"},
    ]
    (external,) = card["external_results"]
    assert external["split"] == "ext_normal" and external["source_shortcut_suspected"] is True
    assert external["positive_share"] == 1.0 and external["labels"] == {"normal": 1}
    assert any(s.startswith("Source shortcut suspected: 100% of the 1 image of external set 'ext_normal'")
               for s in card["shortcuts"])
    internal = card["data"]["test_images"][0]
    assert internal == {"split": "internal", "n_images": 2, "by_source": {"ieee8023": 1, "kermany": 1},
                        "by_label": {"covid": 1, "normal": 1}}
    assert card["data"]["skipped"]["listed"][0]["path"] == HOSTILE_PATH  # plain data: no escaping in JSON
    assert "Not a medical device" in card["intended_use"]


def test_card_without_a_selection_describes_the_best_ranked_and_says_so(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["selected_model"] = None
    (run_dir / "summary.json").write_text(json.dumps(summary))
    card = build_model_card(read_tables(run_dir))
    assert card["model_id"] == "r18-crop-s0" and card["selected"] is False
    assert card["status"].startswith("not selected") and "best-ranked" in card["status"]
    assert "Status: not selected: no model meets the selection rule; this card describes the best-ranked model." \
           in card_markdown(card)


def test_markdown_escapes_every_data_cell(run_dir):
    render_report(run_dir)
    text = (run_dir / "model_card.md").read_text()
    assert "<script>" not in text and "&lt;script&gt;" in text
    (row,) = [line for line in text.splitlines() if "kermany |" in line and "script" in line]
    cells = re.split(r"(?<!\\)\|", row)[1:-1]  # unescaped pipes delimit cells
    assert len(cells) == 3
    assert cells[0].strip() == r"data/a\|b c&lt;script&gt;x&lt;/script&gt;\_\*\[y\](z).png"
    assert cells[1].strip() == r"cannot \| identify image"
    assert "quick &lt;demo&gt;" in text and XSS not in text


@pytest.mark.parametrize(("raw", "escaped"), [
    ("a|b", r"a\|b"),
    ("line\nbreak\r\nend", "line break end"),
    ("<b>&</b>", "&lt;b&gt;&amp;&lt;/b&gt;"),
    ("# _x_ *y* `z` ~w~ [l](u) \\", r"\# \_x\_ \*y\* \`z\` \~w\~ \[l\](u) \\"),
    (None, ""),
    (0.5, "0.5"),
])
def test_md_escape(raw, escaped):
    assert md(raw) == escaped
