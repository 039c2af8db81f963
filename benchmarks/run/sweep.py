"""A grid as a W&B Sweep: the sweep configuration (method ``grid``) whose agents run the grid's cells, each as
``metabench run`` with the cell's arguments in the agent's format (see :mod:`metabench.run.grid`)."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import yaml

from metabench.datasets.registry import SEGMENTATION, get_dataset
from metabench.models.learners import algorithm_names
from metabench.models.problems import Classification, Segmentation
from metabench.run.config import RunConfig
from metabench.run.grid import GridError, GridSpec, Plan, Resolver, expand

# The macro the agent replaces by the cell's parameters. W&B's documentation (Sweep configuration options,
# `command`, the table of command macros) says:
#     `${args}` | Hyperparameters and their values in the form `--param1=value1 --param2=value2`.
#     `${env}`  | `/usr/bin/env` on UNIX systems, omitted on Windows.
# (wandb's agent writes each value with Python's str(), `f"--{param}={value}"`), so the agent runs
# `metabench run <fixed arguments> --benchmark=B --algorithm=A [--preset=P] [--seed=S] [--dotted.key=value ...]`,
# which `metabench run` reads: the named flags as usual, a dotted key as --set.
AGENT_ARGS_MACRO = "${args}"
ENV_MACRO = "${env}"  # so `metabench` is found on the PATH of the environment `wandb agent` runs in


def sweep_config(spec: GridSpec, plan: Plan, resolve_args: Resolver, *, name: str | None = None,
                 project: str | None = None, entity: str | None = None, resume: bool = False) -> dict[str, Any]:
    """A W&B Sweep configuration (method ``grid``) whose runs are the grid's cells.

    A grid sweep runs the full product of its parameters, so a grid with combinations that a preset does not
    define is refused (naming them): split it, e.g. one sweep per benchmark family. Preset and seed are
    parameters only when the grid names them (otherwise each run uses the benchmark's default preset and the
    configuration's seed). Runs log to W&B (``--logger=wandb``) unless the grid names another logger.
    """
    if plan.notes:
        raise GridError("a W&B grid sweep runs every combination of its parameters, and these are not defined: "
                        + "; ".join(plan.notes) + ". Split the grid (e.g. one sweep per benchmark family) or drop them")
    algorithms = spec.algorithms or [a for a in algorithm_names() if any(c.cell.algorithm == a for c in plan.cells)]
    if not spec.algorithms:  # every preset's own list: the product must still be defined everywhere
        missing = expand(replace(spec, algorithms=algorithms), resolve_args).notes
        if missing:
            raise GridError("a W&B grid sweep runs every combination of its parameters; name the algorithms "
                            "(--algorithm) so that every preset defines them: " + "; ".join(missing))
    parameters: dict[str, dict[str, Any]] = {"benchmark": {"values": list(spec.benchmarks)},
                                             "algorithm": {"values": algorithms}}
    if spec.presets:
        parameters["preset"] = {"values": list(spec.presets)}
    if spec.seeds:
        parameters["seed"] = {"values": list(spec.seeds)}
    for key, values in spec.vary.items():
        parameters[key] = {"values": list(values)}
    fixed = list(plan.run_args)
    if "logger" not in spec.options:
        fixed.append("--logger=wandb")
    fixed.append("--quiet")  # progress bars would fill the run's captured output
    if resume:
        fixed.append("--resume")
    config: dict[str, Any] = {
        "name": name or f"metabench grid: {', '.join(spec.benchmarks)} ({len(plan.cells)} runs)",
        "project": project or os.environ.get("WANDB_PROJECT") or "metabench",  # where make_wandb_logger logs
        "program": "metabench",
        "method": "grid",
        "command": [ENV_MACRO, "metabench", "run", *fixed, AGENT_ARGS_MACRO],
        "parameters": parameters,
    }
    if entity:
        config["entity"] = entity
    metrics = {_metric_name(item.config) for item in plan.cells}
    if len(metrics) == 1:  # what log_record writes into the run summary
        config["metric"] = {"name": f"test/{metrics.pop()}", "goal": "maximize"}
    return config


def _metric_name(config: RunConfig) -> str:
    task = get_dataset(config.data.name).task
    return Segmentation.metric_name if task == SEGMENTATION else Classification.metric_name


def sweep_yaml(config: dict[str, Any], cells: int) -> str:
    """The sweep configuration as YAML, with a header saying how to start it."""
    header = (f"# W&B Sweep written by `metabench grid sweep`: {cells} runs, one per grid cell.\n"
              f"#   wandb sweep THIS_FILE        # registers it and prints the agent command\n"
              f"#   wandb agent ENTITY/PROJECT/SWEEP_ID   # on each machine, as many as you like\n"
              f"# Each run is: metabench run {' '.join(config['command'][3:-1])} --benchmark=... --algorithm=...\n")
    return header + yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=1000)
