"""Stage 4b: sanity checks of each explanation method, once per backbone, on a trained model.

Adebayo et al., "Sanity checks for saliency maps", NeurIPS 2018; Arun et al., "Assessing the
trustworthiness of saliency maps for localizing abnormalities in medical imaging", Radiology: AI
2021. A map that barely changes when the model's weights are re-initialised, or when the model is
trained on shuffled labels, does not explain *this* model. On the first model of each backbone
(plan order), fold 0, ``sanity.images`` internal test images (the first ``sanity.expensive_images`` of
them for a method registered as expensive, Score-CAM):

- *cascading randomisation*: the model's units re-initialised cumulatively from the top
  (``audit.sanity.cascading_randomisation``), maps compared with the trained model's by Spearman
  rank correlation and SSIM after each step;
- *label shuffle*: a head trained on the fold's shuffled labels over the pretrained backbone's
  features (shuffling and fine-tuning a whole backbone again is left out: it would double the
  grid's cost), maps compared the same way;
- the baseline: the similarity of random pairs of the trained model's maps of different images.

A test passes when the similarity falls to that baseline (``randomisation_verdict``). Rows go to
sanity.csv; models.csv's ``explanation_sanity`` carries the cascade's verdict of each model's backbone.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from auditbench.data.prepare import TaskData
from auditbench.data.splits import Fold
from auditbench.audit.sanity import (
    cascading_randomisation, map_similarity, random_pair_baseline, randomisation_verdict, shuffled_labels,
)
from auditbench.models.classifier import Classifier, Head
from auditbench.pipeline.plan import RunPlan
from auditbench.pipeline.predict import predict_and_explain
from auditbench.pipeline.records import CellKey, GroupInputs, ModelFold, stable_seed
from auditbench.protocol.grid import ModelSpec
from auditbench.training.trainer import train_head

SANITY_COLUMNS = ["model_id", "backbone", "weights", "method", "layer", "test", "step", "unit", "n_images", "spearman", "ssim",
                  "baseline_spearman", "baseline_ssim", "verdict", "reason"]
CASCADE, LABEL_SHUFFLE = "cascading_randomisation", "label_shuffle"


def sanity_cells(plan: RunPlan) -> set[CellKey]:
    """The cell that carries each backbone's checks: its first model in plan order, first fold."""
    chosen: dict[tuple[str, str], CellKey] = {}
    for group in plan.groups:
        for spec, fold in group.cells:
            chosen.setdefault((spec.backbone, spec.weights), CellKey(spec.model_id, fold.index))
    return set(chosen.values())


def sanity_rows(context, spec: ModelSpec, model: ModelFold, inputs: GroupInputs, data: TaskData, fold: Fold) -> list[dict]:
    """sanity.csv's rows for one trained model (``context``: the run's ``CellContext``)."""
    protocol = context.protocol
    rows = fold.test[: protocol.sanity.images]
    if len(rows) < 2:
        return []
    frames = inputs.test.frames(rows)
    groups = [data.test_view[i].patient_id for i in rows]
    seed = stable_seed(protocol.seed, "sanity", spec.model_id)

    def maps_of(candidate: ModelFold, cached) -> dict[str, np.ndarray]:
        # A method registered as expensive maps only the first sanity.expensive_images of the rows.
        return predict_and_explain(candidate, inputs, frames, cached, context.cams, protocol.explain,
                                   context.accelerator, expensive_images=protocol.sanity.expensive_images).heatmaps

    original = maps_of(model, inputs.test.maps(rows))
    baselines = {method: random_pair_baseline(maps, n_pairs=50, seed=seed) for method, maps in original.items()}
    common = {method: {"model_id": spec.model_id, "backbone": spec.backbone, "weights": spec.weights, "method": method,
                       "layer": protocol.explain.layer, "n_images": len(original[method]),
                       "baseline_spearman": float(baseline.mean_spearman), "baseline_ssim": float(baseline.mean_ssim)}
              for method, baseline in baselines.items()}
    out = {method: [] for method in original}
    steps = list(cascading_randomisation(model.classifier, seed=seed, granularity=protocol.sanity.granularity))
    for step in steps:
        # The backbone changes from the first backbone unit on: its cached maps no longer apply.
        randomised = maps_of(ModelFold(step.model, frozen=False), None)
        for method, maps in randomised.items():
            similarity = map_similarity(original[method], maps)
            row = {**common[method], "test": CASCADE, "step": step.index, "unit": step.unit.name,
                   "spearman": _mean(similarity.spearman), "ssim": _mean(similarity.ssim), "verdict": "", "reason": ""}
            if step is steps[-1]:
                row.update(_verdict(similarity, baselines[method], groups[: len(maps)], protocol.metrics.bootstrap,
                                    seed))
            out[method].append(row)
    shuffled = maps_of(_shuffled_head_model(protocol, spec, inputs, data, fold, seed), inputs.test.maps(rows))
    for method, maps in shuffled.items():
        similarity = map_similarity(original[method], maps)
        out[method].append({**common[method], "test": LABEL_SHUFFLE, "step": 0, "unit": "head trained on shuffled labels",
                            "spearman": _mean(similarity.spearman), "ssim": _mean(similarity.ssim),
                            **_verdict(similarity, baselines[method], groups[: len(maps)], protocol.metrics.bootstrap,
                                       seed)})
    return [row for method_rows in out.values() for row in method_rows]


