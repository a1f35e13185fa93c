"""GPU throughput of auditbench's model path, and the paper grid's wall time projected from it.

Run: ``benchmarks/gpu.sh [--out FILE.json]`` (fails with one line where torch sees no CUDA device), or
``python benchmarks/gpu_bench.py [--device cuda|cpu] [--smoke] [--out FILE.json]``. ``--smoke`` runs the same
code on the CPU with a tiny backbone (resnet10t, 64 px, one iteration) so CI can check the script.

What it measures, per paper backbone (``models.backbones`` of ``protocols/paper.yaml``: VGG16, VGG19,
InceptionV3, InceptionResNetV2, Xception as timm models, random weights, each at its own input size as the
run uses it: 224 px for VGG, 299 px for the others) and per memory layout, in images/s:

- ``features``: :func:`auditbench.training.features.extract_features` with ``keep_maps=True``, the run's one
  backbone pass over every image (the feature cache of a backbone x crop group);
- ``predict``: :func:`auditbench.training.trainer.predict_logits`, what every p of a fine-tuned model goes
  through (validation loss each epoch, test images, occluded copies);
- ``gradcam``: the primary method's maps of a fine-tuned model through the product's own call,
  :func:`auditbench.pipeline.predict.explain_images` (what ``predict_and_explain`` runs; a frozen model's maps at
  ``last`` come from the cached features and cost only the head): the backbone under the accelerator's autocast,
  the method on the fp32 map (or through the backbone at a finer ``explain.layer``), ``upsample_cams`` and the
  copy back to the host;
- ``finetune_step``: :func:`auditbench.training.trainer.finetune` itself, one epoch of ``iterations`` batches
  (forward, backward, Adam step under the accelerator's autocast and GradScaler, batch norm frozen); the call's
  fixed costs (Adam and early-stopping state, one validation image) are inside the time.

Every measured call starts from the run's own input: float32 frames in [0, 1] on the host, normalised and
copied to the device batch by batch by auditbench (``data.transforms.normalise``), so host-side costs are
included as in a run; ``host_prep`` reports that normalise + copy alone. Warm-up calls are excluded; CUDA is
synchronised around each timed call; peak memory is ``torch.cuda.max_memory_allocated`` since the timed
calls began (on a CPU run: the process's peak RSS, which is not per measurement).

Precision and layout, as the product runs them: ``select_accelerator(device, "auto")`` (bf16 autocast
where the GPU supports it, else fp16 with a GradScaler; fp32 on the CPU). Layout ``nchw`` is the default;
``channels_last`` is the product's ``training.channels_last: true`` (the same calls place weights and batches
in NHWC), off by default until these numbers say it pays. ``cudnn.benchmark`` is
left as the product leaves it (off).

The frozen phase (``train_head`` on cached pooled features) runs on the CPU in the product; it is measured
on this machine's CPU (``head_training``) because the projection needs it.

The projection (:func:`project`) combines these rates with the paper protocol's image counts, folds,
epochs and occluded copies; the formula and where each count comes from are in its comments.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from auditbench.audit.occlusion import OCCLUSION_REGIONS
from auditbench.data.transforms import normalise
from auditbench.explain.gradcam import CAM_METHODS
from auditbench.models.backbones import build_backbone
from auditbench.models.classifier import Classifier, Head
from auditbench.pipeline.predict import explain_images
from auditbench.data.datasets import data_axes
from auditbench.protocol.grid import expand_grid
from auditbench.protocol.loader import load_protocol
from auditbench.protocol.schema import PhaseSpec, Protocol
from auditbench.training.device import Accelerator, select_accelerator
from auditbench.training.features import extract_features
from auditbench.training.trainer import finetune, predict_logits, train_head

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PROTOCOL = REPO / "protocols" / "paper.yaml"
SCHEMA = "auditbench-gpu-bench/1"
MODES = ("features", "predict", "gradcam", "finetune_step")
LAYOUTS = ("nchw", "channels_last")
GOAL_SECONDS = 3600.0  # issue 7: the whole paper grid in under one hour on one H100-class GPU

# Image counts of the paper's data, per raw label (the labels auditbench's loaders give; tasks pick theirs).
# covid 247, pneumonia 4273, normal 1583: the reference study ("The data set consists of 247 COVID-19, 4273
# pneumonia, and 1583 healthy X-ray images", ../shared/reference/paper-covid-xray-gradcam.txt, section 1).
# The 4273 Kermany pneumonia images split by file name (personN_bacteria_K / personN_virus_K, auditbench's
# kermany loader) into 2780 bacterial and 1493 viral (train 2530 + 1345, test 242 + 148, val 8 + 0 in the
# Kaggle/Mendeley v2 release). A clone of ieee8023 made today holds more COVID-19 images and some non-COVID
# ones: pass the counts of your data (``auditbench data check``) with --counts.
PAPER_COUNTS = {"covid": 247, "normal": 1583, "bacterial": 2780, "viral": 1493}

SMOKE_BACKBONE, SMOKE_SIZE = "resnet10t", 64


# ----- timing ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def peak_memory_source(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated since the timed calls began"
    return "process peak RSS (CPU run): the whole process so far, not this measurement"


def time_call(run: Callable[[], object], warmup: Callable[[], object] | None, images: int, repeats: int,
              device: torch.device) -> dict:
    """images/s of ``run`` (which processes ``images`` images): ``warmup`` first, untimed; then ``repeats``
    timed calls, CUDA synchronised before and after each; the median is the result."""
    if warmup is not None:
        warmup()
    _sync(device)
    _reset_peak(device)
    rates = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        rates.append(images / (time.perf_counter() - start))
    return {
        "images_per_s": statistics.median(rates),
        "images_per_s_min": min(rates),
        "images_per_s_max": max(rates),
        "peak_memory_bytes": _peak_memory(device),
    }


# ----- the product's calls ----------------------------------------------------------------------------------


def explain_frames(model: Classifier, frames: np.ndarray, mean, std, accelerator: Accelerator, batch_size: int,
                   protocol: Protocol) -> tuple[np.ndarray, np.ndarray]:
    """p(positive) and upsampled primary-method maps of a fine-tuned model (no cached maps): the product's
    ``pipeline.predict.explain_images``, the call ``predict_and_explain`` makes."""
    explain = protocol.explain.model_copy(update={"batch_size": batch_size})
    explained = explain_images(model, frames, mean, std, {explain.primary: CAM_METHODS.get(explain.primary)}, explain,
                               accelerator)
    return explained.p, explained.heatmaps[explain.primary]


def measure_backbone(name: str, size: int | None, layouts: list[str], protocol: Protocol, accelerator: Accelerator,
                     batch: int, warmup: int, iterations: int, repeats: int,
                     say: Callable[[str], None]) -> tuple[list[dict], dict]:
    """The four modes x layouts of one backbone (random weights); and its input size, mean, std and channels."""
    device = accelerator.device
    torch.manual_seed(0)
    template = build_backbone(name, "none").eval()
    for parameter in template.parameters():  # as pipeline.passes.load_backbone: the shared backbone is frozen
        parameter.requires_grad_(False)
    size = size or int(template.data_config["input_size"][-1])  # as pipeline.passes.model_frame with input_size: null
    mean, std = template.data_config["mean"], template.data_config["std"]
    info = {"input_size": size, "mean": mean, "std": std, "num_features": template.num_features}
    hidden = max(protocol.models.hidden)
    n_timed, n_warm = iterations * batch, warmup * batch
    pool = np.random.default_rng(0).random((max(n_timed, n_warm), size, size), dtype=np.float32)
    frames, warm_frames = pool[:n_timed], pool[:n_warm]
    labels, warm_labels = np.arange(n_timed) % 2, np.arange(n_warm) % 2
    phase = protocol.training.finetune_phase
    one_epoch = PhaseSpec(lr=phase.lr, max_epochs=1, patience=1, weight_decay=phase.weight_decay)
    rows = []
    for layout in layouts:
        torch.manual_seed(0)
        head = Head(template.num_features, hidden, protocol.models.dropout)
        model = Classifier(copy.deepcopy(template), head).eval()
        # The product's switch (training.channels_last): its functions place weights and batches.
        accelerator = dataclasses.replace(accelerator, channels_last=layout == "channels_last")
        calls: dict[str, Callable[[np.ndarray], object]] = {
            "features": lambda x: extract_features(model.backbone, x, mean, std, accelerator, batch, keep_maps=True),
            "predict": lambda x: predict_logits(model, x, mean, std, batch, accelerator),
            "gradcam": lambda x: explain_frames(model, x, mean, std, accelerator, batch, protocol),
        }
        for mode, call in calls.items():
            timing = time_call(lambda: call(frames), lambda: call(warm_frames), n_timed, repeats, device)
            rows.append(_row(name, template, size, layout, mode, timing))
            say(_progress(rows[-1]))
        # Fine-tuning trains a copy of the shared backbone with every parameter trainable (pipeline.fit.fit_cell).
        trainable = copy.deepcopy(model)
        del model, calls
        for parameter in trainable.parameters():
            parameter.requires_grad_(True)

        def train(x: np.ndarray, y: np.ndarray) -> None:
            finetune(trainable, x, y, frames[:1], labels[:1], mean, std, one_epoch, batch, 0, accelerator)

        timing = time_call(lambda: train(frames, labels), lambda: train(warm_frames, warm_labels), n_timed, repeats,
                           device)
        rows.append(_row(name, template, size, layout, "finetune_step", timing))
        say(_progress(rows[-1]))
        del trainable, train
        _free(device)
    for row in rows:
        row.update(batch_size=batch, iterations=iterations, warmup_iterations=warmup, repeats=repeats)
    return rows, info


def _row(name, backbone, size, layout, mode, timing) -> dict:
    return {"backbone": name, "timm_name": backbone.timm_name, "input_size": size, "layout": layout, "mode": mode,
            **timing}


def _progress(row: dict) -> str:
    return (f"  {row['backbone']:<20} {row['input_size']:>3}px {row['layout']:<13} {row['mode']:<13}"
            f" {row['images_per_s']:9.1f} img/s  peak {row['peak_memory_bytes'] / 2**20:8.0f} MiB")


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_host_prep(size: int, mean, std, device: torch.device, batch: int, iterations: int, repeats: int) -> dict:
    """normalise + copy to the device alone: the host-side share of every measured call."""
    frames = np.random.default_rng(1).random((iterations * batch, size, size), dtype=np.float32)

    def run():
        for start in range(0, len(frames), batch):
            normalise(frames[start : start + batch], mean, std).to(device)

    timing = time_call(run, run, len(frames), repeats, device)
    return {"input_size": size, "images_per_s": timing["images_per_s"], "images_per_s_min": timing["images_per_s_min"],
            "images_per_s_max": timing["images_per_s_max"]}


def measure_head(name: str, num_features: int, hidden: int, protocol: Protocol, images: int, epochs: int,
                 batch: int) -> dict:
    """The frozen phase as the product runs it (``train_head`` on cached pooled features, on the CPU): images/s
    over ``epochs`` epochs of ``images`` training vectors, with a validation set of the paper fold's relative
    size evaluated each epoch, as in a run."""
    fractions = fold_fractions(protocol)
    n_val = max(1, round(images * fractions["validation"] / fractions["train"]))
    generator = torch.Generator().manual_seed(0)
    pooled = torch.randn(images, num_features, generator=generator)
    val_pooled = torch.randn(n_val, num_features, generator=generator)
    labels, val_labels = torch.arange(images) % 2, torch.arange(n_val) % 2
    phase = protocol.training.head
    spec = PhaseSpec(lr=phase.lr, max_epochs=epochs, patience=epochs + 1, weight_decay=phase.weight_decay)
    warm = PhaseSpec(lr=phase.lr, max_epochs=1, patience=2, weight_decay=phase.weight_decay)
    torch.manual_seed(0)
    train_head(Head(num_features, hidden, protocol.models.dropout), pooled[:batch], labels[:batch], val_pooled,
               val_labels, warm, batch, seed=0)
    head = Head(num_features, hidden, protocol.models.dropout)
    start = time.perf_counter()
    train_head(head, pooled, labels, val_pooled, val_labels, spec, batch, seed=0)
    seconds = time.perf_counter() - start
    return {"backbone": name, "num_features": num_features, "hidden": hidden, "images": images,
            "validation_images": n_val, "epochs": epochs, "images_per_s": images * epochs / seconds,
            "seconds_per_epoch": seconds / epochs}


# ----- projection -------------------------------------------------------------------------------------------


def fold_fractions(protocol: Protocol) -> dict[str, float]:
    """Shares of a task's images in each part of a fold (auditbench.data.splits.make_folds): the test part is
    1/folds of them; the rest is split into round(1/val_fraction) (>= 2) grouped parts, one of which validates.
    Grouping by patient makes the real parts differ slightly."""
    folds = protocol.training.folds
    inner = max(2, int(round(1.0 / protocol.training.val_fraction)))
    rest = 1.0 - 1.0 / folds
    return {"train": rest * (inner - 1) / inner, "validation": rest / inner, "test": 1.0 / folds}


def epoch_bounds(phase: PhaseSpec) -> dict[str, int]:
    """Epochs a phase can run (trainer.EarlyStopping): at least 1 + patience (the first epoch is the best and
    ``patience`` more fail to improve), at most max_epochs. Which one a run hits depends on the data."""
    return {"low": min(1 + phase.patience, phase.max_epochs), "high": phase.max_epochs}


def task_counts(protocol: Protocol, counts: dict[str, int]) -> dict[str, dict[str, int]]:
    """Images per task class: the sum of the counts of its raw labels (a label without a count adds 0)."""
    return {task.name: {cls: sum(counts.get(raw, 0) for raw in raws) for cls, raws in task.classes.items()}
            for task in protocol.task}


def occluded_copies(protocol: Protocol, crop: bool) -> int:
    """Occluded copies per test image (audit.occlusion.OCCLUSION_REGIONS: artifact, border, lung), an upper
    bound: the artifact copy is made only for images with an artifact in view, counted here for every image;
    a cropped frame shows none of the border band (README, "One geometry"), so it has no border copy."""
    if not protocol.metrics.occlusion:
        return 0
    return sum(1 for region in OCCLUSION_REGIONS if not (crop and region == "border"))


def _augment_sources(protocol: Protocol, per_class: dict[str, int]) -> int:
    """Images that get one augmented copy (data.augment.copies_to_make): the minority class ("minority_once",
    the study's mode; none when the classes tie) or every image ("online")."""
    if protocol.training.augment_mode == "online":
        return sum(per_class.values())
    sizes = list(per_class.values())
    return sum(n for n in sizes if n < max(sizes))


def project(protocol: Protocol, rates: dict[str, dict[str, float]], head_rates: dict[tuple[str, int], float],
            counts: dict[str, int], stand_in: dict[str, str] | None = None) -> dict:
    """Wall time of every paper-grid cell x fold and of the whole grid, from measured images/s.

    ``rates[backbone][mode]``: images/s of the GPU modes (one layout); ``head_rates[(backbone, hidden)]``: images/s
    of the CPU frozen phase; ``stand_in`` maps a grid backbone to the measured one whose rates it borrows
    (--smoke). Low and high bounds differ only in the epochs early stopping lets each phase run.

    Per cell x fold (n = the task's images, from ``counts``; fractions from :func:`fold_fractions`):

      n_train = train share * n, n_val = validation share * n, n_test = test share * n
      n_aug   = train share * (images with an augmented copy)            if the cell augments, else 0
      head    = E_head * (n_train + n_aug) / head rate                  (CPU; validation pass inside the rate)
      fine-tuned cells only:
      finetune = E_ft * ((n_train + n_aug) / finetune_step + n_val / predict)   (minority_once copies train too)
      explain  = n_test / gradcam                                       (backbone + Grad-CAM of every test image)
      occlude  = K * n_test / predict                                   (K occluded copies per test image)
      frozen cells: Grad-CAM at 'last' and occlusion use the cached maps and pooled features: the head only, 0 here
      (at a finer explain.layer a frozen model's maps need the images: explain = n_test / gradcam).

    Per backbone x crop group, once for all tasks, cells and folds (the run's BackbonePasses):

      features = N / features + (K * N + N_aug) / predict    (N: images of all tasks together, each once)

    E_head, E_ft: :func:`epoch_bounds` of training.head / training.finetune_phase; K: :func:`occluded_copies`.
    Not included: reading and decoding images, lung masks and artifact detection, frame resampling, the
    occlusion fill itself (harmonic inpainting on the CPU), metrics, bootstrap CIs, the report.
    """
    stand_in = stand_in or {}
    specs = expand_grid(protocol, data_axes(protocol))
    folds = protocol.training.folds
    fractions = fold_fractions(protocol)
    head_epochs, ft_epochs = epoch_bounds(protocol.training.head), epoch_bounds(protocol.training.finetune_phase)
    per_task = task_counts(protocol, counts)
    online = protocol.training.augment_mode == "online"

    def rate(backbone: str, mode: str) -> float:
        return rates[stand_in.get(backbone, backbone)][mode]

    cells = []
    for spec in specs:
        n = sum(per_task[spec.task.name].values())
        n_train, n_val, n_test = (fractions[part] * n for part in ("train", "validation", "test"))
        n_aug = fractions["train"] * _augment_sources(protocol, per_task[spec.task.name]) if spec.augment else 0.0
        head_rate = head_rates[(stand_in.get(spec.backbone, spec.backbone), spec.hidden)]
        row = {"model_id": spec.model_id, "backbone": spec.backbone, "task": spec.task.name, "hidden": spec.hidden,
               "finetune": spec.finetune, "augment": spec.augment, "crop": spec.crop}
        for bound in ("low", "high"):
            head = head_epochs[bound] * (n_train + n_aug) / head_rate
            tune = explain = occlude = 0.0
            if spec.finetune:
                n_tune = n_train + (0.0 if online else n_aug)
                tune = ft_epochs[bound] * (n_tune / rate(spec.backbone, "finetune_step")
                                           + n_val / rate(spec.backbone, "predict"))
                occlude = occluded_copies(protocol, spec.crop) * n_test / rate(spec.backbone, "predict")
            if spec.finetune or protocol.explain.layer != "last":
                explain = n_test / rate(spec.backbone, "gradcam")
            row[bound] = {"cpu_head_s": head, "gpu_finetune_s": tune, "gpu_explain_s": explain,
                          "gpu_occlusion_s": occlude, "total_s": head + tune + explain + occlude}
        cells.append(row)

    groups = []
    raw_labels = {raw for task in protocol.task for raws in task.classes.values() for raw in raws}
    n_all = sum(counts.get(raw, 0) for raw in raw_labels)  # an image in several tasks is computed once
    for backbone, crop in dict.fromkeys((s.backbone, s.crop) for s in specs):
        augmented = set()  # raw labels whose images get a copy in some task (each image copied once, cached)
        if any(s.augment for s in specs if (s.backbone, s.crop) == (backbone, crop)):
            for task in protocol.task:
                sizes = per_task[task.name]
                for cls, raws in task.classes.items():
                    if online or sizes[cls] < max(sizes.values()):
                        augmented.update(raws)
        n_aug_all = sum(counts.get(raw, 0) for raw in augmented)
        seconds = (n_all / rate(backbone, "features")
                   + (occluded_copies(protocol, crop) * n_all + n_aug_all) / rate(backbone, "predict"))
        groups.append({"backbone": backbone, "crop": crop, "images": n_all, "augmented_images": n_aug_all,
                       "occluded_copies_per_image": occluded_copies(protocol, crop), "gpu_features_s": seconds})

    group_s = sum(g["gpu_features_s"] for g in groups)
    totals = {}
    for bound in ("low", "high"):
        parts = {key: folds * sum(c[bound][key] for c in cells)
                 for key in ("cpu_head_s", "gpu_finetune_s", "gpu_explain_s", "gpu_occlusion_s")}
        parts["gpu_features_s"] = group_s
        total = sum(parts.values())
        totals[bound] = {**parts, "gpu_s": total - parts["cpu_head_s"], "total_s": total,
                         "mean_cell_fold_s": total / (len(specs) * folds), "meets_goal": total < GOAL_SECONDS}
    return {
        "cells": len(specs),
        "folds": folds,
        "cell_folds": len(specs) * folds,
        "goal_s": GOAL_SECONDS,
        "counts": dict(counts),
        "task_images": per_task,
        "fold_fractions": fractions,
        "epochs": {"head": head_epochs, "finetune": ft_epochs},
        "stand_in": dict(stand_in),
        "groups": groups,
        "cell_fold": cells,
        "totals": totals,
        "covers": "model compute in the product's loops (host normalise and copy included) and the CPU frozen phase",
        "excludes": ["reading and decoding images", "lung-mask prediction and artifact detection",
                     "resampling into model frames", "occlusion fill (harmonic inpainting, CPU)",
                     "attention metrics and bootstrap CIs", "checkpoints, gallery and report",
                     "head-only work of frozen models on cached features"],
    }


# ----- environment and output -------------------------------------------------------------------------------


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True)
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def environment(accelerator: Accelerator) -> dict:
    device = accelerator.device
    info = {
        "machine": {"hostname": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
                    "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                     "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                     "timm": _version("timm"), "numpy": np.__version__, "auditbench": _version("auditbench")},
        "device": {"type": device.type, "name": _cpu_model(), "precision": accelerator.describe()},
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info["device"].update(name=properties.name, total_memory_bytes=int(properties.total_memory),
                              capability=f"{properties.major}.{properties.minor}",
                              multiprocessors=properties.multi_processor_count, driver=_driver_version(),
                              bf16_supported=torch.cuda.is_bf16_supported())
    return info


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    partial.replace(path)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:7.1f} min"


