"""The leaderboard's tables: every run record -> one honest comparison table per benchmark, and its Markdown page.

A benchmark table is keyed by (benchmark, protocol), the protocol being the record's test protocol: its
``algorithm.bn_mode`` (transductive or non-transductive test-time batch norm) and the query images per class
of its test episodes. Its rows are keyed by (algorithm, backbone, preset, protocol, episode digest); records of
one row key (several seeds) are aggregated. Rows are only compared, ranked and tested against each other on
identical test episodes (one digest); rows on other digests are shown apart, never ranked with them.
Published numbers come from ``paper_results.yaml`` beside this file; a row gets one only when the paper's
backbone family and test protocol (batch-norm mode, class split, queries per class) are the row's own.

Output is deterministic: the same records give byte-identical files (no timestamps, no absolute paths,
stable orders, fixed float precision). The reproductions summary (:mod:`metabench.report.reproductions`), the CSV
(:mod:`metabench.report.leaderboard_csv`) and the HTML page (:mod:`metabench.report.leaderboard_html`) build on
these tables; :mod:`metabench.report.make` writes them all.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metabench.core.stats import ALPHA, BOOTSTRAP_RESAMPLES, T_TEST_MIN_N, PairedTest, aggregate_runs, paired_test
from metabench.run.records import Record, RecordError, read_record

PAPER_RESULTS = Path(__file__).parents[1] / "paper_results.yaml"  # benchmarks/paper_results.yaml

REPRODUCED, OVERLAP, BELOW, NO_PAPER = "reproduced", "CIs overlap", "below", "—"

METHODS_TEXT = (
    "- **Scores** are fractions of the test episodes' metric, shown in percent. Each record evaluates a fixed, "
    "seeded set of test episodes named by its sha256 *digest*.\n"
    "- **Several seeds** (runs) of one configuration (algorithm, backbone, preset, protocol, digest) are "
    "aggregated: with S runs on the same n episodes, x_i is episode i's score averaged over the runs and "
    "m_s run s's mean. Reported mean M = mean of the m_s; 95% CI half-width = 1.96 · sqrt(s_x²/n + s_m²/S), "
    "s_x² the sample variance of the x_i, s_m² that of the m_s (0 for one run, which leaves the record's own "
    "1.96 · s/√n).\n"
    "- **Comparability**: only rows on the same test episodes (same digest) are compared. Per table the "
    "reference digest is the one with the most records (ties: the smallest digest); rows on any other digest "
    "are listed apart under *different test episodes — not comparable*.\n"
    "- **Random init** is the same test-time adaptation from each run's own random initialization, on the same "
    "episodes (mean over runs; recorded by `metabench run`): the gap to it is what meta-training bought.\n"
    f"- **Ranking**: on the reference episodes the best row has the highest mean. Every other row is compared "
    f"with it by a two-sided paired test on the per-episode (run-averaged) score differences at the "
    f"{int(ALPHA * 100)}% level: a paired t-test (exact Student t distribution, n − 1 degrees of freedom) "
    f"when n ≥ {T_TEST_MIN_N}, otherwise a paired bootstrap ({BOOTSTRAP_RESAMPLES} resamples, fixed seed, "
    f"percentile interval of the mean difference); a constant difference is tied only when it is zero. The "
    f"best row and every row not significantly worse are **bold**; the p-value (or bootstrap interval) is in "
    f"the *vs best* column.\n"
    "- **Verdict** against the paper: *reproduced* if our mean ≥ paper mean − paper CI (within or above the "
    "paper's interval); *CIs overlap* if the two 95% intervals overlap otherwise; *below* else; — without a "
    "published number. Δ paper = ours − paper in percentage points.\n"
    "- **Times** are wall-clock seconds on the named device (mean over runs): training, and testing all "
    "episodes; tasks/s is the training throughput (meta-training tasks per second of training).\n"
    "- **Paper numbers** are matched on the test protocol: a row gets one only when the paper's network family "
    "(backbone), test-time batch norm, class split and query images per class are the row's own (a paper's "
    "number measured on 1 query per class says nothing about 15). Each table is one test protocol: batch-norm "
    "mode and queries per class; `metabench test` evaluates a trained run on another protocol.\n"
    "- *paper only* rows are published numbers that no row of ours matches, for context; their label gives "
    "the paper's split and queries per class."
)


class LeaderboardError(ValueError):
    """No leaderboard can be made (e.g. no readable record at all); the message says why."""


# -- paper numbers ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PaperResult:
    """One published number, in percent as printed, with its citation and its test protocol.

    ``split`` and ``test_queries`` are None where the paper's test protocol is not established: such a number
    is context only and never gives a verdict.
    """

    benchmark: str
    algorithm: str
    backbone: str  # family: "conv4", "mlp"
    protocol: str  # test-time batch norm: "transductive" / "non-transductive"
    split: str | None  # "maml", "standard", ...: see paper_results.yaml
    test_queries: int | None
    mean: float
    ci95: float | None
    paper: str
    arxiv: str
    table: str
    row: str
    # Where the docs project that this cell's protocol needs a GPU (not run on the CPU for that reason); None
    # when no projection says so.
    needs_gpu: str | None = None

    @property
    def author_year(self) -> str:
        """First author and year, e.g. "Finn 2017"."""
        first = self.paper.split(",")[0].split(".")[0].strip()
        year = next((w.strip(".") for w in reversed(self.paper.split()) if w.strip(".").isdigit()), "")
        return f"{first} {year}"

    @property
    def source(self) -> str:
        """Short citation: first author, year, arXiv id and table."""
        return f"{self.author_year}, arXiv:{self.arxiv}, {self.table}"

    @property
    def test_protocol(self) -> str:
        """The paper's split and test queries in words, e.g. "maml split, 1 query/class"."""
        split = "split unknown" if self.split is None else f"{self.split} split"
        queries = "queries unknown" if self.test_queries is None else queries_text(self.test_queries)
        return f"{split}, {queries}"

    def matches(self, benchmark: str, algorithm: str, backbone: str, protocol: RowProtocol) -> bool:
        """Whether a row of ours is judged against this number: same benchmark, algorithm, backbone family and
        test protocol, all known."""
        return (self.split is not None and self.test_queries is not None
                and (self.benchmark, self.algorithm, self.backbone, self.protocol, self.split, self.test_queries)
                == (benchmark, algorithm, backbone_family(backbone), protocol.bn_mode, protocol.split,
                    protocol.queries))


