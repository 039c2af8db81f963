"""The ``metabench`` command line: ``run``, ``test``, ``verify``, ``publish``, ``grid``, ``data``, ``episodes``,
``bench`` and ``leaderboard``.

Every command fails with one clear line (exit status 2) on bad input instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metabench.models.hparams import BATCHED_ENGINES, INNER_ENGINES

Subparsers = Any  # argparse's private _SubParsersAction


def _algorithm(name: str) -> str:
    """``--algorithm``: a registered learner, an installed plug-in's, or ``package.module:Class`` (checked when
    given, so that a misspelt name fails before anything runs)."""
    # lazy: the learners import torch and Lightning; metabench --help and the commands without --algorithm don't
    from metabench.models.learners import learner_class

    try:
        learner_class(name)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return name


def _meta_learner(name: str) -> str:
    """``bench speed --algorithm``: a learner that meta-trains through the inner loop (the engines are its)."""
    # lazy: as in _algorithm
    from metabench.models.learners import algorithms_that, learner_class

    if not learner_class(_algorithm(name)).capabilities.inner_loop:
        known = algorithms_that("inner_loop")
        raise argparse.ArgumentTypeError(f"{name} has no inner loop to time; choose from {', '.join(known)}")
    return name


def _options(pairs: list[str], flag: str = "--option") -> dict[str, Any]:
    """``["key=value", ...]`` -> ``{"key": value}`` (values parsed as YAML scalars); ``flag`` names the option in
    the error."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} {pair!r} is not of the form key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _load_split(args: argparse.Namespace, split: str):
    # lazy: this command only (metabench --help stays fast)
    from metabench.datasets.registry import get_dataset

    return get_dataset(args.dataset).load(split, root=args.root, cache_dir=args.cache_dir, **_options(args.option))


# -- data ---------------------------------------------------------------------------------------------------

def _dataset_args(p: argparse.ArgumentParser) -> None:
    # lazy: this command only (metabench --help stays fast)
    from metabench.datasets.registry import DATASETS

    p.add_argument("dataset", help=", ".join(DATASETS))
    p.add_argument("--root", help="dataset folder, or the data folder holding it (default: $METABENCH_DATA)")
    p.add_argument("--cache-dir", help="writable cache folder (default: $METABENCH_CACHE or ~/.cache/metabench)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="reader option, e.g. scheme=maml for omniglot")


def cmd_data_prepare(args: argparse.Namespace) -> int:
    import time

    # lazy: this command only (metabench --help stays fast)
    from metabench.datasets.registry import get_dataset

    info = get_dataset(args.dataset)
    for split in args.split or info.splits:
        start = time.perf_counter()
        loaded = _load_split(args, split)
        print(f"{loaded.name}: {loaded.num_classes} classes, {loaded.images.shape[0]} images "
              f"{tuple(loaded.image_shape)} uint8, ready in {time.perf_counter() - start:.2f} s")
    return 0


def cmd_data_verify(args: argparse.Namespace) -> int:
    # lazy: this command only (metabench --help stays fast)
    from metabench.datasets.registry import get_dataset

    report = get_dataset(args.dataset).verify(args.root)
    print(json.dumps(report, indent=2, sort_keys=True, default=str))
    problems = report.get("problems", [])
    print(f"{args.dataset}: " + ("OK" if not problems else f"{len(problems)} problem(s)"), file=sys.stderr)
    return 0 if not problems else 1


def cmd_data_download(args: argparse.Namespace) -> int:
    # lazy: this command only (metabench --help stays fast)
    from metabench.datasets.download import download

    for path in download(args.dataset, Path(args.root), timeout=args.timeout):
        print(path)
    return 0


def add_data(sub: Subparsers) -> None:
    data = sub.add_parser("data", help="prepare, verify or download datasets").add_subparsers(
        dest="data_command", required=True)
    p = data.add_parser("prepare", help="decode splits once into the prepared cache")
    _dataset_args(p)
    p.add_argument("--split", action="append", help="repeatable; default: every split")
    p.set_defaults(func=cmd_data_prepare)
    p = data.add_parser("verify", help="counts, sizes, checksums; exit 1 on problems")
    p.add_argument("dataset")
    p.add_argument("--root")
    p.set_defaults(func=cmd_data_verify)
    p = data.add_parser("download", help="download from the public source (checksummed, resumable)")
    p.add_argument("dataset")
    p.add_argument("--root", required=True)
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=cmd_data_download)


