"""The leaderboard: statistics against closed forms, paper numbers, golden Markdown/CSV, bad input, W&B.

Fixture records are built in ``tests/helpers.py`` (``fixture_records``): an Omniglot 5w1s transductive table
with a two-seed MAML row (aggregation), a FOMAML row tied with it, a clearly worse Reptile row, a Reptile run on
other test episodes (digest mismatch) and paper-only rows; a non-transductive Reptile table; and a 10-episode
segmentation table (bootstrap path, extra metrics, curves). Set ``METABENCH_UPDATE_GOLDEN=1`` to rewrite
the golden files after an intended change, and read the diff.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from metabench import cli
from metabench.core.stats import aggregate_runs, mean_ci95, paired_test
from metabench.report.leaderboard import (
    BELOW,
    NO_PAPER,
    OVERLAP,
    REPRODUCED,
    PaperResult,
    build_tables,
    load_paper_results,
    verdict,
)
from metabench.report.make import make_leaderboard
from metabench.run.records import SCHEMA_VERSION, Record
from tests.helpers import DIGEST_A, DIGEST_B, fixture_records, make_record, score_pattern, write_fixture

GOLDEN = Path(__file__).parent / "golden"
# -- statistics against closed forms ---------------------------------------------------------------------------

def test_aggregate_runs_matches_closed_form() -> None:
    run1, run2 = [0.5, 0.7, 0.9], [0.7, 0.7, 0.8]
    mean, ci, per_episode = aggregate_runs([run1, run2])
    # x = [0.6, 0.7, 0.85]: s_x^2 = 19/1200; run means 0.7 and 11/15: s_m^2 = 1/1800.
    # CI = 1.96 * sqrt(19/1200 / 3 + 1/1800 / 2) = 1.96 * sqrt(20/3600) = 1.96 / sqrt(180).
    assert per_episode == pytest.approx([0.6, 0.7, 0.85], abs=1e-15)
    assert mean == pytest.approx(43 / 60, abs=1e-15)
    assert ci == pytest.approx(1.96 / math.sqrt(180), rel=1e-12)
    # One run: exactly the record's own mean and 1.96 s / sqrt(n).
    one = aggregate_runs([run1])
    assert one[:2] == pytest.approx(mean_ci95(run1), rel=1e-12) and one[2] == run1
    # Identical runs add no seed variance.
    assert aggregate_runs([run1, run1])[1] == pytest.approx(mean_ci95(run1)[1], rel=1e-12)
    with pytest.raises(ValueError, match="same"):
        aggregate_runs([run1, run1[:2]])


def _offset_pair(t_stat: float, n: int = 100, spread: float = 0.1) -> tuple[list[float], list[float]]:
    """Scores whose differences are mu +- spread (alternating): sample sd = spread * sqrt(n / (n - 1)),
    so the paired t statistic is mu * sqrt(n - 1) / spread; mu is chosen to give ``t_stat``."""
    mu = t_stat * spread / math.sqrt(n - 1)
    b = [0.5 + 0.001 * (i % 7) for i in range(n)]
    a = [x + mu + (spread if i % 2 else -spread) for i, x in enumerate(b)]
    return a, b


# Two-sided Student t p-values 2 * P(T_df > t), tabulated independently (regularized incomplete beta
# I_{df / (df + t^2)}(df / 2, 1 / 2) at 30 digits with mpmath). The normal approximation would give 0.133614,
# 0.057433, 0.048838, 0.045500, 0.012419 and, for df = 29, 0.045500 and 0.035729: t = 1.97 (df 99) and
# t = 2.0 (df 29) are tied only under the exact t distribution.
@pytest.mark.parametrize("t_stat, n, p_expected, tied", [
    (1.5, 100, 0.136797, True), (1.9, 100, 0.060343, True), (1.97, 100, 0.051632, True),
    (2.0, 100, 0.048240, False), (2.5, 100, 0.014063, False),
    (2.0, 30, 0.054944, True), (2.1, 30, 0.044542, False),
])
def test_paired_t_test_known_answers(t_stat: float, n: int, p_expected: float, tied: bool) -> None:
    a, b = _offset_pair(t_stat, n)
    result = paired_test(a, b)
    assert result.method == "t" and result.tied is tied and result.interval is None
    assert result.p_value == pytest.approx(p_expected, abs=2e-6)
    assert result.mean_difference == pytest.approx(t_stat * 0.1 / math.sqrt(n - 1), rel=1e-9)
    assert paired_test(b, a).p_value == pytest.approx(p_expected, abs=2e-6)  # two-sided


def test_paired_test_degenerate_and_bootstrap() -> None:
    same = [0.1 * (i % 4) for i in range(50)]
    assert paired_test(same, same).tied and paired_test(same, same).p_value == 1.0
    shifted = [x - 0.01 for x in same]  # a constant difference (up to rounding): no noise, certainly different
    assert not paired_test(same, shifted).tied and paired_test(same, shifted).p_value == 0.0
    # The same below 30 episodes, where scipy's bootstrap would give NaN or warn: decided before it.
    assert paired_test(same[:10], same[:10]).tied and paired_test(same[:10], same[:10]).interval == (0.0, 0.0)
    constant = paired_test(same[:10], shifted[:10])
    assert not constant.tied and constant.interval == pytest.approx((0.01, 0.01), abs=1e-15)
    # n < 30: the paired bootstrap. Differences all positive -> not tied; symmetric around 0 -> tied.
    small = [0.5 + 0.01 * i for i in range(10)]
    worse = [x - 0.02 - 0.005 * (i % 3) for i, x in enumerate(small)]
    result = paired_test(small, worse)
    assert result.method == "bootstrap" and not result.tied
    low, high = result.interval
    assert 0.02 <= low < high <= 0.03
    # The percentile interval of a mean is close to mean -+ 1.96 * sd / sqrt(n), sd with n in the denominator
    # (the bootstrap's plug-in): differences 0.02, 0.025, 0.03 (4, 3, 3 times): 0.0245 -+ 0.00257.
    d = [x - y for x, y in zip(small, worse)]
    m = math.fsum(d) / len(d)
    half = 1.96 * math.sqrt(math.fsum((v - m) ** 2 for v in d) / len(d)) / math.sqrt(len(d))
    assert result.mean_difference == pytest.approx(0.0245, abs=1e-15)
    assert (low, high) == pytest.approx((m - half, m + half), abs=5e-4)
    noisy = [x + (0.03 if i % 2 else -0.03) for i, x in enumerate(small)]
    assert paired_test(small, noisy).tied
    assert paired_test(small, noisy) == paired_test(small, noisy)  # deterministic


def test_stats_module_stays_light() -> None:
    """Models import metabench.core.stats for mean_ci95: it must not pull in scipy (imported by paired_test only)."""
    code = ("import sys, metabench.core.stats, metabench.core.atomic; "
            "assert 'scipy' not in sys.modules, 'scipy imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_verdict_rules() -> None:
    paper = PaperResult("b", "maml", "conv4", "transductive", "maml", 1, 98.7, 0.4, "Finn et al. 2017", "1703.03400",
                        "Table 1", "MAML")
    assert verdict(99.5, 0.2, paper) == REPRODUCED  # above
    assert verdict(98.3, 0.2, paper) == REPRODUCED  # at the lower end of the paper's CI
    assert verdict(98.0, 0.35, paper) == OVERLAP  # 98.35 >= 98.3
    assert verdict(98.0, 0.2, paper) == BELOW
    assert verdict(50.0, 1.0, None) == NO_PAPER
    no_ci = PaperResult("b", "mamlpp", "conv4", "transductive", None, None, 99.47, None, "x", "1", "T", "r")
    assert verdict(99.47, 0.1, no_ci) == REPRODUCED and verdict(99.3, 0.1, no_ci) == BELOW


def test_verdict_boundaries() -> None:
    """Each verdict's boundary, on numbers exact in binary (paper 98.5 ± 0.25: lower end 98.25), so that "at the
    boundary" is exact: ``>=`` in either rule turned into ``>`` fails here."""
    paper = PaperResult("b", "maml", "conv4", "transductive", "maml", 1, 98.5, 0.25, "P", "1", "T", "r")
    low = 98.25
    below_low = math.nextafter(low, 0.0)
    # reproduced: our mean at the paper's lower end, or anywhere above (also above its upper end)
    assert verdict(low, 0.0, paper) == REPRODUCED
    assert verdict(low, float("nan"), paper) == REPRODUCED
    assert verdict(99.75, 0.5, paper) == REPRODUCED
    # just under the lower end: the CIs decide. Touching (our upper end = the paper's lower end) overlaps ...
    assert verdict(98.0, 0.25, paper) == OVERLAP
    assert verdict(below_low, 0.0, paper) == BELOW  # no CI of ours: a point just outside the paper's interval
    assert verdict(below_low, 1e-12, paper) == OVERLAP
    # ... a hair short of touching is below (2**-40: more than the spacing of floats near 98, so the sum is short)
    assert verdict(98.0, 0.25 - 2**-40, paper) == BELOW
    assert verdict(98.0, float("nan"), paper) == BELOW  # an unknown CI of ours counts as 0
    # a paper without a CI: its mean is the boundary
    no_ci = PaperResult("b", "mamlpp", "conv4", "transductive", "maml", 1, 98.5, None, "P", "1", "T", "r")
    assert verdict(98.5, 0.0, no_ci) == REPRODUCED
    assert verdict(98.25, 0.25, no_ci) == OVERLAP
    assert verdict(98.25, 0.25 - 2**-40, no_ci) == BELOW
    assert verdict(98.25, 0.25, None) == NO_PAPER


