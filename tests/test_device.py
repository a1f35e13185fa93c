import pytest
import torch

from auditbench.training.device import select_accelerator


def test_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    accelerator = select_accelerator("auto", "auto")
    assert accelerator.device.type == "cpu"
    assert accelerator.amp_dtype is None


def test_cuda_and_mixed_precision_taken_when_cuda_reported(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    accelerator = select_accelerator("auto", "auto")
    assert accelerator.device.type == "cuda"
    assert accelerator.amp_dtype is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert select_accelerator("auto", "auto").amp_dtype is torch.float16
    assert select_accelerator("auto", "off").amp_dtype is None


def test_asking_for_cuda_without_it_fails_loudly(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        select_accelerator("cuda", "auto")
