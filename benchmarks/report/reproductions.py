"""What metabench reproduces: one line per published cell of ``paper_results.yaml`` that has a metabench benchmark,
with our row judged against it (its verdict) or the reason there is none (its state), and the commands that made
our records.

The summary opens ``LEADERBOARD.md``, ``leaderboard.html`` and ``leaderboard.csv``; its compared cells also fill a
block of the README between :data:`BEGIN` and :data:`END` (:func:`readme_block`, :func:`replace_block`). Cells
are grouped by paper, in the order ``paper_results.yaml`` lists them; a record that lands later (FOMAML, Reptile)
turns its cell's "not run yet" into a verdict with no change here.
"""

from __future__ import annotations

import json
import shlex
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import yaml

from metabench.report.leaderboard import (
    BELOW,
    OVERLAP,
    REPRODUCED,
    BenchmarkTable,
    LeaderboardError,
    PaperResult,
    Row,
    delta_text,
    md_table,
    ours_text,
    published_text,
)
from metabench.run.config import (
    EXECUTION_KEYS,
    TEST_KEYS,
    TRAIN_SHAPE,
    VALIDATION_KEYS,
    ConfigError,
    flatten_config,
    list_benchmarks,
    resolve,
    training_shape,
)

NOT_RUN, NEEDS_GPU, CONTEXT = "not run yet", "needs a GPU", "context only"
STATES = (REPRODUCED, OVERLAP, BELOW, NOT_RUN, NEEDS_GPU, CONTEXT)  # the order of the counts

BEGIN, END = "<!-- reproductions:begin -->", "<!-- reproductions:end -->"

CONTEXT_TEXT = ("the paper's test protocol (class split, query images per class) is not established, or its number "
                "is not one model's score: see the comments in `benchmarks/paper_results.yaml`")

SUMMARY_HEADINGS = ["table · row", "benchmark", "network", "test protocol", "paper %", "ours % (95% CI)", "seeds",
                    "Δ", "verdict / state"]


@dataclass(frozen=True)
class Reproduction:
    """One published cell and our row judged against it (None: no record of ours on its protocol).

    ``others``: further rows of ours on the same cell (other presets or episodes), shown in their tables;
    ``anchor`` and ``metric``: the table of ``row``.
    """

    paper: PaperResult
    row: Row | None
    others: int = 0
    anchor: str = ""
    metric: str = ""

    @property
    def state(self) -> str:
        """The verdict when there is one, else why not: context only, needs a GPU, not run yet."""
        if self.row is not None:
            return self.row.verdict
        if self.paper.split is None or self.paper.test_queries is None:
            return CONTEXT
        return NEEDS_GPU if self.paper.needs_gpu else NOT_RUN

    @property
    def compared(self) -> bool:
        return self.row is not None

    @property
    def cell(self) -> str:
        """Benchmark, network and test protocol, e.g. "omniglot-5w1s · conv4 · transductive, maml split, 1
        query/class"."""
        return f"{self.paper.benchmark} · {self.paper.backbone} · {self.protocol}"

    @property
    def protocol(self) -> str:
        return f"{self.paper.protocol}, {self.paper.test_protocol}"

    @cached_property
    def commands(self) -> list[str]:
        """The shell commands that made our row's records, one line per record (several seeds: several lines,
        the same repeated ones once)."""
        if self.row is None:
            return []
        return list(dict.fromkeys(" && ".join(record_commands(config)) for config in self.row.configs))

    def cells(self) -> list[str]:
        """The summary's cells, in :data:`SUMMARY_HEADINGS` order (plain text)."""
        row, paper = self.row, self.paper
        seeds = "—" if row is None else str(len(row.seeds))
        return [f"{paper.table}, “{paper.row}”", paper.benchmark, paper.backbone, self.protocol, published_text(paper),
                "—" if row is None else ours_text(row), seeds, delta_text(None if row is None else row.delta),
                self.state]


def _choose(rows: list[tuple[BenchmarkTable, Row]]) -> tuple[BenchmarkTable, Row]:
    """Of several rows of ours on one cell, the one the summary shows: on its table's reference episodes, the most
    runs, the most episodes, then the LOWEST mean (never the luckiest of several tries), then by preset."""
    return min(rows, key=lambda tr: (tr[1].digest != tr[0].reference_digest, -tr[1].runs, -tr[1].episodes,
                                     tr[1].mean, tr[1].preset, tr[1].backbone))


