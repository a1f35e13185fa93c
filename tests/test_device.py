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


def test_runner_takes_the_gpu_path_when_cuda_is_reported(monkeypatch, tmp_path):
    from auditbench.protocol.loader import load_protocol
    from auditbench.run import Runner
    from conftest import REPO

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    runner = Runner(load_protocol(REPO / "protocols" / "paper.yaml"), tmp_path, REPO)
    assert runner.accelerator.device.type == "cuda"
    assert runner.accelerator.amp_dtype is torch.bfloat16
    with runner.accelerator.autocast() as context:
        assert context is not None  # a real torch.autocast, not the CPU's null context
