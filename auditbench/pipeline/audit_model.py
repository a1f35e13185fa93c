"""`auditbench audit`: audit a classifier trained elsewhere -- nothing is trained -- with the metrics,
occlusion checks, external sets and report of `auditbench run` (docs/ci.md, "Gate a checkpoint you
did not train").

The model: an auditbench checkpoint folder (its config.json carries classes and preprocessing), or a
timm backbone with a state dict of :class:`~auditbench.models.classifier.Classifier` and what the
file does not say (:class:`StateDictHead`). The images: a protocol's ``data`` for its ``task``, every
one a test image (one "fold" whose test part is the whole internal set), plus ``data.external``.
The protocol's ``models``, ``preprocessing`` and ``training`` become the model's own, so that
protocol.resolved.yaml records what was audited. The stages are the run's: backbone passes,
:func:`~auditbench.pipeline.evaluate.evaluate_model`, :func:`~auditbench.pipeline.finish.finish_run`,
in a staging folder of :func:`~auditbench.outputs.prepare_output`.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from auditbench.data.datasets import generator_of
from auditbench.data.prepare import TaskData, fill_missing_masks, load_sources, real_task_data
from auditbench.data.records import data_fingerprint
from auditbench.data.splits import Fold
from auditbench.data.transforms import STUDY_CROP_RATIO
from auditbench.explain.cam_base import resolve_method
from auditbench.models.backbones import resolve_backbone
from auditbench.models.checkpoint import (
    CONFIG_FILE, WEIGHTS_FILE, CheckpointError, fit_state_dict, load_checkpoint, read_state_dict,
)
from auditbench.models.classifier import Classifier, build_classifier
from auditbench.outputs import PROTOCOL_FILE, Say, file_sha256, prepare_output, protocol_yaml
from auditbench.pipeline.evaluate import CellContext, evaluate_model
from auditbench.pipeline.finish import RunState, finish_run
from auditbench.pipeline.probes import probe_rows
from auditbench.pipeline.names import check_registered_names
from auditbench.pipeline.passes import BackbonePasses, model_frame
from auditbench.pipeline.plan import RunPlan
from auditbench.pipeline.records import GroupPlan, ModelFold, StageClock, TaskInputs
from auditbench.pipeline.store import FeatureStore
from auditbench.protocol.grid import ModelSpec
from auditbench.protocol.loader import dump_protocol, load_protocol
from auditbench.protocol.schema import Protocol, TaskSpec
from auditbench.registry import UnknownNameError
from auditbench.training.device import accelerator_for

STORE_DIR = "audit-store"  # the backbone passes' working folder in the staging folder; gone before the manifest


class AuditError(ValueError):
    """Bad input to an audit: one line naming the file, option or field (exit 2)."""


@dataclass
class StateDictHead:
    """What a bare state dict does not say about its model: the head and the preprocessing."""

    hidden: int
    classes: list[str] | None = None  # in output order; None: the task's (negative, positive)
    positive: str | None = None  # None: the second class
    input_size: int | None = None  # None: the backbone's default
    crop: bool = False
    crop_ratio: float = STUDY_CROP_RATIO


@dataclass
class AuditedModel:
    """A loaded classifier and what is known of it. ``config`` has a checkpoint config's keys
    (backbone, hidden, dropout, classes, positive_class, preprocessing, and those a run adds)."""

    model_id: str
    classifier: Classifier
    config: dict
    kind: str  # "checkpoint" or "state_dict"
    source: Path  # the checkpoint folder or the state dict file
    weights_file: Path
    weights_sha256: str
    notes: list[str] = field(default_factory=list)

    def described(self) -> dict:
        """summary.json's ``audited_model``: what was loaded, by path and sha256, and (a checkpoint
        of `auditbench run`) the run that trained it."""
        described = {"model_id": self.model_id, "kind": self.kind, "source": str(self.source.resolve()),
                     "weights_file": str(self.weights_file.resolve()), "weights_sha256": self.weights_sha256}
        if self.kind == "checkpoint":
            described["config_sha256"] = file_sha256(self.source / CONFIG_FILE)
        trained = {key: self.config[key] for key in ("run_id", "protocol_sha256", "protocol", "fold") if key in self.config}
        return {**described, "trained_by": trained} if trained else described


def load_model(model: str, weights: Path | None = None, head: StateDictHead | None = None,
               name: str | None = None) -> AuditedModel:
    """A checkpoint folder ``model`` (``weights`` None), or timm backbone ``model`` with the state
    dict ``weights`` and its ``head``. Raises :class:`AuditError` naming the file or option."""
    if weights is None:
        if not (folder := Path(model)).is_dir():
            raise AuditError(f"checkpoint folder not found: {folder} (a folder with {WEIGHTS_FILE} and {CONFIG_FILE}, "
                             "as `auditbench run` saves in models/<id>/; or a timm model name with --weights FILE)")
        try:
            classifier, config = load_checkpoint(folder)
        except CheckpointError as error:
            raise AuditError(str(error)) from None
        except UnknownNameError as error:
            raise AuditError(f"{folder / CONFIG_FILE}: backbone: {error}") from None
        except (TypeError, ValueError, KeyError) as error:  # a config.json edited by hand
            raise AuditError(f"{folder / CONFIG_FILE}: cannot build the model it describes: {error}") from None
        _check_config(config, folder / CONFIG_FILE)
        kind, source, weights_file = "checkpoint", folder, folder / WEIGHTS_FILE
    else:
        if head is None:
            raise AuditError("--weights needs --hidden N: the hidden size of the model's head")
        try:
            resolve_backbone(model)
        except UnknownNameError as error:
            raise AuditError(f"MODEL {model!r} (the timm backbone of --weights): {error}") from None
        classifier = build_classifier(model, head.hidden, "none")
        try:
            fit_state_dict(classifier, read_state_dict(weights), f"weights file {weights} does not fit timm "
                           f"{classifier.backbone.timm_name!r} with --hidden {head.hidden}")
        except CheckpointError as error:
            raise AuditError(str(error)) from None
        config = _state_dict_config(model, classifier, head)
        kind, source, weights_file = "state_dict", weights, weights
    classifier.eval().requires_grad_(False)  # evaluated only; Grad-CAM needs gradients of maps, not weights
    model_id = name or (source.resolve().name if kind == "checkpoint" else weights.stem)
    audited = AuditedModel(model_id, classifier, config, kind, source, weights_file, file_sha256(weights_file))
    if (interpolation := config["preprocessing"].get("interpolation", "bilinear")) != "bilinear":
        audited.notes.append(f"The model's config says {interpolation} resizing; the audit resamples images and masks "
                             "bilinearly on one grid, as every auditbench run does.")
    return audited


def _check_config(config: dict, path: Path) -> None:
    """A checkpoint config that save_checkpoint would have written: a binary head, a positive class
    among its classes, a usable preprocessing."""
    classes, positive, pre = config["classes"], config.get("positive_class"), config["preprocessing"]
    if config["num_classes"] != 2 or not isinstance(classes, list) or len(set(classes)) != 2:
        raise AuditError(f"{path}: classes {classes!r}: auditbench audits classifiers of two named classes")
    if positive not in classes:
        raise AuditError(f"{path}: positive_class {positive!r} is not one of classes {classes}")
    if not isinstance(pre, dict):
        raise AuditError(f"{path}: preprocessing is {pre!r}; expected a mapping")
    size, ratio = pre.get("input_size"), pre.get("crop_ratio")
    checks = [("input_size", isinstance(size, int) and not isinstance(size, bool) and size >= 32, "an integer >= 32"),
              ("crop", isinstance(pre.get("crop"), bool), "true or false"),
              ("crop_ratio", isinstance(ratio, (int, float)) and 0 <= ratio < 0.5, "a number in [0, 0.5)")]
    checks += [(key, isinstance(pre.get(key), list) and len(pre[key]) == 3
                and all(isinstance(v, (int, float)) for v in pre[key]), "3 numbers (R, G, B)") for key in ("mean", "std")]
    for key, ok, expected in checks:
        if not ok:
            raise AuditError(f"{path}: preprocessing.{key} is {pre.get(key)!r}; expected {expected}")


def _state_dict_config(backbone: str, classifier: Classifier, head: StateDictHead) -> dict:
    if head.classes is not None and (len(head.classes) != 2 or len(set(head.classes)) != 2):
        raise AuditError(f"--classes {','.join(head.classes)}: give the two class names in output order, NEGATIVE,POSITIVE")
    if head.positive is not None and head.classes is None:
        raise AuditError(f"--positive {head.positive!r} needs --classes NEGATIVE,POSITIVE: the outputs' order")
    if head.positive is not None and head.positive not in head.classes:
        raise AuditError(f"--positive {head.positive!r} is not one of --classes {','.join(head.classes)}")
    data_config = classifier.backbone.data_config
    return {
        "backbone": backbone, "timm_name": classifier.backbone.timm_name, "hidden": head.hidden,
        "dropout": classifier.head.dropout, "num_classes": 2, "classes": head.classes,
        "positive_class": head.positive or (head.classes[1] if head.classes else None),
        # A state dict says nothing of how its backbone was trained: "file" weights, not the pretrained ones.
        "weights": "file", "finetune": True, "augment": False,
        "preprocessing": {"input_size": head.input_size or int(data_config["input_size"][-1]), "crop": head.crop,
                          "crop_ratio": head.crop_ratio, "mean": list(data_config["mean"]),
                          "std": list(data_config["std"]), "interpolation": "bilinear"},
    }


@dataclass
class AuditPlan:
    """Everything an audit needs before it writes anything: the model, the protocol, the one
    model x "fold" cell and its data."""

    model: AuditedModel
    protocol: Protocol
    spec: ModelSpec
    plan: RunPlan
    clock: StageClock


def prepare_audit(model: AuditedModel, data_file: Path, overrides: list[str], base_dir: Path) -> AuditPlan:
    """Load the protocol (with the model's own models/preprocessing/training sections), bind the
    task, load every image; raises AuditError, ProtocolError, UnknownNameError or DataError."""
    config, pre = model.config, model.config["preprocessing"]
    own = [  # the model's, whatever the protocol says: they are how it was built and trained
        "models=" + json.dumps({"backbones": [{"name": config["backbone"], "weights": str(config.get("weights", "file"))}],
                                "hidden": [config["hidden"]], "dropout": config["dropout"]}),
        "preprocessing=" + json.dumps({"input_size": pre["input_size"], "crop": [pre["crop"]],
                                       "crop_ratio": pre["crop_ratio"]}),
        "training.finetune=" + json.dumps([bool(config.get("finetune", True))]),
        "training.augment=" + json.dumps([bool(config.get("augment", False))]),
    ]
    protocol = load_protocol(data_file, [*overrides, *own])
    cell, pins = _data_cell(protocol, config, data_file)
    protocol = load_protocol(data_file, [*overrides, *own, *pins]) if pins else protocol
    try:
        check_registered_names(protocol)
    except UnknownNameError as error:
        raise UnknownNameError(f"{data_file}: {error}") from None
    task = _bind_task(model, protocol, data_file)
    clock = StageClock()
    with clock.stage("data"):
        data = _task_data(protocol, task, cell, base_dir)
    spec = ModelSpec(model.model_id, config["backbone"], str(config.get("weights", "file")), int(config["hidden"]),
                     bool(config.get("finetune", True)), bool(config.get("augment", False)), bool(pre["crop"]), task, cell)
    no_training = np.array([], dtype=int)
    inputs = TaskInputs(task, cell, data, [Fold(0, no_training, no_training, np.arange(len(data.labels)))])
    views = [data.train_view, data.test_view, data.clean_view or [], *(samples for samples, _ in data.external.values())]
    plan = RunPlan([spec], [inputs], [GroupPlan(spec.backbone, spec.weights, spec.crop, inputs, [spec])],
                   list(data.skipped), [*data.notes, *model.notes], n_images=len(data.labels),
                   data_fingerprint=data_fingerprint([sample for view in views for sample in view]))
    return AuditPlan(model, protocol, spec, plan, clock)


def _data_cell(protocol: Protocol, config: dict, origin: Path) -> tuple[dict, list[str]]:
    """The one synthetic data cell an audit draws (real data has no axes) and the --set overrides
    that pin it: an axis with several values takes the model's own (recorded by `auditbench run`)."""
    trained_on, cell, pins = config.get("data_axes") or {}, {}, []
    generator = generator_of(protocol)
    if generator is None:
        return cell, pins
    fields = generator.axis_fields
    for axis, values in generator.axes(protocol).items():
        if len(values) > 1 and trained_on.get(axis) not in values:
            raise AuditError(f"{origin}: {fields[axis]} has {len(values)} values {values}; an audit draws one "
                             f"set of images: choose one, e.g. --set {fields[axis]}={values[0]}")
        cell[axis] = values[0] if len(values) == 1 else trained_on[axis]
        if len(values) > 1:
            pins.append(f"{fields[axis]}=[{json.dumps(cell[axis])}]")
    return cell, pins


def _bind_task(model: AuditedModel, protocol: Protocol, origin: Path) -> TaskSpec:
    """The protocol's task whose classes are the model's; the model's outputs ordered as the tables
    assume (output 1 is the positive class)."""
    config = model.config
    if config["classes"] is None:  # a state dict whose classes were not given: the task's, in auditbench's order
        if len(protocol.task) != 1:
            raise AuditError(f"{origin}: {len(protocol.task)} tasks; name the model's classes with --classes NEGATIVE,POSITIVE")
        config.update(classes=protocol.task[0].class_names, positive_class=protocol.task[0].positive)
    classes, positive = config["classes"], config["positive_class"]
    trained_on = (config.get("task") or {}).get("name")
    matches = sorted((t for t in protocol.task if set(t.classes) == set(classes) and t.positive == positive),
                     key=lambda t: t.name != trained_on)  # the task it was trained on, where several fit
    if not matches:
        tasks = "; ".join(f"{t.name} {t.class_names} (positive {t.positive!r})" for t in protocol.task)
        raise AuditError(f"{origin}: no task has the model's classes {classes} with positive class {positive!r} "
                         f"(the protocol's tasks: {tasks}); add one with these class names")
    if classes.index(positive) == 0:
        output = model.classifier.head.fc2
        with torch.no_grad():
            output.weight.copy_(output.weight.flip(0))
            output.bias.copy_(output.bias.flip(0))
        model.notes.append(f"The model's output 0 is its positive class {positive!r}; its two outputs were swapped "
                           "for the audit, so that output 1 is, as every table assumes.")
    return matches[0]


def _task_data(protocol: Protocol, task: TaskSpec, cell: dict, base_dir: Path) -> TaskData:
    """Every image of the protocol's data for ``task``: all of them are tested, so no fold needs filling."""
    generator = generator_of(protocol)
    if generator is not None:
        return generator.task_data(protocol, task, cell, check_folds=False)
    data = protocol.data
    internal = load_sources(data.sources, data, base_dir)
    external = {ext.name: load_sources(ext.sources, data, base_dir) for ext in data.external}
    fill_missing_masks(internal.samples + [s for loaded in external.values() for s in loaded.samples], data)
    return real_task_data(protocol, task, internal, external, check_folds=False)


def run_audit(audit: AuditPlan, out_dir: Path, say: Say, overwrite: bool = False, make_parents: bool = False) -> dict:
    """Evaluate the model on every split and write the run's outputs into ``out_dir`` (through a
    staging folder, under its lock, as `auditbench run` does); the summary."""
    started = datetime.now(timezone.utc)
    protocol, spec, model, group = audit.protocol, audit.spec, audit.model, audit.plan.groups[0]
    with prepare_output(out_dir, overwrite=overwrite, say=say, make_parents=make_parents) as target:
        text, digest = protocol_yaml(dump_protocol(protocol), target.run_id)
        (target.staging / PROTOCOL_FILE).write_text(text, encoding="utf-8")
        provenance = {"run_id": target.run_id, "protocol_sha256": digest}
        accelerator = accelerator_for(protocol.training)
        passes, pass_warnings = _own_backbone_passes(protocol, model, accelerator, target.staging / STORE_DIR, audit.clock)
        # Trains nothing, so makes no augmented copies, whatever the model was trained with.
        inputs = passes.group_inputs(dataclasses.replace(group, specs=[dataclasses.replace(spec, augment=False)]))
        cams = {name: resolve_method(name) for name in protocol.explain.method}
        context = CellContext(protocol, accelerator, cams, target.staging, provenance)
        cell = evaluate_model(context, spec, ModelFold(model.classifier, frozen=True), inputs, group.task_inputs.data,
                              group.task_inputs.folds[0])
        with audit.clock.stage("probes"):  # on the model's own features: its values, fine-tuned or not
            cell.probe_rows = probe_rows(protocol, spec, inputs, group.task_inputs.data, own_backbone=True)
        shutil.rmtree(target.staging / STORE_DIR, ignore_errors=True)  # working state, not an output
        note = (f"Audit, not a training run: model {spec.model_id} was loaded from {model.source} (weights sha256 "
                f"{model.weights_sha256[:12]}) and tested on every image of the data; one evaluation, no folds.")
        state = RunState(protocol, target.staging, provenance, audit.plan, [cell], audit.clock, accelerator.describe(),
                         started, pass_warnings, extra={"mode": "audit", "audited_model": model.described()},
                         models_note=note)
        summary = finish_run(state)
        target.commit({spec.model_id})
    return summary


def _own_backbone_passes(protocol: Protocol, model: AuditedModel, accelerator, folder: Path,
                         clock: StageClock) -> tuple[BackbonePasses, Counter]:
    """Backbone passes through the audited model's OWN backbone, normalised with its own mean and
    std. The cached maps and pooled features (of the images, occluded copies and clean twins) are
    then exactly this model's, so it is evaluated as a frozen model is (its head on cached maps,
    ``ModelFold(frozen=True)``), whether its backbone was fine-tuned or not: one backbone pass per
    image. The store is private to this audit (never a shared --cache: its key would not name
    these weights)."""
    backbone, pre = model.classifier.backbone, model.config["preprocessing"]
    backbone.data_config = {**backbone.data_config, "mean": tuple(pre["mean"]), "std": tuple(pre["std"])}
    warnings: Counter = Counter()
    store = FeatureStore(folder, model.weights_sha256[:24])
    frame = model_frame(protocol, backbone, pre["crop"])
    return BackbonePasses(protocol, backbone, frame, accelerator, store, clock, warnings), warnings