def build_reproductions(tables: Sequence[BenchmarkTable], papers: Sequence[PaperResult],
                        benchmarks: Sequence[str] | None = None) -> list[Reproduction]:
    """One :class:`Reproduction` per published cell whose benchmark metabench has (``benchmarks``, default: every
    preset file), grouped by paper (first mention in ``papers`` order), each group in ``papers`` order."""
    known = set(list_benchmarks() if benchmarks is None else benchmarks)
    ours: dict[PaperResult, list[tuple[BenchmarkTable, Row]]] = {}
    for table in tables:
        for row in table.rows + table.other_rows:
            if row.paper is not None:
                ours.setdefault(row.paper, []).append((table, row))
    cells = [p for p in papers if p.benchmark in known]
    order = list(dict.fromkeys(p.paper for p in cells))
    out = []
    for paper in sorted(cells, key=lambda p: order.index(p.paper)):  # stable: papers order within a group
        matched = ours.get(paper, [])
        if matched:
            table, row = _choose(matched)
            out.append(Reproduction(paper, row, len(matched) - 1, table.anchor, table.metric))
        else:
            out.append(Reproduction(paper, None))
    return out


def counts(reproductions: Sequence[Reproduction]) -> Counter[str]:
    return Counter(r.state for r in reproductions)


def counts_text(reproductions: Sequence[Reproduction]) -> str:
    """"N published cells with a metabench benchmark: a reproduced, b CIs overlap, ..." (every state, zeros too)."""
    tally = counts(reproductions)
    parts = ", ".join(f"{tally[s]} {s}" for s in STATES)
    return f"{len(reproductions)} published cells with a metabench benchmark: {parts}."


def paper_heading(paper: PaperResult) -> str:
    return f"{paper.paper} (arXiv:{paper.arxiv})"


def groups(reproductions: Sequence[Reproduction]) -> list[tuple[PaperResult, list[Reproduction]]]:
    """The cells by paper, in order (each group named by its first cell's paper)."""
    out: list[tuple[PaperResult, list[Reproduction]]] = []
    for r in reproductions:
        if out and out[-1][0].paper == r.paper.paper:
            out[-1][1].append(r)
        else:
            out.append((r.paper, [r]))
    return out


def notes(reproductions: Sequence[Reproduction]) -> list[tuple[str, str]]:
    """What the states without a verdict mean, and where a cell has more rows of ours: (term, plain text) pairs."""
    out = [(NOT_RUN, "no record of ours on the cell's benchmark, network and test protocol yet."),
           (CONTEXT, f"{CONTEXT_TEXT}.")]
    out += [(NEEDS_GPU, f"{r.cell} ({r.paper.algorithm}): {r.paper.needs_gpu}.") for r in reproductions
            if r.state == NEEDS_GPU]
    out += [(f"{r.paper.algorithm}, {r.cell}", f"{r.others} more row(s) of ours in its table; the summary shows the "
             "one with the most runs on the table's reference episodes (ties: the lower mean).")
            for r in reproductions if r.others]
    return out


def summary_markdown(reproductions: Sequence[Reproduction]) -> list[str]:
    """The summary as Markdown lines: counts, one table per paper, the notes."""
    if not reproductions:
        return []
    out = [f"**{counts_text(reproductions)}**", ""]
    for paper, cells in groups(reproductions):
        out += [f"### {paper_heading(paper)}", ""]
        body = []
        for r in cells:
            values = r.cells()
            if r.compared:
                values[-1] = f"**{values[-1]}**"
            body.append(values)
        out += md_table(SUMMARY_HEADINGS, body) + [""]
    return out + [f"- *{term}*: {text}" for term, text in notes(reproductions)]


# -- the commands that made a record ------------------------------------------------------------------------

def _normalized(tree: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(tree))  # tuples -> lists, as a record's JSON has them


def _override(key: str, value: Any) -> str:
    """``--set key=value``, the value spelled so that ``--set``'s YAML reading gives it back, quoted for a shell."""
    plain = isinstance(value, str) and yaml.safe_load(value) == value
    text = value if plain else json.dumps(value, separators=(",", ":"))
    return f"--set {shlex.quote(f'{key}={text}')}"


def _arguments(keys: dict[str, Any]) -> str:
    """``--seed S`` first (when it differs), then ``--set`` for each other key, sorted."""
    seed = f" --seed {keys['trainer.seed']}" if "trainer.seed" in keys else ""
    return seed + "".join(f" {_override(k, keys[k])}" for k in sorted(keys) if k != "trainer.seed")


