"""The finish stage's judgement of the audit itself: the validation table (does each metric tell the models that
rely on the known shortcut from those that do not?) and what changes with the explanation method."""
from __future__ import annotations

import pandas as pd

from auditbench.audit.metrics import METRICS
from auditbench.audit.validation import metric_validation
from auditbench.data.datasets import generator_of
from auditbench.protocol.schema import Protocol


def validation_table(models: pd.DataFrame, protocol: Protocol, notes: list[str]) -> pd.DataFrame | None:
    """Known-answer check of the audit itself (synthetic data): does each metric tell the models
    that rely on the marker (shortcut_reliance above validation.reliance_threshold, measured on
    clean twins) from those that do not, within a stratum? The known answer is the one the data's
    generator declares (``data.synthetic_adapter``).

    A stratum is a model frame and, where the run has several backbones, a backbone: models are compared only
    with models of the same frame and backbone. Both change every map statistic whatever the model relies on
    (a random-init backbone that never relies would otherwise make any metric that tells backbones apart look
    like a detector: on validation.yaml, pooling the backbones within a frame gave Grad-CAM ``border_mass``
    AUROC 0.79, within efficientnet_lite0 alone 0.63). validation.csv's ``frame`` column names the stratum."""
    generator = generator_of(protocol)
    answer = f"{generator.known_answer}_mean" if generator is not None and generator.known_answer else None
    if answer is None or answer not in models:
        notes.append("No validation table: only generated data with a known answer (the synthetic phantoms' clean "
                     "twins of the test images) can score the metrics.")
        return None
    table = models.copy()
    threshold = protocol.validation.reliance_threshold
    table["relies"] = table[answer] > threshold
    if {"backbone", "weights"} <= set(table.columns):
        backbones = table["backbone"].astype(str) + " (" + table["weights"].astype(str) + ")"
        if backbones.nunique() > 1:
            table["frame"] = table["frame"].astype(str) + " · " + backbones
    if table["relies"].all() or not table["relies"].any():
        notes.append(
            f"No validation table: {int(table['relies'].sum())} of {len(table)} models rely on the marker "
            f"(shortcut_reliance > {threshold:g}); it needs both kinds."
        )
        return None
    # Every metric but the classification ones and the answer itself, detector or not: the table publishes what
    # each one detects (validation.csv's ``detector`` says which claim to).
    validated = [name for name, info in METRICS.items()
                 if info.kind != "classification" and f"{name}_mean" != answer]
    metrics = [m for m in validated if f"{m}_mean" in table]
    # Per explanation method: each method's maps make its own attention, agreement and faithfulness metrics.
    parts = []
    for method, rows in table.groupby("method", sort=False):
        part = metric_validation(rows.reset_index(drop=True), metrics, reliance_column=answer,
                                 n_boot=protocol.validation.bootstrap, seed=protocol.seed)
        part.insert(0, "method", method)
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def method_notes(models: pd.DataFrame, protocol: Protocol) -> list[str]:
    """With several explanation methods: whether the selection would change with another one as the lens."""
    if len(protocol.explain.method) < 2:
        return []
    chosen = {method: rows.loc[rows["selected"], "model_id"].tolist() for method, rows in models.groupby("method", sort=False)}
    primary = chosen.get(protocol.explain.primary, [])
    differing = [f"{method}: {', '.join(ids) or 'none'}" for method, ids in chosen.items() if ids != primary]
    if not differing:
        return [f"Every explanation method ({', '.join(protocol.explain.method)}) selects the same model."]
    return [f"The selection uses {protocol.explain.primary} maps ({', '.join(primary) or 'no model'}); with another "
            f"method's maps it would be: {'; '.join(differing)} (models.csv, one row per model and method)."]
