"""The data and episode commands of the `metabench` CLI, as a user types them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from metabench.cli import main


def test_preview_draws_one_row_per_class(tmp_path: Path, data_root: Path, cache_dir: Path) -> None:
    out = tmp_path / "grid.png"
    code = main(["episodes", "preview", "omniglot", "--ways", "5", "--shots", "1", "--queries", "3",
                 "--root", str(data_root), "--cache-dir", str(cache_dir), "--out", str(out)])
    assert code == 0
    image = Image.open(out)
    # make_grid: 28 px tiles + 2 px padding; 1 shot + 1 gap + 3 queries per row, 5 rows
    assert image.size == (5 * 30 + 2, 5 * 30 + 2)
    pixels = np.asarray(image.convert("L"))
    assert pixels.min() < 50 and pixels.max() > 200  # real strokes on a light background


def test_data_verify_omniglot_reports_ok(data_root: Path, capsys) -> None:
    assert main(["data", "verify", "omniglot", "--root", str(data_root)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["problems"] == []


def test_data_prepare_then_digest(tmp_path: Path, data_root: Path, cache_dir: Path, capsys) -> None:
    assert main(["data", "prepare", "omniglot", "--root", str(data_root), "--cache-dir", str(cache_dir),
                 "--split", "test"]) == 0
    assert "omniglot/vinyals/test: 1692 classes, 33840 images" in capsys.readouterr().out
    assert main(["episodes", "digest", "synthetic-glyphs", "--count", "5", "--option", "num_classes=20"]) == 0
    first = capsys.readouterr().out.strip()
    assert main(["episodes", "digest", "synthetic-glyphs", "--count", "5", "--option", "num_classes=20",
                 "--seed", "1"]) == 0
    assert len(first) == 64 and capsys.readouterr().out.strip() != first


def test_bad_input_gives_one_clear_line(tmp_path: Path) -> None:
    cases = [
        (["episodes", "digest", "omniglot", "--root", str(tmp_path / "missing")], "does not exist"),
        (["episodes", "digest", "synthetic-glyphs", "--ways", "300", "--option", "num_classes=20"],
         "300-way episodes need 300 classes"),
        (["episodes", "digest", "synthetic-glyphs", "--split", "nope"], "unknown split 'nope'"),
        (["episodes", "digest", "imagenet-21k"], "unknown dataset 'imagenet-21k'"),
        (["data", "download", "mini-imagenet", "--root", str(tmp_path)], "mini-imagenet"),
    ]
    for argv, message in cases:
        out = subprocess.run([sys.executable, "-m", "metabench.cli", *argv], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 2, (argv, out.stderr[-500:])
        assert message in out.stderr and "Traceback" not in out.stderr, (argv, out.stderr[-500:])


def test_run_and_grid_share_one_table_of_flags() -> None:
    """The flags `metabench run` and `metabench grid` share come from cli.RUN_FLAGS, which are the options a grid
    file may give and the grid passes to each cell (metabench.run.grid.RUN_OPTIONS)."""
    from metabench.cli import RUN_FLAGS, build_parser
    from metabench.run.grid import RUN_OPTIONS

    assert {f.dest: f.flag for f in RUN_FLAGS} == RUN_OPTIONS
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    grid = next(a for a in sub["grid"]._actions if a.dest == "grid_command").choices
    for parser, wanted in ((sub["run"], RUN_FLAGS), (grid["run"], RUN_FLAGS), (grid["sweep"], RUN_FLAGS),
                           (sub["test"], [f for f in RUN_FLAGS if f.test])):
        flags = {s for a in parser._actions for s in a.option_strings}
        assert {f.flag for f in wanted} <= flags
    assert "--max-steps" not in {s for a in sub["test"]._actions for s in a.option_strings}
