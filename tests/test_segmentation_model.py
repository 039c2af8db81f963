"""The segmentation network and the algorithms on segmentation episodes: shapes, exact vmap / second-order
gradients, adapting only some parameters, Reptile and the transfer baseline against hand-written updates,
and evaluation records mIoU / FB-IoU."""

from __future__ import annotations

import dataclasses

import lightning as L
import numpy as np
import pytest
import torch
from torch.func import functional_call

from metabench.datasets.base import ImageSplit
from metabench.datasets.datamodule import EpisodicDataModule
from metabench.datasets.episodes import EpisodeSpec
from metabench.models.algorithms import MAML, Reptile, Transfer, adapted_parameter_names
from metabench.models.backbones import build_backbone
from metabench.models.hparams import AlgorithmConfig
from metabench.models.inner_loop import InnerConfig, adapt_tasks, meta_loss, reptile_update
from metabench.models.learners import algorithm_config, build_algorithm
from metabench.models.problems import Classification, Segmentation, episode_counts, fb_iou, mean_iou
from metabench.models.segmentation import ConvSeg
from metabench.run.runner import quiet_lightning
from tests.helpers import TINY_GLYPHS, first_meta_batch, fit_one_step, local_run


def fake_split(name: str, classes: int = 6, per_class: int = 6, size: int = 16, seed: int = 0) -> ImageSplit:
    """Noise images with one bright square each; class ``k`` tints its square with colour ``k``; a one-pixel
    ring of 255 (ignore) around the square, as PASCAL marks object boundaries."""
    g = torch.Generator().manual_seed(seed)
    n = classes * per_class
    images = torch.randint(0, 120, (n, 3, size, size), generator=g, dtype=torch.uint8)
    masks = torch.zeros(n, size, size, dtype=torch.uint8)
    palette = torch.randint(130, 256, (classes, 3), generator=g, dtype=torch.uint8)
    for i in range(n):
        side = int(torch.randint(size // 4, size // 2, (1,), generator=g))
        y, x = (int(v) for v in torch.randint(1, size - side - 1, (2,), generator=g))
        masks[i, y - 1:y + side + 1, x - 1:x + side + 1] = 255
        masks[i, y:y + side, x:x + side] = 1
        images[i, :, y:y + side, x:x + side] = palette[i // per_class].view(3, 1, 1)
    offsets = np.arange(0, n + 1, per_class)
    return ImageSplit(name, images, offsets, tuple(f"c{k}" for k in range(classes)),
                      tuple(f"{name}/{i}" for i in range(n)), masks)


def fake_datamodule(ways: int = 1, shots: int = 1, queries: int = 2, meta_batch: int = 2,
                    size: int = 16) -> EpisodicDataModule:
    splits = {s: fake_split(f"fake/{s}", size=size, seed=i) for i, s in enumerate(("train", "val", "test"))}
    return EpisodicDataModule(splits.__getitem__, EpisodeSpec(ways, shots, queries), meta_batch, val_episodes=4,
                              test_episodes=6, eval_batch=4)


def make(name: str, ways: int = 1, hidden: int = 4, size: int = 16, **hparams) -> tuple:
    torch.manual_seed(0)
    backbone = build_backbone("conv4-seg", 3, ways, size, hidden=hidden)
    config = algorithm_config(name=name, meta_batch=2, inner_steps=2, inner_lr=0.1, eval_steps=2, meta_lr=0.01,
                             engine="sequential", **hparams)
    return build_algorithm(backbone, Segmentation(), config, max_steps=10), config


# -- the network ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ways", "height", "width"), [(1, 16, 16), (2, 21, 13), (1, 32, 48)])
def test_logits_at_input_resolution(ways: int, height: int, width: int) -> None:
    net = ConvSeg(3, ways, min(height, width), hidden=4)
    assert net(torch.rand(2, 3, height, width)).shape == (2, ways + 1, height, width)


def test_parameter_prefixes_and_no_buffers() -> None:
    net = build_backbone("conv4-seg", 3, 1, 16, hidden=4)
    prefixes = {name.split(".", 1)[0] for name, _ in net.named_parameters()}
    assert prefixes == {"encoder", "decoder", "head"}
    assert not list(net.buffers())  # nothing hidden from functional_call / vmap
    assert net.task == "segmentation"
    with pytest.raises(ValueError, match="too small"):
        ConvSeg(3, 1, 4)


def test_second_order_meta_gradient_is_the_same_under_vmap_and_a_loop() -> None:
    torch.manual_seed(0)
    net = ConvSeg(3, 1, 8, hidden=2).double()
    problem = Segmentation(dice_weight=0.5)
    sx, qx = torch.rand(2, 1, 3, 8, 8, dtype=torch.float64), torch.rand(2, 2, 3, 8, 8, dtype=torch.float64)
    sy, qy = torch.randint(0, 2, (2, 1, 8, 8)), torch.randint(0, 2, (2, 2, 8, 8))
    qy[0, 0, :2] = 255
    config = InnerConfig(steps=2, lr=0.3)
    grads = {}
    for engine in ("vmap", "sequential"):
        params = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
        loss, _ = meta_loss(net, params, problem.loss, sx, sy, qx, qy, config, engine)
        grads[engine] = torch.autograd.grad(loss, list(params.values()))
    for a, b in zip(grads["vmap"], grads["sequential"]):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


# -- adapting some parameters only ------------------------------------------------------------------------


def test_adapt_prefixes_select_parameters() -> None:
    net = ConvSeg(3, 1, 16, hidden=4)
    names = adapted_parameter_names(net, ["decoder", "head"])
    assert names and all(n.startswith(("decoder.", "head.")) for n in names)
    assert names | {n for n, _ in net.named_parameters() if n.startswith("encoder.")} == \
        {n for n, _ in net.named_parameters()}
    assert adapted_parameter_names(net, ["head.weight"]) == {"head.weight"}
    assert adapted_parameter_names(net, ["decoder.1"]) == {n for n, _ in net.named_parameters()
                                                           if n.startswith("decoder.1.")}
    with pytest.raises(ValueError, match=r"prefix 'deco' matches no parameter.*decoder, encoder, head"):
        adapted_parameter_names(net, ["deco"])
    with pytest.raises(ValueError, match="not supported by reptile"):
        algorithm_config(name="reptile", adapt=["head"])
    with pytest.raises(ValueError, match="non-empty list"):
        algorithm_config(name="maml", adapt=[])


def test_maml_with_head_only_adaptation_matches_a_hand_written_reference() -> None:
    """Inner steps touch only ``head.*``; the outer (second-order) gradient still reaches the encoder."""
    torch.manual_seed(0)
    net = ConvSeg(3, 1, 8, hidden=2).double()
    module = MAML(net, Segmentation(), algorithm_config(name="maml", inner_steps=2, inner_lr=0.5, adapt=["head"],
                                                       engine="sequential"), max_steps=1)
    assert set(module.params()) == {"head.weight", "head.bias"}
    sx, qx = torch.rand(2, 1, 3, 8, 8, dtype=torch.float64), torch.rand(2, 2, 3, 8, 8, dtype=torch.float64)
    sy, qy = torch.randint(0, 2, (2, 1, 8, 8)), torch.randint(0, 2, (2, 2, 8, 8))
    got = {}
    for engine in ("sequential", "vmap"):  # unadapted parameters are read from the module, also under vmap
        loss, _ = meta_loss(net, module.params(), module.inner_loss, sx, sy, qx, qy, module.inner_config(True),
                            engine)
        got[engine] = torch.autograd.grad(loss, list(net.parameters()))

    # Reference: plain autograd with create_graph, every parameter explicit.
    all_params = dict(net.named_parameters())
    losses = []
    for t in range(2):
        head = {k: all_params[k] for k in ("head.weight", "head.bias")}
        for _ in range(2):
            inner = Segmentation().loss(functional_call(net, {**all_params, **head}, (sx[t],)), sy[t])
            g = torch.autograd.grad(inner, list(head.values()), create_graph=True)
            head = {k: v - 0.5 * gk for (k, v), gk in zip(head.items(), g)}
        losses.append(Segmentation().loss(functional_call(net, {**all_params, **head}, (qx[t],)), qy[t]))
    expected = torch.autograd.grad(torch.stack(losses).mean(), list(net.parameters()))
    for engine, grads in got.items():
        for (name, _), a, b in zip(net.named_parameters(), grads, expected):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10, msg=f"{engine}: {name}")
    assert float(got["vmap"][0].abs().sum()) > 0  # encoder.0.conv.weight is meta-trained


def test_evaluation_with_adapt_changes_only_the_adapted_parameters() -> None:
    module, _ = make("fomaml", adapt=["decoder", "head"])
    dm = fake_datamodule()
    batch = first_meta_batch(dm)
    params = {k: v.detach() for k, v in module.params().items()}
    adapted = adapt_tasks(params, module.task_loss, module.problem.inputs(batch.support_x), batch.support_y,
                          module.inner_config(False), "sequential")
    assert set(adapted) == set(params) and not any(k.startswith("encoder.") for k in adapted)
    assert all(not torch.equal(adapted[k][0], params[k]) for k in adapted if k.endswith("conv.weight"))


# -- Reptile and transfer on segmentation -----------------------------------------------------------------


def test_reptile_step_on_segmentation_equals_hand_update() -> None:
    module, config = make("reptile", meta_lr_final=0.0)
    dm = fake_datamodule()
    theta = {k: v.detach().clone() for k, v in module.params().items()}
    batch = first_meta_batch(dm)
    adapted = adapt_tasks(theta, module.task_loss, module.problem.inputs(batch.support_x), batch.support_y,
                          module.inner_config(True), "sequential")
    expected = reptile_update(theta, adapted, config.meta_lr)
    fit_one_step(module, dm)
    for name, p in module.params().items():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-6)


def test_transfer_step_is_adam_on_the_pooled_supervised_loss() -> None:
    module, config = make("transfer")
    dm = fake_datamodule()
    batch = first_meta_batch(dm)
    net = module.backbone
    reference = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    x = torch.cat([batch.support_x, batch.query_x], 1).flatten(0, 1).float() / 255
    y = torch.cat([batch.support_y, batch.query_y], 1).flatten(0, 1)
    assert set(y.unique().tolist()) == {0, 1, 255}
    Segmentation().loss(functional_call(net, reference, (x,)), y).backward()
    adam = torch.optim.Adam(reference.values(), lr=config.meta_lr)
    adam.step()
    fit_one_step(module, dm)
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), reference[name].detach(), rtol=1e-5, atol=1e-6)


