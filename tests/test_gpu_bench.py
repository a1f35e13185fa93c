"""benchmarks/gpu_bench.py: the smoke mode runs the GPU benchmark's code path on the CPU (tiny backbone, one
iteration) and writes a complete JSON; gpu.sh refuses to run without a CUDA device; the projection formula."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import shutil
import subprocess

import pytest

from conftest import REPO


def _load_gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "benchmarks" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_bench = _load_gpu_bench()

TOP = {"schema", "complete", "smoke", "date", "command", "environment", "settings", "peak_memory_source",
       "measurements", "host_prep", "head_training", "projections"}
MEASUREMENT_NUMBERS = {"images_per_s", "images_per_s_min", "images_per_s_max", "peak_memory_bytes", "input_size",
                       "batch_size", "iterations", "warmup_iterations", "repeats"}
PART_KEYS = {"cpu_head_s", "gpu_finetune_s", "gpu_explain_s", "gpu_occlusion_s"}


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _numbers(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _numbers(value)
    elif isinstance(node, list):
        for value in node:
            yield from _numbers(value)
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield node


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_bench") / "smoke.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = gpu_bench.run(["--smoke", "--out", str(out)], say=lambda text: None)
    return result, json.loads(out.read_text(encoding="utf-8")), printed.getvalue(), out


def test_smoke_writes_every_field_with_finite_positive_numbers(smoke):
    result, data, _, _ = smoke
    assert data == json.loads(json.dumps(result))  # what run() returns is what it wrote
    assert TOP <= set(data)
    assert data["schema"] == gpu_bench.SCHEMA and data["complete"] is True and data["smoke"] is True
    assert data["date"] and data["environment"]["versions"]["torch"] and data["environment"]["device"]["name"]
    assert all(math.isfinite(x) and x >= 0 for x in _numbers(data))  # no NaN or inf anywhere (allow_nan=False too)

    modes = {(row["layout"], row["mode"]) for row in data["measurements"]}
    assert modes == {(layout, mode) for layout in gpu_bench.LAYOUTS for mode in gpu_bench.MODES}
    for row in data["measurements"]:
        assert row["backbone"] == gpu_bench.SMOKE_BACKBONE and row["input_size"] == gpu_bench.SMOKE_SIZE
        for key in MEASUREMENT_NUMBERS:
            assert _positive(row[key]), (row["mode"], key, row[key])
    assert data["host_prep"] and all(_positive(row["images_per_s"]) for row in data["host_prep"])
    assert {row["hidden"] for row in data["head_training"]} == {256, 512}
    assert all(_positive(row["images_per_s"]) and _positive(row["seconds_per_epoch"]) for row in data["head_training"])

    for layout in gpu_bench.LAYOUTS:
        projection = data["projections"][layout]
        # The paper grid: 2 tasks x 5 backbones x 2 hidden x frozen/fine-tuned x augment x crop, 4 folds.
        assert (projection["cells"], projection["folds"], projection["cell_folds"]) == (160, 4, 640)
        assert len(projection["cell_fold"]) == 160 and len(projection["groups"]) == 10
        assert set(projection["stand_in"]) == {"vgg16", "vgg19", "inception_v3", "inception_resnet_v2", "xception"}
        for bound in ("low", "high"):
            totals = projection["totals"][bound]
            for key in PART_KEYS | {"gpu_features_s", "gpu_s", "total_s", "mean_cell_fold_s"}:
                assert _positive(totals[key]), (layout, bound, key)
            assert totals["total_s"] == pytest.approx(sum(totals[k] for k in PART_KEYS | {"gpu_features_s"}))
            assert isinstance(totals["meets_goal"], bool)
        assert projection["totals"]["high"]["total_s"] >= projection["totals"]["low"]["total_s"]


def test_smoke_prints_a_plain_table(smoke):
    _, _, printed, out = smoke
    assert "SMOKE" in printed and "finetune_step" in printed and "whole grid" in printed
    assert printed.rstrip().endswith(f"JSON: {out}")


def test_projection_formula_on_known_rates():
    protocol = gpu_bench.load_protocol(REPO / "protocols" / "paper.yaml")
    names = ["vgg16", "vgg19", "inception_v3", "inception_resnet_v2", "xception"]
    rates = {n: {"features": 100.0, "predict": 100.0, "gradcam": 50.0, "finetune_step": 10.0} for n in names}
    head_rates = {(n, h): 1000.0 for n in names for h in (256, 512)}
    counts = {"covid": 100, "normal": 300, "viral": 200, "bacterial": 400}
    projection = gpu_bench.project(protocol, rates, head_rates, counts)
    cell = next(c for c in projection["cell_fold"]
                if (c["backbone"], c["task"], c["hidden"], c["finetune"], c["augment"], c["crop"])
                == ("vgg16", "covid_vs_non_covid", 256, True, True, False))
    n = 1000  # covid 100 vs normal + viral + bacterial 900
    n_train, n_val, n_test, n_aug = 0.6 * n, 0.15 * n, 0.25 * n, 0.6 * 100  # minority (covid) copied once
    low = cell["low"]
    assert low["cpu_head_s"] == pytest.approx(11 * (n_train + n_aug) / 1000)  # head: 1 + patience 10 epochs
    assert low["gpu_finetune_s"] == pytest.approx(4 * ((n_train + n_aug) / 10 + n_val / 100))  # 1 + patience 3
    assert low["gpu_explain_s"] == pytest.approx(n_test / 50)
    assert low["gpu_occlusion_s"] == pytest.approx(3 * n_test / 100)  # artifact, border, lung copies
    assert cell["high"]["gpu_finetune_s"] == pytest.approx(20 * ((n_train + n_aug) / 10 + n_val / 100))
    frozen = next(c for c in projection["cell_fold"] if c["model_id"] == cell["model_id"].replace("-ft-", "-frozen-"))
    assert frozen["low"]["gpu_finetune_s"] == frozen["low"]["gpu_explain_s"] == frozen["low"]["gpu_occlusion_s"] == 0
    group = next(g for g in projection["groups"] if g["backbone"] == "vgg16" and g["crop"])
    # every image of both tasks once, two occluded copies (no border band in a cropped frame), covid copies
    assert group["gpu_features_s"] == pytest.approx(n / 100 + (2 * n + 100) / 100)


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not found")
def test_gpu_sh_fails_with_one_line_without_cuda():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 3
    assert done.stdout == ""
    assert done.stderr.strip().count("\n") == 0 and "no CUDA device" in done.stderr
