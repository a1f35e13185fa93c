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


def test_deterministic_on_request_switches_torch_to_deterministic_algorithms(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
              torch.backends.cudnn.deterministic)
    try:
        select_accelerator("cpu", "auto")
        assert not torch.are_deterministic_algorithms_enabled()  # only on request
        select_accelerator("cpu", "auto", deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        import os
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[1], before[2]


def test_to_device_keeps_cpu_batches_as_they_are():
    from auditbench.training.device import to_device

    batch = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(to_device(batch, torch.device("cpu")), batch)