def test_transfer_refuses_labels_that_are_not_class_agnostic() -> None:
    with pytest.raises(ValueError, match="1-way"):
        make("transfer", ways=2)
    with pytest.raises(ValueError, match="segmentation only"):
        Transfer(torch.nn.Linear(2, 2), Classification(), algorithm_config(name="transfer"), 1)


# -- evaluation collects mIoU and FB-IoU -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["maml", "transfer"])
def test_test_run_records_scores_miou_and_fb_iou(name: str) -> None:
    module, _ = make(name)
    dm = fake_datamodule()
    quiet_lightning()
    L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
              accelerator="cpu").test(module, datamodule=dm, verbose=False)
    assert module.test_scores.shape == (6,)
    # The same numbers by hand from the fixed episodes.
    indices = dm.sampler("test").fixed(0, 6)
    outputs, targets, classes = [], [], []
    for start in (0, 4):
        batch = dm.sampler("test").gather(indices.slice(start, start + 4))
        outputs.append(module.evaluate_outputs(batch))
        targets.append(batch.query_y)
        classes.append(batch.classes)
    outputs, targets, classes = torch.cat(outputs), torch.cat(targets), torch.cat(classes)
    torch.testing.assert_close(module.test_scores, Segmentation.episode_scores(outputs, targets).float(),
                               check_dtype=False)
    stats = episode_counts(outputs, targets)
    assert module.test_metrics == pytest.approx({"miou": mean_iou(stats, classes), "fb_iou": fb_iou(stats)})
    assert 0.0 <= module.test_metrics["miou"] <= 1.0 and 0.0 <= module.test_metrics["fb_iou"] <= 1.0