def _shuffled_head_model(protocol, spec: ModelSpec, inputs: GroupInputs, data: TaskData, fold: Fold, seed: int) -> ModelFold:
    torch.manual_seed(seed)
    head = Head(inputs.backbone.num_features, spec.hidden, protocol.models.dropout, num_classes=2)
    labels = shuffled_labels(data.labels[fold.train], seed=seed)
    train_head(head, inputs.train.pooled[fold.train], torch.as_tensor(labels, dtype=torch.long),
               inputs.train.pooled[fold.validation],
               torch.as_tensor(shuffled_labels(data.labels[fold.validation], seed=seed + 1), dtype=torch.long),
               protocol.training.head, protocol.training.batch_size, seed)
    return ModelFold(Classifier(inputs.backbone, head), frozen=True)


def _verdict(similarity, baseline, groups, n_boot: int, seed: int) -> dict:
    verdict = randomisation_verdict(similarity, baseline, groups=groups, n_boot=max(n_boot, 100), seed=seed)
    word = "undefined" if verdict.passed is None else "pass" if verdict.passed else "fail"
    return {"verdict": word, "reason": verdict.reason}


def sanity_column(models: pd.DataFrame, sanity: pd.DataFrame) -> pd.Series:
    """models.csv's ``explanation_sanity``: the cascade verdict of the row's method on its model's
    backbone x weights (``not run`` where no check ran, e.g. ``sanity.images: 0``)."""
    final = sanity[(sanity["test"] == CASCADE) & (sanity["verdict"] != "")]
    verdicts = {(row.backbone, row.weights, row.method): row.verdict for row in final.itertuples()}
    keys = zip(models["backbone"], models["weights"], models["method"])
    return pd.Series([verdicts.get(key, "not run") for key in keys], index=models.index)


def _mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else float("nan")


def sanity_notes(sanity: pd.DataFrame) -> list[str]:
    """One line per backbone: the verdicts of both tests with the similarities behind them."""
    lines = []
    for (backbone, weights, _method), rows in sanity.groupby(["backbone", "weights", "method"], sort=False):
        final = rows[rows["verdict"] != ""]
        parts = [f"{row.test.replace('_', ' ')} {row.verdict} (SSIM {row.ssim:.2f} vs random pairs {row.baseline_ssim:.2f})"
                 for row in final.itertuples()]
        lines.append(f"Sanity checks of {rows['method'].iloc[0]} at {rows['layer'].iloc[0]} on {backbone} ({weights} "
                     f"weights, model {rows['model_id'].iloc[0]}): {'; '.join(parts)}. A method whose maps survive "
                     "randomisation does not explain the model (sanity.csv).")
    return lines
