"""`auditbench audit`: a classifier trained elsewhere, audited without training (issue 9).

The known answer: a checkpoint that `auditbench run` saved (its fold-0 model), audited on the same
images, must give the numbers the run computed for that model -- per image on the fold's test
images, per split on an external set -- and the audit folder must pass `auditbench check`."""
from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import safetensors.torch
import torch
from PIL import Image
from typer.testing import CliRunner

from auditbench.cli import app
from auditbench.models.checkpoint import load_checkpoint
from conftest import NO_FAITHFULNESS, REPO

runner = CliRunner()
QUICK = str(REPO / "protocols" / "quick.yaml")
# The images of the tiny run below; an audit of its checkpoints uses the same ones.
PHANTOMS = ["--set", "data.synthetic.n_images=48", "--set", "data.synthetic.image_size=64",
            "--set", "data.synthetic.shortcut_strength=[1]", "--set", "selection.constraints={}",
            "--set", "metrics.bootstrap=100", "--set", "validation.bootstrap=0",
            # Log-odds Grad-CAM maps of a random-init backbone are all zero at this size; logit maps
            # are not, so the attention metrics have values to compare.
            "--set", "explain.score=logit", *NO_FAITHFULNESS]
TRAINING = ["--set", "models.backbones=[{name: resnet10t, weights: none}]", "--set", "preprocessing.input_size=64",
            "--set", "training.finetune=[false, true]", "--set", "training.finetune_phase.max_epochs=1",
            "--set", "preprocessing.crop=[false]", "--set", "report.save_models=all"]
