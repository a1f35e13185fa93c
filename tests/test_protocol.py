from pathlib import Path

import pytest

from auditbench.data.datasets import data_axes
from auditbench.protocol.grid import expand_grid
from auditbench.protocol.loader import ProtocolError, dump_protocol, load_protocol

REPO = Path(__file__).resolve().parents[1]

MINIMAL = """\
name: tiny
seed: 3
data:
  dataset: synthetic
  synthetic: {n_images: 40, image_size: 64, shortcut_strength: [0, 1]}
task: covid_vs_non_covid
preprocessing: {input_size: 64, crop: [false, true]}
models:
  backbones:
    - {name: resnet18, weights: none}
  hidden: [256, 512]
training: {folds: 2, finetune: [false, true]}
"""


@pytest.fixture
def protocol_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(MINIMAL)
    return path


def test_grid_expands_every_axis(protocol_file):
    protocol = load_protocol(protocol_file)
    specs = expand_grid(protocol, data_axes(protocol))
    # 2 strengths x 1 backbone x 2 hidden x 2 finetune x 2 crop
    assert len(specs) == 16
    assert len({s.model_id for s in specs}) == 16
    first = specs[0]
    assert first.model_id == "resnet18-h256-frozen-full-ss0"
    assert first.grid_row()["shortcut_strength"] == 0


def test_backbone_finetune_modes_override_the_training_axis(protocol_file):
    protocol = load_protocol(protocol_file, [
        "models.backbones=[{name: resnet18, weights: none, finetune: false}, {name: resnet10t, weights: none}]",
        "models.hidden=[256]", "preprocessing.crop=[false]", "data.synthetic.shortcut_strength=[0]",
    ])
    ids = [s.model_id for s in expand_grid(protocol, data_axes(protocol))]
    # resnet18 frozen only; resnet10t takes training.finetune [false, true]
    assert ids == ["resnet18-frozen", "resnet10t-frozen", "resnet10t-ft"]


def test_unknown_key_names_key_file_line_and_suggestion(protocol_file):
    protocol_file.write_text(MINIMAL.replace("training: {folds: 2", "traning: {folds: 2"))
    with pytest.raises(ProtocolError) as error:
        load_protocol(protocol_file)
    message = str(error.value)
    assert "unknown key 'traning'" in message
    assert "did you mean 'training'" in message
    assert str(protocol_file) in message
    assert "line 12" in message


def test_nested_unknown_key_suggests_sibling(protocol_file):
    protocol_file.write_text(MINIMAL.replace("{name: resnet18, weights: none}", "{name: resnet18, weigths: none}"))
    with pytest.raises(ProtocolError, match=r"unknown key 'models.backbones\[0\].weigths'; did you mean 'weights'"):
        load_protocol(protocol_file)


def test_bad_value_names_field_and_allowed(protocol_file):
    with pytest.raises(ProtocolError, match=r"field 'training.folds'.*greater than or equal to 2"):
        load_protocol(protocol_file, ["training.folds=1"])
    with pytest.raises(ProtocolError, match=r"data.balance.*'none', 'cap' or 'balance'"):
        load_protocol(protocol_file, ["data.balance=sometimes"])


def test_unknown_builtin_task_lists_known(protocol_file):
    with pytest.raises(ProtocolError, match="covid_vs_viral"):
        load_protocol(protocol_file, ["task=covid_vs_everything"])


def test_overrides_parse_yaml_values(protocol_file):
    protocol = load_protocol(protocol_file, ["models.backbones=[resnet10t]", "training.folds=3", "models.hidden=128"])
    assert [b.name for b in protocol.models.backbones] == ["resnet10t"]
    assert protocol.models.backbones[0].weights == "imagenet"
    assert protocol.training.folds == 3
    assert protocol.models.hidden == [128]


def test_override_indexes_lists(protocol_file):
    protocol = load_protocol(protocol_file, ["models.backbones.0.weights=imagenet"])
    assert protocol.models.backbones[0].weights == "imagenet"
    with pytest.raises(ProtocolError, match="is a list of 1; '3' is not an index"):
        load_protocol(protocol_file, ["models.backbones.3.weights=none"])
    with pytest.raises(ProtocolError, match="is a value, so it has no key 'x'"):
        load_protocol(protocol_file, ["seed.x=1"])


def test_bad_override_syntax(protocol_file):
    with pytest.raises(ProtocolError, match="expected dotted.key=value"):
        load_protocol(protocol_file, ["training.folds"])


def test_resolved_protocol_round_trips(protocol_file, tmp_path):
    protocol = load_protocol(protocol_file)
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(dump_protocol(protocol))
    assert load_protocol(resolved) == protocol


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo owned']\n")
    with pytest.raises(ProtocolError, match="not valid YAML"):
        load_protocol(path)


def test_task_classes_must_be_binary_and_disjoint(protocol_file):
    with pytest.raises(ProtocolError, match="in both"):
        load_protocol(protocol_file, ["task={name: t, positive: a, classes: {a: [covid], b: [covid]}}"])


@pytest.mark.parametrize("name", ["quick.yaml", "paper.yaml", "validation.yaml"])
def test_shipped_protocols_validate(name):
    protocol = load_protocol(REPO / "protocols" / name)
    assert expand_grid(protocol, data_axes(protocol))
