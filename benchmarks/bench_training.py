"""Frozen-head training on cached backbone features vs re-running the backbone every epoch.

Run: ``python -m pytest benchmarks/bench_training.py --benchmark-only``. Both variants train the
same head for the same epochs on the same images; the ratio of their means is the speed-up that
auditbench's feature cache buys (the ratio is what to read: absolute times vary by machine).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from auditbench.data.transforms import normalise
from auditbench.models.backbones import build_backbone
from auditbench.models.classifier import Head
from auditbench.protocol.schema import PhaseSpec
from auditbench.training.device import select_accelerator
from auditbench.training.features import extract_features
from auditbench.training.trainer import train_head

N_IMAGES, SIZE, EPOCHS, BATCH = 64, 96, 5, 32
PHASE = PhaseSpec(lr=1e-3, max_epochs=EPOCHS, patience=EPOCHS + 1)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", "none").eval()
    frames = np.random.default_rng(0).random((N_IMAGES, SIZE, SIZE), dtype=np.float32)
    labels = torch.arange(N_IMAGES) % 2
    mean, std = backbone.data_config["mean"], backbone.data_config["std"]
    return backbone, frames, labels, mean, std


def _recompute_every_epoch(backbone, frames, labels, mean, std):
    head = Head(backbone.num_features, 256)
    optimiser = torch.optim.Adam(head.parameters(), lr=PHASE.lr)
    for _ in range(EPOCHS):
        for start in range(0, N_IMAGES, BATCH):
            with torch.no_grad():
                pooled = backbone(normalise(frames[start : start + BATCH], mean, std)).mean(dim=(2, 3))
            loss = F.cross_entropy(head.forward_pooled(pooled), labels[start : start + BATCH])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()


def _cached(backbone, frames, labels, mean, std):
    """Includes the one feature pass, so the comparison is end to end."""
    features = extract_features(backbone, frames, mean, std, select_accelerator("cpu"), BATCH)
    head = Head(backbone.num_features, 256)
    train_head(head, features.pooled, labels, features.pooled, labels, PHASE, BATCH, seed=0)


def test_head_training_recompute_backbone(benchmark, setup):
    benchmark.group = "frozen head training"
    benchmark.pedantic(_recompute_every_epoch, args=setup, rounds=3, iterations=1)


def test_head_training_cached_features(benchmark, setup):
    benchmark.group = "frozen head training"
    benchmark.pedantic(_cached, args=setup, rounds=3, iterations=1)


def test_head_training_epochs_only_on_cache(benchmark, setup):
    """The per-epoch cost once features exist: what each extra epoch or grid cell costs."""
    backbone, frames, labels, mean, std = setup
    features = extract_features(backbone, frames, mean, std, select_accelerator("cpu"), BATCH)

    def epochs_only():
        head = Head(backbone.num_features, 256)
        train_head(head, features.pooled, labels, features.pooled, labels, PHASE, BATCH, seed=0)

    benchmark.group = "frozen head training"
    benchmark.pedantic(epochs_only, rounds=3, iterations=1)
