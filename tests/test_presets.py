"""Benchmark presets: every benchmark x algorithm resolves, cites its source, and carries the published numbers;
overrides and config files layer on top; bad input fails with a ConfigError that names the problem."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from metabench.datasets.omniglot import DRAWINGS
from metabench.models.learners import algorithm_names, algorithms_that, learner_class
from metabench.run.config import (
    AlgorithmConfig,
    ConfigError,
    list_benchmarks,
    preset_algorithms,
    preset_path,
    resolve,
)

PAPER_BENCHMARKS = ("omniglot-5w1s", "omniglot-5w5s", "omniglot-20w1s", "omniglot-20w5s",
                    "mini-imagenet-5w1s", "mini-imagenet-5w5s")
MAML_ARXIV, REPTILE_ARXIV = "1703.03400", "1803.02999"
ANIL_ARXIV, METASGD_ARXIV = "1909.09157", "1707.09835"
META_LEARNERS = ("maml", "fomaml", "reptile")  # every benchmark defines these; "transfer" only 1-way segmentation
# every classification benchmark defines these too (the segmentation presets do not, yet)
CLASSIFICATION_ALGORITHMS = algorithms_that("inner_loop")
PROTONET_ARXIV, CHEN_ARXIV = "1703.05175", "1904.04232"


def test_paper_benchmarks_are_listed() -> None:
    assert set(PAPER_BENCHMARKS) <= set(list_benchmarks())


@pytest.mark.parametrize(("benchmark", "algorithm"),
                         [(b, a) for b in list_benchmarks() for a in preset_algorithms(b)])
def test_every_benchmark_and_algorithm_resolves_with_a_source(benchmark: str, algorithm: str) -> None:
    assert set(META_LEARNERS) <= set(preset_algorithms(benchmark))
    config = resolve(benchmark, algorithm)
    assert config.benchmark == benchmark
    assert config.algorithm.name == algorithm
    assert config.algorithm.source.strip(), f"{benchmark}/{algorithm} has no source"
    assert config.algorithm.inner_optimizer in ("sgd", "adam")
    assert config.algorithm.bn_mode in ("transductive", "non-transductive")
    assert config.to_dict()["algorithm"]["source"] == config.algorithm.source  # the record carries it


@pytest.mark.parametrize("benchmark", PAPER_BENCHMARKS)
def test_paper_preset_is_default_and_cites_the_papers(benchmark: str) -> None:
    for algorithm in META_LEARNERS:
        config = resolve(benchmark, algorithm)
        assert config.preset == "paper"
        assert config == resolve(benchmark, algorithm, "paper")
        arxiv = REPTILE_ARXIV if algorithm == "reptile" else MAML_ARXIV
        assert arxiv in config.algorithm.source
        assert re.search(r"(App\.|Sec\.|Table)", config.algorithm.source)  # a section, table or appendix


@pytest.mark.parametrize("benchmark", (*PAPER_BENCHMARKS, "synthetic-5w1s"))
def test_classification_presets_define_the_maml_family_and_the_baselines(benchmark: str) -> None:
    """The MAML family and ProtoNet everywhere; Baseline / Baseline++ where their paper has numbers (mini-ImageNet)
    and on the synthetic benchmark."""
    baselines = ["baseline", "baseline++"] if benchmark.startswith(("mini-imagenet", "synthetic")) else []
    assert preset_algorithms(benchmark) == [*CLASSIFICATION_ALGORITHMS, "protonet", *baselines]


@pytest.mark.parametrize("benchmark", PAPER_BENCHMARKS)
def test_protonet_preset_is_the_papers_protocol(benchmark: str) -> None:
    """Snell et al. 2017 Sec. 3.1 / 3.2 and the authors' code: Conv4 with max-pooling and 64 filters, Adam 1e-3 halved
    every 2000 episodes, one episode per step, higher-way training episodes with the test shot, the code's stopping
    rule; tested non-transductively (running statistics in the code)."""
    config = resolve(benchmark, "protonet")
    a, e = config.algorithm, config.episodes
    assert PROTONET_ARXIV in a.source and "Sec. 3" in a.source
    assert (a.meta_batch, a.meta_lr, a.lr_decay_every, a.lr_decay_factor, a.patience) == (1, 1e-3, 2000, 0.5, 200)
    assert a.bn_mode == "non-transductive"
    assert config.model.backbone == "conv4" and config.model.options == {"hidden": 64, "pool": True}
    omniglot = benchmark.startswith("omniglot")
    expected_ways = 60 if omniglot else (30 if e.shots == 1 else 20)
    assert (e.train_ways, e.train_shots, e.train_queries) == (expected_ways, None, 5 if omniglot else 15)
    assert (config.trainer.max_steps, config.trainer.val_every, e.val_episodes) == (1_000_000, 100, 100)
    if omniglot:
        assert config.data.options == {"scheme": "vinyals"} and config.model.invert is True
        assert e.shots + e.train_queries <= DRAWINGS


@pytest.mark.parametrize("benchmark", ["mini-imagenet-5w1s", "mini-imagenet-5w5s"])
@pytest.mark.parametrize("algorithm", ["baseline", "baseline++"])
def test_baseline_presets_are_the_papers_protocol(benchmark: str, algorithm: str) -> None:
    """Chen et al. 2019 Sec. 4.1 and the authors' code: Conv-4, Adam 1e-3, batches of 16 with augmentation, 400 epochs
    of the 38,400 training images, a 200-way pre-training classifier; the authors' fine-tuning recipe."""
    config = resolve(benchmark, algorithm)
    a = config.algorithm
    assert CHEN_ARXIV in a.source and "Sec. 4.1" in a.source
    assert (a.meta_lr, a.pretrain.batch_size, a.pretrain.classes, a.pretrain.augment) == (1e-3, 16, 200, True)
    assert config.trainer.max_steps == 400 * 38_400 // 16
    f = a.finetune
    assert (f.epochs, f.batch_size, f.lr, f.momentum, f.dampening, f.weight_decay) == (100, 4, 0.01, 0.9, 0.9, 0.001)
    assert a.bn_mode == "non-transductive" and a.cosine_scale is None  # the code's rule: 2 for <= 200 classes
    assert config.model.backbone == "conv4" and config.model.options == {"hidden": 64, "pool": True}


