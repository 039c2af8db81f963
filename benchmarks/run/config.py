"""Run configuration: dataclasses resolved from a benchmark preset (YAML), an optional config file and
dotted ``key=value`` overrides, in that order.

A benchmark preset file (``benchmarks/presets/<benchmark>.yaml``) holds the benchmark's fixed part (dataset,
episode shape, backbone, evaluation) and named presets of per-algorithm hyper-parameters, each citing its
source. The resolved :class:`RunConfig` is written in full into every record.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from metabench.core.registry import RegistryError
from metabench.core.roles import (
    EXECUTION,
    NEVER_COMPUTED,
    TEST,
    TEST_MAY_CHANGE,
    VALIDATION,
    keys_with_role,
    role_field,
)
from metabench.models.hparams import AlgorithmConfig
from metabench.models.learners import algorithm_names, learner_class


class ConfigError(ValueError):
    """A configuration cannot be resolved; the message names the key or file."""


@dataclass
class DataConfig:
    """Which dataset and where: ``options`` go to the dataset's reader (e.g. ``scheme: vinyals``). Each key's role
    (what it changes: training by default, the test protocol, or nothing computed) is declared on its field
    (:mod:`metabench.core.roles`)."""

    name: str = "synthetic-glyphs"
    root: str | None = role_field(None, EXECUTION)
    cache_dir: str | None = role_field(None, EXECUTION)
    options: dict[str, Any] = field(default_factory=dict)
    # gather episodes on the training device (the whole split is small)
    resident: bool = role_field(True, EXECUTION)


@dataclass
class EpisodeConfig:
    """Episode shapes. ``train_ways``/``train_shots``/``train_queries`` default to the evaluation ones
    (``train_ways`` only for networks without a classifier head: protonet)."""

    ways: int = 5
    # The evaluation shape: training compares by its own shape (train_*: training_shape fills them when null).
    shots: int = role_field(1, TEST)
    queries: int = role_field(15, TEST)
    train_shots: int | None = None
    train_queries: int | None = None
    train_ways: int | None = None
    val_episodes: int = 100
    test_episodes: int = role_field(600, TEST)
    eval_seed: int = role_field(0, TEST)
    eval_batch: int = role_field(25, EXECUTION)  # evaluation episodes at a time: the scores do not depend on it


@dataclass
class ModelConfig:
    backbone: str = "conv4-omniglot"
    options: dict[str, Any] = field(default_factory=dict)
    invert: bool = False  # map dark-on-white glyphs to bright-on-black (as the MAML code feeds Omniglot)


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    # Validation: it makes the record's curve, and protonet's early stopping (algorithm.patience counts validations)
    # keeps the best validated weights, so a grid cell's record must share it; a test of finished weights does not
    # validate (metabench test keeps the run's curve and records the run's value in resolved.trained).
    val_every: int = role_field(250, VALIDATION)
    checkpoint_every: int = role_field(100, EXECUTION)  # how often a checkpoint is written, not what is trained
    # Lightning's logging and the progress bar only: nothing in the weights, the curve or the record depends on it,
    # so metabench test may change it too (it used to be refused there, while grids ignored it).
    log_every: int = role_field(25, EXECUTION)
    accelerator: str = role_field("auto", EXECUTION)
    seed: int = 0
    max_time_minutes: float | None = None
    # CPU threads for torch (None: torch's default). On a 2-core machine shared with other jobs, OpenMP's
    # spinning threads can slow small convolutions many-fold; 1 thread is the robust choice there.
    cpu_threads: int | None = role_field(None, EXECUTION)
    # Keep freed CPU memory in the process (glibc only; metabench.core.allocator): a step's large fresh tensors stop
    # page-faulting in, zero-filled, every step. Bit for bit the same results; resident memory stays at its peak.
    retain_memory: bool = role_field(True, EXECUTION)
    # Processes: ``devices`` per node x ``num_nodes``, each with its share of every meta-batch (strategy "ddp",
    # benchmarks/core/distributed.py); "auto" is one process. Records do not depend on the number of processes
    # (tests/test_ddp.py).
    devices: int = role_field(1, EXECUTION)
    num_nodes: int = role_field(1, EXECUTION)
    strategy: str = role_field("auto", EXECUTION)


@dataclass
class RunConfig:
    """Everything that defines a run; written in full into its record."""

    benchmark: str = "synthetic-5w1s"
    preset: str = "default"
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    data: DataConfig = field(default_factory=DataConfig)
    episodes: EpisodeConfig = field(default_factory=EpisodeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: str = role_field("none", EXECUTION)  # "none", "csv" or "wandb"
    out_dir: str = role_field("runs", EXECUTION)
    records_dir: str = role_field("results/records", EXECUTION)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Derived from the roles declared on the fields above and on AlgorithmConfig's (metabench.core.roles), in field order.
# Keys that change nothing a run computes (execution, citations): a record or checkpoint whose configuration differs
# from a grid cell's only in these still belongs to the cell, and a command that reproduces a record leaves them out.
EXECUTION_KEYS = keys_with_role(RunConfig, NEVER_COMPUTED)
# Keys that ``metabench test`` may change in a trained run's configuration: the test protocol, the run's validation
# cadence and the keys that change nothing computed; never what was trained.
TEST_KEYS = keys_with_role(RunConfig, TEST_MAY_CHANGE)
TEST_PROTOCOL_KEYS = keys_with_role(RunConfig, [TEST])  # the test protocol itself
VALIDATION_KEYS = keys_with_role(RunConfig, [VALIDATION])  # when training validates: part of the run's command


# The training episodes' shape: ``episodes.train_<key>``, or ``episodes.<key>`` where that is null.
TRAIN_SHAPE = ("ways", "shots", "queries")


def training_shape(flat: dict[str, Any]) -> dict[str, Any]:
    """A flattened configuration with every ``episodes.train_<key>`` set to the value training uses (the
    evaluation one when null), so that configurations compare by what they train."""
    return {**flat, **{f"episodes.train_{k}": flat.get(f"episodes.train_{k}") or flat.get(f"episodes.{k}")
                       for k in TRAIN_SHAPE}}


BENCHMARK_FILE = (".yaml", ".yml")  # --benchmark path/to/mine.yaml: a benchmark file outside the package


def benchmark_name(benchmark: str) -> str:
    """What records call ``benchmark``: a named benchmark as is, a benchmark file by its stem."""
    return Path(benchmark).stem if benchmark.endswith(BENCHMARK_FILE) else benchmark


def preset_path(benchmark: str) -> Path:
    """The YAML file of ``benchmark``: one of metabench's (``list_benchmarks``), or a path ending in .yaml."""
    if benchmark.endswith(BENCHMARK_FILE):
        path = Path(benchmark)
        if not path.is_file():
            raise ConfigError(f"benchmark file {benchmark!r} does not exist")
        return path
    path = Path(str(resources.files("metabench") / "presets" / f"{benchmark}.yaml"))
    if not path.is_file():
        raise ConfigError(f"unknown benchmark {benchmark!r}; known: {', '.join(list_benchmarks())}")
    return path


