"""Grids of cells: benchmarks x presets x algorithms x seeds (x varied config keys), each cell one
``metabench run``.

A grid is run on this machine (:func:`run_grid`: one cell after another or N at a time, each as its own
``metabench run`` process, skipping a cell whose record exists and resuming one whose run folder holds a
checkpoint) or written as a W&B grid Sweep (:mod:`metabench.run.sweep`) whose agents run the same ``metabench run``
arguments on any number of machines. Either way a cell is named on the command line exactly as a W&B agent
names it (``--benchmark=B --algorithm=A --preset=P --seed=S --algorithm.inner_lr=0.1``), and its configuration
is resolved by parsing those arguments with ``metabench run``'s own parser (the ``resolve_args`` callable).
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from metabench.models.learners import learner_class
from metabench.run.config import (
    EXECUTION_KEYS,
    ConfigError,
    RunConfig,
    flatten_config,
    preset_algorithms,
    preset_names,
)
from metabench.run.records import Record, RecordError, read_record
from metabench.run.runner import run_dir_for, world_size

T = TypeVar("T")
Resolver = Callable[[list[str]], RunConfig]  # `metabench run` arguments -> the configuration that run trains


class GridError(ValueError):
    """A grid cannot be expanded or run as asked; the message names the cell, key or value."""


# Options of `metabench run` that a grid passes unchanged to every cell (grid-file key -> flag).
RUN_OPTIONS = {"config": "--config", "data_root": "--data-root", "cache_dir": "--cache-dir", "max_steps": "--max-steps",
               "test_episodes": "--test-episodes", "accelerator": "--accelerator", "records_dir": "--records-dir",
               "out_dir": "--out-dir", "logger": "--logger", "devices": "--devices", "num_nodes": "--num-nodes",
               "strategy": "--strategy"}
AXES = ("benchmark", "preset", "algorithm", "seed")
GRID_FILE_KEYS = (*AXES, "vary", "set", *RUN_OPTIONS)

_MISSING = object()


# -- the grid and its cells ---------------------------------------------------------------------------------

@dataclass
class GridSpec:
    """What a grid spans. Empty ``algorithms``: every algorithm each preset defines; empty ``presets``: each
    benchmark's default preset; empty ``seeds``: the configuration's seed. ``vary``: dotted config keys and the
    values each takes (one more axis per key). ``options`` / ``sets``: ``metabench run`` options (keys of
    :data:`RUN_OPTIONS`) and ``--set`` overrides given to every cell."""

    benchmarks: list[str]
    algorithms: list[str] = field(default_factory=list)
    presets: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    vary: dict[str, list[Any]] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    sets: list[str] = field(default_factory=list)

    def run_args(self) -> list[str]:
        """The fixed ``metabench run`` arguments of every cell."""
        args = [f"{RUN_OPTIONS[name]}={value}" for name, value in self.options.items() if value is not None]
        return args + [f"--set={item}" for item in self.sets]


@dataclass(frozen=True)
class Cell:
    """One ``metabench run``: a benchmark, a preset, an algorithm, a seed (None: the configuration's) and one
    value of each varied key."""

    benchmark: str
    preset: str
    algorithm: str
    seed: int | None = None
    vary: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        parts = [self.benchmark, self.algorithm, self.preset] + ([f"seed{self.seed}"] if self.seed is not None else [])
        return "/".join(parts) + "".join(f" {key}={agent_value(value)}" for key, value in self.vary)

    def args(self) -> list[str]:
        """The cell's ``metabench run`` arguments in a W&B agent's format (``--name=value``)."""
        args = [f"--benchmark={self.benchmark}", f"--algorithm={self.algorithm}", f"--preset={self.preset}"]
        if self.seed is not None:
            args.append(f"--seed={self.seed}")
        return args + [f"--{key}={agent_value(value)}" for key, value in self.vary]


def agent_value(value: Any) -> str:
    """A parameter value as a W&B agent writes it into ``--name=value``: Python's ``str`` (W&B's agent formats
    ``f"{param}={value}"``), so that a local grid passes exactly what an agent would."""
    return str(value)


@dataclass
class PlannedCell:
    cell: Cell
    argv: list[str]  # the cell's `metabench run` arguments: the agent's plus the grid's fixed ones
    config: RunConfig

    @property
    def name(self) -> str:
        return self.cell.name


@dataclass
class Plan:
    """A grid expanded into resolved cells; ``notes``: the combinations skipped because no preset defines them."""

    cells: list[PlannedCell]
    notes: list[str]
    run_args: list[str]


def load_grid_file(path: str | Path) -> dict[str, Any]:
    """A grid YAML file: the keys of :data:`GRID_FILE_KEYS` (axes as a value or a list)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise GridError(f"grid file {path}: {error.strerror or error}") from error
    except yaml.YAMLError as error:
        raise GridError(f"grid file {path}: not valid YAML ({error})") from error
    if not isinstance(data, dict):
        raise GridError(f"grid file {path}: expected a mapping of {', '.join(GRID_FILE_KEYS)}")
    unknown = sorted(set(data) - set(GRID_FILE_KEYS))
    if unknown:
        raise GridError(f"grid file {path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(GRID_FILE_KEYS)}")
    return data