@pytest.mark.parametrize("benchmark", PAPER_BENCHMARKS)
def test_anil_and_metasgd_cite_their_papers_and_otherwise_use_maml_values(benchmark: str) -> None:
    """Their papers' text established only the algorithm (ANIL: head-only inner loop; Meta-SGD: learned rates,
    one step); every other value is MAML's for the benchmark, and the source says so."""
    maml, anil, metasgd = (resolve(benchmark, a) for a in ("maml", "anil", "metasgd"))
    assert ANIL_ARXIV in anil.algorithm.source and METASGD_ARXIV in metasgd.algorithm.source
    for config in (anil, metasgd):
        assert config.preset == "paper" and learner_class(config.algorithm.name).capabilities.second_order
        assert MAML_ARXIV in config.algorithm.source and "Abstract" in config.algorithm.source
        assert (config.episodes, config.trainer, config.model, config.data) == \
            (maml.episodes, maml.trainer, maml.model, maml.data)
    assert anil.algorithm.adapt == ["head"]
    assert dataclasses.replace(anil.algorithm, name="maml", source="", adapt=None) == \
        dataclasses.replace(maml.algorithm, source="")
    assert (metasgd.algorithm.inner_steps, metasgd.algorithm.eval_steps, metasgd.algorithm.eval_lr) == (1, 1, None)
    assert dataclasses.replace(metasgd.algorithm, name="maml", source="", inner_steps=maml.algorithm.inner_steps,
                               eval_steps=maml.algorithm.eval_steps) == dataclasses.replace(maml.algorithm, source="")


@pytest.mark.parametrize("benchmark", PAPER_BENCHMARKS)
def test_fixed_part_matches_the_protocol(benchmark: str) -> None:
    config = resolve(benchmark, "maml")
    ways, shots = (int(n) for n in re.fullmatch(r".*-(\d+)w(\d+)s", benchmark).groups())
    e = config.episodes
    assert (e.ways, e.shots, e.queries, e.val_episodes, e.test_episodes, e.eval_seed) == (ways, shots, 15, 100, 600, 0)
    if benchmark.startswith("omniglot"):
        # MAML's own class split and head init, so that the number compares with Finn et al.'s (preset comments)
        assert config.data.name == "omniglot" and config.data.options == {"scheme": "maml"}
        assert config.model.options["head_init_std"] == 1.0
        assert config.model.backbone == "conv4-omniglot" and config.model.invert is True
        assert config.model.options.get("hidden", 64) == 64
    else:
        assert config.data.name == "mini-imagenet"
        assert config.model.backbone == "conv4-miniimagenet" and config.model.invert is False
        assert config.model.options.get("hidden", 32) == 32


