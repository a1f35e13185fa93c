"""Check every registry name a protocol uses before anything runs, with suggestions (the pipeline
checks here because it sits above every registry; protocol/ imports none of them)."""
from __future__ import annotations

from auditbench.protocol.schema import Protocol
from auditbench.registry import UnknownNameError


def check_registered_names(protocol: Protocol) -> None:
    """Raise :class:`UnknownNameError` naming the protocol field of the first unknown name."""
    from auditbench.audit.metrics import METRICS
    from auditbench.explain.gradcam import CAM_METHODS
    from auditbench.masks.lungseg import SEGMENTERS
    from auditbench.models.backbones import resolve_backbone

    checks = [(f"models.backbones[{i}].name", resolve_backbone, b.name) for i, b in enumerate(protocol.models.backbones)]
    checks += [(f"data.sources[{i}].dataset", _reader, s.dataset) for i, s in enumerate(protocol.data.sources)]
    checks += [
        (f"data.external[{i}].sources[{j}].dataset", _reader, s.dataset)
        for i, ext in enumerate(protocol.data.external)
        for j, s in enumerate(ext.sources)
    ]
    if protocol.data.dataset != "sources":
        checks.append(("data.dataset", _generator, protocol.data.dataset))
    checks += [(f"explain.method[{i}]", CAM_METHODS.get, m) for i, m in enumerate(protocol.explain.method)]
    checks += [("selection.primary", METRICS.get, protocol.selection.primary)]
    checks += [(f"selection.constraints.{m}", METRICS.get, m) for m in protocol.selection.constraints]
    checks += [("selection.pareto", METRICS.get, m) for m in protocol.selection.pareto]
    if protocol.data.dataset == "sources":
        checks.append(("data.masks.lung_model", SEGMENTERS.get, protocol.data.masks.lung_model))
    for field, lookup, name in checks:
        try:
            lookup(name)
        except UnknownNameError as error:
            raise UnknownNameError(f"{field}: {error}") from None


def _reader(name: str):
    """A data set that reads files (a ``data.sources`` entry)."""
    from auditbench.data.datasets import DATASETS

    adapter = DATASETS.get(name)
    if getattr(adapter, "generates", False):
        raise UnknownNameError(f"{name!r} generates its images and reads no folder: use data.dataset: {name}")
    return adapter


def _generator(name: str):
    """A data set that generates its images (``data.dataset``)."""
    from auditbench.data.datasets import DATASETS, generator_names

    adapter = DATASETS.get(name)
    if not getattr(adapter, "generates", False):
        raise UnknownNameError(f"{name!r} reads files: use data.dataset: sources and list it under data.sources "
                               f"(data sets that generate images: {', '.join(generator_names())})")
    return adapter


def backbone_weights_errors(protocol: Protocol) -> list[Exception]:
    """For every backbone whose weights cannot be had now (ImageNet weights neither local nor
    downloadable, a missing weights file), its error, prefixed with the field
    ``models.backbones.N.weights``. Fast: cache lookups and at most one short network probe per host."""
    from auditbench.models.backbones import WeightsFileError, WeightsUnavailableError, check_weights

    errors: list[Exception] = []
    for index, backbone in enumerate(protocol.models.backbones):
        try:
            check_weights(backbone.name, backbone.weights)
        except (WeightsUnavailableError, WeightsFileError) as error:
            errors.append(type(error)(f"models.backbones.{index}.weights: {error}"))
    return errors


def check_backbone_weights(protocol: Protocol) -> None:
    """Raise the first of :func:`backbone_weights_errors`."""
    errors = backbone_weights_errors(protocol)
    if errors:
        raise errors[0]
