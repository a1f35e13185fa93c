"""A run killed with SIGKILL at a random point resumes: the same command recomputes no finished
model x fold cell and writes the tables an uninterrupted run writes, byte for byte (the run id, which
names each run, aside: a resumed run keeps the id of the run it resumes)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import NO_FAITHFULNESS, REPO

# 2 backbones' worth of groups (crop on/off) x frozen/fine-tuned x 2 folds = 8 cells, seconds each.
SMALL = [
    "--set", "models.backbones=[{name: resnet10t, weights: none}]",
    "--set", "data.synthetic.n_images=40",
    "--set", "data.synthetic.image_size=48",
    "--set", "data.synthetic.shortcut_strength=[1.0]",
    "--set", "preprocessing.input_size=48",
    "--set", "training.finetune=[false, true]",
    "--set", "training.finetune_phase.max_epochs=1",
    "--set", "selection.constraints={}",
    "--set", "report.html=false",
    *NO_FAITHFULNESS,
]
TABLES = ["results.csv", "models.csv", "images.csv", "gallery.csv", "skipped.csv", "validation.csv", "sanity.csv"]


def _command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "auditbench", "run", str(REPO / "protocols" / "quick.yaml"), *SMALL,
            "--out", str(out), *extra]


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run(_command(out, *extra), capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _tables(out: Path) -> dict[str, bytes]:
    run_id = json.loads((out / "summary.json").read_text())["run_id"]
    return {name: (out / name).read_bytes().replace(run_id.encode(), b"RUN")
            for name in TABLES if (out / name).exists()}


def _journalled(parent: Path, name: str) -> int:
    return sum(len(list(folder.glob("cells/cell-*.npz"))) for folder in parent.glob(f".{name}.partial-*"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    _run(out)
    return out


def test_sigkill_at_a_random_point_resumes_with_identical_tables(uninterrupted, tmp_path):
    summary = json.loads((uninterrupted / "summary.json").read_text())
    n_cells = summary["cells_computed"]
    assert summary["cells_reused"] == 0 and n_cells == 8
    seed = random.randrange(1 << 30)
    kill_after = random.Random(seed).randint(1, n_cells - 1)  # finished cells to wait for
    out = tmp_path / "out"
    process = subprocess.Popen(_command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        while _journalled(tmp_path, "out") < kill_after and process.poll() is None:
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    finished = _journalled(tmp_path, "out")
    assert process.returncode == -signal.SIGKILL, f"the run ended before the kill (seed {seed})"
    assert finished >= kill_after and not out.exists()

    result = _run(out)  # the same command
    assert "resuming run " in result.stderr
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["cells_reused"] == finished, f"seed {seed}"
    assert resumed["cells_computed"] == n_cells - finished
    assert _tables(out) == _tables(uninterrupted), f"seed {seed}: killed after {finished} cells"
    assert not list(tmp_path.glob(".out.partial-*")) and not (out / "cells").exists()


def _stale_staging(parent: Path, protocol_sha256: str) -> Path:
    staging = parent / ".out.partial-20260101T000000Z-deadbeef"
    (staging / "cells").mkdir(parents=True)
    (staging / ".auditbench-partial").write_text(json.dumps({"run_id": "x", "pid": 1}))
    from auditbench.pipeline.journal import JOURNAL_FORMAT

    header = {"format": JOURNAL_FORMAT, "protocol_sha256": protocol_sha256, "run_id": "20260101T000000Z-deadbeef"}
    (staging / "cells" / "journal.json").write_text(json.dumps(header))
    return staging


@pytest.mark.parametrize("case", ["other protocol", "restart"])
def test_a_stale_run_is_resumed_only_for_the_same_protocol_without_restart(tmp_path, case):
    from auditbench.outputs import protocol_yaml
    from auditbench.protocol.loader import dump_protocol, load_protocol

    overrides = [*SMALL, "--set", "training.finetune=[false]"]
    protocol = load_protocol(REPO / "protocols" / "quick.yaml", [v for v in overrides if v != "--set"])
    sha = "0" * 64 if case == "other protocol" else protocol_yaml(dump_protocol(protocol), "")[1]
    staging = _stale_staging(tmp_path, sha)
    out = tmp_path / "out"
    result = _run(out, "--set", "training.finetune=[false]", *(["--restart"] if case == "restart" else []))
    assert "resuming" not in result.stderr and f"removed {staging}" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cells_reused"] == 0 and summary["run_id"] != "20260101T000000Z-deadbeef"


def test_ray_executor_writes_the_local_executors_tables(uninterrupted, tmp_path):
    """Backbone passes and cells as Ray tasks on a local Ray instance (2 CPUs)."""
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'auditbench[ray]'")
    out = tmp_path / "out"
    result = _run(out, "--executor", "ray")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["executor"] == "ray" and summary["cells_computed"] == 8, result.stderr[-2000:]
    assert _tables(out) == _tables(uninterrupted)


def test_cache_serves_a_second_run_without_a_backbone_pass(uninterrupted, tmp_path):
    cache = tmp_path / "cache"
    _run(tmp_path / "first", "--cache", str(cache))
    first = json.loads((tmp_path / "first" / "summary.json").read_text())["feature_store"]
    assert first["entries_read"] == 0 and first["entries_written"] > 0
    _run(tmp_path / "second", "--cache", str(cache))
    second = json.loads((tmp_path / "second" / "summary.json").read_text())["feature_store"]
    assert second["entries_written"] == 0 and second["entries_read"] == first["entries_written"]
    assert _tables(tmp_path / "second") == _tables(tmp_path / "first") == _tables(uninterrupted)


def test_a_run_that_fails_while_finishing_resumes_without_recomputing(tmp_path, monkeypatch):
    """The journal outlives a failure in the finish stage (here: aggregation), so the same command
    reuses every cell and only finishes."""
    from typer.testing import CliRunner

    import auditbench.pipeline.finish as finish
    from auditbench.cli import app

    args = ["run", str(REPO / "protocols" / "quick.yaml"), *SMALL, "--set", "training.finetune=[false]",
            "--set", "data.synthetic.shortcut_strength=[1.0]", "--set", "preprocessing.crop=[false]",
            "--out", str(tmp_path / "out")]

    def broken(*args, **kwargs):
        raise RuntimeError("aggregation broke")

    real_aggregate = finish.aggregate_models
    monkeypatch.setattr(finish, "aggregate_models", broken)
    failed = CliRunner().invoke(app, args)
    assert failed.exit_code != 0 and isinstance(failed.exception, RuntimeError)
    (staging,) = tmp_path.glob(".out.partial-*")
    assert len(list((staging / "cells").glob("cell-*.npz"))) == 2  # 1 model x 2 folds, journal kept
    monkeypatch.setattr(finish, "aggregate_models", real_aggregate)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["cells_reused"], summary["cells_computed"]) == (2, 0)
    assert not (tmp_path / "out" / "cells").exists() and not (tmp_path / "out" / "store").exists()