def make_spec(file: dict[str, Any], flags: dict[str, Any]) -> GridSpec:
    """Merge a grid file's keys with command-line flags (same names; None or [] = not given): an axis given as
    flags replaces the file's, ``vary`` keys from flags replace the file's, ``set`` items add to the file's (later
    ones win), other options from flags win. Validates names, types and duplicates up front."""
    axes = {}
    for axis in AXES:
        values = flags.get(axis) or _as_list(file.get(axis), axis)
        if len(set(map(str, values))) != len(values):
            twice = next(v for v in values if [str(x) for x in values].count(str(v)) > 1)
            raise GridError(f"{axis} {twice!r} is listed twice")
        axes[axis] = values
    if not axes["benchmark"]:
        raise GridError("a grid needs at least one benchmark (--benchmark, or benchmark: in the grid file)")
    for name in axes["algorithm"]:
        try:
            learner_class(name)
        except ValueError as error:
            raise GridError(str(error)) from None
    for seed in axes["seed"]:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise GridError(f"seed {seed!r} is not an integer")
    vary = {**_vary_mapping(file.get("vary")), **flags.get("vary", {})}
    sets = _set_items(file.get("set")) + list(flags.get("set") or [])
    options = {name: file.get(name) for name in RUN_OPTIONS}
    options.update({name: value for name, value in flags.items() if name in RUN_OPTIONS and value is not None})
    spec = GridSpec(benchmarks=[str(b) for b in axes["benchmark"]], algorithms=[str(a) for a in axes["algorithm"]],
                    presets=[str(p) for p in axes["preset"]], seeds=list(axes["seed"]), vary=vary,
                    options={k: v for k, v in options.items() if v is not None}, sets=sets)
    _check_vary(spec)
    return spec


def parse_vary(item: str) -> tuple[str, list[Any]]:
    """``--vary KEY=VALUES`` (a YAML list, or one value): ``algorithm.inner_lr=[0.1, 0.4]``."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise GridError(f"--vary {item!r} is not of the form dotted.key=[value, ...]")
    try:
        values = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise GridError(f"--vary {item!r}: the values are not valid YAML ({error})") from error
    return key.strip(), _values(key.strip(), values)


def _as_list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        raise GridError(f"grid file: {what} should be a value or a list, got a mapping")
    return [value]


def _values(key: str, values: Any) -> list[Any]:
    values = values if isinstance(values, list) else [values]
    if not values or any(isinstance(v, dict) for v in values):
        raise GridError(f"vary {key}: expected one value or a non-empty list of values, got {values!r}")
    if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
        raise GridError(f"vary {key}: a value is listed twice in {values!r}")
    return values


def _vary_mapping(value: Any) -> dict[str, list[Any]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise GridError("grid file: vary should map dotted config keys to lists of values")
    return {str(key): _values(str(key), values) for key, values in value.items()}


def _set_items(value: Any) -> list[str]:
    """A grid file's ``set``: a list of ``key=value`` strings or a mapping of dotted keys to values."""
    if value is None:
        return []
    if isinstance(value, dict):  # values written as JSON, which the override parser (YAML) reads back exactly
        return [f"{key}={json.dumps(item)}" for key, item in value.items()]
    if isinstance(value, list) and all(isinstance(item, str) and "=" in item for item in value):
        return list(value)
    raise GridError("grid file: set should be a list of key=value strings or a mapping of dotted keys to values")