@pytest.mark.parametrize("algorithm", META_LEARNERS)
@pytest.mark.parametrize("benchmark", [b for b in PAPER_BENCHMARKS if b.startswith("omniglot")])
def test_omniglot_episodes_fit_in_twenty_drawings(benchmark: str, algorithm: str) -> None:
    e = resolve(benchmark, algorithm).episodes
    assert e.shots + e.queries <= DRAWINGS
    assert (e.train_shots or e.shots) + (e.train_queries or e.queries) <= DRAWINGS


# (benchmark, algorithm) -> published values; MAML: Finn et al. 2017 App. A.1, Reptile: Nichol et al. 2018 App. A
# and the openai/supervised-reptile README commands.
PUBLISHED = {
    ("omniglot-5w1s", "maml"): dict(meta_batch=32, inner_steps=1, inner_lr=0.4, eval_steps=3, meta_lr=1e-3),
    ("omniglot-5w5s", "maml"): dict(meta_batch=32, inner_steps=1, inner_lr=0.4, eval_steps=3, meta_lr=1e-3),
    ("omniglot-20w1s", "maml"): dict(meta_batch=16, inner_steps=5, inner_lr=0.1, eval_steps=5, meta_lr=1e-3),
    ("omniglot-20w5s", "maml"): dict(meta_batch=16, inner_steps=5, inner_lr=0.1, eval_steps=5, meta_lr=1e-3),
    ("mini-imagenet-5w1s", "maml"): dict(meta_batch=4, inner_steps=5, inner_lr=0.01, eval_steps=10, meta_lr=1e-3),
    ("mini-imagenet-5w5s", "maml"): dict(meta_batch=2, inner_steps=5, inner_lr=0.01, eval_steps=10, meta_lr=1e-3),
    ("omniglot-5w1s", "reptile"): dict(meta_batch=5, inner_steps=5, inner_lr=0.001, eval_steps=50),
    ("omniglot-5w5s", "reptile"): dict(meta_batch=5, inner_steps=5, inner_lr=0.001, eval_steps=50),
    ("omniglot-20w1s", "reptile"): dict(meta_batch=5, inner_steps=10, inner_lr=0.0005, eval_steps=50),
    ("omniglot-20w5s", "reptile"): dict(meta_batch=5, inner_steps=10, inner_lr=0.0005, eval_steps=50),
    ("mini-imagenet-5w1s", "reptile"): dict(meta_batch=5, inner_steps=8, inner_lr=0.001, eval_steps=50),
    ("mini-imagenet-5w5s", "reptile"): dict(meta_batch=5, inner_steps=8, inner_lr=0.001, eval_steps=50),
}


@pytest.mark.parametrize(("benchmark", "algorithm"), sorted(PUBLISHED))
def test_published_numbers(benchmark: str, algorithm: str) -> None:
    config = resolve(benchmark, algorithm)
    got = {key: getattr(config.algorithm, key) for key in PUBLISHED[benchmark, algorithm]}
    assert got == pytest.approx(PUBLISHED[benchmark, algorithm])
    assert config.algorithm.eval_lr is None  # both papers evaluate with the training step size


@pytest.mark.parametrize("benchmark", PAPER_BENCHMARKS)
def test_maml_protocol_sgd_inner_adam_outer_60k(benchmark: str) -> None:
    config = resolve(benchmark, "maml")
    assert config.algorithm.inner_optimizer == "sgd"
    assert config.algorithm.bn_mode == "transductive"
    assert config.algorithm.meta_lr_final is None
    assert config.trainer.max_steps == 60000
    # Omniglot: the MAML code trains on K query images per class; mini-ImageNet: 15 ("Following Ravi & Larochelle")
    expected_train_queries = config.episodes.shots if benchmark.startswith("omniglot") else None
    assert config.episodes.train_queries == expected_train_queries
    assert config.episodes.train_shots is None


