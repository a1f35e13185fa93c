"""Stage 3: fit one grid cell on one fold: a head on cached features, then (fine-tuned models)
the whole network on the fold's frames."""
from __future__ import annotations

import copy

import numpy as np
import torch

from auditbench.data.augment import augment_frames
from auditbench.data.prepare import TaskData
from auditbench.data.splits import Fold
from auditbench.models.classifier import Classifier, Head
from auditbench.pipeline.records import GroupInputs, ModelFold, StageClock, stable_seed
from auditbench.protocol.grid import ModelSpec
from auditbench.protocol.schema import Protocol
from auditbench.training.device import Accelerator
from auditbench.training.trainer import finetune, train_head


def fit_cell(protocol: Protocol, accelerator: Accelerator, spec: ModelSpec, inputs: GroupInputs, data: TaskData,
             fold: Fold, clock: StageClock) -> ModelFold:
    """The model of ``spec`` trained on ``fold``; seeded by the protocol seed, model id and fold
    alone, so a cell gives the same model whatever ran before it (resume, other workers)."""
    training = protocol.training
    seed = stable_seed(protocol.seed, spec.model_id, fold.index)
    torch.manual_seed(seed)
    head = Head(inputs.backbone.num_features, spec.hidden, protocol.models.dropout, num_classes=2)
    train_index = fold.train
    pooled = inputs.train.pooled[train_index]
    labels = data.labels[train_index]
    frame_labels = labels
    in_fold = None
    if spec.augment and inputs.augmented_source is not None:
        in_fold = np.isin(inputs.augmented_source, train_index)
        pooled = torch.cat([pooled, inputs.augmented.pooled[in_fold]])
        labels = np.concatenate([labels, data.labels[inputs.augmented_source[in_fold]]])
        if training.augment_mode == "minority_once":
            frame_labels = labels
    y = torch.as_tensor(labels, dtype=torch.long)
    val_pooled = inputs.train.pooled[fold.validation]
    val_y = torch.as_tensor(data.labels[fold.validation], dtype=torch.long)
    with clock.stage("train_head"):
        train_head(head, pooled, y, val_pooled, val_y, training.head, training.batch_size, seed)
    if not spec.finetune:
        return ModelFold(Classifier(inputs.backbone, head), frozen=True)
    # Fine-tuning reads its fold's training frames (images only, no masks): the one step whose
    # memory grows with the data, by 4 bytes per pixel of the training images.
    frames = inputs.train.images(train_index)
    if in_fold is not None and training.augment_mode == "minority_once":
        frames = np.concatenate([frames, inputs.augmented.images(np.flatnonzero(in_fold))])
    model = Classifier(copy.deepcopy(inputs.backbone), head)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    augment_fn = augment_frames if spec.augment and training.augment_mode == "online" else None
    with clock.stage("finetune"):
        finetune(
            model, frames, frame_labels, inputs.train.images(fold.validation), data.labels[fold.validation],
            inputs.mean, inputs.std, training.finetune_phase, training.batch_size, seed, accelerator, augment_fn,
        )
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return ModelFold(model.cpu() if accelerator.device.type == "cpu" else model, frozen=False)
