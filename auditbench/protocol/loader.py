"""Read a protocol YAML (safe loading), apply ``--set`` overrides, validate with clear errors."""
from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from auditbench.protocol.schema import Protocol
from auditbench.textio import NotUtf8, read_utf8_text


class ProtocolError(ValueError):
    """An invalid protocol; the message names the file, the field (and line) and what is allowed."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ProtocolError(f"--set {text!r}: expected dotted.key=value, e.g. --set training.folds=2")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ProtocolError(f"--set {text!r}: the value is not valid YAML ({' '.join(str(error).split())})") from None
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set each ``dotted.key=value``; a numeric part indexes a list (``models.backbones.0.weights=none``)."""
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    where = ".".join(path[:depth])
                    raise ProtocolError(f"--set {text!r}: {where} is a list of {len(node)}; {part!r} is not an index in it")
                part = int(part)
            elif not isinstance(node, dict):
                raise ProtocolError(f"--set {text!r}: {'.'.join(path[:depth])} is a value, so it has no key {part!r}")
            if last:
                node[part] = value
            else:
                if isinstance(node, dict) and node.get(part) is None:
                    node[part] = {}
                elif isinstance(node, list) and isinstance(node[part], str) and path[: depth] == ["models", "backbones"]:
                    node[part] = {"name": node[part]}  # the shorthand `- resnet18` takes fields by index too
                node = node[part]
    return raw


def _model_class_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model whose fields are valid at ``loc`` (for 'did you mean' suggestions)."""
    model: type[BaseModel] | None = Protocol
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int) or part not in model.model_fields:
            continue
        model = _first_model_in(model.model_fields[part].annotation)
    return model


def _first_model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _first_model_in(arg)
        if found is not None:
            return found
    return None


def _line_of(node: yaml.Node | None, loc: tuple) -> int | None:
    """1-based line of the YAML node at ``loc`` (the deepest one that exists)."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == part), None)
            key = next((k for k, v in node.value if k.value == part), None)
            if match is None:
                break
            line, node = key.start_mark.line + 1, match
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _format_errors(error: ValidationError, origin: str, tree: yaml.Node | None) -> str:
    lines = []
    for item in error.errors():
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and p.startswith(("function-", "list["))))
        dotted = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
        line = _line_of(tree, loc)
        where = f"{origin}" + (f", line {line}" if line else "")
        if item["type"] == "extra_forbidden":
            parent = _model_class_at(loc[:-1])
            valid = list(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.4)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            lines.append(f"{where}: unknown key {dotted!r}{hint} (valid keys here: {', '.join(valid)})")
        elif item["type"] == "missing":
            lines.append(f"{where}: missing required field {dotted!r}")
        else:
            got = item.get("input")
            shown = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
            lines.append(f"{where}: field {dotted or '<top level>'!r}: {item['msg']}{shown}")
    return "invalid protocol:\n  " + "\n  ".join(lines)


def _empty_grid_axes(protocol: Protocol) -> list[tuple]:
    """The locations of the grid axes that are empty lists, so that the grid has no model."""
    axes: list[tuple[tuple, list]] = [
        (("task",), protocol.task),
        (("models", "backbones"), protocol.models.backbones),
        (("models", "hidden"), protocol.models.hidden),
        (("training", "augment"), protocol.training.augment),
        (("preprocessing", "crop"), protocol.preprocessing.crop),
    ]
    own = [(("models", "backbones", i, "finetune"), b.finetune) for i, b in enumerate(protocol.models.backbones)]
    axes += [(loc, modes) for loc, modes in own if modes is not None]
    if any(modes is None for _, modes in own) or not own:
        axes.append((("training", "finetune"), protocol.training.finetune))
    if protocol.data.dataset == "synthetic":
        synthetic = protocol.data.synthetic
        axes += [(("data", "synthetic", "shortcut_strength"), synthetic.shortcut_strength),
                 (("data", "synthetic", "artifact_placement"), synthetic.artifact_placement)]
        if synthetic.seed is not None:
            axes.append((("data", "synthetic", "seed"), synthetic.seed))
    return [loc for loc, values in axes if len(values) == 0]


def _read_text(path: Path) -> str:
    """The protocol's text (UTF-8), or ProtocolError naming the line and byte that is not UTF-8."""
    try:
        return read_utf8_text(path)
    except NotUtf8 as exc:
        raise ProtocolError(f"{exc.where} is not UTF-8; save the protocol as UTF-8") from None


def _yaml_error(error: yaml.YAMLError) -> str:
    """``, line L, column C: not valid YAML: problem (context)`` on one line."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if mark is None or not problem:
        return ": not valid YAML: " + " ".join(str(error).split())
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and context_mark is not None:
        problem += f" ({context} that starts on line {context_mark.line + 1}, column {context_mark.column + 1})"
    elif context:
        problem += f" ({context})"
    return f", line {mark.line + 1}, column {mark.column + 1}: not valid YAML: {problem}"


def load_protocol(path: str | Path, overrides: list[str] | None = None) -> Protocol:
    """Load, override and validate a protocol file. Raises :class:`ProtocolError`, also when a grid
    axis is an empty list (the grid would have no model)."""
    path = Path(path)
    if not path.is_file():
        raise ProtocolError(f"protocol file not found: {path}")
    text = _read_text(path)
    try:
        raw = yaml.safe_load(text)
        tree = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        raise ProtocolError(f"{path}{_yaml_error(error)}") from None
    if not isinstance(raw, dict):
        raise ProtocolError(f"{path}: a protocol is a YAML mapping with keys {', '.join(Protocol.model_fields)}")
    origin = str(path)
    if overrides:
        raw = apply_overrides(raw, overrides)
        origin = f"{path} (after --set {' '.join(overrides)})"
    try:
        protocol = Protocol.model_validate(raw)
    except ValidationError as error:
        raise ProtocolError(_format_errors(error, origin, tree)) from None
    empty = _empty_grid_axes(protocol)
    if empty:
        loc = empty[0]
        line = _line_of(tree, loc)
        dotted = ".".join(map(str, loc))
        names = ", ".join(".".join(map(str, e)) for e in empty)
        whole = any(len(e) != 4 for e in empty) or len(empty) == len(protocol.models.backbones)
        what = "the grid has no models" if whole else f"backbone {protocol.models.backbones[loc[2]].name!r} has no models"
        raise ProtocolError(
            f"{origin}{f', line {line}' if line else ''}: {what}: {names} "
            f"{'is an empty list' if len(empty) == 1 else 'are empty lists'}; give {dotted} at least one value"
        )
    return protocol


def dump_protocol(protocol: Protocol) -> str:
    """The resolved protocol (defaults filled in) as YAML, loadable again by :func:`load_protocol`."""
    return yaml.safe_dump(protocol.model_dump(mode="json"), sort_keys=False)
