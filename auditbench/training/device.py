"""Device and mixed-precision choice: the GPU when present, never a silent fallback when asked for."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Accelerator:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: full precision

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        precision = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[self.amp_dtype]
        return f"{self.device.type} ({name}), {precision}"


def select_accelerator(device: str = "auto", mixed_precision: str = "auto", deterministic: bool = False) -> Accelerator:
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
        return Accelerator(chosen, None)
    if mixed_precision == "auto":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]
    return Accelerator(chosen, dtype)


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