def record_commands(config: dict[str, Any]) -> list[str]:
    """The commands that made a record with ``config``: ``metabench run`` with the keys in which it differs from its
    preset, and for a record of ``metabench test`` (``resolved.tested_checkpoint``) the test after it with the test
    protocol's keys. Paths and execution options (data root, devices, threads, engine: no result depends on
    them) are left out; so is the run's validation and checkpoint cadence from the test command, which does not
    need it. Which key goes where follows its declared role (:mod:`metabench.core.roles`): keys that change nothing
    computed (:data:`EXECUTION_KEYS`: paths, execution, citations) in neither command; the run's validation cadence
    (:data:`VALIDATION_KEYS`) in the run's only; what a test may change (:data:`TEST_KEYS`) in the test's only. A
    test of another benchmark's run (``resolved.trained_run``) runs that benchmark, compared with its own preset,
    and tests with ``--trained-benchmark``."""
    benchmark, algorithm, preset = str(config["benchmark"]), str(config["algorithm"]["name"]), str(config["preset"])
    resolved = config.get("resolved") or {}
    # A test of another benchmark's run (--trained-benchmark): the run is that benchmark's, with its preset.
    trained_benchmark = (resolved.get("trained_run") or {}).get("benchmark")
    run_benchmark = str(trained_benchmark or benchmark)
    base = f"--benchmark {benchmark} --algorithm {algorithm} --preset {preset}"
    run_base = f"--benchmark {run_benchmark} --algorithm {algorithm} --preset {preset}"
    try:
        wanted = flatten_config(_normalized(resolve(benchmark, algorithm, preset).to_dict()))
        wanted_run = flatten_config(_normalized(resolve(run_benchmark, algorithm, preset).to_dict()))
    except ConfigError as error:  # the preset changed since the record was made: say so, never guess
        return [f"metabench run {run_base}  # the preset no longer resolves: {error}"]
    flat = flatten_config(_normalized(config))
    # A test record keeps the run's values of what the test changed (resolved.trained): the run command is the run's.
    ran = {**flat, **resolved.get("trained", {})}
    # Training episode shapes compare by what training used: an explicit train_shots of 1 where the preset says
    # null (the evaluation's 1) is no override (test records spell the training shape out).
    shapes = {f"episodes.train_{k}" for k in TRAIN_SHAPE}
    ran_shape = training_shape(ran)
    missing = object()

    def differing(tree: dict[str, Any], against: dict[str, Any]) -> dict[str, Any]:
        against_shape = training_shape(against)
        return {k: v for k, v in tree.items()
                if not k.startswith("resolved.") and k not in EXECUTION_KEYS
                and (ran_shape[k] != against_shape[k] if k in shapes else against.get(k, missing) != v)}

    if "tested_checkpoint" not in resolved:
        return [f"metabench run {base}{_arguments(differing(flat, wanted))}"]
    # The run's cadence is the run's; the rest a test may change is the test's (with the training's keys, which
    # the test resolves again to find the run).
    train = {k: v for k, v in differing(ran, wanted_run).items() if k not in TEST_KEYS or k in VALIDATION_KEYS}
    test = {k: v for k, v in differing(flat, wanted).items() if k not in VALIDATION_KEYS}
    trained = f" --trained-benchmark {run_benchmark}" if trained_benchmark else ""
    return [f"metabench run {run_base}{_arguments(train)}", f"metabench test {base}{trained}{_arguments(test)}"]


# -- the README block -----------------------------------------------------------------------------------------

def readme_block(reproductions: Sequence[Reproduction], leaderboard_link: str) -> str:
    """The README's reproductions block (without its markers): counts, then each compared cell with the paper's
    number, ours, the verdict and the commands that made our records."""
    compared = [r for r in reproductions if r.compared]
    out = ["<!-- generated by `metabench leaderboard` from the run records: do not edit by hand -->", "",
           f"{counts_text(reproductions)} Every cell, with the states of those not compared, is in "
           f"[{leaderboard_link}]({leaderboard_link}).", ""]
    if compared:
        body = []
        for r in compared:
            seeds = len(r.row.seeds) if r.row else 0
            body.append([r.cell, f"{r.paper.author_year}, {r.paper.table}, “{r.paper.row}”: {published_text(r.paper)}",
                         f"{ours_text(r.row)} ({seeds} seed{'s' if seeds != 1 else ''})" if r.row else "—",
                         f"**{r.state}**", "; ".join(f"`{c}`" for c in r.commands)])
        out += md_table(["cell", "paper %", "ours %", "verdict", "command"], body)
        out += ["", "Commands leave out paths and execution options (`--data-root`, `--accelerator`, `--devices`, "
                "`--set trainer.cpu_threads=...`): no result depends on them."]
    else:
        out += ["No published cell has a record of ours yet."]
    return "\n".join(out)


def replace_block(text: str, block: str, name: str) -> str:
    """``text`` with the lines between the line :data:`BEGIN` and the line :data:`END` replaced by ``block``
    (the marker lines kept; a marker quoted inside other text does not count). Raises :class:`LeaderboardError`
    naming ``name`` unless each marker line occurs exactly once, BEGIN first."""
    lines = text.splitlines(keepends=True)
    found = {marker: [i for i, line in enumerate(lines) if line.strip() == marker] for marker in (BEGIN, END)}
    if [len(found[BEGIN]), len(found[END])] != [1, 1] or found[BEGIN][0] > found[END][0]:
        raise LeaderboardError(f"{name}: the reproductions block needs the lines {BEGIN} and {END}, once each and "
                               f"in that order (found {len(found[BEGIN])} and {len(found[END])}); add them where the "
                               f"table belongs, or pass --no-readme")
    first, last = found[BEGIN][0], found[END][0]
    return "".join(lines[:first + 1]) + block + "\n" + "".join(lines[last:])