def list_benchmarks() -> list[str]:
    folder = Path(str(resources.files("metabench") / "presets"))
    return sorted(p.stem for p in folder.glob("*.yaml"))


def load_preset_file(benchmark: str) -> dict[str, Any]:
    with open(preset_path(benchmark)) as handle:
        return yaml.safe_load(handle)


def preset_names(benchmark: str) -> tuple[str | None, list[str]]:
    """The default preset of ``benchmark`` and all its named presets."""
    spec = load_preset_file(benchmark)
    presets = list(spec.get("presets", {}))
    return spec.get("default_preset") or next(iter(presets), None), presets


def preset_algorithms(benchmark: str, preset: str | None = None) -> list[str]:
    """The algorithms that ``preset`` (default: the benchmark's default preset) of ``benchmark`` defines, in
    the registry's order (``algorithm_names``): what a benchmark runs when no algorithm is named (e.g. transfer
    only on 1-way segmentation benchmarks)."""
    spec = load_preset_file(benchmark)
    presets = spec.get("presets", {})
    preset = preset or spec.get("default_preset") or next(iter(presets), None)
    if preset not in presets:
        raise ConfigError(f"benchmark {benchmark!r} has no preset {preset!r}; known: {', '.join(presets)}")
    return [name for name in algorithm_names() if name in presets[preset]]


def resolve(benchmark: str, algorithm: str, preset: str | None = None, config_file: str | Path | None = None,
            overrides: list[str] | None = None) -> RunConfig:
    """Build the :class:`RunConfig` of ``algorithm`` on ``benchmark``.

    Order: dataclass defaults < the benchmark's fixed part < its ``presets[preset][algorithm]`` < the YAML
    ``config_file`` < ``overrides`` (``"algorithm.inner_lr=0.1"``, values parsed as YAML scalars).
    ``{dotted.key}`` fields in ``out_dir`` are filled from the resolved config (see :func:`expand_out_dir`).
    """
    try:
        learner = learner_class(algorithm)
    except RegistryError as error:
        raise ConfigError(str(error)) from None
    spec = load_preset_file(benchmark)
    presets = spec.get("presets", {})
    preset = preset or spec.get("default_preset") or next(iter(presets), None)
    if preset not in presets:
        raise ConfigError(f"benchmark {benchmark!r} has no preset {preset!r}; known: {', '.join(presets)}")
    if algorithm in presets[preset]:
        algo = dict(presets[preset][algorithm])
    elif learner.preset_base in presets[preset]:  # e.g. a MAML variant with this preset's MAML hyper-parameters
        algo = dict(presets[preset][learner.preset_base])
        algo["source"] = f"{learner.preset_base}'s {preset} preset, run as {algorithm}: {algo.get('source', '')}"
    else:
        raise ConfigError(f"preset {preset!r} of {benchmark!r} defines no {algorithm!r} "
                          f"(it defines {', '.join(presets[preset])}); give its hyper-parameters with --config, or "
                          "name a learner whose section serves it in the class's preset_base")
    tree: dict[str, Any] = {"benchmark": benchmark_name(benchmark), "preset": preset}
    for key in ("data", "episodes", "model", "trainer"):
        tree[key] = dict(spec.get(key, {}))
    for section in ("trainer", "episodes", "model", "data"):  # an algorithm's preset may refine the fixed part
        _merge(tree[section], algo.pop(section, {}))
    tree["algorithm"] = {"name": algorithm, **algo}
    if config_file is not None:
        with open(config_file) as handle:
            extra = yaml.safe_load(handle) or {}
        if not isinstance(extra, dict):
            raise ConfigError(f"{config_file}: expected a mapping at the top level")
        _merge(tree, extra)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    if tree["algorithm"].get("name", algorithm) != algorithm:
        raise ConfigError("algorithm.name cannot be overridden; use --algorithm")
    try:
        config = _build(RunConfig, tree, "")
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:  # a dataclass's own validation
        raise ConfigError(f"{benchmark}/{algorithm}: {error}") from error
    config.out_dir = expand_out_dir(config.out_dir, config)
    return config


