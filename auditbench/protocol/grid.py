"""Expand a protocol's grid axes into one :class:`ModelSpec` per model (one function, benchopt-style)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from auditbench.protocol.schema import BackboneSpec, Protocol, TaskSpec


@dataclass(frozen=True)
class ModelSpec:
    """One cell of the model grid."""

    model_id: str
    backbone: str
    weights: str
    hidden: int
    finetune: bool
    augment: bool
    crop: bool
    task: TaskSpec
    data_axes: dict[str, float | str | int] = field(default_factory=dict, hash=False)

    def grid_row(self) -> dict:
        """The grid columns of the result tables (docs/tables.md)."""
        return {
            "model_id": self.model_id,
            "backbone": self.backbone,
            "weights": self.weights,
            "hidden": self.hidden,
            "finetune": self.finetune,
            "augment": self.augment,
            "crop": self.crop,
            "task": self.task.name,
            **self.data_axes,
        }


def finetune_modes(protocol: Protocol, backbone: BackboneSpec) -> list[bool]:
    """The training modes of one backbone: its own ``finetune`` list, else ``training.finetune``."""
    return backbone.finetune if backbone.finetune is not None else protocol.training.finetune


def _weights_tag(weights: str) -> str:
    return weights if weights in ("imagenet", "none") else "file"


def expand_grid(protocol: Protocol, data_axes: dict[str, list]) -> list[ModelSpec]:
    """Every model of the grid. ``data_axes``: the grid axes of the protocol's data, declared by the
    data set that makes it (``auditbench.data.datasets.data_axes``; real data sets have none)."""
    axes = data_axes
    axis_names = list(axes)
    backbone_names = [b.name for b in protocol.models.backbones]
    ambiguous_backbones = {n for n in backbone_names if backbone_names.count(n) > 1}
    specs = []
    cells = (
        (task, axis_values, backbone, hidden, finetune, augment, crop)
        for task, axis_values, backbone, hidden in itertools.product(
            protocol.task, itertools.product(*axes.values()), protocol.models.backbones, protocol.models.hidden,
        )
        for finetune, augment, crop in itertools.product(
            finetune_modes(protocol, backbone), protocol.training.augment, protocol.preprocessing.crop,
        )
    )
    for task, axis_values, backbone, hidden, finetune, augment, crop in cells:
        axis_map = dict(zip(axis_names, axis_values))
        specs.append(
            ModelSpec(
                model_id=_model_id(protocol, task, axis_map, axes, backbone, hidden, finetune, augment, crop,
                                   ambiguous_backbones),
                backbone=backbone.name,
                weights=backbone.weights,
                hidden=hidden,
                finetune=finetune,
                augment=augment,
                crop=crop,
                task=task,
                data_axes=axis_map,
            )
        )
    ids = [s.model_id for s in specs]
    if len(set(ids)) != len(ids):
        raise ValueError("the grid has duplicate models; remove repeated values from the grid axes")
    return specs


def _model_id(
    protocol: Protocol,
    task: TaskSpec,
    axis_map: dict[str, float],
    axes: dict[str, list],
    backbone: BackboneSpec,
    hidden: int,
    finetune: bool,
    augment: bool,
    crop: bool,
    ambiguous_backbones: set[str],
) -> str:
    """A readable id naming only the axes that vary, so ids stay short and stable."""
    parts = [backbone.name]
    if backbone.name in ambiguous_backbones:
        parts.append(_weights_tag(backbone.weights))
    if len(protocol.task) > 1:
        parts.append(task.name)
    if len(protocol.models.hidden) > 1:
        parts.append(f"h{hidden}")
    if len({mode for b in protocol.models.backbones for mode in finetune_modes(protocol, b)}) > 1:
        parts.append("ft" if finetune else "frozen")
    if len(protocol.training.augment) > 1:
        parts.append("aug" if augment else "noaug")
    if len(protocol.preprocessing.crop) > 1:
        parts.append("crop" if crop else "full")
    for name, value in axis_map.items():
        if len(axes[name]) > 1:
            text = f"{value:g}" if isinstance(value, float) else str(value).replace("_", "")
            parts.append(f"{_axis_abbreviation(name)}{text}")
    return "-".join(parts)


def _axis_abbreviation(name: str) -> str:
    return "".join(word[0] for word in name.split("_"))