# -- episodes -----------------------------------------------------------------------------------------------

def _sampler(args: argparse.Namespace):
    # lazy: this command only (metabench --help stays fast)
    from metabench.datasets.episodes import EpisodeSampler, EpisodeSpec

    return EpisodeSampler(_load_split(args, args.split), EpisodeSpec(args.ways, args.shots, args.queries))


def cmd_episodes_digest(args: argparse.Namespace) -> int:
    sampler = _sampler(args)
    print(sampler.digest(args.seed, args.count))
    return 0


def cmd_episodes_preview(args: argparse.Namespace) -> int:
    # lazy: this command only (metabench --help stays fast)
    from metabench.datasets.preview import save_episode_grid

    sampler = _sampler(args)
    indices = sampler.fixed(args.seed, 1, start=args.index)
    out = save_episode_grid(sampler, indices, Path(args.out))
    print(f"episode {args.index} of {sampler.split.name} ({sampler.spec}) -> {out}")
    return 0


def _episode_args(p: argparse.ArgumentParser) -> None:
    _dataset_args(p)
    p.add_argument("--split", default="test")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--seed", type=int, default=0, help="evaluation seed naming the fixed episodes")


def add_episodes(sub: Subparsers) -> None:
    episodes = sub.add_parser("episodes", help="fixed evaluation episodes").add_subparsers(
        dest="episodes_command", required=True)
    p = episodes.add_parser("digest", help="print the sha256 digest naming a fixed episode set")
    _episode_args(p)
    p.add_argument("--count", type=int, default=600)
    p.set_defaults(func=cmd_episodes_digest)
    p = episodes.add_parser("preview", help="draw one episode to a PNG grid")
    _episode_args(p)
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_episodes_preview)


# -- run and test -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunFlag:
    """A flag of ``metabench run`` that ``metabench grid`` takes too and passes to every cell (the grid file's keys
    of :data:`metabench.run.grid.RUN_OPTIONS`); ``test`` says whether ``metabench test`` takes it as well. ``key``:
    the dotted config key it sets (None: not one key); ``grid_help``: its help under ``grid``, where it differs."""

    flag: str
    key: str | None
    options: dict[str, Any] = field(default_factory=dict)
    test: bool = True
    grid_help: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")


# The one table of the flags `run` (and `test`) and `grid` share, in the order their help lists them.
RUN_FLAGS = (
    RunFlag("--config", None, {"help": "YAML file merged over the preset"},
            grid_help="YAML file merged over the preset of every cell"),
    RunFlag("--data-root", "data.root"),
    RunFlag("--cache-dir", "data.cache_dir"),
    RunFlag("--max-steps", "trainer.max_steps", {"type": int}, test=False),
    RunFlag("--test-episodes", "episodes.test_episodes", {"type": int}),
    RunFlag("--accelerator", "trainer.accelerator", {"choices": ("auto", "cpu", "gpu")}),
    RunFlag("--records-dir", "records_dir"),
    RunFlag("--out-dir", "out_dir", {"help": "folder of the run folders (default: runs); {dotted.key} fields are "
                                             "filled from the configuration, e.g. 'runs/lr={algorithm.inner_lr}'"},
            grid_help="folder of the run folders (default: runs; with --vary, one sub-folder per varied value)"),
    RunFlag("--logger", "logger", {"choices": ("none", "csv", "wandb")}, test=False),
    RunFlag("--devices", "trainer.devices", {"type": int, "help": "processes per node, each with its share of every "
                                                                  "meta-batch (with --strategy ddp; GPUs, or CPU "
                                                                  "processes)"},
            test=False, grid_help="DDP processes per node of every cell (with --strategy ddp)"),
    RunFlag("--num-nodes", "trainer.num_nodes", {"type": int, "help": "nodes (with --strategy ddp; torchrun / SLURM "
                                                                      "set the ranks)"}, test=False),
    RunFlag("--strategy", "trainer.strategy", {"choices": ("auto", "ddp"),
                                               "help": "ddp: one process per device (Lightning DDP)"}, test=False),
)
# Flags that set one config key: the table's and run's --seed (a grid's --seed is an axis).
_FLAG_KEYS = (*((f.dest, f.key) for f in RUN_FLAGS if f.key is not None), ("seed", "trainer.seed"))