def _check_vary(spec: GridSpec) -> None:
    set_keys = {item.partition("=")[0].strip() for item in spec.sets}
    for key in spec.vary:
        if key in ("algorithm.name", "trainer.seed"):
            raise GridError(f"vary {key}: use the grid's {'algorithm' if key == 'algorithm.name' else 'seed'} axis")
        if "." not in key:
            raise GridError(f"vary {key}: expected a dotted configuration key such as algorithm.inner_lr "
                            f"(benchmarks, presets, algorithms and seeds are axes of their own)")
        if key in set_keys:
            raise GridError(f"{key} is both varied and set to one value (--set): drop one")


# -- expansion ----------------------------------------------------------------------------------------------

def expand(spec: GridSpec, resolve_args: Resolver) -> Plan:
    """The grid's cells, each resolved as ``metabench run`` would resolve its arguments.

    Seeds are the outermost loop (every algorithm's first seed before any second seed: a partial grid already
    compares everything). A combination that a preset does not define (e.g. ``transfer`` on a classification
    benchmark) is skipped with a note; a preset or algorithm that no benchmark of the grid defines, a cell whose
    configuration does not resolve, and two cells sharing a run folder are errors naming them.
    """
    combos, notes = _combinations(spec)
    varied = [[(key, value) for value in values] for key, values in spec.vary.items()]
    cells = [Cell(b, p, a, seed, tuple(vary)) for seed in (spec.seeds or [None]) for b, p, a in combos
             for vary in itertools.product(*varied)]
    if not cells:
        raise GridError("the grid has no cells: " + ("; ".join(notes) or "nothing to combine"))
    run_args = _run_args_with_out_dir(spec, cells[0], resolve_args)
    planned = []
    for cell in cells:
        argv = cell.args() + run_args
        try:
            config = resolve_args(argv)
            world_size(config)  # e.g. --devices 2 for a learner that runs in one process: refused up front
        except ConfigError as error:
            raise GridError(f"cell {cell.name}: {error}") from error
        _check_varied_values(cell, config)
        planned.append(PlannedCell(cell, argv, config))
    _check_run_folders(planned)
    return Plan(planned, notes, run_args)