PER_IMAGE = ["p_positive", "prediction", "correct", "lung_mass", "border_mass", "artifact_mass", "pointing_game",
             "artifact_occlusion_effect", "border_occlusion_effect", "lung_occlusion_effect", "shortcut_reliance"]


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def _audit(*args: str):
    return runner.invoke(app, ["audit", *map(str, args)])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run of a frozen and a fine-tuned resnet10t; every model's fold-0 checkpoint is saved."""
    out = tmp_path_factory.mktemp("trained") / "run"
    result = runner.invoke(app, ["run", QUICK, *TRAINING, *PHANTOMS, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _fold0_rows(run: Path, model_id: str, split: str) -> pd.DataFrame:
    images = pd.read_csv(run / "images.csv")
    return images[(images["model_id"] == model_id) & (images["fold"] == 0) & (images["split"] == split)]


def _assert_same_per_image(expected: pd.DataFrame, audited: pd.DataFrame, columns: list[str]) -> None:
    """The audit's rows for the images of ``expected`` hold the same values (fp32 arithmetic: 1e-5)."""
    audited = audited.set_index("sample_id").loc[expected["sample_id"]]
    expected = expected.set_index("sample_id")
    for column in columns:
        if expected[column].dtype.kind in "fi":
            np.testing.assert_allclose(audited[column], expected[column], rtol=1e-5, atol=1e-6, equal_nan=True,
                                       err_msg=column)
        else:
            assert audited[column].tolist() == expected[column].tolist(), column


@pytest.mark.parametrize("model_id", ["resnet10t-frozen", "resnet10t-ft"])
def test_audit_of_a_run_checkpoint_reproduces_the_run(trained, tmp_path, model_id):
    out = tmp_path / "audit"
    result = _audit(trained / "models" / model_id, "--data", QUICK, *PHANTOMS, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"audited model {model_id}" in result.output
    for table in ("results.csv", "models.csv", "images.csv"):
        assert (out / table).is_file(), table
    models = pd.read_csv(out / "models.csv")
    assert models["model_id"].tolist() == [model_id]
    # The checkpoint's preprocessing, not quick.yaml's (128 px), and the run's grid columns.
    run_models = pd.read_csv(trained / "models.csv").set_index("model_id")
    for column in ("backbone", "weights", "hidden", "finetune", "augment", "crop", "task", "shortcut_strength", "input_size"):
        assert models.loc[0, column] == run_models.loc[model_id, column], column
    assert models.loc[0, "n_folds"] == 1
    # The shortcut probes read the audited model's own features (phantoms: one source, so undefined).
    probes = pd.read_csv(out / "probes.csv")
    assert set(probes["features"]) == {"model"} and probes["reason"].str.startswith("one source only").all()
    images = pd.read_csv(out / "images.csv")
    internal = images[images["split"] == "internal"]
    assert len(internal) == 48  # every image is a test image
    # Known answer: the fold-0 model the run evaluated on its fold-0 test images, image by image.
    for split in ("internal", "train_distribution"):
        expected = _fold0_rows(trained, model_id, split)
        assert len(expected) == 24
        _assert_same_per_image(expected, images[images["split"] == split], PER_IMAGE)
    assert internal["lung_mass"].notna().sum() > 24 and internal["artifact_occlusion_effect"].notna().sum() > 10
    # ... and so the run's fold-0 metrics, recomputed from the audit's rows of those images.
    results = pd.read_csv(trained / "results.csv")
    fold0 = results[(results["model_id"] == model_id) & (results["fold"] == 0) & (results["split"] == "internal")]
    fold0 = fold0.set_index("metric")["value"]
    same_images = internal[internal["sample_id"].isin(_fold0_rows(trained, model_id, "internal")["sample_id"])]
    assert same_images["correct"].mean() == pytest.approx(fold0["accuracy"])
    assert same_images["lung_mass"].mean() == pytest.approx(fold0["lung_mass"], rel=1e-5)
    assert same_images["artifact_occlusion_effect"].mean() == pytest.approx(fold0["artifact_occlusion_effect"], rel=1e-5)

    summary = json.loads((out / "summary.json").read_text())
    run_summary = json.loads((trained / "summary.json").read_text())
    weights = trained / "models" / model_id / "weights.safetensors"
    assert summary["mode"] == "audit"
    assert summary["audited_model"]["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert summary["audited_model"]["trained_by"]["run_id"] == run_summary["run_id"]
    assert summary["data_fingerprint"] == run_summary["data_fingerprint"]
    assert not any(note.startswith("Checkpoints are the models trained") for note in summary["notes"])
    assert not (out / "models").exists() and not (out / "audit-store").exists()
    card = json.loads((out / "model_card.json").read_text())
    assert "auditbench audit" in card["intended_use"]
    assert not any("cross-validation" in text for text in card["limitations"])

    # The CI gate accepts the folder: one complete run, rows and files of the audit's run id.
    assert runner.invoke(app, ["check", str(out), "--min-accuracy", "0"]).exit_code == 0
    policy = tmp_path / "policy.yaml"
    policy.write_text("models: all\nthresholds:\n  accuracy: {min: 0}\n  artifact_occlusion_effect: {max: 1}\n")
    gate = runner.invoke(app, ["check", str(out), "--policy", str(policy), "--junit", str(tmp_path / "junit.xml")])
    assert gate.exit_code == 0, gate.output
    assert "testcase" in (tmp_path / "junit.xml").read_text()
    failing = runner.invoke(app, ["check", str(out), "--min-accuracy", "1.01"])
    assert failing.exit_code == 1 and model_id in failing.output


def test_state_dict_in_a_pth_file_gives_the_checkpoints_predictions(trained, tmp_path):
    """A bare state dict (.pth, read with weights_only=True) with its head described on the command
    line; its outputs in the other order (positive first), which --classes says."""
    model, _ = load_checkpoint(trained / "models" / "resnet10t-ft")
    state = model.state_dict()
    state["head.fc2.weight"], state["head.fc2.bias"] = state["head.fc2.weight"].flip(0), state["head.fc2.bias"].flip(0)
    weights = tmp_path / "model.pth"
    torch.save(state, weights)
    out = tmp_path / "audit"
    result = _audit("resnet10t", "--weights", weights, "--hidden", 256, "--classes", "covid,non_covid",
                    "--positive", "covid", "--input-size", 64, "--data", QUICK, *PHANTOMS, "--out", out)
    assert result.exit_code == 0, result.output
    images = pd.read_csv(out / "images.csv")
    assert set(images["model_id"]) == {"model"}  # the file's stem
    expected = _fold0_rows(trained, "resnet10t-ft", "internal")
    _assert_same_per_image(expected, images[images["split"] == "internal"], ["p_positive", "prediction", "lung_mass"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["audited_model"]["kind"] == "state_dict"
    assert any("outputs were swapped" in note for note in summary["notes"])


# -- real images: an external set and a golden set too small to train on ------------------------------


def _write_images(folder: Path, prefix: str, labels: dict[str, int]) -> None:
    """Noise images with a lung mask each, and their manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["path,label,lung_mask"]
    lungs = np.zeros((48, 64), np.uint8)
    lungs[10:38, 12:52] = 255
    Image.fromarray(lungs).save(folder / "lungs.png")
    for label, n in labels.items():
        for i in range(n):
            name = f"{prefix}{label}{i}.png"
            rng = np.random.default_rng(zlib.crc32(name.encode()))
            Image.fromarray(rng.integers(0, 256, (48, 64), dtype=np.uint8)).save(folder / name)
            rows.append(f"{name},{label},lungs.png")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")


def _real_protocol(folder: Path, internal: dict[str, int], training: bool = True) -> Path:
    """A protocol on real-image manifests with an external set; ``training=False``: the sections an
    audit needs alone (it takes models, preprocessing and training from the model)."""
    _write_images(folder / "internal", "in", internal)
    _write_images(folder / "external", "ext", {"covid": 4, "normal": 4})
    text = f"""\
name: golden
data:
  dataset: sources
  sources: [{{dataset: manifest, root: {folder / 'internal'}, source: hospital_a}}]
  external: [{{name: hospital_b, sources: [{{dataset: manifest, root: {folder / 'external'}, source: hospital_b}}]}}]
  masks: {{lung: dataset, artifacts: none}}
task: covid_vs_non_covid
explain: {{score: logit}}
metrics: {{bootstrap: 0}}
validation: {{bootstrap: 0}}
report: {{save_models: all, gallery_per_model: 0, html: false}}
"""
    if training:
        text += """\
preprocessing: {input_size: 32}
models: {backbones: [{name: resnet10t, weights: none}], hidden: [8]}
training: {folds: 2, head: {lr: 0.01, max_epochs: 3, patience: 2}}
"""
    protocol = folder / ("protocol.yaml" if training else "golden.yaml")
    protocol.write_text(text)
    return protocol


def test_audit_on_real_images_reproduces_the_external_set_and_takes_a_golden_set(tmp_path):
    protocol = _real_protocol(tmp_path / "train", {"covid": 12, "normal": 12})
    run = tmp_path / "run"
    result = runner.invoke(app, ["run", str(protocol), "--out", str(run)])
    assert result.exit_code == 0, result.output
    checkpoint = run / "models" / "resnet10t"
    out = tmp_path / "audit"
    result = _audit(checkpoint, "--data", protocol, "--out", out)
    assert result.exit_code == 0, result.output
    assert "Test set 'hospital_b'" in result.output
    # The external set: the same model on the same images, so the run's fold-0 rows exactly.
    keys = ["split", "metric"]
    ran = pd.read_csv(run / "results.csv")
    ran = ran[(ran["split"] == "hospital_b") & (ran["fold"] == 0)].set_index(keys)["value"]
    audited = pd.read_csv(out / "results.csv")
    audited = audited[audited["split"] == "hospital_b"].set_index(keys)["value"]
    assert len(ran) > 10 and ran.index.equals(audited.index)
    np.testing.assert_allclose(audited.to_numpy(), ran.to_numpy(), rtol=1e-5, atol=1e-7, equal_nan=True)
    images = pd.read_csv(out / "images.csv")
    _assert_same_per_image(_fold0_rows(run, "resnet10t", "internal"), images[images["split"] == "internal"],
                           PER_IMAGE[:-1])  # real data has no clean twins: no shortcut_reliance
    assert images["lung_mass"].notna().all()
    assert runner.invoke(app, ["check", str(out), "--min-accuracy", "0"]).exit_code == 0

    # A golden set of 2 images per class: too few to train on (run refuses it), enough to audit,
    # with a protocol of data, task and report sections alone.
    trainable = _real_protocol(tmp_path / "golden", {"covid": 2, "normal": 2})
    refused = runner.invoke(app, ["run", str(trainable), "--out", str(tmp_path / "no-run")])
    assert refused.exit_code == 2 and "needs at least 4 patients per class" in refused.output
    golden = _real_protocol(tmp_path / "golden", {"covid": 2, "normal": 2}, training=False)
    sections = {line.split(":")[0] for line in golden.read_text().splitlines() if not line.startswith(" ")}
    assert sections == {"name", "data", "task", "explain", "metrics", "validation", "report"}
    result = _audit(checkpoint, "--data", golden, "--out", tmp_path / "golden-audit")
    assert result.exit_code == 0, result.output
    images = pd.read_csv(tmp_path / "golden-audit" / "images.csv")
    assert (images["split"] == "internal").sum() == 4 and (images["split"] == "hospital_b").sum() == 8


# -- bad input: exit 2, one line naming the file or field, nothing written ----------------------------


def _bad(tmp_path: Path, *args) -> str:
    out = tmp_path / "out"
    result = _audit(*args, "--data", QUICK, *PHANTOMS, "--out", out)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not out.exists()
    (line,) = _error_lines(result.output)
    return line


def test_bad_checkpoints_exit_2_naming_the_file(trained, tmp_path):
    missing = tmp_path / "nowhere"
    assert f"checkpoint folder not found: {missing}" in _bad(tmp_path, missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"checkpoint config missing: {empty / 'config.json'}" in _bad(tmp_path, empty)
    copy = tmp_path / "copy"
    copy.mkdir()
    source = trained / "models" / "resnet10t-frozen"
    (copy / "weights.safetensors").write_bytes((source / "weights.safetensors").read_bytes())
    config = json.loads((source / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "backbone": "resnet_nope"}))
    line = _bad(tmp_path, copy)
    assert str(copy / "config.json") in line and "resnet_nope" in line
    (copy / "config.json").write_text(json.dumps({**config, "hidden": 16}))  # weights of a 256-wide head
    line = _bad(tmp_path, copy)
    assert str(copy / "weights.safetensors") in line and "head.fc1.weight" in line and "of another shape" in line
    (copy / "config.json").write_text(json.dumps({**config, "preprocessing": {**config["preprocessing"], "input_size": 8}}))
    assert f"{copy / 'config.json'}: preprocessing.input_size is 8" in _bad(tmp_path, copy)
    # A checkpoint whose classes no task of the protocol has.
    line = _bad(tmp_path, source, "--set", "task=covid_vs_viral")
    assert "no task has the model's classes ['non_covid', 'covid']" in line and QUICK in line


def test_bad_state_dicts_exit_2_naming_the_file(trained, tmp_path):
    model, _ = load_checkpoint(trained / "models" / "resnet10t-frozen")
    state = model.state_dict()
    weights = tmp_path / "model.safetensors"
    safetensors.torch.save_file(state, weights)
    line = _bad(tmp_path, "resnet10t", "--weights", weights, "--hidden", 16, "--input-size", 64)
    assert str(weights) in line and "--hidden 16" in line and "head.fc1.weight (256, 512), model (16, 512)" in line
    renamed = tmp_path / "renamed.pth"
    torch.save({key.replace("backbone.body.", ""): value for key, value in state.items()}, renamed)
    line = _bad(tmp_path, "resnet10t", "--weights", renamed, "--hidden", 256)
    assert str(renamed) in line and "missing (backbone.body." in line and "unexpected (conv1" in line
    pickled = tmp_path / "whole_model.pth"
    torch.save(model, pickled)  # the whole module: loading it would run pickle
    line = _bad(tmp_path, "resnet10t", "--weights", pickled, "--hidden", 256)
    assert str(pickled) in line and "pickled Python objects" in line and "Classifier" in line
    assert "resnet_nope" in _bad(tmp_path, "resnet_nope", "--weights", weights, "--hidden", 256)
    assert f"weights file not found: {tmp_path / 'absent.pth'}" in _bad(
        tmp_path, "resnet10t", "--weights", tmp_path / "absent.pth", "--hidden", 256)
    assert "--weights needs --hidden" in _bad(tmp_path, "resnet10t", "--weights", weights)
    assert "--positive 'covid' needs --classes" in _bad(tmp_path, "resnet10t", "--weights", weights, "--hidden", 256,
                                                        "--positive", "covid")
    assert "need --weights FILE" in _bad(tmp_path, trained / "models" / "resnet10t-frozen", "--hidden", 256)
    # Without a run's record of its data cell, a protocol with two shortcut strengths is ambiguous.
    result = _audit("resnet10t", "--weights", weights, "--hidden", 256, "--data", QUICK, "--out", tmp_path / "out")
    assert result.exit_code == 2
    (line,) = _error_lines(result.output)
    assert "data.synthetic.shortcut_strength has 2 values" in line and "--set data.synthetic.shortcut_strength=" in line


def test_audit_refuses_an_out_folder_it_did_not_write(trained, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    result = _audit(trained / "models" / "resnet10t-frozen", "--data", QUICK, *PHANTOMS, "--out", out)
    assert result.exit_code == 2 and "is not an auditbench run folder" in result.output
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
