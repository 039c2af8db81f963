"""The registries: learners, backbones and datasets by name, from metabench, from installed plug-ins (entry points)
and from ``package.module:attr`` references; every registered learner describes itself, and every registered
backbone honours the written contract, its engines' meta-gradients equal to the sequential reference in float64."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metabench.core.registry import Registry, RegistryError, import_reference
from metabench.datasets.base import DatasetError
from metabench.datasets.registry import DATASETS, get_dataset
from metabench.models.algorithms import LEARNERS, MetaLearner
from metabench.models.backbones import BACKBONES, Backbone, build_backbone, check_backbone
from metabench.models.hparams import AlgorithmConfig, Capabilities
from metabench.models.inner_loop import InnerConfig, meta_loss, supports_batched, supports_fused
from metabench.models.learners import algorithm_config, algorithm_names, build_algorithm, learner_class
from metabench.models.problems import Classification
from metabench.run.config import ConfigError, resolve
from tests.helpers import rel_err, write_distribution

BUILTIN = ["maml", "fomaml", "anil", "metasgd", "mamlpp", "reptile", "transfer", "protonet", "baseline",
           "baseline++"]


# -- the registry itself -------------------------------------------------------------------------------------


def test_registry_resolves_registrations_entry_points_and_references(tmp_path, monkeypatch) -> None:
    registry: Registry[object] = Registry("widget", "metabench_test.widgets")
    registry.register("one", 1)
    assert registry.get("one") == 1 and "one" in registry and list(registry) == ["one"]
    with pytest.raises(RegistryError, match="registered twice"):
        registry.register("one", 2)
    (tmp_path / "widget_pkg.py").write_text("TWO = 2\nclass Box:\n    THREE = 3\n")
    write_distribution(tmp_path, "widget_pkg", {"metabench_test.widgets": {"two": "widget_pkg:TWO"}})
    monkeypatch.syspath_prepend(str(tmp_path))
    assert registry.names() == ["one", "two"] and registry.get("two") == 2
    assert registry.get("widget_pkg:Box.THREE") == 3
    with pytest.raises(RegistryError, match=r"unknown widget 'four'; known: one, two"):
        registry.get("four")
    with pytest.raises(RegistryError, match="cannot import module 'no_such_pkg'"):
        import_reference("no_such_pkg:thing")
    with pytest.raises(RegistryError, match="has no attribute 'FOUR'"):
        registry.get("widget_pkg:FOUR")


def test_a_broken_plugin_is_named(tmp_path, monkeypatch) -> None:
    (tmp_path / "broken_pkg.py").write_text("raise ImportError('missing dependency xyz')\n")
    write_distribution(tmp_path, "broken_pkg", {"metabench.algorithms": {"broken": "broken_pkg:Learner"}})
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "broken" in algorithm_names()
    with pytest.raises(RegistryError, match="broken.*broken_pkg.*failed to load: missing dependency xyz"):
        learner_class("broken")


# -- learners ------------------------------------------------------------------------------------------------


def test_builtin_learners_in_canonical_order() -> None:
    assert algorithm_names()[:len(BUILTIN)] == BUILTIN


@pytest.mark.parametrize("name", BUILTIN)
def test_every_learner_describes_itself(name: str) -> None:
    cls = learner_class(name)
    assert issubclass(cls, MetaLearner) and cls.name == name
    assert isinstance(cls.capabilities, Capabilities) and issubclass(cls.config_class, AlgorithmConfig)
    assert cls.capabilities.second_order <= cls.capabilities.inner_loop  # second order needs an inner loop
    assert isinstance(algorithm_config(name), cls.config_class)


def test_capabilities_are_the_papers() -> None:
    second = {n for n in BUILTIN if learner_class(n).capabilities.second_order}
    inner = {n for n in BUILTIN if learner_class(n).capabilities.inner_loop}
    assert second == {"maml", "anil", "metasgd", "mamlpp"}
    assert inner == second | {"fomaml", "reptile"}
    assert {n for n in BUILTIN if learner_class(n).capabilities.ddp_exact} == inner
    assert {n for n in BUILTIN if learner_class(n).capabilities.supervised_pretraining} == {"baseline", "baseline++"}
    assert {n for n in BUILTIN if learner_class(n).capabilities.way_free} == {"protonet"}


@pytest.mark.parametrize("name,fields,message", [
    ("maml", {"patience": 3}, "patience is not used by maml.*protonet"),
    ("fomaml", {"msl": True}, "MAML\\+\\+ switch"),
    ("maml", {"inner_state": "persistent", "inner_optimizer": "adam"}, "inner_state is not used by maml"),
    ("maml", {"lr_decay_every": 10}, "lr_decay_every is not used by maml"),
    ("reptile", {"adapt": ["head"]}, "adapt is not supported by reptile"),
])
def test_each_learner_refuses_what_it_does_not_use(name: str, fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        algorithm_config(name, **fields)
    for user, key in (("protonet", "patience"), ("protonet", "lr_decay_every"), ("transfer", "lr_decay_every")):
        algorithm_config(user, **{key: 3})  # the learners that read them accept them


def test_unknown_algorithm_lists_the_known_ones() -> None:
    with pytest.raises(RegistryError, match="unknown algorithm 'mine'; known: maml, fomaml"):
        learner_class("mine")
    with pytest.raises(ConfigError, match="unknown algorithm 'mine'"):
        resolve("synthetic-5w1s", "mine")


def test_a_registered_learner_needs_a_name_and_a_metalearner_class() -> None:
    with pytest.raises(RegistryError, match="not a subclass of"):
        LEARNERS.register("not-a-learner", object)

    class Nameless(MetaLearner):
        pass

    with pytest.raises(RegistryError, match="declares no name"):
        LEARNERS.register("nameless", Nameless)
    assert "nameless" not in LEARNERS


def test_a_learner_by_reference_with_its_own_config(tmp_path, monkeypatch) -> None:
    """``--algorithm pkg.module:Class``: a learner outside metabench, with a config field of its own, resolved on a
    metabench benchmark with the hyper-parameters of the learner it builds on (``preset_base``)."""
    (tmp_path / "my_learners.py").write_text(
        "from dataclasses import dataclass\n"
        "from metabench.models.algorithms import MAML\n"
        "from metabench.models.hparams import AlgorithmConfig\n"
        "@dataclass\n"
        "class MineConfig(AlgorithmConfig):\n"
        "    temperature: float = 1.0\n"
        "class Mine(MAML):\n"
        "    name = 'mine'\n"
        "    config_class = MineConfig\n"
        "    preset_base = 'maml'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = resolve("synthetic-5w1s", "my_learners:Mine", overrides=["algorithm.temperature=2.5"])
    maml = resolve("synthetic-5w1s", "maml")
    assert type(config.algorithm).__name__ == "MineConfig" and config.algorithm.temperature == 2.5
    assert config.algorithm.name == "my_learners:Mine" and config.algorithm.source.startswith("maml's default preset")
    same = {f.name for f in dataclasses.fields(AlgorithmConfig)} - {"name", "source"}
    assert {k: getattr(config.algorithm, k) for k in same} == {k: getattr(maml.algorithm, k) for k in same}
    with pytest.raises(ConfigError, match="unknown key.*algorithm.temprature"):
        resolve("synthetic-5w1s", "my_learners:Mine", overrides=["algorithm.temprature=2.5"])
    backbone = build_backbone("conv4", 1, 5, 28, hidden=4)
    module = build_algorithm(backbone, Classification(), config.algorithm, 1)
    assert type(module).__name__ == "Mine" and module.capabilities.second_order


def test_a_preset_without_the_learner_and_no_base_is_refused(tmp_path, monkeypatch) -> None:
    (tmp_path / "bare_learner.py").write_text(
        "from metabench.models.algorithms import MAML\nclass Bare(MAML):\n    name = 'bare'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="defines no 'bare_learner:Bare'.*--config"):
        resolve("synthetic-5w1s", "bare_learner:Bare")


# -- backbones -----------------------------------------------------------------------------------------------

# Small instances of the built-ins (in_channels, image_size, options); a plug-in's backbone gets (1, 28, {}).
SMALL = {
    "conv4": (1, 16, {"hidden": 3}),
    "conv4-omniglot": (1, 28, {"hidden": 3}),
    "conv4-miniimagenet": (3, 84, {"hidden": 3}),
    "mlp-omniglot": (1, 28, {"hidden": [6, 5]}),
    "resnet12": (3, 32, {"widths": [2, 3, 3, 4]}),
    "conv4-seg": (3, 16, {"hidden": 3}),
}


@pytest.mark.parametrize("name", BACKBONES.names())
def test_every_backbone_honours_the_contract(name: str) -> None:
    """Buffer-free with a ``head``; float64 meta-gradients (second order, 2 inner steps) of every engine it offers
    (vmap always, batched where it has ``batched_forward``, batched-fused where it has ``fused_batched_forward``)
    equal to the sequential reference to 1e-10."""
    channels, size, options = SMALL.get(name, (1, 28, {}))
    torch.manual_seed(0)
    model = build_backbone(name, channels, 2, size, **options).double()
    assert isinstance(model, Backbone) and not list(model.named_buffers())
    segmentation = getattr(model, "task", "classification") == "segmentation"
    tasks, n = 2, 4
    generator = torch.Generator().manual_seed(1)
    sx, qx = (torch.rand(tasks, n, channels, size, size, generator=generator, dtype=torch.float64) for _ in range(2))
    label_shape = (tasks, n, size, size) if segmentation else (tasks, n)
    sy, qy = (torch.randint(0, 2 if not segmentation else 3, label_shape, generator=generator) for _ in range(2))
    params = dict(model.named_parameters())
    config = InnerConfig(steps=2, lr=0.1, first_order=False)
    engines = ["sequential", "vmap", *(["batched"] if supports_batched(model) else []),
               *(["batched-fused"] if supports_fused(model) else [])]
    grads = {}
    for engine in engines:
        loss, _ = meta_loss(model, params, F.cross_entropy, sx, sy, qx, qy, config, engine)
        grads[engine] = torch.autograd.grad(loss, list(params.values()))
    for engine in engines[1:]:
        assert rel_err(list(grads[engine]), list(grads["sequential"])) <= 1e-10, engine


def test_a_backbone_that_breaks_the_contract_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'bn' .*has buffers 0.running_mean"):
        check_backbone("bn", nn.Sequential(nn.BatchNorm2d(3)))
    with pytest.raises(ValueError, match="no classifier submodule `head`"):
        check_backbone("headless", nn.Linear(2, 2))
    with pytest.raises(RegistryError, match="unknown backbone 'resnet99'"):
        build_backbone("resnet99", 1, 5, 28)


# -- datasets ------------------------------------------------------------------------------------------------


def test_datasets_by_name_and_by_loader_reference(tmp_path, monkeypatch) -> None:
    assert DATASETS.names()[:2] == ["omniglot", "mini-imagenet"]
    (tmp_path / "my_data.py").write_text(
        "import numpy as np, torch\n"
        "from metabench.datasets.base import ImageSplit\n"
        "def load(split, root=None, cache_dir=None, classes=3):\n"
        "    '''Three classes of constant images.'''\n"
        "    images = torch.arange(classes * 2, dtype=torch.uint8).repeat_interleave(16).reshape(-1, 1, 4, 4)\n"
        "    names = tuple(f'{split}/{k}' for k in range(classes))\n"
        "    return ImageSplit(f'mine/{split}', images, np.arange(classes + 1) * 2, names,\n"
        "                      tuple(f'{c}/{i}' for c in names for i in range(2)))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    info = get_dataset("my_data:load")
    assert info.description == "Three classes of constant images."
    split = info.load("test", root=None, classes=4)
    assert split.name == "mine/test" and split.num_classes == 4
    with pytest.raises(DatasetError, match="unknown dataset 'nope'; known: omniglot"):
        get_dataset("nope")