# -- paper numbers ------------------------------------------------------------------------------------------

def test_paper_numbers_as_published() -> None:
    papers = {(p.benchmark, p.algorithm, p.protocol): p for p in load_paper_results() if p.backbone == "conv4"}
    mlp = {(p.benchmark, p.test_queries): (p.mean, p.ci95, p.row) for p in load_paper_results() if p.backbone == "mlp"}
    assert mlp == {("omniglot-5w1s", 1): (89.7, 1.1, "MAML, no conv (ours)"),
                   ("omniglot-5w5s", 5): (97.5, 0.6, "MAML, no conv (ours)")}
    expected = {  # (benchmark, algorithm, protocol): (mean, ci95, arXiv id, table)
        ("omniglot-5w1s", "maml", "transductive"): (98.7, 0.4, "1703.03400", "Table 1"),
        ("omniglot-20w5s", "maml", "transductive"): (98.9, 0.2, "1703.03400", "Table 1"),
        ("mini-imagenet-5w1s", "maml", "transductive"): (48.70, 1.84, "1703.03400", "Table 1"),
        ("mini-imagenet-5w5s", "fomaml", "transductive"): (63.15, 0.91, "1703.03400", "Table 1"),
        ("omniglot-20w1s", "fomaml", "transductive"): (89.4, 0.5, "1803.02999v3", "Table 2"),
        ("omniglot-5w1s", "reptile", "non-transductive"): (95.39, 0.09, "1803.02999v3", "Table 2"),
        ("omniglot-20w5s", "reptile", "transductive"): (97.12, 0.32, "1803.02999v3", "Table 2"),
        ("mini-imagenet-5w1s", "reptile", "non-transductive"): (47.07, 0.26, "1803.02999v3", "Table 1"),
        ("mini-imagenet-5w5s", "reptile", "transductive"): (65.99, 0.58, "1803.02999v3", "Table 1"),
        ("omniglot-5w1s", "mamlpp", "transductive"): (99.47, None, "1810.09502", "Table 1"),
        ("mini-imagenet-5w5s", "mamlpp", "transductive"): (68.32, 0.44, "1810.09502", "Table 2"),
        ("omniglot-20w1s", "anil", "transductive"): (96.2, 0.5, "1909.09157", "Table 2"),
        ("mini-imagenet-5w1s", "metasgd", "transductive"): (50.47, 1.87, "1707.09835", "Table 1"),
        ("omniglot-20w1s", "metasgd", "transductive"): (95.93, 0.38, "1707.09835", "Table 1"),
        ("omniglot-5w1s", "protonet", "non-transductive"): (98.8, None, "1703.05175", "Table 1"),
        ("omniglot-20w5s", "protonet", "non-transductive"): (98.9, None, "1703.05175", "Table 1"),
        ("mini-imagenet-5w1s", "protonet", "non-transductive"): (49.42, 0.78, "1703.05175", "Table 2"),
        ("mini-imagenet-5w5s", "protonet", "non-transductive"): (68.20, 0.66, "1703.05175", "Table 2"),
        ("mini-imagenet-5w1s", "baseline", "non-transductive"): (42.11, 0.71, "1904.04232", "Table A5"),
        ("mini-imagenet-5w5s", "baseline", "non-transductive"): (62.53, 0.69, "1904.04232", "Table A5"),
        ("mini-imagenet-5w1s", "baseline++", "non-transductive"): (48.24, 0.75, "1904.04232", "Table A5"),
        ("mini-imagenet-5w5s", "baseline++", "non-transductive"): (66.43, 0.63, "1904.04232", "Table A5"),
    }
    for key, (mean, ci, arxiv, table) in expected.items():
        p = papers[key]
        assert (p.mean, p.ci95, p.arxiv, p.table) == (mean, ci, arxiv, table), key
    # Every benchmark x {MAML, FOMAML, Reptile} the issue asks for has at least one published number.
    for bench in ("omniglot-5w1s", "omniglot-5w5s", "omniglot-20w1s", "omniglot-20w5s", "mini-imagenet-5w1s",
                  "mini-imagenet-5w5s"):
        for algorithm in ("maml", "fomaml", "reptile"):
            assert any(k[0] == bench and k[1] == algorithm for k in papers), (bench, algorithm)