@pytest.mark.parametrize("benchmark", PAPER_BENCHMARKS)
def test_fomaml_uses_maml_hyper_parameters(benchmark: str) -> None:
    maml, fomaml = resolve(benchmark, "maml"), resolve(benchmark, "fomaml")
    assert not learner_class("fomaml").capabilities.second_order and learner_class("maml").capabilities.second_order
    assert dataclasses.replace(fomaml.algorithm, name="maml", source="") == \
        dataclasses.replace(maml.algorithm, source="")
    assert (fomaml.episodes, fomaml.trainer) == (maml.episodes, maml.trainer)


@pytest.mark.parametrize("benchmark", PAPER_BENCHMARKS)
def test_reptile_protocol(benchmark: str) -> None:
    config = resolve(benchmark, "reptile")
    a = config.algorithm
    assert (a.inner_optimizer, a.meta_lr, a.meta_lr_final, a.bn_mode) == ("adam", 1.0, 0.0, "transductive")
    assert config.episodes.train_shots == (15 if benchmark.startswith("mini-imagenet") else 10)
    assert config.trainer.max_steps == (200000 if "-20w" in benchmark else 100000)


def test_maml_and_reptile_keep_separate_trainer_lengths() -> None:
    """An algorithm's ``trainer`` block must not leak into another algorithm of the same benchmark."""
    assert resolve("omniglot-5w1s", "reptile").trainer.max_steps == 100000
    assert resolve("omniglot-5w1s", "maml").trainer.max_steps == 60000


# ---- overrides and config files --------------------------------------------------------------------------


def test_override_inner_lr() -> None:
    config = resolve("omniglot-5w1s", "maml", overrides=["algorithm.inner_lr=0.1"])
    assert config.algorithm.inner_lr == 0.1
    assert config.algorithm.meta_batch == 32  # the rest of the preset is untouched


def test_overrides_parse_yaml_scalars_and_widen_ints_to_floats() -> None:
    config = resolve("mini-imagenet-5w1s", "reptile",
                     overrides=["algorithm.meta_lr=1", "trainer.max_steps=7", "algorithm.bn_mode=non-transductive",
                                "episodes.train_queries=2", "model.invert=true"])
    assert config.algorithm.meta_lr == 1.0 and isinstance(config.algorithm.meta_lr, float)
    assert config.trainer.max_steps == 7
    assert config.algorithm.bn_mode == "non-transductive"
    assert config.episodes.train_queries == 2 and config.episodes.train_shots == 15
    assert config.model.invert is True


def test_config_file_sits_between_preset_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"algorithm": {"meta_batch": 2, "inner_lr": 0.2},
                                    "trainer": {"max_steps": 5}, "data": {"root": "/some/where"}}))
    config = resolve("omniglot-20w1s", "maml", config_file=path, overrides=["algorithm.inner_lr=0.3"])
    assert config.algorithm.meta_batch == 2  # file beats preset
    assert config.algorithm.inner_lr == 0.3  # override beats file
    assert config.trainer.max_steps == 5
    assert config.data.root == "/some/where"
    assert config.data.options == {"scheme": "maml"}  # merged, not replaced
    assert config.algorithm.inner_steps == 5  # preset value survives


def test_empty_config_file_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert resolve("omniglot-5w5s", "reptile", config_file=path) == resolve("omniglot-5w5s", "reptile")


# ---- errors -----------------------------------------------------------------------------------------------


def test_unknown_key_names_it_and_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) algorithm\.inner_lrr") as info:
        resolve("omniglot-5w1s", "maml", overrides=["algorithm.inner_lrr=0.1"])
    assert "inner_lr" in str(info.value).split("valid under", 1)[1]


def test_unknown_section_in_config_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("optimizer: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) optimizer"):
        resolve("omniglot-5w1s", "maml", config_file=path)


def test_config_file_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        resolve("omniglot-5w1s", "maml", config_file=path)


