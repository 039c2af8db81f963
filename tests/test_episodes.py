"""Episode sampling: invariants, determinism, digests, clear errors (on a tiny in-memory split)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metabench.datasets.base import DatasetError, ImageSplit
from metabench.datasets.episodes import EpisodeSampler, EpisodeSpec, _CounterRng, episode_digest


def toy_split(counts: list[int], name: str = "toy/test") -> ImageSplit:
    """Each image's single pixel value encodes its row, so gathered tensors can be traced back."""
    n = sum(counts)
    images = torch.arange(n, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(n, 1, 1, 1).expand(n, 1, 2, 2)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return ImageSplit(name, images.contiguous(), offsets, tuple(f"class{k}" for k in range(len(counts))),
                      tuple(f"img{i}" for i in range(n)))


def check_invariants(sampler: EpisodeSampler, indices) -> None:
    spec, split = sampler.spec, sampler.split
    tasks = len(indices)
    assert indices.classes.shape == (tasks, spec.ways)
    assert indices.support.shape == (tasks, spec.ways * spec.shots)
    assert indices.query.shape == (tasks, spec.ways * spec.queries)
    labels = split.labels.numpy()
    for t in range(tasks):
        assert len(set(indices.classes[t])) == spec.ways  # distinct classes
        assert not set(indices.support[t]) & set(indices.query[t])  # support and query disjoint
        assert len(set(indices.support[t])) == spec.ways * spec.shots
        assert len(set(indices.query[t])) == spec.ways * spec.queries
        for label, cls in enumerate(indices.classes[t]):  # label-major rows, each from its class
            assert (labels[indices.support[t, label * spec.shots:(label + 1) * spec.shots]] == cls).all()
            assert (labels[indices.query[t, label * spec.queries:(label + 1) * spec.queries]] == cls).all()


@settings(max_examples=40, deadline=None)
@given(ways=st.integers(1, 6), shots=st.integers(1, 4), queries=st.integers(1, 4),
       extra=st.lists(st.integers(0, 5), min_size=6, max_size=12), seed=st.integers(0, 2**32 - 1))
def test_episode_invariants_property(ways: int, shots: int, queries: int, extra: list[int], seed: int) -> None:
    split = toy_split([shots + queries + e for e in extra])
    sampler = EpisodeSampler(split, EpisodeSpec(ways, shots, queries))
    check_invariants(sampler, sampler.sample(np.random.default_rng(seed), 7))
    check_invariants(sampler, sampler.fixed(seed % 1000, 5))


def test_gather_shapes_labels_and_pixels() -> None:
    split = toy_split([20] * 12)
    spec = EpisodeSpec(5, 2, 3)
    sampler = EpisodeSampler(split, spec)
    indices = sampler.sample(np.random.default_rng(1), 4)
    batch = sampler.gather(indices)
    assert batch.support_x.shape == (4, 10, 1, 2, 2) and batch.query_x.shape == (4, 15, 1, 2, 2)
    assert batch.support_x.dtype == torch.uint8
    assert batch.support_y.tolist()[0] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert batch.query_y.tolist()[2] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    # pixel value = row % 256, so the gathered image is the indexed one
    assert torch.equal(batch.support_x[:, :, 0, 0, 0].long(), torch.as_tensor(indices.support) % 256)
    assert batch.classes.tolist() == indices.classes.tolist()


def test_labels_are_a_random_order_of_classes() -> None:
    """Label 0 must not always go to the smallest class index (labels are remapped in random order)."""
    sampler = EpisodeSampler(toy_split([5] * 10), EpisodeSpec(3, 1, 1))
    classes = sampler.sample(np.random.default_rng(0), 500).classes
    assert (np.diff(classes, axis=1) < 0).any() and (np.diff(classes, axis=1) > 0).any()
    # each class lands on each label about equally often: 500 * 3 / 10 / 3 = 50 per (class, label)
    counts = np.zeros((10, 3))
    for label in range(3):
        counts[:, label] = np.bincount(classes[:, label], minlength=10)
    assert counts.min() > 25 and counts.max() < 80


def test_training_episodes_repeat_per_seed_and_differ_across_seeds() -> None:
    sampler = EpisodeSampler(toy_split([20] * 30), EpisodeSpec(5, 1, 5))
    a = sampler.sample(np.random.default_rng(7), 8)
    b = sampler.sample(np.random.default_rng(7), 8)
    c = sampler.sample(np.random.default_rng(8), 8)
    assert np.array_equal(a.support, b.support) and np.array_equal(a.query, b.query)
    assert not np.array_equal(a.support, c.support)


def test_fixed_episodes_are_pure_functions_of_index() -> None:
    sampler = EpisodeSampler(toy_split([20] * 30), EpisodeSpec(5, 1, 5))
    all_ = sampler.fixed(0, 10)
    part = EpisodeSampler(toy_split([20] * 30), EpisodeSpec(5, 1, 5)).fixed(0, 3, start=4)
    assert np.array_equal(all_.support[4:7], part.support) and np.array_equal(all_.classes[4:7], part.classes)
    assert not np.array_equal(sampler.fixed(1, 10).classes, all_.classes)
    assert sampler.digest(0, 10) != sampler.digest(1, 10)
    assert sampler.digest(0, 10) != sampler.digest(0, 9)


def test_digest_depends_on_identities_not_objects() -> None:
    spec = EpisodeSpec(2, 1, 1)
    a = EpisodeSampler(toy_split([3] * 4, "toy/a"), spec)
    b = EpisodeSampler(toy_split([3] * 4, "toy/a"), spec)
    assert a.digest(0, 5) == b.digest(0, 5)
    renamed = toy_split([3] * 4, "toy/a")
    renamed = ImageSplit(renamed.name, renamed.images, renamed.offsets, renamed.class_names,
                         ("other",) + renamed.image_ids[1:])
    # a changed image identity changes the digest iff that image is used
    used = set(a.fixed(0, 5).support.ravel()) | set(a.fixed(0, 5).query.ravel())
    assert (episode_digest(renamed, spec, a.fixed(0, 5)) != a.digest(0, 5)) == (0 in used)


def test_counter_rng_is_uniform_and_pinned() -> None:
    rng = _CounterRng("metabench-test")
    draws = [rng.below(6) for _ in range(6000)]
    assert np.bincount(draws, minlength=6).min() > 900
    # pinned values: a change of the generator would silently change every benchmark's test episodes
    assert _CounterRng("metabench-test").sample(100, 5) == _CounterRng("metabench-test").sample(100, 5)
    assert _CounterRng("pin").sample(10, 10) == PINNED_SAMPLE


PINNED_SAMPLE = [2, 4, 6, 7, 5, 0, 9, 3, 8, 1]


def test_digest_is_identical_in_a_separate_process() -> None:
    code = ("from tests.test_episodes import toy_split;"
            "from metabench.datasets.episodes import EpisodeSampler, EpisodeSpec;"
            "print(EpisodeSampler(toy_split([20] * 30), EpisodeSpec(5, 1, 5)).digest(3, 20))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    here = EpisodeSampler(toy_split([20] * 30), EpisodeSpec(5, 1, 5)).digest(3, 20)
    assert out.stdout.strip() == here


@pytest.mark.parametrize("spec, message", [
    ((6, 1, 1), "6-way episodes need 6 classes, the split has 5"),
    ((2, 3, 3), "class 'class1' has 4 images, fewer than shots + queries = 3 + 3 = 6"),
])
def test_impossible_requests_fail_at_construction(spec, message) -> None:
    with pytest.raises(DatasetError, match=message.replace("+", r"\+")):
        EpisodeSampler(toy_split([6, 4, 6, 6, 6]), EpisodeSpec(*spec))


@pytest.mark.parametrize("bad", [(0, 1, 1), (5, -1, 1), (5, 1, 0), (5, 1.5, 1), (True, 1, 1)])
def test_non_positive_sizes_rejected(bad) -> None:
    with pytest.raises(DatasetError, match="must be a positive integer"):
        EpisodeSpec(*bad)
