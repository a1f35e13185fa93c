"""One registry pattern, and one way to fill it, for metrics, CAM methods, backbones, data sets and segmenters.

Every entry is registered by decorating the function that does its work::

    @METRICS.register("lung_mass", higher_is_better=True, kind="attention", description="...")
    def lung_mass(a: AttentionInputs) -> np.ndarray:
        return relevance_mass(a.heatmaps, a.lungs)

- A registry made with an entry type, ``Registry("metric", entry=MetricInfo)``, builds its typed entry as
  ``entry(name, function, **metadata)``: the registered name first, **the decorated function second** (the
  entry type's second field or parameter: ``MetricInfo.compute``, ``BackboneEntry.imagenet_loader``,
  ``FunctionAdapter.function``, the CAM method's ``function``), and the decorator's keywords as the rest.
- A registry without an entry type stores the decorated object itself and takes no metadata.
- **The decorator returns what was registered**: the built entry (a :class:`MetricInfo`, a ``FeatureCam``, ...)
  or, without an entry type, the decorated object unchanged. So the module-level name of a decorated function
  is its entry: ``gradcam_from_features(head, features, target)`` and ``gradcam_from_features.explain(...)``
  call the registered ``FeatureCam``.
- An entry whose work is done elsewhere (a metric computed by a module that imports the metric module, a
  backbone whose ImageNet weights are timm's own) applies the same decorator to ``None``:
  ``METRICS.register("shortcut_reliance", ...)(None)``; its entry type decides whether None is allowed.

:meth:`Registry.add` (name, ready-made entry) is the low-level primitive the decorator uses; outside this module
the package registers only with :meth:`Registry.register` (``tests/test_registry.py`` enforces it). ``add`` stays
for callers that register an object they already have (a test's stand-in entries, a user's own adapter object).
Names are unique (a second registration raises ``ValueError``) and unknown names raise
:class:`UnknownNameError` with the closest registered names.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, Iterator, Optional, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """An unknown registry name; the message lists the closest registered names."""

    def __str__(self) -> str:  # KeyError quotes its argument; show the message as written
        return str(self.args[0])


class Registry(Generic[T]):
    """Name -> entry mapping filled by :meth:`register`; lookups of unknown names suggest close ones.

    ``entry``: the entry type (or any factory), called as ``entry(name, function, **metadata)``; None stores the
    decorated object itself.
    """

    def __init__(self, kind: str, entry: Optional[Callable[..., T]] = None):
        self.kind = kind
        self.entry = entry
        self._entries: dict[str, T] = {}

    def register(self, name: str, **metadata: Any) -> Callable[[Any], T]:
        """Decorator: register the decorated function as ``name`` and return the entry it became.

        With an entry type the entry is ``entry(name, function, **metadata)``; without one it is the function.
        Raises ``ValueError`` when ``name`` is taken, ``TypeError`` for metadata (or None) without an entry type.
        """

        def decorator(function: Any) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            if self.entry is not None:
                built = self.entry(name, function, **metadata)
            elif metadata:
                raise TypeError(f"the {self.kind} registry stores objects as they are: register({name!r}) takes no "
                                f"metadata, got {', '.join(sorted(metadata))}")
            elif function is None:
                raise TypeError(f"the {self.kind} registry stores objects as they are: {name!r} cannot be None")
            else:
                built = function
            self.add(name, built)
            return built

        return decorator

    def add(self, name: str, entry: T) -> None:
        """Register a ready-made ``entry`` as ``name`` (the primitive under :meth:`register`)."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(str(name), list(self._entries), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        return f"unknown {self.kind} {name!r}{hint} (known: {', '.join(sorted(self._entries))})"

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._entries.items())

    def in_registration_order(self) -> list[tuple[str, T]]:
        """Entries as registered: for registries where an entry may use an earlier one's result."""
        return list(self._entries.items())
