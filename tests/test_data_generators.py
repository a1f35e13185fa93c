"""Data sets that generate their images declare their grid axes and known answer; the grid, the
planner, `audit` and the validation take them from the registry, not from code that knows the name."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from auditbench.cli import app
from auditbench.data.datasets import DATASETS, data_axes, generator_of
from auditbench.data.prepare import TaskData
from auditbench.protocol.grid import expand_grid
from auditbench.protocol.loader import load_protocol

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "protocols" / "quick.yaml"


def _field(protocol, dotted: str):
    value = protocol
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def test_the_synthetic_generator_declares_its_axes_fields_and_known_answer():
    protocol = load_protocol(QUICK, ["data.synthetic.shortcut_strength=[0, 0.5, 1]", "data.synthetic.seed=[4, 5]"])
    synthetic = DATASETS.get("synthetic")
    assert synthetic.generates and generator_of(protocol) is synthetic
    assert synthetic.known_answer == "shortcut_reliance"
    axes = data_axes(protocol)
    assert axes == {"shortcut_strength": [0, 0.5, 1], "artifact_placement": ["border"], "data_seed": [4, 5]}
    for axis, values in axes.items():  # each axis names the protocol field its values come from
        assert _field(protocol, synthetic.axis_fields[axis]) == values
    assert not DATASETS.get("kermany").generates and DATASETS.get("kermany").known_answer is None


def test_real_data_has_no_axes_and_no_generator():
    protocol = load_protocol(REPO / "protocols" / "paper.yaml")
    assert generator_of(protocol) is None and data_axes(protocol) == {}


def test_a_registered_generator_is_a_data_axis_of_the_grid_without_other_changes(monkeypatch):
    """A user's generator: registering it is all it takes for the grid and model ids to span its axis."""
    monkeypatch.setattr(DATASETS, "_entries", dict(DATASETS._entries))
    made = []

    @DATASETS.register("noisy_phantoms", axes=lambda protocol: {"noise_level": [0.1, 0.3]},
                       axis_fields={"noise_level": "seed"}, known_answer=None)
    def noisy(protocol, task, axis_values, check_folds=True):
        made.append(axis_values)
        return TaskData([], [], np.zeros(0, int), np.zeros(0, int))

    protocol = load_protocol(QUICK, ["data.dataset=noisy_phantoms", "models.backbones=[{name: resnet10t, weights: none}]",
                                     "preprocessing.crop=[false]", "training.finetune=[false]"])
    ids = [spec.model_id for spec in expand_grid(protocol, data_axes(protocol))]
    assert ids == ["resnet10t-nl0.1", "resnet10t-nl0.3"]
    noisy.task_data(protocol, protocol.task[0], {"noise_level": 0.3})
    assert made == [{"noise_level": 0.3}]
    with pytest.raises(Exception, match="generates its images and reads no folder"):
        noisy.load(Path("."), {}, 512)


@pytest.mark.parametrize("override, message", [
    ("data.dataset=kermany", "'kermany' reads files: use data.dataset: sources"),
    ("data.dataset=synthetc", "did you mean 'synthetic'"),
])
def test_data_dataset_must_name_a_generator(override, message):
    result = CliRunner().invoke(app, ["validate", str(QUICK), "--set", override])
    assert result.exit_code == 2 and message in result.output and "data.dataset" in result.output, result.output


def test_a_generator_listed_as_a_source_is_refused():
    result = CliRunner().invoke(app, ["validate", str(REPO / "protocols" / "paper.yaml"),
                                      "--set", "data.sources=[{dataset: synthetic, root: x}]"])
    assert result.exit_code == 2 and "'synthetic' generates its images" in result.output, result.output