def _combinations(spec: GridSpec) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(benchmark, preset, algorithm) triples the presets define, and a note for each one skipped."""
    combos: list[tuple[str, str, str]] = []
    notes: list[str] = []
    used_presets: set[str] = set()
    used_algorithms: set[str] = set()
    for benchmark in spec.benchmarks:
        default, presets = preset_names(benchmark)  # an unknown benchmark fails here, naming the known ones
        for preset in spec.presets or [default]:
            if preset not in presets:
                notes.append(f"{benchmark}: no preset {preset!r} (it has {', '.join(presets)})")
                continue
            used_presets.add(preset)
            defined = preset_algorithms(benchmark, preset)
            for algorithm in spec.algorithms or defined:
                # A learner that declares a preset_base runs with that learner's section (run.config.resolve).
                if algorithm not in defined and learner_class(algorithm).preset_base not in defined:
                    notes.append(f"{benchmark}/{preset}: no {algorithm!r} (the preset defines {', '.join(defined)})")
                    continue
                used_algorithms.add(algorithm)
                combos.append((benchmark, preset, algorithm))
    for preset in spec.presets:
        if preset not in used_presets:
            raise GridError(f"preset {preset!r} is defined by none of the grid's benchmarks "
                            f"({', '.join(spec.benchmarks)})")
    for algorithm in spec.algorithms:
        if algorithm not in used_algorithms:
            raise GridError(f"algorithm {algorithm!r} is defined by no preset of the grid's benchmarks "
                            f"({'; '.join(notes)})")
    return combos, notes


def _run_args_with_out_dir(spec: GridSpec, first: Cell, resolve_args: Resolver) -> list[str]:
    """The fixed arguments; with varied keys, ``--out-dir`` names each one (``runs/algorithm.inner_lr={...}``)
    so that cells differing only in them get run folders of their own, locally and under a W&B agent alike."""
    given = spec.options.get("out_dir")
    missing = [key for key in spec.vary if f"{{{key}}}" not in str(given or "")]
    if not missing:
        return spec.run_args()
    if given is None:
        try:
            given = resolve_args(first.args() + spec.run_args()).out_dir
        except ConfigError as error:
            raise GridError(f"cell {first.name}: {error}") from error
    template = str(given).rstrip("/") + "/" + ",".join(f"{key}={{{key}}}" for key in missing)
    return replace(spec, options={**spec.options, "out_dir": template}).run_args()


def _dotted_get(tree: dict[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _check_varied_values(cell: Cell, config: RunConfig) -> None:
    """A varied value must reach the configuration unchanged through ``--key=str(value)``, as an agent passes it."""
    tree = json.loads(json.dumps(config.to_dict()))
    for key, value in cell.vary:
        actual = _dotted_get(tree, key)
        if actual != json.loads(json.dumps(value)):
            raise GridError(f"cell {cell.name}: {key}={value!r} becomes {actual!r} after --{key}={agent_value(value)} "
                            f"(as a W&B agent passes it); write the value as the configuration types it")


def _check_run_folders(planned: list[PlannedCell]) -> None:
    seen: dict[Path, str] = {}
    for item in planned:
        folder = run_dir_for(item.config)
        if folder in seen:
            raise GridError(f"cells {seen[folder]} and {item.name} would share the run folder {folder}: name what "
                            f"tells them apart in --out-dir (e.g. --out-dir 'runs/lr={{algorithm.inner_lr}}')")
        seen[folder] = item.name


# -- which cells are done: records and checkpoints ----------------------------------------------------------

def _normalized(tree: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(tree))  # tuples -> lists, as they come back from a JSON file


def config_differences(cell: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """The keys of ``cell``'s configuration whose value ``other`` does not share, those that change nothing a run
    computes aside (:data:`metabench.run.config.EXECUTION_KEYS`, by their declared roles).

    A key ``other`` lacks (written before the key existed) counts as its default; keys only ``other`` has (e.g. a
    record's ``resolved``) are ignored.
    """
    defaults = flatten_config(_normalized(RunConfig().to_dict()))
    mine, theirs = flatten_config(_normalized(cell)), flatten_config(_normalized(other))
    return [key for key, value in mine.items()
            if key not in EXECUTION_KEYS and theirs.get(key, defaults.get(key, _MISSING)) != value]


class RecordIndex:
    """The records of records folders, each file read once (later calls read new files only)."""

    def __init__(self) -> None:
        self._folders: dict[Path, dict[Path, Record]] = {}
        self._seen: set[Path] = set()
        self.problems: list[str] = []  # unreadable record files, one line each

    def records(self, folder: str | Path) -> dict[Path, Record]:
        known = self._folders.setdefault(Path(folder).resolve(), {})
        for path in sorted(Path(folder).glob("*.json")):
            if path in self._seen:
                continue
            self._seen.add(path)
            try:
                known[path] = read_record(path)
            except RecordError as error:
                self.problems.append(str(error))
        return known

    def find(self, config: RunConfig) -> Path | None:
        """The first record (by file name) in ``config.records_dir`` of ``config``'s cell: the same configuration
        (:func:`config_differences`), fully trained (``trainer.max_steps`` steps, any count under a time limit)."""
        wanted = config.to_dict()
        for path, record in sorted(self.records(config.records_dir).items()):
            if (record.benchmark, record.algorithm, record.preset, record.seed) != (
                    config.benchmark, config.algorithm.name, config.preset, config.trainer.seed):
                continue
            if record.training_steps != config.trainer.max_steps and not config.trainer.max_time_minutes:
                continue
            if not config_differences(wanted, record.config):
                return path
        return None


@dataclass
class CellState:
    status: str  # "done" (a record exists), "running" (another process), "resume" (a checkpoint), "new", "conflict"
    detail: str = ""  # the record, the process, the checkpoint, or why the run folder cannot be used


def cell_state(item: PlannedCell, index: RecordIndex) -> CellState:
    """Where a cell stands: its record; else the process that holds its run folder's :class:`RunLock`; else its
    run folder's checkpoint (resumable only if the folder's ``config.json`` is the cell's configuration up to
    :data:`metabench.run.config.EXECUTION_KEYS`)."""
    record = index.find(item.config)
    if record is not None:
        return CellState("done", str(record))
    folder = run_dir_for(item.config)
    holder = RunLock(folder / "grid.lock").holder()
    if holder is not None:
        return CellState("running", holder)
    last = folder / "checkpoints" / "last.ckpt"
    if not last.exists():
        return CellState("new")
    saved = folder / "config.json"
    if not saved.is_file():
        return CellState("conflict", f"{folder} holds a checkpoint but no config.json, so what it trained is unknown; "
                                     f"remove the folder or choose another --out-dir")
    previous = json.loads(saved.read_text())
    changed = config_differences(item.config.to_dict(), previous)
    if changed:
        mine, theirs = flatten_config(_normalized(item.config.to_dict())), flatten_config(previous)
        what = ", ".join(f"{key} {theirs.get(key, 'unset')!r} there, {mine[key]!r} here" for key in changed)
        return CellState("conflict", f"{folder} holds a run of another configuration ({what}); remove the folder or "
                                     f"choose another --out-dir")
    return CellState("resume", str(last))


# -- running cells as processes -----------------------------------------------------------------------------

@dataclass
class Job:
    """One process to run: ``command`` with its output appended to ``log``; ``launched`` gets its pid."""

    label: str
    command: list[str]
    log: Path
    env: dict[str, str] | None = None
    launched: Callable[[int], None] | None = None


@dataclass
class Outcome:
    job: Job
    returncode: int
    seconds: float
    stopped: bool = False  # ended by the KeyboardInterrupt, not by itself


def execute(items: Iterable[T], parallel: int, progress: Progress, start: Callable[[T], Job | None],
            finish: Callable[[T, Outcome], None], poll_seconds: float = 0.2) -> None:
    """Run a process for each of ``items``, at most ``parallel`` at a time, each shown as a line of ``progress``
    while it runs. ``start(item)`` is called when a slot is free and gives the item's Job, or None to pass over it
    (decided then, not up front: another process may have finished the item meanwhile); ``finish(item, outcome)``
    is called as each process ends. On KeyboardInterrupt the running processes are stopped (SIGTERM, then SIGKILL
    after 30 s) and ``finish`` gets them (return code of the stopped process) before the interrupt propagates."""
    if parallel < 1:
        raise GridError(f"--parallel must be >= 1, got {parallel}")
    pending = list(items)
    running: list[tuple[subprocess.Popen[bytes], T, Job, Any, Any, float]] = []
    try:
        while pending or running:
            while pending and len(running) < parallel:
                item = pending.pop(0)
                job = start(item)
                if job is None:
                    continue
                job.log.parent.mkdir(parents=True, exist_ok=True)
                handle = job.log.open("ab")
                handle.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(job.command)}\n".encode())
                handle.flush()
                process = subprocess.Popen(job.command, stdout=handle, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, env=job.env)
                if job.launched is not None:
                    job.launched(process.pid)
                task = progress.add_task(f"  {job.label}", total=None, count="running")
                running.append((process, item, job, handle, task, time.monotonic()))
            time.sleep(poll_seconds)
            for entry in list(running):
                process, item, job, handle, task, began = entry
                code = process.poll()
                if code is None:
                    continue
                running.remove(entry)
                handle.close()
                progress.remove_task(task)
                finish(item, Outcome(job, code, time.monotonic() - began))
    except KeyboardInterrupt:
        for process, *_ in running:
            process.terminate()
        for process, item, job, handle, _, began in running:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            handle.close()
            finish(item, Outcome(job, process.returncode, time.monotonic() - began, stopped=True))
        raise


@dataclass
class RunLock:
    """``<run folder>/grid.lock``: which process (host, pid) runs the folder's cell, so that two ``grid run``
    processes on the same folders never train one run twice. A lock of this host whose process has ended (a grid
    killed with its cell) is stale and taken over; one of another host is respected (remove it by hand if that
    process is gone)."""

    path: Path

    def holder(self) -> str | None:
        """Who holds the lock (``pid N on HOST``), or None if nobody does (no lock, or a stale one)."""
        try:
            data = json.loads(self.path.read_text())
            host, pid = str(data["host"]), int(data["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # gone, or torn by a crash: not a live holder
        if host == socket.gethostname() and not _alive(pid):
            return None
        return f"pid {pid} on {host}"

    def acquire(self) -> str | None:
        """Take the lock; None on success, else who holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is not None:
                    return holder
                self.path.unlink(missing_ok=True)  # stale
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump({"host": socket.gethostname(), "pid": os.getpid()}, handle)
            return None
        return "another process (the lock keeps coming back)"

    def hold(self, pid: int) -> None:
        """Name the cell's own process as the holder: the lock lives as long as the run does, even if the grid
        that started it is killed."""
        self.path.write_text(json.dumps({"host": socket.gethostname(), "pid": pid}))

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def terminal() -> Console:
    """A console for the grid's display; piped output (logs, CI) gets wide lines instead of 80 columns."""
    return Console(width=None if sys.stdout.isatty() else 160, highlight=False)