_FIELD = re.compile(r"\{([^{}]*)\}")


def expand_out_dir(template: str, config: RunConfig) -> str:
    """``template`` with each ``{dotted.key}`` replaced by that value of ``config``, made safe for a folder name
    (``runs/lr={algorithm.inner_lr}`` -> ``runs/lr=0.1``): runs that differ only in such a value (a grid or
    a W&B Sweep over it) get run folders of their own."""
    flat = flatten_config(config.to_dict())

    def value(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in flat or key == "out_dir":
            raise ConfigError(f"out_dir {template!r}: {{{key}}} names no configuration value "
                              f"(use a dotted key such as {{algorithm.inner_lr}})")
        item = flat[key]
        text = item if isinstance(item, str) else json.dumps(item, separators=(",", ":"))
        return re.sub(r"[^\w.=+,-]", "_", text)  # no separators or quotes inside one path component

    return _FIELD.sub(value, template)


def flatten_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"algorithm": {"inner_lr": 0.4}}`` -> ``{"algorithm.inner_lr": 0.4}``; ``options`` mappings (a reader's
    or a backbone's free-form keyword arguments) stay whole values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "options":
            out.update(flatten_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def _build(cls: type, tree: dict[str, Any], where: str) -> Any:
    """Instantiate dataclass ``cls`` from ``tree``, rejecting unknown keys and checking scalar types."""
    section = where.rstrip(".") or "top level"
    if not isinstance(tree, dict):
        raise ConfigError(f"{section}: expected a mapping, got {tree!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(tree) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(where + k for k in unknown)}; "
                          f"valid under {section}: {', '.join(known)}")
    hints = typing.get_type_hints(cls)
    defaults = cls()
    kwargs: dict[str, Any] = {}
    for name, value in tree.items():
        default = getattr(defaults, name)
        if cls is RunConfig and name == "algorithm":
            kwargs[name] = _build_algorithm(value, f"{where}{name}.")
        elif dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where}{name}.")
        else:
            kwargs[name] = _check_type(f"{where}{name}", value, hints[name])
    return cls(**kwargs)


def _build_algorithm(tree: Any, where: str) -> AlgorithmConfig:
    """The ``algorithm`` section as its learner's own config class, checked by the learner."""
    name = tree.get("name", AlgorithmConfig.name) if isinstance(tree, dict) else AlgorithmConfig.name
    try:
        learner = learner_class(name)
    except RegistryError as error:
        raise ConfigError(str(error)) from None
    return learner.check_config(_build(learner.config_class, tree, where))


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a field's type hint (``int``, ``float | None``, ``dict[str, Any]``, ...)."""
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    allowed = tuple(typing.get_origin(a) or a for a in allowed)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{key}: may not be null")
    if bool in allowed and isinstance(value, bool):
        return value
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected {_names(allowed)}, got {value!r}")
    if float in allowed and isinstance(value, int | float):
        return float(value)
    if float in allowed and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string; a number field accepts it
            return float(value)
        except ValueError:
            pass
    if any(isinstance(value, a) for a in allowed if isinstance(a, type)):
        return value
    raise ConfigError(f"{key}: expected {_names(allowed)}, got {value!r}")


def _names(allowed: tuple) -> str:
    words = {"NoneType": "null", "dict": "a mapping", "int": "an integer", "float": "a number", "bool": "true/false",
             "str": "a string", "list": "a list"}
    return " or ".join(words.get(a.__name__, a.__name__) for a in allowed)


def build_config(tree: dict[str, Any], overrides: dict[str, Any] | None = None) -> RunConfig:
    """The :class:`RunConfig` of a resolved configuration ``tree`` (e.g. a record's ``config`` without its
    ``resolved`` part) with ``{dotted key: value}`` ``overrides``; unknown keys and wrong types fail naming the key."""
    tree = copy.deepcopy(tree)
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    try:
        return _build(RunConfig, tree, "")
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:  # a dataclass's own validation
        raise ConfigError(f"{tree.get('benchmark')}: {error}") from error