def format_report(result: dict) -> str:
    env, settings = result["environment"], result["settings"]
    lines = [
        f"auditbench GPU benchmark  {result['date']}  {env['device']['name']}  torch {env['versions']['torch']}"
        f" CUDA {env['versions']['cuda']}  {env['device']['precision']}  batch {settings['batch_size']}"
        f"{'  SMOKE (CPU, tiny backbone: not a measurement)' if result['smoke'] else ''}",
        "",
        f"images/s (median of {settings['repeats']} x {settings['iterations']} batches after"
        f" {settings['warmup_iterations']} warm-up; peak MiB per mode: {result['peak_memory_source']})",
        f"{'backbone':<20} {'px':>3} {'layout':<13} " + " ".join(f"{m:>13}" for m in MODES) + "  peak MiB f/p/g/t",
    ]
    by_key: dict[tuple, dict] = {}
    for row in result["measurements"]:
        by_key.setdefault((row["backbone"], row["input_size"], row["layout"]), {})[row["mode"]] = row
    for (name, size, layout), modes in by_key.items():
        peaks = "/".join(f"{modes[m]['peak_memory_bytes'] / 2**20:.0f}" for m in MODES if m in modes)
        lines.append(f"{name:<20} {size:>3} {layout:<13} "
                     + " ".join(f"{modes[m]['images_per_s']:13.1f}" if m in modes else f"{'-':>13}" for m in MODES)
                     + f"  {peaks}")
    lines.append("")
    lines.append("host normalise + copy to device: " + ", ".join(
        f"{row['input_size']} px {row['images_per_s']:.0f} img/s" for row in result["host_prep"]))
    lines.append("frozen phase on the CPU (train_head on cached features): " + ", ".join(
        f"{row['backbone']} h{row['hidden']} {row['images_per_s']:.0f} img/s" for row in result["head_training"]))
    for layout, projection in result["projections"].items():
        lines += ["", f"projection, layout {layout}: paper grid {projection['cells']} cells x {projection['folds']} folds"
                      f" = {projection['cell_folds']} cell-folds; counts {projection['counts']}"
                      f"; epochs head {projection['epochs']['head']['low']}-{projection['epochs']['head']['high']},"
                      f" fine-tune {projection['epochs']['finetune']['low']}-{projection['epochs']['finetune']['high']}"]
        if projection["stand_in"]:
            lines.append(f"  rates borrowed (smoke): {projection['stand_in']}")
        lines.append("  one cell x fold (largest task, augmented, no crop, largest head), low - high:")
        worst: dict[tuple, dict] = {}
        for cell in projection["cell_fold"]:
            key = (cell["backbone"], cell["finetune"])
            if key not in worst or cell["high"]["total_s"] > worst[key]["high"]["total_s"]:
                worst[key] = cell
        for (name, tuned), cell in worst.items():
            lines.append(f"    {name:<20} {'fine-tuned' if tuned else 'frozen':<10} {cell['low']['total_s']:8.1f} -"
                         f" {cell['high']['total_s']:8.1f} s  (CPU head {cell['low']['cpu_head_s']:.1f} -"
                         f" {cell['high']['cpu_head_s']:.1f} s)")
        lines.append(f"  shared feature passes ({len(projection['groups'])} backbone x crop groups):"
                     f" {sum(g['gpu_features_s'] for g in projection['groups']):.1f} s")
        for bound in ("low", "high"):
            total = projection["totals"][bound]
            verdict = "under" if total["meets_goal"] else "OVER"
            lines.append(f"  whole grid, {bound:<4} epochs: {_minutes(total['total_s'])} (GPU {_minutes(total['gpu_s'])},"
                         f" CPU head {_minutes(total['cpu_head_s'])}); mean cell-fold {total['mean_cell_fold_s']:.1f} s;"
                         f" {verdict} the {projection['goal_s'] / 3600:g} h goal")
        lines.append(f"  covers {projection['covers']}; excludes: {', '.join(projection['excludes'])}")
    return "\n".join(lines)


