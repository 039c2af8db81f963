"""Every learner metabench knows, by name: the built-ins, installed plug-ins and ``package.module:Class`` names.

The one place the rest of the suite asks "which algorithms are there, what can each do, how is it configured":
the CLI's choices, config resolution, the grid, the sweep, the runner's checks and the tests all read
:func:`algorithm_names` and :func:`learner_class` instead of lists of names. Importing this module imports the
built-in learners (``models/algorithms.py``, ``models/baselines.py``), which register themselves in
:data:`~metabench.models.algorithms.LEARNERS`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from metabench.models import baselines  # noqa: F401  (registers protonet, baseline, baseline++)
from metabench.models.algorithms import LEARNERS, MetaLearner, Problem
from metabench.models.hparams import AlgorithmConfig


def algorithm_names() -> list[str]:
    """The built-in learners in their canonical order (maml, fomaml, ..., baseline++), then those that installed
    packages register through the ``metabench.algorithms`` entry-point group."""
    return LEARNERS.names()


def algorithms_that(capability: str) -> list[str]:
    """The learners (in :func:`algorithm_names` order) whose ``capabilities.<capability>`` is true, e.g.
    ``algorithms_that("ddp_exact")``."""
    return [name for name in algorithm_names() if getattr(learner_class(name).capabilities, capability)]


def learner_class(name: str) -> type[MetaLearner]:
    """The class of learner ``name``: a registered name, an entry point, or a ``package.module:Class`` reference
    (``RegistryError``, a ``ValueError``, listing the known names otherwise)."""
    return LEARNERS.get(name)


def algorithm_config(name: str = "maml", **fields: Any) -> AlgorithmConfig:
    """The configuration of learner ``name`` with ``fields`` set, checked by the learner
    (:meth:`MetaLearner.check_config`) as a run's configuration is."""
    cls = learner_class(name)
    return cls.check_config(cls.config_class(name=name, **fields))


def build_algorithm(backbone: nn.Module, problem: Problem, config: AlgorithmConfig, max_steps: int) -> MetaLearner:
    """The Lightning module of ``config.name`` around ``backbone``; the configuration is checked by the learner
    first (a plain :class:`AlgorithmConfig` of a learner with a config class of its own is converted to it)."""
    cls = learner_class(config.name)
    if not isinstance(config, cls.config_class):
        config = cls.config_class(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
    return cls(backbone, problem, cls.check_config(config), max_steps)
