"""Grad-CAM cost relative to plain inference, on one batch.

Run: ``python -m pytest benchmarks/bench_gradcam.py --benchmark-only`` (needs the ``bench`` extra).
On a CPU shared with other work the times are noisy; ``OMP_NUM_THREADS=1`` in front steadies them.

On 8 images at 224 px with efficientnet_lite0 (ImageNet weights, shipped locally) and the study's head,
it times: plain inference under ``torch.no_grad()``; auditbench's GradCAM at layer ``last`` (backbone
without a graph, head with one) and at ``stride16`` / ``stride8`` (``blocks.4`` / ``blocks.2``: the bottom
without a graph, a backward through the top blocks and the head only), all with the default log-odds
score; captum's LayerGradCam (forward with a graph through the whole model, gradient asked
only at the backbone's output, bilinear upsampling); and pytorch-grad-cam's GradCAM (hooks,
``backward()`` through the whole model, per-image min-max scaling on the CPU) at the backbone's output
and at the stride-8 level. Each result stores its
ratio to inference (fastest rounds) in ``extra_info``; the ratios are printed after the table. Read
the ratios: absolute times depend on the machine. Uses the GPU when torch sees one.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
from captum.attr import LayerAttribution, LayerGradCam
from pytorch_grad_cam import GradCAM as PytorchGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from auditbench.explain.gradcam import GradCAM
from auditbench.models.classifier import Classifier, build_classifier

BATCH, SIZE, POSITIVE = 8, 224, 1
ROUNDS, WARMUP_ROUNDS = 5, 1
GROUP = "Grad-CAM vs inference"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

_fastest: dict[str, float] = {}


@pytest.fixture(scope="module")
def model() -> Classifier:
    torch.manual_seed(0)
    return build_classifier("efficientnet_lite0", hidden=256, weights="imagenet").eval().to(DEVICE)


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


def _measure(benchmark, bench_summary: list[str], label: str, fn: Callable[[], object]) -> None:
    benchmark.group = GROUP
    benchmark.extra_info.update(device=str(DEVICE), batch=BATCH, size=SIZE, backbone="efficientnet_lite0")
    benchmark.pedantic(_timed(fn), rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
    # The fastest round is the one least disturbed by other load on the machine.
    _fastest[label] = benchmark.stats.stats.min
    if "inference" in _fastest:  # absent when the inference benchmark was deselected
        ratio = _fastest[label] / _fastest["inference"]
        benchmark.extra_info["ratio_to_inference"] = round(ratio, 2)
        bench_summary.append(
            f"{label:<26} {_fastest[label] * 1e3:8.1f} ms  {ratio:5.2f} x inference"
            f"  (min of {ROUNDS} rounds, {DEVICE}, {BATCH} x {SIZE} px)"
        )


def test_inference(benchmark, bench_summary, model, batch):
    def infer():
        with torch.no_grad():
            return model(batch)

    _measure(benchmark, bench_summary, "inference", infer)


def test_auditbench_gradcam(benchmark, bench_summary, model, batch):
    cam = GradCAM(model)
    benchmark.extra_info.update(layer="last", score=cam.score)
    _measure(benchmark, bench_summary, "auditbench GradCAM", lambda: cam(batch, target=POSITIVE))


@pytest.mark.parametrize("layer", ["stride16", "stride8"])
def test_auditbench_gradcam_finer_layer(benchmark, bench_summary, model, batch, layer):
    cam = GradCAM(model, layer=layer)
    benchmark.extra_info.update(layer=layer, module=cam.level["module"], score=cam.score)
    _measure(benchmark, bench_summary, f"auditbench {layer}", lambda: cam(batch, target=POSITIVE))


def test_captum_layer_gradcam(benchmark, bench_summary, model, batch):
    layer_gradcam = LayerGradCam(model, model.backbone)

    def explain():
        maps = layer_gradcam.attribute(batch, target=POSITIVE, relu_attributions=True)
        return LayerAttribution.interpolate(maps, (SIZE, SIZE), interpolate_mode="bilinear")

    _measure(benchmark, bench_summary, "captum LayerGradCam", explain)


@pytest.mark.parametrize("layer", ["last", "stride8"])
def test_pytorch_grad_cam(benchmark, bench_summary, model, batch, layer):
    module = model.backbone if layer == "last" else model.backbone.layer_module(layer)
    cam = PytorchGradCAM(model=model, target_layers=[module])
    targets = [ClassifierOutputTarget(POSITIVE)] * BATCH
    benchmark.extra_info.update(layer=layer, score="logit")
    label = "pytorch-grad-cam" if layer == "last" else f"pytorch-grad-cam {layer}"
    try:
        _measure(benchmark, bench_summary, label, lambda: cam(input_tensor=batch, targets=targets))
    finally:
        cam.activations_and_grads.release()  # its hooks would otherwise stay on the shared model