_PAPER_KEYS = ("benchmark", "algorithm", "backbone", "protocol", "split", "test_queries", "mean", "ci95", "source",
               "table", "row")
_OPTIONAL_PAPER_KEYS = ("needs_gpu",)


def queries_text(queries: int) -> str:
    return f"{queries} {'query' if queries == 1 else 'queries'}/class"


def backbone_family(backbone: str) -> str:
    """``conv4-omniglot`` -> ``conv4``, ``mlp-omniglot`` -> ``mlp``: what a paper's network is compared on."""
    return backbone.split("-", 1)[0]


def load_paper_results(path: str | Path = PAPER_RESULTS) -> list[PaperResult]:
    """Read the published numbers; a malformed entry raises ``ValueError`` naming the file and the entry."""
    path = Path(path)
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ValueError(f"{path.name}: expected a mapping with a 'results' list")
    out: list[PaperResult] = []
    seen: set[tuple[Any, ...]] = set()
    for i, entry in enumerate(data["results"]):
        where = f"{path.name}: results[{i}]"
        if not isinstance(entry, dict) or not set(_PAPER_KEYS) <= set(entry) <= {*_PAPER_KEYS, *_OPTIONAL_PAPER_KEYS}:
            raise ValueError(f"{where}: expected the keys {', '.join(_PAPER_KEYS)} and optionally "
                             f"{', '.join(_OPTIONAL_PAPER_KEYS)}")
        source = entry["source"]
        if not isinstance(source, dict) or not {"paper", "arxiv"} <= set(source):
            raise ValueError(f"{where}: source needs paper and arxiv")
        ci = entry["ci95"]
        if not isinstance(entry["mean"], (int, float)) or not (ci is None or isinstance(ci, (int, float))):
            raise ValueError(f"{where}: mean and ci95 must be numbers (ci95 may be null)")
        needs_gpu = entry.get("needs_gpu")
        if not (needs_gpu is None or (isinstance(needs_gpu, str) and needs_gpu.strip())):
            raise ValueError(f"{where}: needs_gpu must be a non-empty text (where the docs project it)")
        queries = entry["test_queries"]
        if not (queries is None or (isinstance(queries, int) and queries > 0)):
            raise ValueError(f"{where}: test_queries must be a positive integer or null")
        key = tuple(entry[k] for k in ("benchmark", "algorithm", "backbone", "protocol", "split", "test_queries"))
        if key in seen:
            raise ValueError(f"{where}: a second number for {key}")
        seen.add(key)
        out.append(PaperResult(benchmark=str(entry["benchmark"]), algorithm=str(entry["algorithm"]),
                               backbone=str(entry["backbone"]), protocol=str(entry["protocol"]),
                               split=None if entry["split"] is None else str(entry["split"]), test_queries=queries,
                               mean=float(entry["mean"]), ci95=None if ci is None else float(ci),
                               paper=str(source["paper"]), arxiv=str(source["arxiv"]), table=str(entry["table"]),
                               row=str(entry["row"]), needs_gpu=needs_gpu))
    return out