# ----- main -------------------------------------------------------------------------------------------------


def parse_counts(text: str) -> dict[str, int]:
    counts = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        label, sep, value = part.partition("=")
        if not sep or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(f"--counts: expected label=count[,label=count...], got {part!r}")
        counts[label.strip()] = int(value)
    return counts


def _fail(message: str, code: int = 2) -> None:
    """One line on stderr, then exit ``code`` (3: no CUDA device, 2: bad arguments)."""
    print(f"gpu_bench: {message}", file=sys.stderr)
    raise SystemExit(code)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda (cpu with --smoke)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"CPU, {SMOKE_BACKBONE} at {SMOKE_SIZE} px, batch 2, one iteration: checks the script")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: reports/gpu-bench/<UTC time>.json)")
    parser.add_argument("--protocol", type=Path, default=DEFAULT_PROTOCOL)
    parser.add_argument("--backbones", default=None, help="comma-separated (default: the protocol's backbones)")
    parser.add_argument("--size", type=int, default=None, help="input size for every backbone (default: each its own)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the protocol's training.batch_size (32)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up batches, untimed, at least 1 (default 3)")
    parser.add_argument("--iterations", type=int, default=None, help="timed batches per call (default 10)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement, median kept (default 3)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="nchw (the default), channels_last (training.channels_last)")
    parser.add_argument("--precision", choices=["auto", "off", "bf16", "fp16"], default="auto",
                        help="training.mixed_precision (default auto, as the paper protocol)")
    parser.add_argument("--counts", type=parse_counts, default=None,
                        help="images per raw label, e.g. covid=247,normal=1583,bacterial=2780,viral=1493 (the paper's)")
    parser.add_argument("--head-images", type=int, default=None, help="training vectors of the CPU head measurement")
    parser.add_argument("--head-epochs", type=int, default=None, help="epochs of the CPU head measurement (default 2)")
    return parser


def run(argv: list[str] | None = None, say: Callable[[str], None] | None = None) -> dict:
    """Measure, project, print the table, write the JSON; returns the JSON's content."""
    args = build_parser().parse_args(argv)
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    smoke = args.smoke
    device = args.device or ("cpu" if smoke else "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        _fail("no CUDA device visible to torch (torch.cuda.is_available() is False); run on a GPU machine,"
              " or pass --device cpu or --smoke", code=3)
    protocol = load_protocol(args.protocol)
    accelerator = select_accelerator(device, args.precision)
    paper_backbones = list(dict.fromkeys(b.name for b in protocol.models.backbones))
    backbones = [SMOKE_BACKBONE] if smoke and not args.backbones else (
        args.backbones.split(",") if args.backbones else paper_backbones)
    size = args.size or (SMOKE_SIZE if smoke else None)
    batch = args.batch_size or (2 if smoke else protocol.training.batch_size)
    warmup = max(1, args.warmup if args.warmup is not None else (1 if smoke else 3))
    iterations = args.iterations or (1 if smoke else 10)
    repeats = args.repeats or (1 if smoke else 3)
    layouts = [layout.strip() for layout in args.layouts.split(",") if layout.strip()]
    unknown = [layout for layout in layouts if layout not in LAYOUTS]
    if unknown or not layouts:
        _fail(f"--layouts takes {', '.join(LAYOUTS)}; got {args.layouts!r}")
    counts = args.counts or dict(PAPER_COUNTS)
    head_epochs = args.head_epochs or (1 if smoke else 2)
    fractions = fold_fractions(protocol)
    largest_task = max(sum(c.values()) for c in task_counts(protocol, counts).values())
    head_images = args.head_images or (4 * batch if smoke else max(batch, round(fractions["train"] * largest_task)))
    out = args.out or REPO / "reports" / "gpu-bench" / f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"

    result = {
        "schema": SCHEMA,
        "complete": False,
        "smoke": smoke,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": ["benchmarks/gpu_bench.py", *(argv if argv is not None else sys.argv[1:])],
        "environment": environment(accelerator),
        "settings": {
            "protocol": str(args.protocol), "backbones": backbones, "weights": "none", "input_size": size,
            "batch_size": batch, "warmup_iterations": warmup, "iterations": iterations, "repeats": repeats,
            "layouts": layouts, "mixed_precision": args.precision, "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "explain": protocol.explain.model_dump(), "head_images": head_images, "head_epochs": head_epochs,
            "product_switches": {"mixed_precision": "training.mixed_precision (auto: bf16 where supported)",
                                 "channels_last": "training.channels_last (default false: nchw)"},
        },
        "peak_memory_source": peak_memory_source(accelerator.device),
        "measurements": [],
        "host_prep": [],
        "head_training": [],
        "projections": {},
    }
    say(f"gpu_bench: {accelerator.describe()}, batch {batch}, {iterations} timed batches x {repeats} after {warmup}"
        f" warm-up, layouts {', '.join(layouts)}, backbones {', '.join(backbones)}")
    host_sizes: dict[int, tuple] = {}
    for name in backbones:
        started = time.perf_counter()
        rows, info = measure_backbone(name, size, layouts, protocol, accelerator, batch, warmup, iterations, repeats,
                                      say)
        result["measurements"].extend(rows)
        host_sizes.setdefault(info["input_size"], (info["mean"], info["std"]))
        for hidden in protocol.models.hidden:
            result["head_training"].append(
                measure_head(name, info["num_features"], hidden, protocol, head_images, head_epochs, batch))
        say(f"  {name}: {time.perf_counter() - started:.1f} s")
        write_json(out, result)  # what is done survives a time limit
    for input_size, (mean, std) in sorted(host_sizes.items()):
        result["host_prep"].append(measure_host_prep(input_size, mean, std, accelerator.device, batch, iterations,
                                                     repeats))

    stand_in = {name: SMOKE_BACKBONE for name in paper_backbones} if smoke and SMOKE_BACKBONE in backbones else {}
    missing = [name for name in paper_backbones if stand_in.get(name, name) not in backbones]
    head_rates = {(row["backbone"], row["hidden"]): row["images_per_s"] for row in result["head_training"]}
    if missing:
        result["projection_skipped"] = f"paper backbones not measured: {', '.join(missing)}"
    else:
        for layout in layouts:
            rates: dict[str, dict[str, float]] = {}
            for row in result["measurements"]:
                if row["layout"] == layout:
                    rates.setdefault(row["backbone"], {})[row["mode"]] = row["images_per_s"]
            result["projections"][layout] = project(protocol, rates, head_rates, counts, stand_in)
    result["complete"] = True
    write_json(out, result)
    print(format_report(result))
    if missing:
        print(f"no projection: {result['projection_skipped']}")
    print(f"JSON: {out}")
    return result


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