def test_two_way_segmentation_trains_with_maml() -> None:
    module, _ = make("maml", ways=2)
    dm = fake_datamodule(ways=2)
    batch = first_meta_batch(dm)
    assert set(batch.query_y.unique().tolist()) <= {0, 1, 2, 255} and batch.classes.shape == (2, 2)
    before = {k: v.detach().clone() for k, v in module.params().items()}
    fit_one_step(module, dm)
    assert any(not torch.equal(before[k], v) for k, v in module.params().items())


def test_classification_modules_are_unchanged() -> None:
    """Classification still adapts every parameter and has no segmentation metrics."""
    net = build_backbone("conv4", 1, 5, 28, hidden=4)
    module = build_algorithm(net, Classification(), algorithm_config(name="reptile"), 1)
    assert isinstance(module, Reptile) and set(module.params()) == {n for n, _ in net.named_parameters()}
    assert module.test_metrics == {}
    assert dataclasses.asdict(AlgorithmConfig())["adapt"] is None


# -- through `metabench run` -------------------------------------------------------------------------------

SEG_TINY = ["data.options.image_size=16", "data.options.num_classes=6", "data.options.images_per_class=5",
            "model.options.hidden=4", "episodes.val_episodes=2", "episodes.test_episodes=4", "episodes.eval_batch=2",
            "trainer.max_steps=2", "trainer.val_every=1", "trainer.checkpoint_every=2", "trainer.log_every=1",
            "algorithm.meta_batch=2", "algorithm.eval_steps=1"]


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile", "transfer"])
def test_segmentation_run_writes_miou_fb_iou_and_curve(tmp_path, algorithm: str) -> None:
    from metabench.run.config import resolve
    from metabench.run.records import read_record
    from metabench.run.runner import run

    config = resolve("synthetic-seg-1w1s", algorithm, overrides=SEG_TINY + local_run(tmp_path))
    record = read_record(run(config, progress=False).record_path)
    assert record.metric == "fg_iou" and len(record.scores) == 4
    assert set(record.metrics) == {"miou", "fb_iou"} and all(0 <= v <= 1 for v in record.metrics.values())
    assert {"random_init_mean", "random_init_miou", "random_init_fb_iou"} <= set(record.baseline)
    assert [p[0] for p in record.curve] == [1, 2]  # [step, train seconds, validation mean]
    assert all(0 <= p[2] <= 1 and p[1] >= 0 for p in record.curve)