@dataclass(frozen=True, order=True)
class RowProtocol:
    """A record's test protocol: test-time batch norm, class split (``data.options.scheme``, else "standard")
    and query images per class."""

    bn_mode: str
    queries: int
    split: str

    @property
    def label(self) -> str:
        """The table's protocol heading, e.g. "transductive, 1 query/class"."""
        return f"{self.bn_mode}, {queries_text(self.queries)}"

    @classmethod
    def of(cls, record: Record) -> RowProtocol:
        bn_mode = _config_key(record, "algorithm", "bn_mode")
        queries = record.config.get("episodes", {}).get("queries")
        if not isinstance(queries, int) or isinstance(queries, bool):
            raise RecordError(f"config.episodes.queries should be an integer, got {queries!r:.40}")
        options = record.config.get("data", {}).get("options") or {}
        return cls(bn_mode, queries, str(options.get("scheme", "standard")))


# -- loading records ----------------------------------------------------------------------------------------

@dataclass
class Loaded:
    """The records that could be used, with their file names, and one message per skipped file."""

    records: list[tuple[str, Record]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _config_key(record: Record, *keys: str) -> str:
    value: Any = record.config
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            raise RecordError(f"config has no {'.'.join(keys)}")
        value = value[key]
    if not isinstance(value, str):
        raise RecordError(f"config.{'.'.join(keys)} should be a string, got {value!r:.40}")
    return value


def load_records(records_dir: str | Path) -> Loaded:
    """Read every ``*.json`` under ``records_dir`` (sorted); bad or duplicate files become problems.

    A file is skipped when :func:`read_record` rejects it, when its config lacks ``algorithm.bn_mode``,
    ``episodes.queries`` or ``model.backbone``, or when an earlier file (in path order) already claimed its run id.
    """
    root = Path(records_dir)
    if not root.is_dir():
        raise LeaderboardError(f"records folder {root} does not exist")
    loaded = Loaded()
    owner: dict[str, str] = {}
    for path in sorted(root.rglob("*.json")):
        name = path.relative_to(root).as_posix()  # never an absolute path in the outputs
        try:
            record = read_record(path)
            RowProtocol.of(record)
            _config_key(record, "model", "backbone")
        except RecordError as error:
            message = str(error).replace(str(path), "").lstrip(": ")
            loaded.problems.append(f"{name}: skipped: {message}")
            continue
        if record.run_id in owner:
            loaded.problems.append(f"{name}: skipped: run id {record.run_id!r} already claimed by "
                                   f"{owner[record.run_id]}")
            continue
        owner[record.run_id] = name
        loaded.records.append((name, record))
    return loaded


# -- verdict against the paper ------------------------------------------------------------------------------

def verdict(ours_pct: float, ours_ci_pct: float, paper: PaperResult | None) -> str:
    """reproduced / CIs overlap / below / — (see METHODS_TEXT); all in percent."""
    if paper is None:
        return NO_PAPER
    paper_ci = paper.ci95 or 0.0
    ours_ci = 0.0 if math.isnan(ours_ci_pct) else ours_ci_pct
    if ours_pct >= paper.mean - paper_ci:
        return REPRODUCED
    if ours_pct + ours_ci >= paper.mean - paper_ci:
        return OVERLAP
    return BELOW


# -- tables -------------------------------------------------------------------------------------------------

@dataclass
class Row:
    """One configuration on one set of test episodes: our runs aggregated, or a paper-only number."""

    algorithm: str
    backbone: str
    preset: str
    protocol: str
    digest: str  # "" for paper-only rows
    files: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    episodes: int = 0
    mean: float = float("nan")  # fraction
    ci95: float = float("nan")  # fraction
    per_episode: list[float] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # extra summary metrics, run-averaged
    # The same test-time adaptation from each run's own random initialization (record.baseline), run-averaged:
    # what meta-training bought.
    random_init: float = float("nan")  # fraction
    training_steps: float = float("nan")
    train_seconds: float = float("nan")
    eval_seconds: float = float("nan")
    tasks_per_second: float = float("nan")
    devices: list[str] = field(default_factory=list)
    curves: list[list[list[float]]] = field(default_factory=list)
    configs: list[dict[str, Any]] = field(default_factory=list, repr=False)  # each record's config, by seed
    paper: PaperResult | None = None
    best: bool = False
    tied: bool = False  # not significantly worse than the best (bold)
    test: PairedTest | None = None

    @property
    def paper_only(self) -> bool:
        return not self.files

    @property
    def runs(self) -> int:
        return len(self.files)

    @property
    def verdict(self) -> str:
        return "paper only" if self.paper_only else verdict(100 * self.mean, 100 * self.ci95, self.paper)

    @property
    def delta(self) -> float | None:
        """Ours - paper in percentage points."""
        return None if self.paper is None or self.paper_only else 100 * self.mean - self.paper.mean

    @property
    def label(self) -> str:
        if not self.paper_only:
            return self.algorithm
        assert self.paper is not None
        return f"{self.algorithm} (paper; {self.paper.test_protocol})"


@dataclass
class BenchmarkTable:
    """All rows of one (benchmark, protocol): ranked rows on the reference digest, the rest apart."""

    benchmark: str
    protocol: str
    metric: str
    reference_digest: str
    rows: list[Row]  # reference digest, best first
    other_rows: list[Row]  # other digests: not comparable
    paper_rows: list[Row]  # published numbers without a record of ours
    extra_metrics: list[str]

    @property
    def title(self) -> str:
        return f"{self.benchmark} · {self.protocol} · {self.metric}"

    @property
    def anchor(self) -> str:
        return f"{self.benchmark}--" + re.sub(r"[^a-z0-9]+", "-", self.protocol.lower()).strip("-")

    @property
    def bn_mode(self) -> str:
        return self.protocol.split(",", 1)[0]

    @property
    def queries(self) -> int:
        return int(self.protocol.split(", ", 1)[1].split()[0])


def _row_from_records(key: tuple[str, str, str, str, str], named: list[tuple[str, Record]],
                      paper: PaperResult | None) -> Row:
    algorithm, backbone, preset, protocol, digest = key
    named = sorted(named, key=lambda fr: (fr[1].seed, fr[1].run_id))
    records = [r for _, r in named]
    mean, ci, per_episode = aggregate_runs([r.scores for r in records])
    metric_names = sorted({k for r in records for k in r.metrics})
    metrics = {k: math.fsum(r.metrics[k] for r in records if k in r.metrics) /
               sum(1 for r in records if k in r.metrics) for k in metric_names}

    def avg(attr: str) -> float:
        return math.fsum(getattr(r, attr) for r in records) / len(records)

    baselines = [r.baseline["random_init_mean"] for r in records if "random_init_mean" in r.baseline]
    random_init = math.fsum(baselines) / len(baselines) if baselines else float("nan")

    return Row(algorithm=algorithm, backbone=backbone, preset=preset, protocol=protocol, digest=digest,
               files=[f for f, _ in named], seeds=sorted({r.seed for r in records}),
               episodes=records[0].num_episodes, mean=mean, ci95=ci, per_episode=per_episode, metrics=metrics,
               random_init=random_init,
               training_steps=avg("training_steps"), train_seconds=avg("train_seconds"),
               eval_seconds=avg("eval_seconds"), tasks_per_second=avg("tasks_per_second"),
               devices=sorted({r.device for r in records}), curves=[r.curve for r in records if r.curve],
               configs=[r.config for r in records], paper=paper)


def _table_order(table: BenchmarkTable, papers: Sequence[PaperResult]) -> tuple[Any, ...]:
    """Sections in reading order: the paper benchmarks first (in the order ``paper_results.yaml`` names them:
    Omniglot, then mini-ImageNet), then other classification benchmarks (synthetic), then the rest
    (segmentation); within one benchmark by batch-norm mode and queries per class."""
    published = [p.benchmark for p in papers]
    if table.benchmark in published:
        group: tuple[int, int] = (0, published.index(table.benchmark))
    else:
        group = (1, 0) if table.metric == "accuracy" else (2, 0)
    return (*group, table.benchmark, table.bn_mode, table.queries)


def build_tables(records: Sequence[tuple[str, Record]], papers: Sequence[PaperResult] = ()) -> list[BenchmarkTable]:
    """Group ``(file name, record)`` pairs into benchmark tables, aggregate, rank and attach paper numbers.

    A paper number goes to the row whose benchmark, algorithm, backbone family and test protocol it matches
    (:meth:`PaperResult.matches`); an unmatched number of the benchmark is listed once as a *paper only* row,
    in the table of its batch-norm mode with its queries per class if there is one, else the first of that mode.
    Tables come in reading order (:func:`_table_order`).
    """
    by_table: dict[tuple[str, str, int], dict[tuple[str, ...], list[tuple[str, Record]]]] = defaultdict(
        lambda: defaultdict(list))
    protocols: dict[tuple[str, ...], RowProtocol] = {}
    for name, record in records:
        protocol = RowProtocol.of(record)
        row_key = (record.algorithm, _config_key(record, "model", "backbone"), record.preset, protocol.label,
                   record.episode_digest)
        by_table[(record.benchmark, protocol.bn_mode, protocol.queries)][row_key].append((name, record))
        protocols[(record.benchmark, *row_key)] = protocol  # one digest: one split and one shape

    matched: set[PaperResult] = set()
    tables: list[BenchmarkTable] = []
    for (benchmark, _, _), groups in sorted(by_table.items()):
        counts = Counter(r.episode_digest for named in groups.values() for _, r in named)
        reference = min(counts, key=lambda d: (-counts[d], d))
        rows = []
        for key, named in sorted(groups.items()):
            protocol = protocols[(benchmark, *key)]
            paper = next((p for p in papers if p.matches(benchmark, key[0], key[1], protocol)), None)
            matched.update([paper] if paper else [])
            rows.append(_row_from_records(key, named, paper))
        metric_names = sorted({r.metric for named in groups.values() for _, r in named})
        extra = sorted({k for named in groups.values() for _, r in named for k in r.metrics})
        ranked = sorted((r for r in rows if r.digest == reference),
                        key=lambda r: (-r.mean, r.algorithm, r.backbone, r.preset))
        _rank(ranked)
        others = sorted((r for r in rows if r.digest != reference),
                        key=lambda r: (r.digest, -r.mean, r.algorithm, r.backbone, r.preset))
        tables.append(BenchmarkTable(benchmark=benchmark, protocol=rows[0].protocol, metric=" / ".join(metric_names),
                                     reference_digest=reference, rows=ranked, other_rows=others, paper_rows=[],
                                     extra_metrics=extra))
    tables.sort(key=lambda t: _table_order(t, papers))
    for paper in sorted(set(papers) - matched, key=lambda p: (-p.mean, p.algorithm, p.backbone, p.test_protocol)):
        same_mode = [t for t in tables if t.benchmark == paper.benchmark and t.bn_mode == paper.protocol]
        home = next((t for t in same_mode if t.queries == paper.test_queries), same_mode[0] if same_mode else None)
        if home is not None:
            home.paper_rows.append(Row(algorithm=paper.algorithm, backbone=paper.backbone, preset="",
                                       protocol=paper.protocol, digest="", paper=paper))
    return tables


def _rank(rows: list[Row]) -> None:
    """Mark the best row (first: highest mean) and every row the paired test cannot tell from it."""
    if not rows:
        return
    best = rows[0]
    best.best = best.tied = True
    for row in rows[1:]:
        row.test = paired_test(best.per_episode, row.per_episode)
        row.tied = row.test.tied


# -- formatting ---------------------------------------------------------------------------------------------

def pct(value: float | None, digits: int = 2) -> str:
    return "—" if value is None or math.isnan(value) else f"{100 * value:.{digits}f}"


def fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def ours_text(row: Row) -> str:
    return "—" if row.paper_only else f"{pct(row.mean)} ± {pct(row.ci95)}"


def paper_text(row: Row) -> str:
    return "—" if row.paper is None else published_text(row.paper)


def published_text(paper: PaperResult) -> str:
    """A published number as printed: "98.7 ± 0.4", or "99.47" without a CI."""
    return f"{paper.mean:g}" + ("" if paper.ci95 is None else f" ± {paper.ci95:g}")


def delta_text(delta: float | None) -> str:
    return "—" if delta is None else f"{delta:+.2f}"


def vs_best_text(row: Row) -> str:
    if row.best:
        return "best"
    test = row.test
    if test is None:
        return "—"
    word = "tied" if test.tied else "worse"
    if test.p_value is not None:
        return f"{word} (p<0.001)" if test.p_value < 0.001 else f"{word} (p={test.p_value:.3f})"
    assert test.interval is not None
    return f"{word} (Δ 95% [{100 * test.interval[0]:.2f}, {100 * test.interval[1]:.2f}])"


def vs_best_rank(row: Row) -> float | None:
    """Sort key of the *vs best* column, ascending: the best, then the most tied, then the clearly worse."""
    if row.best:
        return 0.0
    if row.test is None:
        return None
    if row.test.p_value is not None:
        return 1 - row.test.p_value
    return 0.5 if row.test.tied else 1.0


def steps_text(row: Row) -> str:
    return "—" if math.isnan(row.training_steps) else f"{row.training_steps:.0f}"


def runs_text(row: Row) -> str:
    return "—" if row.paper_only else f"{len(row.seeds)}/{row.runs}"


def _ours(row: Row, value: float) -> float | None:
    return None if row.paper_only or math.isnan(value) else value


@dataclass(frozen=True)
class Column:
    """One column of a benchmark table: its heading, a row's text and, for a numeric column, the number it sorts
    by (None: missing). ``wrap``: long text the HTML table may break over lines (the rest never wraps)."""

    heading: str
    text: Callable[[Row], str]
    number: Callable[[Row], float | None] | None = None
    wrap: bool = False


def _key_columns() -> list[Column]:
    """What names a row: the first columns of both the main and the details table."""
    return [Column("algorithm", lambda r: r.label, wrap=True), Column("backbone", lambda r: r.backbone or "—"),
            Column("preset", lambda r: r.preset or "—")]


def main_columns(table: BenchmarkTable) -> list[Column]:
    """What a reader compares, in view: ours, random init, the paper, Δ, the verdict and the test against the best."""
    return _key_columns() + [
        Column(f"ours {table.metric} % (95% CI)", ours_text, lambda r: _ours(r, 100 * r.mean)),
        Column("random init %", lambda r: pct(r.random_init), lambda r: _ours(r, 100 * r.random_init)),
        Column("paper % (95% CI)", paper_text, lambda r: None if r.paper is None else r.paper.mean),
        Column("Δ paper", lambda r: delta_text(r.delta), lambda r: r.delta),
        Column("verdict", lambda r: r.verdict),
        Column("vs best", vs_best_text, vs_best_rank),
    ]


def detail_columns(table: BenchmarkTable) -> list[Column]:
    """The rest of each row: extra metrics, seeds, episodes, digest, the paper's source, steps, times, device."""
    def metric(name: str) -> Column:
        return Column(f"{name} %", lambda r: "—" if r.paper_only else pct(r.metrics.get(name)),
                      lambda r: None if r.paper_only or name not in r.metrics else 100 * r.metrics[name])

    return _key_columns() + [metric(m) for m in table.extra_metrics] + [
        Column("seeds/runs", runs_text, lambda r: None if r.paper_only else float(r.runs)),
        Column("episodes", lambda r: "—" if r.paper_only else str(r.episodes),
               lambda r: None if r.paper_only else float(r.episodes)),
        Column("digest", lambda r: "—" if r.paper_only else r.digest[:12]),
        Column("paper source", lambda r: r.paper.source if r.paper else "—", wrap=True),
        Column("steps", steps_text, lambda r: _ours(r, r.training_steps)),
        Column("train s", lambda r: fmt(r.train_seconds, 1), lambda r: _ours(r, r.train_seconds)),
        Column("test s", lambda r: fmt(r.eval_seconds, 1), lambda r: _ours(r, r.eval_seconds)),
        Column("tasks/s", lambda r: fmt(r.tasks_per_second, 1), lambda r: _ours(r, r.tasks_per_second)),
        Column("device", lambda r: "; ".join(r.devices) or "—", wrap=True),
    ]


DETAILS_SUMMARY = "Details: seeds, episodes, digest, paper source, steps, times, device"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def md_table(heads: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table (cells escaped)."""
    lines = ["| " + " | ".join(_md_escape(h) for h in heads) + " |", "|" + "---|" * len(heads)]
    return lines + ["| " + " | ".join(_md_escape(c) for c in cells) + " |" for cells in body]


def _md_rows(table: BenchmarkTable, rows: Sequence[Row], bold: bool) -> list[str]:
    main, details = main_columns(table), detail_columns(table)
    body = []
    for row in rows:
        values = [c.text(row) for c in main]
        if bold and row.tied:  # the algorithm and our score, as the HTML page bolds the whole row
            values[0], values[3] = f"**{values[0]}**", f"**{values[3]}**"
        body.append(values)
    return (md_table([c.heading for c in main], body)
            + ["", f"<details><summary>{DETAILS_SUMMARY}</summary>", ""]
            + md_table([c.heading for c in details], [[c.text(r) for c in details] for r in rows])
            + ["", "</details>"])


def render_markdown(tables: Sequence[BenchmarkTable], problems: Sequence[str] = (),
                    summary: Sequence[str] = ()) -> str:
    """The whole ``LEADERBOARD.md`` page: the reproductions ``summary`` (Markdown lines) first, then one section
    per table."""
    out = ["# metabench leaderboard", "",
           "Generated by `metabench leaderboard` from the run records in `results/records/`; do not edit by "
           "hand.", ""]
    if summary:
        out += ["## Reproductions", "", *summary, ""]
    out += ["## How to read it", "", METHODS_TEXT, ""]
    if problems:
        out += ["## Skipped record files", ""] + [f"- {_md_escape(p)}" for p in problems] + [""]
    for table in tables:
        out += [f"## {table.title}", ""]
        if table.rows:
            ref = table.rows[0]
            out += [f"Test episodes: {ref.episodes}, digest `{table.reference_digest[:12]}` "
                    f"(`{table.reference_digest}`).", ""]
            out += _md_rows(table, table.rows + table.paper_rows, bold=True) + [""]
        if table.other_rows:
            out += ["**Different test episodes — not comparable** with the table above (never ranked with it):",
                    ""]
            out += [f"- `{d}`" for d in sorted({r.digest for r in table.other_rows})] + [""]
            out += _md_rows(table, table.other_rows, bold=False) + [""]
    return "\n".join(out).rstrip("\n") + "\n"
