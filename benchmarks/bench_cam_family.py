"""Cost of every CAM method relative to plain inference, next to pytorch-grad-cam's same method, in one run.

Run: ``python -m pytest benchmarks/bench_cam_family.py --benchmark-only`` (needs the ``bench`` extra).
On a CPU shared with other work the times are noisy; ``OMP_NUM_THREADS=1`` in front steadies them.

Settings (environment variables, defaults in brackets): ``CAM_BENCH_BACKBONE`` [efficientnet_lite0, with its
locally shipped ImageNet weights; other backbones get random weights], ``CAM_BENCH_SIZE`` [224],
``CAM_BENCH_BATCH`` [8], ``CAM_BENCH_LAYER`` [last], ``CAM_BENCH_METHODS`` [all, comma-separated],
``CAM_BENCH_ROUNDS`` [5; Score-CAM gets 1 round without warm-up: C forward passes per image],
``CAM_BENCH_CHUNK`` [64, masked images per forward pass for both Score-CAMs]. Score-CAM at ``"last"`` of
efficientnet_lite0 is 320 passes per image (about a minute per batch of 16 at 128 px on a 2-core CPU).

For each method it times, on one batch with the positive class as target:

- ``ours``: :func:`auditbench.explain.cam_base.explain_batch` from the images (backbone pass included);
- ``ours cached``: feature-level methods at ``"last"`` on the cached backbone output (the run's frozen path);
- ``reference``: pytorch-grad-cam's class for the method (hooks, a forward with a graph and ``backward()``
  through the whole model, per-image min-max scaling and resize on the CPU), or captum's ``InputXGradient``
  on the whole model for the pixel method, which pytorch-grad-cam does not have.

Each result stores its ratio to inference in ``extra_info``: its fastest round over the fastest of
``ROUNDS`` inference passes timed right before it, so a load that changes during the run moves both (the fastest
round is the one least disturbed by other work). The ratios are printed after the table, one line per method:
ours, ours cached, reference. Read the ratios: absolute times depend on the machine. Uses the GPU when torch
sees one. Ours explains the default log-odds, pytorch-grad-cam a logit: the same work.
"""
from __future__ import annotations

import os
import time
from typing import Callable

import pytest
import torch

from auditbench.explain.cam_base import explain_batch
from auditbench.explain.gradcam import CAM_METHODS
from auditbench.models.classifier import Classifier, build_classifier

BACKBONE = os.environ.get("CAM_BENCH_BACKBONE", "efficientnet_lite0")
SIZE = int(os.environ.get("CAM_BENCH_SIZE", "224"))
BATCH = int(os.environ.get("CAM_BENCH_BATCH", "8"))
LAYER = os.environ.get("CAM_BENCH_LAYER", "last")
ROUNDS = int(os.environ.get("CAM_BENCH_ROUNDS", "5"))
CHUNK = int(os.environ.get("CAM_BENCH_CHUNK", "64"))
METHODS = [m for m in os.environ.get("CAM_BENCH_METHODS", ",".join(CAM_METHODS.names())).split(",") if m]
POSITIVE, WARMUP_ROUNDS = 1, 1
GROUP = "CAM family vs inference"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
REFERENCES = {
    "gradcam": "GradCAM", "hirescam": "HiResCAM", "gradcampp": "GradCAMPlusPlus", "xgradcam": "XGradCAM",
    "layercam": "LayerCAM", "eigencam": "EigenCAM", "scorecam": "ScoreCAM",
}
VARIANTS = ("ours", "ours cached", "reference")

_ratios: dict[str, dict[str, float]] = {}  # method -> variant -> ratio to inference
_releases: list[Callable[[], None]] = []


@pytest.fixture(scope="module")
def model() -> Classifier:
    torch.manual_seed(0)
    weights = "imagenet" if BACKBONE == "efficientnet_lite0" else "none"  # nothing is downloaded
    return build_classifier(BACKBONE, hidden=256, weights=weights).eval().to(DEVICE)


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)).to(DEVICE)


def _timed(fn: Callable[[], object]) -> Callable[[], None]:
    # CUDA runs asynchronously: wait for the work so the timer measures it.
    def run() -> None:
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    return run