@pytest.mark.parametrize(("override", "message"), [
    ("algorithm.meta_batch=many", r"algorithm\.meta_batch: expected an integer, got 'many'"),
    ("algorithm.meta_batch=2.5", r"algorithm\.meta_batch: expected an integer, got 2\.5"),
    ("algorithm.meta_batch=true", r"algorithm\.meta_batch: expected an integer, got True"),
    ("algorithm.inner_lr=fast", r"algorithm\.inner_lr: expected a number, got 'fast'"),
    ("model.invert=1", r"model\.invert: expected true/false, got 1"),
    ("algorithm.inner_optimizer=3", r"algorithm\.inner_optimizer: expected a string, got 3"),
    ("data.options=vinyals", r"data\.options: expected a mapping, got 'vinyals'"),
    ("trainer=5", r"trainer\.?: expected a mapping, got 5"),  # config.py prints "trainer.:"
])
def test_wrong_types_are_named(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve("omniglot-5w1s", "maml", overrides=[override])


@pytest.mark.parametrize(("override", "message"), [
    ("algorithm.bn_mode=sometimes", r"algorithm\.bn_mode must be one of transductive, non-transductive"),
    ("algorithm.inner_optimizer=rmsprop", r"algorithm\.inner_optimizer must be one of"),
    ("algorithm.meta_batch=0", r"algorithm\.meta_batch must be positive, got 0"),
    ("algorithm.inner_lr=-0.4", r"algorithm\.inner_lr must be positive, got -0\.4"),
])
def test_invalid_values_are_named(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"omniglot-5w1s/maml: " + message):
        resolve("omniglot-5w1s", "maml", overrides=[override])


@pytest.mark.parametrize("override", ["episodes.train_shots=abc", "algorithm.eval_lr=fast",
                                      "algorithm.meta_lr_final=[1]"])
def test_optional_fields_are_type_checked(override: str) -> None:
    with pytest.raises(ConfigError):
        resolve("omniglot-5w1s", "reptile", overrides=[override])


def test_malformed_override() -> None:
    with pytest.raises(ConfigError, match="not of the form key.path=value"):
        resolve("omniglot-5w1s", "maml", overrides=["algorithm.inner_lr"])


def test_algorithm_name_cannot_be_overridden() -> None:
    with pytest.raises(ConfigError, match="algorithm.name cannot be overridden"):
        resolve("omniglot-5w1s", "maml", overrides=["algorithm.name=reptile"])


def test_unknown_benchmark_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown benchmark 'omniglot-5w2s'; known: .*omniglot-5w1s"):
        resolve("omniglot-5w2s", "maml")


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"benchmark 'mini-imagenet-5w1s' has no preset 'fast'; known: paper"):
        resolve("mini-imagenet-5w1s", "maml", preset="fast")


def test_unknown_algorithm() -> None:
    with pytest.raises(ConfigError, match=r"unknown algorithm 'matchingnet'; known: maml, fomaml, anil, metasgd, "
                                          r"mamlpp, reptile, transfer, protonet, baseline, baseline\+\+"):
        resolve("omniglot-5w1s", "matchingnet")


def test_preset_entries_use_only_algorithm_fields_and_sections() -> None:
    """Guards the YAML itself: a typo in a preset would otherwise only surface when someone runs it."""
    sections = {"trainer", "episodes", "model", "data"}
    allowed = {f.name for f in dataclasses.fields(AlgorithmConfig)} - {"name"} | sections
    presets_dir = preset_path(PAPER_BENCHMARKS[0]).parent  # benchmarks/presets
    for benchmark in PAPER_BENCHMARKS:
        spec = yaml.safe_load((presets_dir / f"{benchmark}.yaml").read_text())
        assert spec["default_preset"] == "paper"
        assert "paper" in spec["presets"] and set(spec["presets"]) <= {"paper", "paper-mlp"}
        for preset, entries in spec["presets"].items():
            for algorithm, entry in entries.items():
                assert algorithm in algorithm_names()
                assert set(entry) <= allowed, f"{benchmark}/{preset}/{algorithm}: {sorted(set(entry) - allowed)}"


@pytest.mark.parametrize("benchmark", PAPER_BENCHMARKS)
def test_batch_norm_is_the_authors_codes(benchmark: str) -> None:
    """MAML's code: tf.contrib.layers.batch_norm defaults (offset only, epsilon 1e-3), offsets not adapted in the
    inner loop; Reptile's: tf.layers.batch_normalization defaults (scale and offset, epsilon 1e-3), all adapted."""
    for algorithm in ("maml", "fomaml", "anil", "metasgd"):
        config = resolve(benchmark, algorithm, "paper")
        assert config.model.options["norm_scale"] is False and config.model.options["norm_eps"] == 0.001
        assert config.algorithm.adapt_norm is False
    reptile = resolve(benchmark, "reptile", "paper")
    assert reptile.model.options["norm_eps"] == 0.001 and "norm_scale" not in reptile.model.options
    assert reptile.algorithm.adapt_norm is True
