"""The heatmap gallery (gallery PNGs embedded as data URIs) and the data section."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from auditbench.report.formatting import data_uri, fmt, fmt_int, text
from auditbench.report.tables import GALLERY_DIR, INTERNAL_SPLIT, ResultTables


LUNG_MASS_KINDS = ("best", "worst")


def gallery_rows(tables: ResultTables) -> pd.DataFrame:
    """gallery.csv with every column; a run from before the gallery of decisions held only internal
    best / worst rows and lacks ``split`` and ``prediction``, one from before the per-source
    examples lacks ``source``."""
    frame = tables.gallery
    defaults = {"split": INTERNAL_SPLIT, "prediction": "", "source": ""}
    return frame.assign(**{column: value for column, value in defaults.items() if column not in frame})


def gallery(tables: ResultTables, models: pd.DataFrame) -> list[dict[str, Any]]:
    """Per model, its internal images of the highest and lowest lung_mass (the decisions have their own section)."""
    rows = gallery_rows(tables)
    rows = rows[(rows["split"] == INTERNAL_SPLIT) & rows["kind"].isin(LUNG_MASS_KINDS)]
    out = []
    for model in models["model_id"]:
        part = rows[rows["model_id"] == model]
        part = part.assign(_order=(part["kind"] != "best").astype(int)).sort_values(["_order", "lung_mass"],
                                                                                    ascending=[True, False])
        figures = [{
            "kind": text(r["kind"]), "sample_id": text(r["sample_id"]), "label": text(r["label"]),
            "fold": fmt_int(r["fold"]), "p": fmt(r["p_positive"]), "lung_mass": fmt(r["lung_mass"]),
            "file": text(r["file"]), "uri": gallery_uri(tables.out_dir, r["file"]),
        } for _, r in part.iterrows()]
        if figures:
            out.append({"model_id": text(model), "figures": figures})
    return out


def gallery_uri(out_dir: Path | None, name: Any) -> str | None:
    """Data URI of a gallery PNG; None when absent or outside the output folder (never embed other files)."""
    if out_dir is None or not isinstance(name, str) or not name:
        return None
    root = out_dir.resolve()
    for candidate in (root / name, root / GALLERY_DIR / name):
        path = candidate.resolve()
        if path.is_relative_to(root) and path.suffix.lower() == ".png" and path.is_file():
            return data_uri(path.read_bytes())
    return None


def data_info(tables: ResultTables) -> dict[str, Any]:
    images = tables.images.drop_duplicates(["split", "source", "sample_id"])
    counts = images.groupby(["source", "mask_source"]).size().unstack(fill_value=0)
    return {
        "mask_columns": [text(c) for c in counts.columns],
        "mask_rows": [(text(source), [int(v) for v in row]) for source, row in counts.iterrows()],
        "splits": [(text(k), int(v)) for k, v in images["split"].value_counts(sort=False).items()],
        "skipped": [(text(r["path"]), text(r["reason"]), text(r["source"])) for _, r in tables.skipped.iterrows()],
    }