def _add_run_flags(p: argparse.ArgumentParser, command: str) -> None:
    """:data:`RUN_FLAGS` on the parser of ``command`` ("run", "test" or "grid")."""
    for f in RUN_FLAGS:
        if command == "test" and not f.test:
            continue
        options = dict(f.options)
        if command == "grid" and f.grid_help is not None:
            options["help"] = f.grid_help
        p.add_argument(f.flag, **options)


def _overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` items plus the dedicated flags (``--data-root`` ...) as dotted overrides."""
    overrides = list(args.set)
    for flag, key in _FLAG_KEYS:
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    return overrides


_DOTTED_FLAG = re.compile(r"--([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?:=(.*))?", re.DOTALL)


def dotted_overrides(extra: list[str]) -> list[str]:
    """Arguments ``--section.key=value`` (or ``--section.key value``) as ``--set`` overrides ``section.key=value``.

    This is how a W&B Sweep agent passes a parameter named by a dotted config key (its ``${args}`` macro writes
    ``--name=value`` with Python's ``str(value)``); so ``None``, Python's spelling of null, means null.
    """
    overrides: list[str] = []
    rest = list(extra)
    while rest:
        item = rest.pop(0)
        match = _DOTTED_FLAG.fullmatch(item)
        if match is None:
            raise ValueError(f"unrecognized arguments: {' '.join([item, *rest])}")
        key, value = match.group(1), match.group(2)
        if value is None:
            if not rest or rest[0].startswith("--"):
                raise ValueError(f"argument --{key}: expected a value (--{key}=VALUE)")
            value = rest.pop(0)
        overrides.append(f"{key}={'null' if value == 'None' else value}")
    return overrides


def _run_args(p: argparse.ArgumentParser, command: str) -> None:
    """What names a run and where it lives: shared by ``run`` and ``test`` (``command``). Also accepted (by
    :func:`main`): ``--section.key=value``, the same as ``--set section.key=value``."""
    p.add_argument("--benchmark", default="synthetic-5w1s")
    p.add_argument("--algorithm", action="append", type=_algorithm,
                   help="repeatable; default: every algorithm of the benchmark's preset")
    p.add_argument("--preset", help="named hyper-parameter preset of the benchmark (default: its default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. algorithm.inner_lr=0.1 (repeatable)")
    p.add_argument("--seed", type=int)
    _add_run_flags(p, command)
    p.set_defaults(dotted_flags=True)


def cmd_run(args: argparse.Namespace) -> int:
    # lazy: this command only (metabench --help stays fast)
    from metabench.report.terminal import print_comparison
    from metabench.run.config import preset_algorithms, resolve
    from metabench.run.runner import run

    algorithms = args.algorithm or preset_algorithms(args.benchmark, args.preset)
    configs = [resolve(args.benchmark, name, args.preset, args.config, _overrides(args)) for name in algorithms]
    results = [run(config, resume=args.resume, progress=not args.quiet) for config in configs]
    if all(r.primary for r in results):  # several processes: rank 0 reports
        print_comparison([r.record for r in results], [r.record_path for r in results])
    return 0


def add_run(sub: Subparsers) -> None:
    p = sub.add_parser("run", help="train and test (no arguments: MAML, FOMAML, ANIL, Meta-SGD, MAML++, Reptile, "
                                   "ProtoNet, Baseline, Baseline++ on synthetic glyphs)")
    _run_args(p, "run")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)


def cmd_test(args: argparse.Namespace) -> int:
    # lazy: this command only (metabench --help stays fast)
    from metabench.report.terminal import print_comparison
    from metabench.run.config import preset_algorithms, resolve
    from metabench.run.runner import test_run

    if args.weights:
        if args.baseline_only:
            raise ValueError("--baseline-only keeps a run folder's baseline; published --weights have none")
        return cmd_test_weights(args)
    algorithms = args.algorithm or preset_algorithms(args.benchmark, args.preset)
    if args.baseline_only:
        return _baselines_only(args, algorithms)
    results = []
    for name in algorithms:
        tested = resolve(args.benchmark, name, args.preset, args.config, _overrides(args))
        # Checked against the run folder's saved config; runs without one, against the preset without --set.
        results.append(test_run(tested, trained=resolve(args.benchmark, name, args.preset, args.config),
                                trained_benchmark=args.trained_benchmark))
    print_comparison([r.record for r in results], [r.record_path for r in results])
    return 0


def _baselines_only(args: argparse.Namespace, algorithms: list[str]) -> int:
    # lazy: this command only (metabench --help stays fast)
    from metabench.run.config import resolve
    from metabench.run.runner import baseline_only

    for name in algorithms:
        tested = resolve(args.benchmark, name, args.preset, args.config, _overrides(args))
        result = baseline_only(tested, trained_benchmark=args.trained_benchmark)
        kept = result.provenance
        how = (f"reused (evaluated {kept['created']} at {kept['git_commit']})" if kept["reused"]
               else f"evaluated in {kept['seconds']:.0f} s")
        print(f"{tested.benchmark} {name} {tested.preset}: random-init baseline "
              f"{100 * result.summary['random_init_mean']:.2f} +- {100 * result.summary['random_init_ci95']:.2f} % "
              f"over {result.num_episodes} episodes, {how}; kept in {kept['file']}")
    return 0


def add_test(sub: Subparsers) -> None:
    p = sub.add_parser("test", help="evaluate a finished run's weights on another fixed test protocol (e.g. "
                                    "--set episodes.queries=1) and write a second record, without retraining")
    _run_args(p, "test")
    p.add_argument("--trained-benchmark", metavar="BENCHMARK",
                   help="test the run trained under BENCHMARK (its run folder), when its training configuration is "
                        "this benchmark's (checked): e.g. one Reptile Omniglot training for both 1-shot and 5-shot")
    p.add_argument("--weights", metavar="FILE.safetensors", help="evaluate published weights (checked against their "
                   "record) instead of a run folder: the record's protocol, changed by --set; --benchmark, "
                   "--algorithm, --preset and --config come from the record")
    p.add_argument("--record", metavar="FILE.json", help="with --weights: their record (default: "
                   "../records/<same name>.json beside the weights' folder)")
    p.add_argument("--baseline-only", action="store_true",
                   help="evaluate only the random-init column of this test (it needs no trained weights: run it "
                        "while the run trains) and keep it in the run folder, where this test and the run's own "
                        "reuse it; writes no record")
    p.set_defaults(func=cmd_test)


# -- checking a result: verify, publish, test --weights ----------------------------------------------------

def cmd_test_weights(args: argparse.Namespace) -> int:
    # lazy: this command only (metabench --help stays fast)
    from metabench.report.terminal import print_comparison
    from metabench.run.published import test_weights

    if args.algorithm or args.preset or args.config:
        raise ValueError("--weights takes the algorithm, preset and configuration from the weights' record")
    overrides = _options([item for item in _overrides(args) if not item.startswith("records_dir=")], "--set")
    overrides["records_dir"] = args.records_dir or "results/records"  # never the record's (another machine's)
    result = test_weights(args.weights, overrides, args.record)
    if result.path is None:  # the record's own protocol: a check, not a new record
        ok = result.reproduces()
        print(f"{args.weights}: {'reproduces' if ok else 'does NOT reproduce'} {result.source_path.name}: "
              f"{len(result.record.scores)} scores {'bit-identical' if ok else 'differ'}, mean "
              f"{result.record.mean!r} (record {result.source.mean!r})")
        return 0 if ok else 1
    print_comparison([result.record], [result.path])
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    # lazy: this command only (metabench --help stays fast)
    from metabench.run.verify import verify

    overrides = _options(args.set, "--set")
    for flag, key in (("data_root", "data.root"), ("cache_dir", "data.cache_dir")):
        if getattr(args, flag):
            overrides[key] = getattr(args, flag)
    result = verify(args.record, args.steps, overrides, noise=args.noise, progress=args.progress)
    print("\n".join(result.lines()))
    return result.exit_status


def add_verify(sub: Subparsers) -> None:
    p = sub.add_parser("verify", help="retrain a record's first steps and compare: bit-identical (exit 0), "
                                      "different (1) or cannot verify (3: code, data or versions differ)")
    p.add_argument("record", help="a run record (results/records/*.json)")
    p.add_argument("--steps", type=int, help="train to the record's first curve point at or after this step "
                                             "(default: its first curve point)")
    p.add_argument("--noise", action="store_true", help="also train on another engine (or thread count): the "
                                                        "spread float noise alone gives")
    p.add_argument("--data-root")
    p.add_argument("--cache-dir")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="execution only: trainer.cpu_threads, trainer.accelerator, data.root, "
                        "data.cache_dir, data.resident, algorithm.engine")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    p.set_defaults(func=cmd_verify)


def cmd_publish(args: argparse.Namespace) -> int:
    # lazy: this command only (metabench --help stays fast)
    from metabench.run.config import build_config
    from metabench.run.records import read_record
    from metabench.run.runner import run_dir_for
    from metabench.run.weights import publish

    for name in args.record:
        record = read_record(name)
        tested = record.config.get("resolved", {}).get("tested_checkpoint")
        if args.out_dir is None and tested:  # where metabench test found the run
            run_dir = Path(tested["path"]).parent.parent
        else:
            tree = {k: v for k, v in record.config.items() if k != "resolved"}
            run_dir = run_dir_for(build_config(tree, {"out_dir": args.out_dir or tree["out_dir"]}))
        print(publish(name, run_dir, args.weights_dir))
    return 0


def add_publish(sub: Subparsers) -> None:
    p = sub.add_parser("publish", help="copy a record's final weights from its run folder to results/weights/ "
                                       "(checked against the record's weights_sha256)")
    p.add_argument("record", nargs="+", help="run record(s) with weights_sha256")
    p.add_argument("--out-dir", help="folder of the run folders (default: the record's)")
    p.add_argument("--weights-dir", default="results/weights")
    p.set_defaults(func=cmd_publish)


# -- grid ---------------------------------------------------------------------------------------------------

def run_args_resolver() -> Callable[[list[str]], Any]:
    """A function from ``metabench run`` arguments to the configuration that run trains (one algorithm): the grid
    resolves each cell by parsing the very arguments its process, or a W&B agent, will get."""
    # lazy: this command only (metabench --help stays fast)
    from metabench.run.config import resolve

    parser = build_parser()

    def resolve_args(argv: list[str]):
        args, extra = parser.parse_known_args(["run", *argv])
        args.set = [*args.set, *dotted_overrides(extra)]
        if not args.algorithm or len(args.algorithm) != 1:
            raise ValueError(f"expected exactly one --algorithm in {argv}")
        return resolve(args.benchmark, args.algorithm[0], args.preset, args.config, _overrides(args))

    return resolve_args


def _grid_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grid", metavar="FILE.yaml", help="grid file: benchmark, algorithm, preset, seed (a value or "
                   "a list), vary, set, and run options (data_root, max_steps, ...); flags given here win")
    p.add_argument("--benchmark", action="append", help="repeatable")
    p.add_argument("--algorithm", action="append", type=_algorithm,
                   help="repeatable; default: every algorithm of each preset")
    p.add_argument("--preset", action="append", help="repeatable; default: each benchmark's default preset")
    p.add_argument("--seed", action="append", type=int, help="repeatable; default: the configuration's seed")
    p.add_argument("--vary", action="append", default=[], metavar="KEY=VALUES",
                   help="a dotted config key and its values, one more axis of the grid, e.g. "
                        "'algorithm.inner_lr=[0.1, 0.4]' (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override for every cell (repeatable)")
    _add_run_flags(p, "grid")


def _grid_plan(args: argparse.Namespace):
    # lazy: this command only (metabench --help stays fast)
    from metabench.run.grid import RUN_OPTIONS, expand, load_grid_file, make_spec, parse_vary

    file = load_grid_file(args.grid) if args.grid else {}
    vary: dict[str, list] = {}
    for item in args.vary:
        key, values = parse_vary(item)
        if key in vary:
            raise ValueError(f"--vary {key} is given twice")
        vary[key] = values
    flags = {"benchmark": args.benchmark, "algorithm": args.algorithm, "preset": args.preset, "seed": args.seed,
             "vary": vary, "set": args.set, **{name: getattr(args, name) for name in RUN_OPTIONS}}
    spec = make_spec(file, flags)
    resolve_args = run_args_resolver()
    return spec, expand(spec, resolve_args), resolve_args


def cmd_grid_run(args: argparse.Namespace) -> int:
    # lazy: this command only (metabench --help stays fast)
    from metabench.run.grid import run_grid

    if args.parallel < 1:
        raise ValueError(f"--parallel must be >= 1, got {args.parallel}")
    _, plan, _ = _grid_plan(args)
    return run_grid(plan, parallel=args.parallel).exit_status


def cmd_grid_list(args: argparse.Namespace) -> int:
    # lazy: this command only (metabench --help stays fast)
    from metabench.run.grid import list_cells

    _, plan, _ = _grid_plan(args)
    list_cells(plan)
    return 0


def cmd_grid_sweep(args: argparse.Namespace) -> int:
    # lazy: this command only (metabench --help stays fast)
    from metabench.core.atomic import atomic_write_bytes
    from metabench.run.sweep import sweep_config, sweep_yaml

    spec, plan, resolve_args = _grid_plan(args)
    config = sweep_config(spec, plan, resolve_args, name=args.name, project=args.project, entity=args.entity,
                          resume=args.resume)
    text = sweep_yaml(config, len(plan.cells))
    if args.out in (None, "-"):
        sys.stdout.write(text)
        return 0
    atomic_write_bytes(Path(args.out), text.encode(), durable=False)
    print(f"{args.out}: W&B grid sweep of {len(plan.cells)} runs. Start it with\n  wandb sweep {args.out}\n"
          f"then on each machine run the `wandb agent ...` line it prints", file=sys.stderr)
    return 0


def add_grid(sub: Subparsers) -> None:
    grid = sub.add_parser("grid", help="benchmarks x algorithms x presets x seeds: run on this machine, or write a "
                                       "W&B Sweep").add_subparsers(dest="grid_command", required=True)
    p = grid.add_parser("run", help="run the cells here, one after another or N at a time; skips cells whose record "
                                    "exists, resumes interrupted ones; exit 1 if a cell failed")
    _grid_args(p)
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="cells at a time (each gets CPUs/N torch threads unless trainer.cpu_threads is set)")
    p.set_defaults(func=cmd_grid_run)
    p = grid.add_parser("list", help="the cells and where each stands (done, resume, new, conflict)")
    _grid_args(p)
    p.set_defaults(func=cmd_grid_list)
    p = grid.add_parser("sweep", help="write a W&B Sweep configuration (method grid) whose agents run the cells")
    _grid_args(p)
    p.add_argument("--out", help="YAML file to write (default: standard output)")
    p.add_argument("--name", help="sweep name")
    p.add_argument("--project", help="W&B project (default: $WANDB_PROJECT or metabench)")
    p.add_argument("--entity", help="W&B entity (default: yours)")
    p.add_argument("--resume", action="store_true",
                   help="runs continue a checkpoint left in their run folder on the agent's machine")
    p.set_defaults(func=cmd_grid_sweep)


# -- bench --------------------------------------------------------------------------------------------------

def cmd_bench_episodes(args: argparse.Namespace) -> int:
    # lazy: this command only (metabench --help stays fast)
    from metabench.perf.episode_throughput import main as bench_main

    return bench_main(args)


def cmd_bench_steps(args: argparse.Namespace) -> int:
    # lazy: this command only (metabench --help stays fast)
    from metabench.perf.step_time import main as bench_main

    return bench_main(args)


def cmd_bench_scaling(args: argparse.Namespace) -> int:
    # lazy: this command only (metabench --help stays fast)
    from metabench.perf.scaling import main as bench_main

    return bench_main(args)


def cmd_bench_profile(args: argparse.Namespace) -> int:
    # lazy: this command only (metabench --help stays fast)
    from metabench.perf.profile_step import main as bench_main

    return bench_main(args)


def cmd_bench_speed(args: argparse.Namespace) -> int:
    # lazy: this command only (metabench --help stays fast)
    from metabench.perf.speed import main as bench_main

    return bench_main(args)


def add_bench(sub: Subparsers) -> None:
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    p = bench.add_parser("episodes", help="episode throughput from the prepared cache (episodes/s)")
    p.add_argument("--root", help="data folder holding omniglot/ and mini-imagenet/")
    p.add_argument("--cache-dir")
    p.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    p.add_argument("--out", default="results/speed/episodes.json")
    p.set_defaults(func=cmd_bench_episodes)
    p = bench.add_parser("steps", help="median meta-iteration time of each algorithm under a preset")
    p.add_argument("--benchmark", default="omniglot-5w1s")
    p.add_argument("--algorithm", action="append", type=_algorithm)
    p.add_argument("--preset")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--accelerator", default="auto", choices=("auto", "cpu", "gpu"))
    p.add_argument("--threads", type=int, help="torch threads per process (default: the preset's)")
    p.add_argument("--devices", type=int, default=1, help="DDP processes sharing each meta-batch (default 1)")
    p.add_argument("--out", default="results/speed/steps.json")
    p.set_defaults(func=cmd_bench_steps)
    p = bench.add_parser("scaling", help="one training step as 1 process x 1 thread, 1 x N threads and N "
                                         "processes x 1 thread (DDP): how best to use this machine's cores")
    p.add_argument("--benchmark", default="omniglot-5w1s")
    p.add_argument("--algorithm", action="append", type=_algorithm, help="repeatable (default maml)")
    p.add_argument("--preset")
    p.add_argument("--layout", action="append", metavar="PxT",
                   help="processes x threads, repeatable (default 1x1, 1x2, 2x1)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="results/speed/scaling-cpu.json")
    p.set_defaults(func=cmd_bench_scaling)
    _add_bench_speed(bench)
    p = bench.add_parser("profile", help="where a batched MAML / FOMAML meta-step spends its time: the profiler's "
                                         "table by operator for each phase (CPU)")
    p.add_argument("--benchmark", default="omniglot-5w1s")
    p.add_argument("--algorithm", action="append", choices=("maml", "fomaml"), help="repeatable (default maml)")
    p.add_argument("--steps", type=int, default=5, help="profiled meta-steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--engine", action="append", choices=BATCHED_ENGINES, help="repeatable (default batched)")
    p.add_argument("--top", type=int, default=8, help="operators listed per phase")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (hidden 4, meta-batch 2): a smoke test")
    p.add_argument("--retain-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="keep freed CPU memory in the process first, as training runs do (trainer.retain_memory; "
                   "metabench.core.allocator); default on")
    p.add_argument("--out", help="JSON path (default: $OUT or results/speed, then profile-<benchmark>.json)")
    p.set_defaults(func=cmd_bench_profile)


def _add_bench_speed(bench: Subparsers) -> None:
    p = bench.add_parser("speed", help="meta-iteration time, FLOP/s and peak memory per protocol x algorithm x "
                         "engine, learn2learn included")
    p.add_argument("--protocol", action="append", help="benchmark name, repeatable; default: omniglot-5w1s, "
                   "omniglot-20w1s, mini-imagenet-5w1s, mini-imagenet-5w5s")
    p.add_argument("--algorithm", action="append", type=_meta_learner, help="repeatable; default: maml")
    p.add_argument("--engine", action="append", choices=(*INNER_ENGINES, "learn2learn"),
                   help="repeatable; default: all (vmap on CUDA only; learn2learn when installed)")
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--accelerator", default="auto", choices=("auto", "cpu", "gpu"))
    p.add_argument("--tiny", action="store_true", help="tiny shapes (hidden 4, meta-batch 2): a smoke test")
    p.add_argument("--task-chunk", type=int, help="also time the batched engine with the meta-gradient "
                   "back-propagated this many tasks at a time (memory)")
    p.add_argument("--no-isolate", action="store_true",
                   help="all cells in this process (faster; CPU memory numbers then unreliable)")
    p.add_argument("--retain-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="keep freed CPU memory in each cell's process, as training runs do (trainer.retain_memory; "
                   "glibc mallopt: no page faults on the step's fresh tensors); default on")
    p.add_argument("--out", help="JSON path (default: $OUT or results/speed, then speed-<cpu|cuda>.json)")
    p.set_defaults(func=cmd_bench_speed)


# -- leaderboard --------------------------------------------------------------------------------------------

LEADERBOARD_RECORDS, LEADERBOARD_OUT = "results/records", "results"


def readme_target(args: argparse.Namespace) -> str | None:
    """The README whose reproductions block ``metabench leaderboard`` rewrites: ``--readme``; none with
    ``--no-readme``; by default ``README.md`` of the current folder when the records and output folders are the
    defaults (the repository's own leaderboard) and that file exists."""
    if args.no_readme:
        return None
    if args.readme:
        return args.readme
    defaults = (args.records, args.out) == (LEADERBOARD_RECORDS, LEADERBOARD_OUT)
    return "README.md" if defaults and Path("README.md").is_file() else None


def cmd_leaderboard(args: argparse.Namespace) -> int:
    # lazy: this command only (metabench --help stays fast)
    from metabench.report.make import make_leaderboard

    result = make_leaderboard(args.records, args.out, readme=readme_target(args))
    for problem in result.problems:
        print(f"metabench: skipped {problem}", file=sys.stderr)
    for path in result.paths:
        print(path)
    if args.wandb:
        # lazy: this command only (metabench --help stays fast)
        from metabench.report.wandb_leaderboard import log_leaderboard

        log_leaderboard(result.tables, result.paths[2], reproductions=result.reproductions)
    return result.exit_status


def add_leaderboard(sub: Subparsers) -> None:
    p = sub.add_parser("leaderboard", help="records -> LEADERBOARD.md, leaderboard.csv, leaderboard.html and the "
                                           "README's reproductions block; exit 1 if a record file was skipped")
    p.add_argument("--records", default=LEADERBOARD_RECORDS, help="folder of run records (*.json)")
    p.add_argument("--out", default=LEADERBOARD_OUT, help="output folder")
    readme = p.add_mutually_exclusive_group()
    readme.add_argument("--readme", metavar="PATH",
                        help="rewrite the block between <!-- reproductions:begin --> and <!-- reproductions:end --> "
                             "of this file (default: ./README.md when --records and --out are the defaults)")
    readme.add_argument("--no-readme", action="store_true", help="leave every README alone")
    p.add_argument("--wandb", action="store_true", help="also log the tables and the page to W&B")
    p.set_defaults(func=cmd_leaderboard)


# -- parser -------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metabench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_run, add_test, add_verify, add_publish, add_grid, add_data, add_episodes, add_bench,
                add_leaderboard):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # lazy: the error types only (they import torch; metabench --help stays fast)
    from metabench.datasets.base import DatasetError
    from metabench.run.checkpoints import LostProcessError, NoCheckpointError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `run` and `test` take --section.key=value as a W&B agent writes it; elsewhere, argparse's error
        if not getattr(args, "dotted_flags", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        try:
            args.set = [*args.set, *dotted_overrides(extra)]
        except ValueError as error:
            parser.error(str(error))
    try:
        return int(args.func(args) or 0)
    except (DatasetError, ValueError, FileExistsError, FileNotFoundError) as error:
        print(f"metabench: error: {error}", file=sys.stderr)
        return 2
    except (LostProcessError, NoCheckpointError) as error:  # one line, no traceback: the message says what to do
        print(error if str(error).startswith("metabench:") else f"metabench: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
