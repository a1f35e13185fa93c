"""The synthetic generator as a registered data set, declaring its own grid axes and known answer.

A reader (``kermany``, ``ieee8023``, ``manifest``, ...) loads files in a public layout. A *generator*
makes its images, so its entry in :data:`~auditbench.data.datasets.DATASETS` also declares:

- its **data axes**: grid axes that change the training data, each read from a list-valued protocol
  field (here the shortcut strength, the marker placement and the phantom seed), so the model grid,
  model ids, the planner and ``auditbench audit`` all take them from here;
- its **known answer**: the behavioural metric it makes measurable (``shortcut_reliance``: how much
  each model's output moves between a test image and its marker-free clean twin), against which the
  validation table scores every metric that claims to detect shortcuts.

A protocol uses it with ``data.dataset: synthetic`` (the default); settings are ``data.synthetic``.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from auditbench.data.datasets import DATASETS
from auditbench.data.prepare import (
    TaskData, balance_classes, check_classes, check_fold_sizes, raw_label_counts, select_task,
)
from auditbench.data.records import Sample
from auditbench.data.synthetic import SyntheticConfig, generate
from auditbench.protocol.schema import Protocol, TaskSpec

# Each data axis and the protocol field (a list) its values come from.
AXIS_FIELDS = {
    "shortcut_strength": "data.synthetic.shortcut_strength",
    "artifact_placement": "data.synthetic.artifact_placement",
    "data_seed": "data.synthetic.seed",
}


def synthetic_axes(protocol: Protocol) -> dict[str, list]:
    """The values of each data axis (the phantom seed defaults to the protocol seed)."""
    synthetic = protocol.data.synthetic
    return {
        "shortcut_strength": list(synthetic.shortcut_strength),
        "artifact_placement": list(synthetic.artifact_placement),
        "data_seed": list(synthetic.seed) if synthetic.seed is not None else [protocol.seed],
    }


def _view(config: SyntheticConfig, shortcut_strength: float, variant: str) -> list[Sample]:
    """One view of the phantoms. Views that hold the same images (the decorrelated test view of
    every training strength) share cached features by content (``records.content_key``)."""
    return generate(config, shortcut_strength, variant).samples


@DATASETS.register("synthetic", axes=synthetic_axes, axis_fields=AXIS_FIELDS, known_answer="shortcut_reliance")
def synthetic_task_data(protocol: Protocol, task: TaskSpec, axes: dict, check_folds: bool = True) -> TaskData:
    """One cell of the data axes: training view, decorrelated test view and the test images' clean
    twins (the known answer). ``check_folds=False``: images that are only tested (``auditbench
    audit``) need no folds."""
    spec = protocol.data.synthetic
    kwargs = dict(
        n_images=spec.n_images,
        image_size=spec.image_size,
        classes=tuple(spec.classes),
        positive_class=task.positive if task.positive in spec.classes else spec.classes[0],
        base_artifact_rate=spec.base_artifact_rate,
        artifact_band=spec.artifact_band,
        artifact_placement=axes["artifact_placement"],
        seed=axes["data_seed"],
    )
    if spec.disease_strength is not None:
        kwargs["disease_strength"] = spec.disease_strength
    config = SyntheticConfig(**kwargs)
    train_view = _view(config, axes["shortcut_strength"], "train")
    test_view = _view(config, spec.test_shortcut_strength, "test")
    # The same test images without any marker: the counterfactual that measures reliance.
    clean_view = _view(dataclasses.replace(config, base_artifact_rate=0.0), 0.0, "test")
    keep, labels = select_task(train_view, task)
    check_classes(labels, task, "synthetic data", raw_label_counts(train_view))
    keep, labels = balance_classes(keep, labels, protocol.data, protocol.seed)
    groups = np.array([train_view[i].patient_id for i in keep])
    if check_folds:
        check_fold_sizes(protocol, task, labels, groups, "synthetic data")
    return TaskData(
        train_view=[train_view[i] for i in keep],
        test_view=[test_view[i] for i in keep],
        labels=labels,
        groups=groups,
        clean_view=[clean_view[i] for i in keep],
    )
