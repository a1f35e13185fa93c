"""A CI gate policy file for `auditbench check --policy FILE` (docs/ci.md).

```yaml
version: 1                      # optional; 1 is the only version
models: selected                # selected | all | [model_id, ...]
thresholds:                     # metric: {min: F, max: F} (either or both)
  lung_mass: {min: 0.2}
  artifact_occlusion_effect: {max: 0.1}
regression:                     # needs --baseline DIR; metric: tolerance
  accuracy: 0.05                # absolute: may get 0.05 worse than the baseline
  lung_mass: {ci: 1.0}          # in half-widths of the 95% bootstrap CI of the difference
```

Read with a safe YAML loader that also refuses duplicate keys. Every mistake raises
:class:`PolicyError` naming the file and the field.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

POLICY_VERSION = 1
TOP_FIELDS = ("version", "models", "thresholds", "regression")


class PolicyError(ValueError):
    """The policy file is missing, unreadable or has a bad field; the message names file and field."""


@dataclass(frozen=True)
class Tolerance:
    """How much worse than the baseline a metric may get: ``value`` in the metric's units
    (``kind`` "abs") or in half-widths of the 95% CI of the difference (``kind`` "ci")."""

    kind: Literal["abs", "ci"]
    value: float

    def __str__(self) -> str:
        return f"{self.value:g}" if self.kind == "abs" else f"{self.value:g} CI half-width(s)"


@dataclass
class Policy:
    path: Path
    models: str | list[str] = "selected"
    thresholds: list[tuple[str, str, float, str]] = field(default_factory=list)
    """(metric, "min"|"max", value, field name for messages)."""
    regression: dict[str, Tolerance] = field(default_factory=dict)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would keep the last)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _number(path: Path, where: str, value: Any, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PolicyError(f"{path}: {where}: expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise PolicyError(f"{path}: {where}: must be a finite number, got {value!r}")
    if minimum is not None and number < minimum:
        raise PolicyError(f"{path}: {where}: must be >= {minimum:g}, got {value!r}")
    return number


def _metric_name(path: Path, where: str, name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise PolicyError(f"{path}: {where}: metric names must be non-empty text, got {name!r}")
    return name


def load_policy(path: Path | str) -> Policy:
    """Read and validate a policy file; :class:`PolicyError` names the file and the bad field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(f"policy file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise PolicyError(f"cannot read policy file {path}: {error}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise PolicyError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise PolicyError(f"{path}: expected a mapping with fields {', '.join(TOP_FIELDS)}, got {type(data).__name__}")
    unknown = [str(k) for k in data if k not in TOP_FIELDS]
    if unknown:
        raise PolicyError(f"{path}: {unknown[0]}: unknown field (fields: {', '.join(TOP_FIELDS)})")
    if "version" in data and (isinstance(data["version"], bool) or data["version"] != POLICY_VERSION):
        raise PolicyError(f"{path}: version: must be {POLICY_VERSION}, got {data['version']!r}")
    policy = Policy(path=path)

    models = data.get("models", "selected")
    if isinstance(models, str) and models in ("selected", "all"):
        policy.models = models
    elif isinstance(models, list) and models and all(isinstance(m, str) and m.strip() for m in models):
        if len(set(models)) != len(models):
            raise PolicyError(f"{path}: models: a model id is listed twice")
        policy.models = list(models)
    else:
        raise PolicyError(f"{path}: models: expected 'selected', 'all' or a non-empty list of model ids, got {models!r}")

    thresholds = data.get("thresholds") or {}
    if not isinstance(thresholds, dict):
        raise PolicyError(f"{path}: thresholds: expected a mapping metric: {{min: F, max: F}}")
    for metric, bounds in thresholds.items():
        where = f"thresholds.{metric}"
        metric = _metric_name(path, "thresholds", metric)
        if not isinstance(bounds, dict) or not bounds:
            raise PolicyError(f"{path}: {where}: expected {{min: F}}, {{max: F}} or both, got {bounds!r}")
        bad = [str(k) for k in bounds if k not in ("min", "max")]
        if bad:
            raise PolicyError(f"{path}: {where}.{bad[0]}: unknown field (expected min, max)")
        values = {bound: _number(path, f"{where}.{bound}", value) for bound, value in bounds.items()}
        if "min" in values and "max" in values and values["min"] > values["max"]:
            raise PolicyError(f"{path}: {where}: min {values['min']:g} is above max {values['max']:g}")
        for bound in ("min", "max"):
            if bound in values:
                policy.thresholds.append((metric, bound, values[bound], f"{path}: {where}.{bound}"))

    regression = data.get("regression") or {}
    if not isinstance(regression, dict):
        raise PolicyError(f"{path}: regression: expected a mapping metric: tolerance")
    for metric, spec in regression.items():
        where = f"regression.{metric}"
        metric = _metric_name(path, "regression", metric)
        if isinstance(spec, dict):
            if len(spec) != 1 or next(iter(spec)) not in ("abs", "ci"):
                raise PolicyError(f"{path}: {where}: expected a number, {{abs: F}} or {{ci: K}}, got {spec!r}")
            kind, value = next(iter(spec.items()))
            policy.regression[metric] = Tolerance(kind, _number(path, f"{where}.{kind}", value, minimum=0.0))
        else:
            policy.regression[metric] = Tolerance("abs", _number(path, where, spec, minimum=0.0))
    if not policy.thresholds and not policy.regression:
        raise PolicyError(f"{path}: no rule: give thresholds, regression or both")
    return policy
