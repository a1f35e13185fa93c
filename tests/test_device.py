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


def test_channels_last_gives_the_same_features_and_its_own_store_namespace():
    """NHWC changes the kernels, not the function: features match NCHW to float tolerance; the
    layout is part of describe(), which keys the feature store, so cached NCHW features are never
    served to an NHWC run."""
    import numpy as np

    from auditbench.models.backbones import build_backbone
    from auditbench.training.features import extract_features

    torch.manual_seed(0)
    backbone = build_backbone("resnet10t", "none").eval()
    frames = np.random.default_rng(0).random((3, 64, 64), dtype=np.float32)
    plain, nhwc = select_accelerator("cpu", "off"), select_accelerator("cpu", "off", channels_last=True)
    a = extract_features(backbone, frames, (0.5,) * 3, (0.25,) * 3, plain, batch_size=2, keep_maps=True)
    b = extract_features(backbone, frames, (0.5,) * 3, (0.25,) * 3, nhwc, batch_size=2, keep_maps=True)
    assert next(p for p in backbone.parameters() if p.dim() == 4).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(b.pooled, a.pooled, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.maps, a.maps, rtol=1e-4, atol=1e-5)
    assert plain.describe() != nhwc.describe() and nhwc.describe().endswith("channels_last")


def test_loader_workers_resolve_from_the_protocol_setting(monkeypatch):
    from auditbench.data.loader import MAX_AUTO_WORKERS, resolve_workers

    monkeypatch.setattr("os.cpu_count", lambda: 64)
    assert resolve_workers("auto", "cpu") == 0
    assert resolve_workers("auto", "cuda") == MAX_AUTO_WORKERS
    monkeypatch.setattr("os.cpu_count", lambda: 6)
    assert resolve_workers("auto", "cuda") == 3
    assert resolve_workers(5, "cpu") == 5


def test_frames_made_by_worker_processes_are_the_frames_made_in_process():
    import dataclasses

    import numpy as np

    from auditbench.data.loader import frame_chunks
    from auditbench.data.synthetic import SyntheticConfig, generate
    from auditbench.data.transforms import FrameSpec

    samples = generate(SyntheticConfig(n_images=10, image_size=64, seed=2), 0.5).samples
    chunks = [samples[0:4], samples[4:8], samples[8:]]
    frame = FrameSpec(48, True, 0.12, "bilinear")
    inline = list(frame_chunks(chunks, frame, 0.1, workers=0))
    pooled = list(frame_chunks(chunks, frame, 0.1, workers=2))
    assert [len(f.images) for f in pooled] == [4, 4, 2]
    for a, b in zip(inline, pooled):
        for field in dataclasses.fields(a):
            np.testing.assert_array_equal(getattr(b, field.name), getattr(a, field.name))
