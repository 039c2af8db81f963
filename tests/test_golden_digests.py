"""The committed golden digests name the standard benchmarks' test sets; they must never drift.

A failure here means the test episodes of a published benchmark changed (a reader's ordering, a split, the
episode generator): every record made before is then incomparable with records made after.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources

import pytest

from metabench.datasets.episodes import EpisodeSampler, EpisodeSpec
from metabench.datasets.registry import get_dataset

GOLDEN = json.loads((resources.files("metabench") / "golden" / "digests.json").read_text())["digests"]


def _load(entry: dict, data_root, cache_dir):
    info = get_dataset(entry["dataset"])
    if info.needs_root:
        return info.load(entry["split"], root=data_root, cache_dir=cache_dir, **entry["options"])
    return info.load(entry["split"], **entry["options"])


def test_golden_set_covers_the_standard_benchmarks() -> None:
    keys = {(e["dataset"], e["ways"], e["shots"]) for e in GOLDEN}
    assert {("omniglot", 5, 1), ("omniglot", 5, 5), ("omniglot", 20, 1), ("omniglot", 20, 5),
            ("mini-imagenet", 5, 1), ("mini-imagenet", 5, 5), ("synthetic-glyphs", 5, 1)} <= keys


@pytest.mark.parametrize("entry", GOLDEN, ids=lambda e: f"{e['dataset']}-{e['ways']}w{e['shots']}s")
def test_golden_digest(entry: dict, data_root, cache_dir) -> None:
    split = _load(entry, data_root, cache_dir)
    assert split.name == entry["split_name"]
    sampler = EpisodeSampler(split, EpisodeSpec(entry["ways"], entry["shots"], entry["queries"]))
    assert sampler.digest(entry["seed"], entry["episodes"]) == entry["digest"]


def test_cli_digest_in_a_separate_process_matches_golden(data_root, cache_dir) -> None:
    entry = next(e for e in GOLDEN if e["dataset"] == "omniglot" and e["ways"] == 5 and e["shots"] == 1)
    out = subprocess.run([sys.executable, "-m", "metabench.cli", "episodes", "digest", "omniglot", "--ways", "5",
                          "--shots", "1", "--split", "test", "--root", str(data_root), "--cache-dir", str(cache_dir)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == entry["digest"]