def _measure(benchmark, label: str, fn: Callable[[], object], baseline: float, rounds: int = ROUNDS) -> float:
    """Time ``fn``; store and return the ratio of its fastest round to ``baseline`` (seconds of inference)."""
    benchmark.group = GROUP
    benchmark.extra_info.update(device=str(DEVICE), batch=BATCH, size=SIZE, backbone=BACKBONE, layer=LAYER)
    warmup = WARMUP_ROUNDS if rounds > 1 else 0  # Score-CAM: one round, its C passes per image warm up anyway
    benchmark.pedantic(_timed(fn), rounds=rounds, warmup_rounds=warmup, iterations=1)
    # The fastest round is the one least disturbed by other load on the machine.
    ratio = benchmark.stats.stats.min / baseline
    benchmark.extra_info.update(inference_s=baseline, ratio_to_inference=round(ratio, 2))
    return ratio


def _inference_time(model: Classifier, batch: torch.Tensor) -> float:
    """Fastest of ROUNDS inference passes (after one warm-up), timed now: the baseline of the next measurement."""
    run = _timed(lambda: model(batch))
    times = []
    with torch.no_grad():
        for index in range(ROUNDS + 1):
            start = time.perf_counter()
            run()
            if index:
                times.append(time.perf_counter() - start)
    return min(times)


def test_inference(benchmark, model, batch):
    def infer():
        with torch.no_grad():
            return model(batch)

    _measure(benchmark, "inference", infer, _inference_time(model, batch))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", METHODS)
def test_method(benchmark, bench_summary, model, batch, name, variant):
    method = CAM_METHODS.get(name)
    rounds = 1 if name == "scorecam" else ROUNDS
    backbone, head = model.backbone, model.head
    baseline = _inference_time(model, batch)  # before pytorch-grad-cam puts its hooks on the model
    if variant == "ours":
        def fn():
            return explain_batch(name, backbone, head, batch, None, POSITIVE, layer=LAYER, batch_size=CHUNK)
    elif variant == "ours cached":
        if method.needs_input or LAYER != "last":
            pytest.skip("only feature-level methods at 'last' run on cached features")
        with torch.no_grad():
            features = backbone(batch)

        def fn():
            return method(head, features, POSITIVE)
    else:
        fn = _reference(model, batch, name)
    try:
        _ratios.setdefault(name, {})[variant] = _measure(benchmark, f"{name} {variant}", fn, baseline, rounds)
    finally:
        if variant == "reference":
            for release in _releases:  # pytorch-grad-cam's hooks would otherwise stay on the shared model
                release()
            _releases.clear()
            model.zero_grad(set_to_none=True)  # its backward() fills the parameters' .grad
    if variant == VARIANTS[-1]:
        shown = "  ".join(f"{v} {_ratios[name][v]:7.2f}x" if v in _ratios[name] else f"{v}      -  " for v in VARIANTS)
        bench_summary.append(f"{name:<15} {shown}   ({DEVICE}, {BACKBONE}, {BATCH} x {SIZE} px, {LAYER})")


def _reference(model: Classifier, batch: torch.Tensor, name: str) -> Callable[[], object]:
    if name == "inputxgradient":  # pytorch-grad-cam has no pixel method: captum's, on the whole model
        from captum.attr import InputXGradient

        attribution = InputXGradient(model)
        return lambda: attribution.attribute(batch.clone().requires_grad_(), target=POSITIVE)
    if name not in REFERENCES:
        pytest.skip(f"pytorch-grad-cam has no counterpart of {name!r}")
    pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    module = model.backbone if LAYER == "last" else model.backbone.layer_module(LAYER)
    cam = getattr(pytorch_grad_cam, REFERENCES[name])(model=model, target_layers=[module])
    cam.batch_size = CHUNK  # Score-CAM's masked images per forward pass
    _releases.append(cam.activations_and_grads.release)
    targets = [ClassifierOutputTarget(POSITIVE)] * BATCH
    return lambda: cam(input_tensor=batch, targets=targets)