# -- golden files and table logic ---------------------------------------------------------------------------

def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("METABENCH_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.is_file(), f"{path} missing: run with METABENCH_UPDATE_GOLDEN=1 once"
    assert text == path.read_text(), f"{name} differs from {path} (METABENCH_UPDATE_GOLDEN=1 rewrites it)"


def test_golden_outputs(tmp_path: Path) -> None:
    write_fixture(tmp_path / "records")
    result = make_leaderboard(tmp_path / "records", tmp_path / "out")
    assert result.problems == [] and result.exit_status == 0
    md, csv_text, html = (p.read_text() for p in result.paths)
    _golden("leaderboard.md", md)
    _golden("leaderboard.csv", csv_text)

    # Same records (written again elsewhere) -> byte-identical files; no temp path leaks into them.
    write_fixture(tmp_path / "again")
    again = make_leaderboard(tmp_path / "again", tmp_path / "out2")
    for first, second in zip(result.paths, again.paths):
        assert first.read_bytes() == second.read_bytes()
    for text in (md, csv_text, html):
        assert str(tmp_path) not in text

    # HTML sanity: self-contained (nothing fetched), the summary first, two tables per table of rows (compared
    # columns and details), every row present.
    assert "<script src" not in html and "<link" not in html and "src=" not in html and "@import" not in html
    assert html.index('<table class="summary" id="summary">') < html.index('<table class="lb"')
    assert html.count('<table class="summary"') == 1
    assert html.count('<table class="lb"') == 2 * 4  # 3 benchmark tables + one "not comparable" table
    assert html.count("<svg") == 4 + 1  # a bar chart per table, one curve chart (omniglot transductive)
    assert "polyline" in html and "not comparable" in html
    # Curves are clipped to their plot box: every polyline names the clip path drawn with its chart.
    clips = re.findall(r'<clipPath id="([^"]+)"><rect x="50" y="24" width="460" height="220"/></clipPath>', html)
    lines = re.findall(r'<polyline [^>]*clip-path="url\(#([^)]+)\)"', html)
    assert clips and lines and html.count("<polyline") == len(lines) and set(lines) <= set(clips)


def test_sections_in_reading_order() -> None:
    """Paper benchmarks first, in the order paper_results.yaml names them (Omniglot, then mini-ImageNet), then
    synthetic (other classification), then segmentation; within a benchmark by batch-norm mode and queries."""
    scores = score_pattern(0.5, 40, 0.01, 5)
    records = [make_record("s", "maml", scores, benchmark="synthetic-5w1s", scheme=None),
               make_record("f", "maml", scores, benchmark="fss-1w5s", metric="fg_iou", scheme=None),
               make_record("m", "maml", scores, benchmark="mini-imagenet-5w1s", scheme=None),
               make_record("o20", "maml", scores, benchmark="omniglot-20w1s"),
               make_record("o15", "maml", scores, queries=15),
               make_record("o1", "maml", scores),
               make_record("ont", "maml", scores, bn_mode="non-transductive")]
    tables = build_tables([(f"{r.run_id}.json", r) for r in records], load_paper_results())
    assert [(t.benchmark, t.protocol) for t in tables] == [
        ("omniglot-5w1s", "non-transductive, 1 query/class"), ("omniglot-5w1s", "transductive, 1 query/class"),
        ("omniglot-5w1s", "transductive, 15 queries/class"), ("omniglot-20w1s", "transductive, 1 query/class"),
        ("mini-imagenet-5w1s", "transductive, 1 query/class"), ("synthetic-5w1s", "transductive, 1 query/class"),
        ("fss-1w5s", "transductive, 1 query/class")]
    # Without published numbers: classification, then the rest, each by name.
    assert [t.benchmark for t in build_tables([(f"{r.run_id}.json", r) for r in records[:4]])] == [
        "mini-imagenet-5w1s", "omniglot-20w1s", "synthetic-5w1s", "fss-1w5s"]


def test_table_logic_on_fixture() -> None:
    papers = load_paper_results()
    tables = {(t.benchmark, t.protocol): t for t in build_tables([(f"{r.run_id}.json", r)
                                                                  for r in fixture_records()], papers)}
    one = "1 query/class"
    assert sorted(tables) == [("fss-1w5s", f"transductive, {one}"), ("omniglot-5w1s", f"non-transductive, {one}"),
                              ("omniglot-5w1s", f"transductive, {one}")]
    omni = tables[("omniglot-5w1s", f"transductive, {one}")]
    assert omni.reference_digest == DIGEST_A  # 4 records against 1
    assert [r.algorithm for r in omni.rows] == ["maml", "fomaml", "reptile"]
    maml, fomaml, reptile = omni.rows
    assert maml.best and maml.tied and maml.seeds == [0, 1] and maml.runs == 2
    assert maml.mean == pytest.approx(0.9825, abs=1e-12)
    assert fomaml.tied and not fomaml.best and fomaml.test.p_value > 0.05
    assert not reptile.tied and reptile.test.p_value < 1e-6
    assert [r.digest for r in omni.other_rows] == [DIGEST_B]  # shown, never ranked
    assert omni.other_rows[0].test is None and not omni.other_rows[0].tied
    # MAML 98.25 vs 98.7 ± 0.4; FOMAML 97.75 vs 98.3 ± 0.5; Reptile 95.04 vs 97.68 ± 0.04.
    assert (maml.verdict, fomaml.verdict, reptile.verdict) == (OVERLAP, OVERLAP, BELOW)
    assert maml.delta == pytest.approx(98.25 - 98.7, abs=1e-9)
    # Unmatched numbers, by published mean: two of unknown test protocol, and MAML's MLP (not our backbone).
    assert [(r.algorithm, r.backbone) for r in omni.paper_rows] == [("metasgd", "conv4"), ("mamlpp", "conv4"),
                                                                   ("maml", "mlp")]
    assert omni.paper_rows[0].label == "metasgd (paper; split unknown, queries unknown)"
    non_t = tables[("omniglot-5w1s", f"non-transductive, {one}")]
    assert non_t.rows[0].paper.mean == 95.39 and non_t.rows[0].verdict == REPRODUCED
    # ProtoNet's Omniglot number (non-transductive, 15 queries per class) matches no row: listed as paper only
    assert [(r.algorithm, r.paper.mean) for r in non_t.paper_rows] == [("protonet", 98.8)]
    seg = tables[("fss-1w5s", f"transductive, {one}")]
    assert seg.metric == "fg_iou" and seg.extra_metrics == ["fb_iou", "miou"]
    assert seg.rows[1].test.method == "bootstrap" and not seg.rows[1].tied


def _paper_of(record: Record) -> PaperResult | None:
    [table] = build_tables([("r.json", record)], load_paper_results())
    return table.rows[0].paper


def test_paper_numbers_only_for_the_same_backbone_and_test_protocol() -> None:
    """A published cell judges a row only on its own network family and test protocol."""
    scores = score_pattern(0.9, 40, 0.01, 5)
    conv = _paper_of(make_record("c", "maml", scores))
    mlp = _paper_of(make_record("m", "maml", scores, backbone="mlp-omniglot"))
    assert (conv.backbone, conv.mean, mlp.backbone, mlp.mean) == ("conv4", 98.7, "mlp", 89.7)
    mlp5 = _paper_of(make_record("m5", "maml", scores, benchmark="omniglot-5w5s", backbone="mlp-omniglot",
                                 queries=5))
    assert mlp5.mean == 97.5
    assert _paper_of(make_record("q", "maml", scores, backbone="mlp-omniglot", queries=15)) is None  # 15 queries
    assert _paper_of(make_record("v", "maml", scores, scheme="vinyals")) is None  # another class split
    assert _paper_of(make_record("r", "reptile", scores, bn_mode="non-transductive", scheme="reptile")).mean == 95.39
    assert _paper_of(make_record("rm", "reptile", scores, bn_mode="non-transductive")) is None  # MAML's split
    assert _paper_of(make_record("r5", "reptile", scores, queries=5, bn_mode="non-transductive",
                                scheme="reptile")) is None
    # An MLP-only paper cell never lands on a conv row, even as context of another table.
    [table] = build_tables([("c.json", make_record("c", "maml", scores))], load_paper_results())
    assert table.rows[0].paper.backbone == "conv4"
    assert ("maml", "mlp", 89.7) in {(r.algorithm, r.backbone, r.paper.mean) for r in table.paper_rows}


# -- the command and bad input ----------------------------------------------------------------------------

def _dump(path: Path, data: Any) -> None:
    path.write_text(data if isinstance(data, str) else json.dumps(data))


def test_cli_bad_input_is_named_and_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = tmp_path / "records"
    paths = write_fixture(records)
    good = json.loads(paths[0].read_text())
    _dump(records / "aa-broken.json", "{not json")
    _dump(records / "ab-missing.json", {k: v for k, v in good.items() if k != "scores"})
    _dump(records / "ac-schema.json", {**good, "run_id": "other", "schema_version": SCHEMA_VERSION + 1})
    _dump(records / "ad-no-bn-mode.json", {**good, "run_id": "third", "config": {"model": {"backbone": "x"}}})
    _dump(records / "zz-duplicate.json", good)  # same run id as the fixture's first record, later in path order
    out = tmp_path / "out"
    status = cli.main(["leaderboard", "--records", str(records), "--out", str(out)])
    captured = capsys.readouterr()
    assert status == 1
    lines = [line for line in captured.err.splitlines() if line.startswith("metabench: skipped")]
    assert len(lines) == 5
    expect = {"aa-broken.json": "not readable as JSON", "ab-missing.json": "missing field(s) scores",
              "ac-schema.json": "schema version", "ad-no-bn-mode.json": "config has no algorithm.bn_mode",
              "zz-duplicate.json": f"already claimed by {paths[0].name}"}
    for name, words in expect.items():
        (line,) = [line for line in lines if f" {name}:" in line]
        assert words in line, line
    # The rest of the leaderboard is still produced, identical to the clean one apart from the skip list.
    md = (out / "LEADERBOARD.md").read_text()
    assert "## Skipped record files" in md and "zz-duplicate.json" in md
    assert (out / "leaderboard.csv").read_text() == (GOLDEN / "leaderboard.csv").read_text()
    assert (out / "leaderboard.html").is_file()


def test_cli_no_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert cli.main(["leaderboard", "--records", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no usable run records" in capsys.readouterr().err
    assert cli.main(["leaderboard", "--records", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_clean_run_exit_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_fixture(tmp_path / "records")
    assert cli.main(["leaderboard", "--records", str(tmp_path / "records"), "--out", str(tmp_path / "o")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "o" / n) for n in
                                               ("LEADERBOARD.md", "leaderboard.csv", "leaderboard.html")]
