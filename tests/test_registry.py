"""The registry pattern and its one registration style: ``@REGISTRY.register(name, **metadata)`` on the function."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest

from auditbench.audit.metrics import METRICS, AttentionInputs, MetricInfo
from auditbench.data.datasets import COMMON_OPTIONS, DATASETS, FunctionAdapter
from auditbench.explain.cam_base import FeatureCam, InputCam, cam_method
from auditbench.explain.gradcam import CAM_METHODS, gradcam_from_features
from auditbench.masks.lungseg import SEGMENTERS
from auditbench.models.backbones import BACKBONES, BackboneEntry, efficientnet_lite0
from auditbench.registry import Registry, UnknownNameError

PACKAGE = Path(__file__).resolve().parents[1] / "auditbench"
REGISTRIES = ("METRICS", "CAM_METHODS", "BACKBONES", "DATASETS", "SEGMENTERS")


@dataclass(frozen=True)
class Tool:
    name: str
    run: Optional[Callable[[int], int]]
    sharp: bool = False


def test_register_builds_the_typed_entry_and_returns_it():
    tools = Registry("tool", entry=Tool)

    @tools.register("double", sharp=True)
    def double(x: int) -> int:
        return 2 * x

    assert isinstance(double, Tool) and tools.get("double") is double
    assert double.name == "double" and double.sharp and double.run(3) == 6
    assert tools.register("elsewhere")(None) == Tool("elsewhere", None)  # work done elsewhere: applied to None
    assert [name for name, _ in tools.in_registration_order()] == ["double", "elsewhere"]


def test_without_an_entry_type_the_object_itself_is_stored_and_returned():
    plain = Registry("plain")

    def build() -> str:
        return "built"

    assert plain.register("a")(build) is build and plain.get("a") is build
    with pytest.raises(TypeError, match="takes no metadata, got colour"):
        plain.register("b", colour="red")(build)
    with pytest.raises(TypeError, match="cannot be None"):
        plain.register("c")(None)
    assert plain.names() == ["a"]


def test_duplicates_are_refused_and_the_first_entry_kept():
    tools = Registry("tool", entry=Tool)
    first = tools.register("double")(lambda x: 2 * x)
    with pytest.raises(ValueError, match="tool 'double' is already registered"):
        tools.register("double")(lambda x: 3 * x)
    with pytest.raises(ValueError, match="already registered"):
        tools.add("double", Tool("double", None))
    assert tools.get("double") is first


def test_unknown_names_get_suggestions():
    tools = Registry("tool", entry=Tool)
    for name in ("double", "triple"):
        tools.register(name)(None)
    expected = r"unknown tool 'doubel'; did you mean 'double'\? \(known: double, triple\)"
    with pytest.raises(UnknownNameError, match=expected):
        tools.get("doubel")
    with pytest.raises(UnknownNameError, match="did you mean 'gradcam'"):
        CAM_METHODS.get("gradcan")


def test_the_five_registries_hold_typed_entries():
    assert METRICS.entry is MetricInfo and BACKBONES.entry is BackboneEntry and DATASETS.entry is FunctionAdapter
    assert CAM_METHODS.entry is cam_method and SEGMENTERS.entry is None
    for name, info in METRICS.items():
        assert isinstance(info, MetricInfo) and info.name == name
        assert (info.compute is not None) == (info.kind in ("attention", "classification")), name
    # The decorated name is the registered entry: Grad-CAM is called as before.
    assert CAM_METHODS.get("gradcam") is gradcam_from_features and gradcam_from_features.name == "gradcam"
    assert isinstance(CAM_METHODS.get("scorecam"), InputCam) and CAM_METHODS.get("scorecam").batch_size == 64
    assert isinstance(CAM_METHODS.get("eigencam"), FeatureCam) and not CAM_METHODS.get("eigencam").uses_gradients
    assert BACKBONES.get("efficientnet_lite0") is efficientnet_lite0 and callable(efficientnet_lite0.imagenet_loader)
    assert BACKBONES.get("resnet18").imagenet_loader is None  # timm's own weights
    kermany = DATASETS.get("kermany")
    assert isinstance(kermany, FunctionAdapter) and set(COMMON_OPTIONS) <= set(kermany.options)
    assert "splits" in kermany.options
    assert all(callable(build) for _, build in SEGMENTERS.items())


def test_metric_entries_check_their_compute_and_default_detector():
    with pytest.raises(ValueError, match="attention metric 'x' needs its compute function"):
        MetricInfo("x", None, higher_is_better=True, kind="attention", description="")
    occlusion = MetricInfo("y", None, higher_is_better=True, kind="occlusion", description="")
    assert occlusion.detector and not MetricInfo("z", None, True, "probe", "").detector


def test_metrics_keep_their_registration_order():
    """Tables list metrics in this order, and an enrichment reads the mass registered before it."""
    order = [name for name, _ in METRICS.in_registration_order()]
    assert order[:11] == [
        "accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity",
        "lung_mass", "border_mass", "artifact_mass", "artifact_enrichment", "lung_enrichment", "pointing_game",
    ]
    assert order.index("artifact_mass") < order.index("artifact_enrichment")
    assert METRICS.get("lung_mass").compute.__annotations__["a"] in ("AttentionInputs", AttentionInputs)


def test_cam_entry_type_refuses_batch_size_and_expensive_for_feature_methods():
    for option in ({"batch_size": 8}, {"expensive": True}):
        with pytest.raises(TypeError, match="batch_size and expensive are for input-level methods"):
            cam_method("x", lambda a, g: a, title="X", **option)
    # Only Score-CAM (a forward pass per channel) is bounded by explain.expensive_images.
    assert [name for name, cam in CAM_METHODS.items() if cam.expensive] == ["scorecam"]


# ------------------------------------------------------------------ the rule: register, never .add, in the package


def registry_add_calls(path: Path) -> list[str]:
    """``line N: NAME.add(...)`` for every call of ``.add`` on one of the five registries in a module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add":
            owner = node.func.value
            name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else ""
            if name in REGISTRIES:
                found.append(f"line {node.lineno}: {name}.add(...)")
    return found


def test_no_module_but_the_registry_calls_add_on_a_registry():
    offenders = {
        str(path.relative_to(PACKAGE)): calls
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != PACKAGE / "registry.py" and (calls := registry_add_calls(path))
    }
    assert not offenders, f"register with @REGISTRY.register(name, ...) on the function instead: {offenders}"


def test_the_rule_catches_an_add_call(tmp_path):
    module = tmp_path / "bad.py"
    module.write_text(
        "from auditbench.audit import metrics\nMETRICS.add('x', None)\nmetrics.METRICS.add('y', None)\nseen.add(1)\n",
        encoding="utf-8",
    )
    assert registry_add_calls(module) == ["line 2: METRICS.add(...)", "line 3: METRICS.add(...)"]
