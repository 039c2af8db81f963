"""Registries: a plain dict from name to object (learner class, backbone builder, dataset), open to other packages.

A name resolves, in this order:

1. the registrations made in this process: metabench's built-ins (``@LEARNERS.register`` on their classes) and
   whatever an imported module registered the same way;
2. the entry points of the registry's group in the installed distributions, e.g. in a package's pyproject::

       [project.entry-points."metabench.algorithms"]
       boil = "metabench_boil:BOIL"

   (the entry point's name is the name users type: ``metabench run --algorithm boil``);
3. a reference ``"pkg.module:attr"`` itself, imported on the spot (``--algorithm mypkg.learners:Mine``).

Nothing here imports a learner, a backbone or a reader: the modules that define them import this one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class RegistryError(ValueError):
    """A name that no registration, entry point or ``pkg.module:attr`` reference resolves; says what is known."""


def import_reference(reference: str) -> Any:
    """The object that ``"pkg.module:attr"`` (``attr`` may be dotted) names; ``RegistryError`` saying which part
    is missing otherwise."""
    module_name, sep, attr = reference.partition(":")
    if not sep or not module_name or not attr:
        raise RegistryError(f"{reference!r} is not a 'package.module:attribute' reference")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise RegistryError(f"{reference!r}: cannot import module {module_name!r} ({error})") from error
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RegistryError(f"{reference!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


class Registry(Generic[T]):
    """Name -> ``T`` for one kind of component (``kind`` names it in messages; ``group`` is its entry-point group).

    ``check(name, obj)`` validates (and may convert) whatever an entry point or a reference yields, so that a
    wrong object fails at lookup with a message naming it, not deep inside a run.
    """

    def __init__(self, kind: str, group: str, check: Callable[[str, Any], T] | None = None) -> None:
        self.kind, self.group = kind, group
        self._check = check
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Any:
        """Register ``obj`` under ``name``; without ``obj``, a decorator. A second registration of a name is refused
        (two packages claiming one name would make results depend on import order)."""

        def add(item: T) -> T:
            if name in self._items and self._items[name] is not item:
                raise RegistryError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = self._checked(name, item)
            return item

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> None:
        """Drop a registration made in this process (tests registering throw-away components)."""
        self._items.pop(name, None)

    def _checked(self, name: str, obj: Any) -> T:
        return self._check(name, obj) if self._check is not None else obj

    def _entry_points(self) -> dict[str, Any]:
        return {point.name: point for point in entry_points(group=self.group)}

    def names(self) -> list[str]:
        """Registered names in registration order (the built-ins' own order), then installed entry points, sorted."""
        registered = list(self._items)
        return registered + sorted(set(self._entry_points()) - set(registered))

    def __iter__(self) -> Iterator[str]:  # the names, as a dict's keys
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._items or name in self._entry_points())

    def get(self, name: str) -> T:
        """The object ``name`` resolves to (see the module docstring for the order)."""
        if name in self._items:
            return self._items[name]
        point = self._entry_points().get(name)
        if point is not None:
            try:
                obj = point.load()
            except Exception as error:  # a broken plug-in: name it and its distribution
                dist = getattr(point.dist, "name", "?")
                raise RegistryError(f"{self.kind} {name!r} (entry point {point.value!r} of {dist}, group "
                                    f"{self.group!r}) failed to load: {error}") from error
            return self._checked(name, obj)
        if ":" in name:
            return self._checked(name, import_reference(name))
        raise RegistryError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())} (or a "
                            f"'package.module:attribute' reference, or an entry point of group {self.group!r})")