def test_classification_run_records_its_validation_curve(tmp_path) -> None:
    from metabench.run.config import resolve
    from metabench.run.runner import run

    config = resolve("synthetic-5w1s", "fomaml", overrides=TINY_GLYPHS + [
        "episodes.val_episodes=4", "episodes.test_episodes=4", "episodes.eval_batch=4", "trainer.max_steps=4",
        "trainer.val_every=2", "algorithm.meta_batch=2"] + local_run(tmp_path))
    record = run(config, progress=False, write=False).record
    assert [p[0] for p in record.curve] == [2, 4] and record.curve[0][1] <= record.curve[1][1]
    assert record.metrics == {}


def test_mismatched_backbone_or_transfer_on_classification_is_a_config_error() -> None:
    from metabench.run.config import ConfigError, resolve
    from metabench.run.runner import build_datamodule, build_module

    config = resolve("synthetic-seg-1w1s", "maml", overrides=SEG_TINY + ["model.backbone=conv4"])
    with pytest.raises(ConfigError, match="conv4.*classification network.*segmentation"):
        build_module(config, build_datamodule(config))
    config = resolve("synthetic-seg-1w1s", "maml", overrides=SEG_TINY + ["algorithm.adapt=[decod]"])
    with pytest.raises(ConfigError, match="prefix 'decod' matches no parameter"):
        build_module(config, build_datamodule(config))
    config = resolve("synthetic-seg-1w1s", "transfer", overrides=SEG_TINY + ["episodes.ways=2"])
    with pytest.raises(ConfigError, match="transfer needs 1-way episodes"):  # checked once, by the module
        build_module(config, build_datamodule(config))


SEG_BENCHMARKS = ("synthetic-seg-1w1s", "fss-mini-1w1s", "fss-mini-1w5s", "fss-1000-1w1s", "fss-1000-1w5s",
                  "pascal-5i-1w1s", "pascal-5i-1w5s")


@pytest.mark.parametrize("benchmark", SEG_BENCHMARKS)
def test_segmentation_presets_define_all_four_algorithms_with_sources(benchmark: str) -> None:
    from metabench.datasets.registry import get_dataset
    from metabench.run.config import preset_algorithms, resolve

    assert preset_algorithms(benchmark) == ["maml", "fomaml", "reptile", "transfer"]
    for algorithm in preset_algorithms(benchmark):
        config = resolve(benchmark, algorithm)
        assert get_dataset(config.data.name).task == "segmentation"
        assert config.model.backbone == "conv4-seg" and config.episodes.ways == 1 and config.episodes.queries == 1
        assert config.episodes.shots == int(benchmark[-2]) and "metabench choice" in config.algorithm.source
        e = config.episodes
        assert (e.train_shots or e.shots) + (e.train_queries or e.queries) <= 10  # FSS classes hold 10 pairs
    if benchmark.startswith("pascal-5i"):
        assert config.episodes.test_episodes == 1000 and config.data.options["fold"] == 0
    if benchmark.startswith("fss-1000"):
        assert config.data.options["image_size"] == 224
