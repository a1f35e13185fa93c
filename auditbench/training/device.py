"""Device and mixed-precision choice: the GPU when present, never a silent fallback when asked for."""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass

import torch

from auditbench.data.loader import resolve_workers


@dataclass(frozen=True)
class Accelerator:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: full precision
    # NHWC weights and batches (``training.channels_last``): faster convolutions on tensor cores where
    # cuDNN has NHWC kernels; off until ``benchmarks/gpu.sh`` has measured it per backbone.
    channels_last: bool = False
    # Processes making image frames while the backbone runs (``training.loader_workers`` resolved):
    # changes speed only, never a number, so it is not part of :meth:`describe`.
    loader_workers: int = 0

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def place(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` on the device, its 4-D weights in the chosen memory format."""
        if self.channels_last:
            return module.to(self.device, memory_format=torch.channels_last)
        return module.to(self.device)

    def batch(self, batch: torch.Tensor) -> torch.Tensor:
        """A CPU batch on the device (:func:`to_device`), in the chosen memory format."""
        moved = to_device(batch, self.device)
        return moved.contiguous(memory_format=torch.channels_last) if self.channels_last and moved.dim() == 4 else moved

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        precision = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[self.amp_dtype]
        layout = ", channels_last" if self.channels_last else ""
        return f"{self.device.type} ({name}), {precision}{layout}"


def accelerator_for(training) -> Accelerator:
    """The accelerator a protocol's ``training`` section asks for (:class:`~auditbench.protocol.schema.TrainingSpec`)."""
    chosen = select_accelerator(training.device, training.mixed_precision, training.deterministic, training.channels_last)
    return dataclasses.replace(chosen, loader_workers=resolve_workers(training.loader_workers, chosen.device.type))


def select_accelerator(device: str = "auto", mixed_precision: str = "auto", deterministic: bool = False,
                       channels_last: bool = False) -> Accelerator:
    """``auto`` takes CUDA when torch reports it; asking for ``cuda`` without one is an error.
    ``deterministic``: the same numbers on every GPU run, at some speed (:func:`use_deterministic`)."""
    if deterministic:
        use_deterministic()
    if device == "auto":
        chosen = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        chosen = torch.device(device)
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("training.device is 'cuda' but torch reports no CUDA device")
    if chosen.type != "cuda" or mixed_precision == "off":
        return Accelerator(chosen, None, channels_last)
    if mixed_precision == "auto":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]
    return Accelerator(chosen, dtype, channels_last)


def use_deterministic() -> None:
    """torch's deterministic algorithms for this process: an op without one raises instead of
    varying; cuDNN picks fixed kernels; cuBLAS gets the workspace its deterministic mode needs
    (set before CUDA starts: https://docs.pytorch.org/docs/stable/notes/randomness.html)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU batch on ``device``; to a GPU through pinned memory without blocking, so the copy of one
    batch overlaps the work on the previous one."""
    if device.type != "cuda":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True)
