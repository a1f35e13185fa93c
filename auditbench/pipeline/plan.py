"""Stage 1: load the data of every task and plan the grid into work units.

A work unit is one model x fold (:class:`CellKey`); units that share a backbone pass (same
backbone, weights, frame and task data) form a :class:`GroupPlan`, computed together so that each
image goes through each backbone once per frame. The plan's order is the order of every output
table, whatever order the units are computed in.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from auditbench.data.datasets import data_axes, generator_of
from auditbench.data.prepare import fill_missing_masks, load_sources, real_task_data
from auditbench.data.records import SkippedFile, data_fingerprint
from auditbench.data.splits import make_folds
from auditbench.pipeline.records import GroupPlan, TaskInputs
from auditbench.protocol.grid import ModelSpec, expand_grid
from auditbench.protocol.schema import Protocol


@dataclass
class RunPlan:
    """The grid, the data it runs on, and the groups of work units in output order."""

    specs: list[ModelSpec]
    task_inputs: list[TaskInputs]
    groups: list[GroupPlan]
    skipped: list[SkippedFile]
    notes: list[str]
    n_images: int
    data_fingerprint: str

    @property
    def n_cells(self) -> int:
        return sum(len(group.cells) for group in self.groups)


def load_task_inputs(protocol: Protocol, base_dir: Path) -> list[TaskInputs]:
    """Every task x data-axes cell of the data with its patient-grouped folds."""
    loaded = []
    generator = generator_of(protocol)
    if generator is not None:
        axes = generator.axes(protocol)
        for task in protocol.task:
            for values in itertools.product(*axes.values()):
                cell = dict(zip(axes, values))
                loaded.append((task, cell, generator.task_data(protocol, task, cell)))
    else:
        data = protocol.data
        internal = load_sources(data.sources, data, base_dir)
        external = {ext.name: load_sources(ext.sources, data, base_dir) for ext in data.external}
        everything = internal.samples + [s for source in external.values() for s in source.samples]
        fill_missing_masks(everything, data)
        loaded = [(task, {}, real_task_data(protocol, task, internal, external)) for task in protocol.task]
    training = protocol.training
    return [
        TaskInputs(task, axes, data, make_folds(data.labels, data.groups, training.folds, training.val_fraction, protocol.seed))
        for task, axes, data in loaded
    ]


def plan_run(protocol: Protocol, base_dir: Path) -> RunPlan:
    """Load the data and group the grid's model x fold units by backbone pass.

    Backbone and frame outermost: each sample's features are computed once for all tasks."""
    specs = expand_grid(protocol, data_axes(protocol))
    task_inputs = load_task_inputs(protocol, base_dir)
    groups = []
    for backbone_key in dict.fromkeys((s.backbone, s.weights, s.crop) for s in specs):
        for inputs in task_inputs:
            members = [s for s in specs if s.task.name == inputs.task.name and s.data_axes == inputs.axes
                       and (s.backbone, s.weights, s.crop) == backbone_key]
            if members:
                groups.append(GroupPlan(*backbone_key, inputs, members))
    skipped, notes = [], []
    for inputs in task_inputs:
        skipped.extend(s for s in inputs.data.skipped if s not in skipped)
        notes.extend(n for n in inputs.data.notes if n not in notes)
    views = [
        sample for inputs in task_inputs
        for view in (inputs.data.train_view, inputs.data.test_view, inputs.data.clean_view or [],
                     *(samples for samples, _ in inputs.data.external.values()))
        for sample in view
    ]
    return RunPlan(
        specs, task_inputs, groups, skipped, notes,
        n_images=sum(len(inputs.data.labels) for inputs in task_inputs),
        data_fingerprint=data_fingerprint(views),
    )
