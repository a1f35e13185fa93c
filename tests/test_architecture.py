"""The package's folders are the pipeline's stages, and imports run one way, down the pipeline.

protocol -> data (with masks, which fills missing lung masks) -> models / training -> explain ->
audit -> selection -> report -> pipeline (which runs them all) -> cli. A module may import its own
stage and the stages before it; ``registry`` and ``outputs`` are neutral helpers below every stage.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "auditbench"

STAGE_LEVEL = {
    "registry": -1, "outputs": -1, "textio": -1,
    "protocol": 0,
    "data": 1, "masks": 1,
    "models": 2, "training": 2,
    "explain": 3,
    "audit": 4,
    "selection": 5,
    "report": 6,
    "pipeline": 7, "run": 7,
    "cli": 8, "__main__": 8, "__init__": 8,
}


def _stage(parts: tuple[str, ...]) -> str:
    """The stage of a module path below the package (``("audit", "metrics")`` -> ``"audit"``)."""
    return parts[0].removesuffix(".py")


def _imported_stages(path: Path) -> set[tuple[str, int]]:
    """(stage, line) of every ``auditbench.<stage>`` import in a module, including function-level ones."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "auditbench":
                names = [f"auditbench.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "auditbench" and len(parts) > 1:
                found.add((parts[1], node.lineno))
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_package_folder_and_module_has_a_stage():
    top_level = {_stage(path.relative_to(PACKAGE).parts) for path in MODULES}
    assert top_level <= set(STAGE_LEVEL), f"modules without a stage: {sorted(top_level - set(STAGE_LEVEL))}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_down_the_pipeline(path: Path):
    stage = _stage(path.relative_to(PACKAGE).parts)
    upward = sorted(
        f"line {line}: auditbench.{imported} ({imported} comes after {stage})"
        for imported, line in _imported_stages(path)
        if STAGE_LEVEL.get(imported, 99) > STAGE_LEVEL[stage]
    )
    assert not upward, f"{path.relative_to(PACKAGE)} imports up the pipeline: {upward}"


def test_the_rule_catches_an_upward_import(tmp_path):
    """The check itself can fail: a protocol module importing data is reported."""
    module = tmp_path / "bad.py"
    module.write_text("def f():\n    from auditbench.data.transforms import FrameSpec\n", encoding="utf-8")
    assert _imported_stages(module) == {("data", 2)}
    assert STAGE_LEVEL["data"] > STAGE_LEVEL["protocol"]