def cpu_count() -> int:
    """CPUs this process may use (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@dataclass
class GridReport:
    done: list[tuple[str, str]] = field(default_factory=list)  # (cell, record) run now
    resumed: list[str] = field(default_factory=list)  # cells continued from a checkpoint
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (cell, record) found before
    busy: list[tuple[str, str]] = field(default_factory=list)  # (cell, holder) run by another grid process
    failed: list[tuple[str, str]] = field(default_factory=list)  # (cell, why)
    unfinished: list[str] = field(default_factory=list)  # cells stopped by Ctrl-C
    interrupted: bool = False

    @property
    def exit_status(self) -> int:
        return 130 if self.interrupted else 1 if self.failed else 0


def run_grid(plan: Plan, parallel: int = 1, console: Console | None = None) -> GridReport:
    """Run the plan's cells on this machine, ``parallel`` processes at a time.

    Right before a cell would start, its state decides (:func:`cell_state`): with a record it is skipped; with its
    checkpoint in the run folder it runs with ``--resume``; with another configuration's checkpoint there it fails
    without running; while another process holds its :class:`RunLock` it is left to that process. Each cell is
    ``python -m metabench.cli run <its arguments> --quiet``, its output appended to ``<run folder>/grid.log``.
    With ``parallel > 1``, a cell whose configuration leaves ``trainer.cpu_threads`` unset gets the CPUs divided
    among the processes (at least one each). A cell that exits non-zero, or exits 0 without a matching record,
    is reported as failed; the others still run.
    """
    if parallel < 1:
        raise GridError(f"--parallel must be >= 1, got {parallel}")
    console = console or terminal()
    report = GridReport()
    index = RecordIndex()
    threads = max(1, cpu_count() // parallel) if parallel > 1 else None
    locks: dict[str, RunLock] = {}
    for note in plan.notes:
        console.print(f"grid: skipped {note}", soft_wrap=True)

    def settle(item: PlannedCell, status: str, detail: str) -> None:
        """A cell that ends without a process of its own: skipped, left to another process, or failed."""
        if status == "done":
            report.skipped.append((item.name, detail))
            console.print(f"[dim]skip[/]   {item.name}: record {detail}", soft_wrap=True)
        elif status == "running":
            report.busy.append((item.name, detail))
            console.print(f"[yellow]busy[/]   {item.name}: run by {detail}", soft_wrap=True)
        else:
            report.failed.append((item.name, detail))
            console.print(f"[red]FAILED[/] {item.name}: {detail}", soft_wrap=True)
        advance()

    def start(item: PlannedCell) -> Job | None:
        state = cell_state(item, index)
        if state.status in ("done", "conflict", "running"):
            settle(item, state.status, state.detail)
            return None
        lock = RunLock(run_dir_for(item.config) / "grid.lock")
        holder = lock.acquire()
        if holder is not None:  # taken between the look and the grab
            settle(item, "running", holder)
            return None
        locks[item.name] = lock
        if state.status == "resume":
            report.resumed.append(item.name)
        job = _job(item, resume=state.status == "resume", threads=threads, run_dir=run_dir_for(item.config))
        job.launched = lock.hold
        return job

    def finish(item: PlannedCell, outcome: Outcome) -> None:
        locks.pop(item.name).release()
        if outcome.stopped:
            report.unfinished.append(item.name)
            return
        record = index.find(item.config) if outcome.returncode == 0 else None
        if record is not None:
            report.done.append((item.name, str(record)))
            how = "resumed and done" if item.name in report.resumed else "done"
            console.print(f"[green]{how}[/] {item.name} in {outcome.seconds:.0f} s: {record}", soft_wrap=True)
        else:
            why = (f"exit status {outcome.returncode}" if outcome.returncode else "exited 0 but wrote no record "
                   f"of this configuration to {item.config.records_dir}")
            report.failed.append((item.name, f"{why}; {_tail(outcome.job.log)}log: {outcome.job.log}"))
            console.print(f"[red]FAILED[/] {item.name}: {why} (log: {outcome.job.log})", soft_wrap=True)
        advance()

    def advance() -> None:
        progress.advance(overall)
        progress.update(overall, count=f"{int(progress.tasks[overall].completed)}/{len(plan.cells)} cells finished")

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[count]}"),
                  TimeElapsedColumn(), console=console) as progress:
        overall = progress.add_task("grid", total=len(plan.cells), count=f"0/{len(plan.cells)} cells finished")
        try:
            execute(plan.cells, parallel, progress, start, finish)
        except KeyboardInterrupt:
            report.interrupted = True
        for problem in index.problems:
            console.print(f"grid: ignored unreadable record {problem}", soft_wrap=True)
    _print_report(report, console)
    return report


def _job(item: PlannedCell, *, resume: bool, threads: int | None, run_dir: Path) -> Job:
    command = [sys.executable, "-m", "metabench.cli", "run", *item.argv, "--quiet"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads is not None and item.config.trainer.cpu_threads is None:
        command.append(f"--set=trainer.cpu_threads={threads}")
        env["OMP_NUM_THREADS"] = str(threads)  # OpenMP reads it at start-up, before torch.set_num_threads
    if resume:
        command.append("--resume")
    return Job(f"{item.name}{' (resumed)' if resume else ''}", command, run_dir / "grid.log", env)


def _tail(log: Path, lines: int = 4) -> str:
    try:
        text = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return "last output: " + " | ".join(line.strip()[:200] for line in text[-lines:]) + "; " if text else ""


def _print_report(report: GridReport, console: Console) -> None:
    table = Table(title="grid")
    for column in ("cell", "status", "record / why"):
        table.add_column(column, overflow="fold")
    for name, record in report.skipped:
        table.add_row(name, "skipped (record exists)", record)
    for name, record in report.done:
        table.add_row(name, "resumed, done" if name in report.resumed else "done", record)
    for name, why in report.failed:
        table.add_row(name, "[red]failed[/]", why)
    for name, holder in report.busy:
        table.add_row(name, "running elsewhere", f"run by {holder}")
    for name in report.unfinished:
        table.add_row(name, "interrupted", "run the grid again to resume it")
    console.print(table)
    summary = f"{len(report.done)} done, {len(report.skipped)} skipped (record exists), {len(report.failed)} failed"
    if report.busy:
        summary += f", {len(report.busy)} running in another process"
    if report.interrupted:
        summary += "; interrupted: run the same command again to resume"
    console.print(summary)


def list_cells(plan: Plan, console: Console | None = None) -> list[tuple[PlannedCell, CellState]]:
    """Each cell's state (done / resume / new / conflict), printed as a table."""
    console = console or terminal()
    index = RecordIndex()
    states = [(item, cell_state(item, index)) for item in plan.cells]
    for note in plan.notes:
        console.print(f"grid: skipped {note}", soft_wrap=True)
    table = Table(title=f"grid: {len(states)} cells")
    for column in ("cell", "state", "record / checkpoint / why"):
        table.add_column(column, overflow="fold")
    for item, state in states:
        table.add_row(item.name, state.status, state.detail)
    console.print(table)
    return states
