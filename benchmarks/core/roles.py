"""The role of a configuration key, declared once on its dataclass field; every set of keys that treats keys by
role (which keys a grid ignores when it matches records, which ``metabench test`` may change, which a reproducing
command leaves out) is derived from these declarations (:func:`roles`, :func:`keys_with_role`).

==============  ========================================================  ===============  ====================
role            what the key changes                                      grid skip/resume  ``metabench test``
==============  ========================================================  ===============  ====================
``training``    what training computes (the default)                      compared          refused
``validation``  when training validates: the recorded curve (and early   compared          may change
                stopping), not the trained weights' test
``test``        the test protocol only                                    compared          may change
``execution``   nothing a run computes: where and how it runs              ignored           may change
``citation``    nothing: where a value comes from                          ignored           ignored
==============  ========================================================  ===============  ====================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

TRAINING, VALIDATION, TEST, EXECUTION, CITATION = "training", "validation", "test", "execution", "citation"
ROLES = (TRAINING, VALIDATION, TEST, EXECUTION, CITATION)
# Keys whose value cannot change a result: a record or checkpoint that differs from a grid cell only in these is
# still the cell's.
NEVER_COMPUTED = (EXECUTION, CITATION)
# What `metabench test` may change about a trained run's configuration: it evaluates finished weights.
TEST_MAY_CHANGE = (VALIDATION, TEST, EXECUTION, CITATION)


def role_field(default: Any = dataclasses.MISSING, role: str = TRAINING, **kwargs: Any) -> Any:
    """A dataclass field with ``default`` (or ``default_factory=`` in ``kwargs``) whose key has ``role``."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; known: {', '.join(ROLES)}")
    return dataclasses.field(default=default, metadata={"role": role}, **kwargs)


def roles(cls: type, prefix: str = "") -> dict[str, str]:
    """``{dotted key: role}`` of every leaf field of dataclass ``cls`` (a field whose default is a dataclass, by
    that dataclass's fields; a field without a declared role is :data:`TRAINING`), keyed as
    :func:`metabench.run.config.flatten_config` keys a configuration."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        nested = f.default_factory
        if isinstance(nested, type) and dataclasses.is_dataclass(nested):
            out.update(roles(nested, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = f.metadata.get("role", TRAINING)
    return out


def keys_with_role(cls: type, wanted: Iterable[str]) -> tuple[str, ...]:
    """The dotted keys of dataclass ``cls`` whose role is one of ``wanted``, in field order."""
    wanted = set(wanted)
    return tuple(key for key, kind in roles(cls).items() if kind in wanted)
