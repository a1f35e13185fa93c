"""Transfer learning as in the study: Adam, early stopping on validation loss, a frozen-backbone
phase on cached features, then an optional fine-tune of the whole network at a low learning rate."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from auditbench.data.transforms import normalise
from auditbench.protocol.schema import PhaseSpec
from auditbench.training.device import Accelerator


@dataclass
class PhaseHistory:
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = -1

    @property
    def epochs(self) -> int:
        return len(self.train_loss)


class EarlyStopping:
    """Stops when validation loss has not improved for ``patience`` epochs; keeps the best state."""

    def __init__(self, module: torch.nn.Module, patience: int):
        self.module = module
        self.patience = patience
        self.best_loss = float("inf")
        self.best_state = copy.deepcopy(module.state_dict())
        self.waited = 0

    def step(self, val_loss: float, history: PhaseHistory) -> bool:
        """Record an epoch; True when training should stop."""
        if val_loss < self.best_loss:
            self.best_loss = val_loss
            self.best_state = copy.deepcopy(self.module.state_dict())
            history.best_epoch = history.epochs - 1
            self.waited = 0
            return False
        self.waited += 1
        return self.waited >= self.patience

    def restore(self) -> None:
        self.module.load_state_dict(self.best_state)


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    return list(torch.randperm(n, generator=generator).split(batch_size))


def train_head(
    head: torch.nn.Module,
    train_pooled: torch.Tensor,
    train_labels: torch.Tensor,
    val_pooled: torch.Tensor,
    val_labels: torch.Tensor,
    phase: PhaseSpec,
    batch_size: int,
    seed: int,
) -> PhaseHistory:
    """Train the head on cached pooled backbone features (the frozen phase); CPU is enough."""
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(head.parameters(), lr=phase.lr, weight_decay=phase.weight_decay)
    stopper = EarlyStopping(head, phase.patience)
    history = PhaseHistory()
    for _ in range(phase.max_epochs):
        head.train()
        losses = []
        for batch in _batches(len(train_labels), batch_size, generator):
            loss = F.cross_entropy(head.forward_pooled(train_pooled[batch]), train_labels[batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(loss.item() * len(batch))
        history.train_loss.append(sum(losses) / len(train_labels))
        head.eval()
        with torch.no_grad():
            val_loss = F.cross_entropy(head.forward_pooled(val_pooled), val_labels).item()
        history.val_loss.append(val_loss)
        if stopper.step(val_loss, history):
            break
    stopper.restore()
    head.eval()
    return history


AugmentFn = Callable[[np.ndarray, int], np.ndarray]


def finetune(
    model: torch.nn.Module,
    train_frames: np.ndarray,
    train_labels: np.ndarray,
    val_frames: np.ndarray,
    val_labels: np.ndarray,
    mean,
    std,
    phase: PhaseSpec,
    batch_size: int,
    seed: int,
    accelerator: Accelerator,
    augment: AugmentFn | None = None,
) -> PhaseHistory:
    """Fine-tune the whole network on images (each epoch re-runs the backbone).

    ``augment(frames, seed)`` draws a fresh geometric augmentation per epoch (on-the-fly mode).
    BatchNorm statistics stay frozen (eval mode), as usual when fine-tuning on small data sets.
    """
    device = accelerator.device
    accelerator.place(model)
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=phase.lr, weight_decay=phase.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=accelerator.amp_dtype == torch.float16)
    stopper = EarlyStopping(model, phase.patience)
    history = PhaseHistory()
    y_train = torch.as_tensor(train_labels, dtype=torch.long)
    for epoch in range(phase.max_epochs):
        _train_mode_without_batchnorm(model)
        frames = augment(train_frames, seed * 1000 + epoch) if augment is not None else train_frames
        total = 0.0
        for batch in _batches(len(y_train), batch_size, generator):
            x = accelerator.batch(normalise(frames[batch.numpy()], mean, std))
            with accelerator.autocast():
                loss = F.cross_entropy(model(x).float(), y_train[batch].to(device))
            optimiser.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
            total += loss.item() * len(batch)
        history.train_loss.append(total / len(y_train))
        val_loss = evaluation_loss(model, val_frames, val_labels, mean, std, batch_size, accelerator)
        history.val_loss.append(val_loss)
        if stopper.step(val_loss, history):
            break
    stopper.restore()
    model.eval()
    return history


def _train_mode_without_batchnorm(model: torch.nn.Module) -> None:
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


@torch.no_grad()
def predict_logits(model, frames: np.ndarray, mean, std, batch_size: int, accelerator: Accelerator) -> torch.Tensor:
    """Logits of a :class:`Classifier`: the backbone under the accelerator's precision, the head in
    fp32, the path every p(positive) of the audit takes (original and occluded images alike)."""
    accelerator.place(model.eval())
    out = []
    for start in range(0, len(frames), batch_size):
        x = accelerator.batch(normalise(frames[start : start + batch_size], mean, std))
        with accelerator.autocast():
            feature_map = model.features(x)
        out.append(model.head(feature_map.float()).cpu())
    return torch.cat(out) if out else torch.empty(0, 2)


def evaluation_loss(model, frames, labels, mean, std, batch_size, accelerator) -> float:
    logits = predict_logits(model, frames, mean, std, batch_size, accelerator)
    return F.cross_entropy(logits, torch.as_tensor(labels, dtype=torch.long)).item()
