"""ProtoNet, Baseline and Baseline++ (models/baselines.py) and their non-episodic training data
(datasets/supervised.py): prototype logits and the cosine head against hand computations, the vectorised head
fine-tuning against torch.optim.SGD, the frozen network bit-identical after test-time fine-tuning, the batch-norm
modes, early stopping, the pre-training batches, and `metabench run` end to end on a tiny configuration."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metabench.cli import main as cli_main
from metabench.datasets.base import ImageSplit
from metabench.datasets.episodes import EpisodeSampler, EpisodeSpec, MetaBatch
from metabench.datasets.supervised import LabelledBatch, SupervisedDataModule, augment_images, epoch_order
from metabench.datasets.synthetic import make_glyphs
from metabench.models.algorithms import FineTuning, Transfer
from metabench.models.backbones import build_backbone, is_norm
from metabench.models.baselines import (
    Baseline,
    CosineClassifier,
    ProtoNet,
    chen_scale,
    cosine_logits,
    episode_features,
    finetune_heads,
    head_logits,
    init_heads,
    prototype_logits,
    support_order,
    use_native_norm,
)
from metabench.models.hparams import FinetuneConfig
from metabench.models.learners import algorithm_config, build_algorithm
from metabench.models.problems import Classification, Segmentation
from metabench.run.config import ConfigError
from metabench.run.records import read_record
from metabench.run.runner import build_datamodule, build_module, run
from tests.helpers import (
    TINY_RUN,
    TINY_RUN_CLASSES,
    first_meta_batch,
    fit_one_step,
    local_run,
    set_flags,
    tiny_config,
)

DT = torch.float64


# -- ProtoNet's logits ------------------------------------------------------------------------------------------


def test_prototype_logits_are_minus_squared_distances_by_hand() -> None:
    # 2 ways, 2 shots each (labels out of order), 2-d embeddings: prototypes (1, 1) and (4, 2)
    support = torch.tensor([[0.0, 0.0], [3.0, 2.0], [2.0, 2.0], [5.0, 2.0]], dtype=DT)
    labels = torch.tensor([0, 1, 0, 1])
    query = torch.tensor([[1.0, 1.0], [4.0, 0.0], [0.0, 3.0]], dtype=DT)
    # (1,1): 0 to p0, 9+1 = 10 to p1; (4,0): 9+1 = 10, 0+4 = 4; (0,3): 1+4 = 5, 16+1 = 17
    expected = -torch.tensor([[0.0, 10.0], [10.0, 4.0], [5.0, 17.0]], dtype=DT)
    torch.testing.assert_close(prototype_logits(support, labels, query, 2), expected, rtol=0, atol=1e-12)


def test_prototype_logits_match_a_direct_computation() -> None:
    gen = torch.Generator().manual_seed(0)
    support, query = torch.randn(15, 32, generator=gen, dtype=DT), torch.randn(20, 32, generator=gen, dtype=DT)
    labels = torch.randperm(15, generator=gen) % 5
    protos = torch.stack([support[labels == k].mean(0) for k in range(5)])
    direct = -((query[:, None, :] - protos[None]) ** 2).sum(-1)
    torch.testing.assert_close(prototype_logits(support, labels, query, 5), direct, rtol=1e-12, atol=1e-10)


# -- Baseline++'s cosine head ----------------------------------------------------------------------------------


def test_cosine_logits_by_hand() -> None:
    z = torch.tensor([[3.0, 4.0]], dtype=DT)  # norm 5
    weight = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=DT)
    gain = torch.tensor([1.0, 3.0, 2.0], dtype=DT)
    # normalised feature (3, 4) / (5 + 1e-5); class directions (1, 0), (0, 1), (1, 1)/sqrt(2), times the gains
    f = torch.tensor([3.0, 4.0], dtype=DT) / (5.0 + 1e-5)
    expected = 2.0 * torch.tensor([[f[0] * 1.0, f[1] * 3.0, (f[0] + f[1]) / math.sqrt(2.0) * 2.0]], dtype=DT)
    torch.testing.assert_close(cosine_logits(z, weight, gain, 2.0), expected, rtol=0, atol=1e-12)


def test_cosine_classifier_starts_as_weight_norm_of_a_linear_layer() -> None:
    torch.manual_seed(0)
    head = CosineClassifier(8, 3, scale=10.0)
    assert set(dict(head.named_parameters())) == {"weight", "gain"}
    torch.testing.assert_close(head.gain, head.weight.norm(dim=1))  # WeightNorm.apply: g = ||v|| at init
    assert float(head.weight.detach().abs().max()) <= 1 / math.sqrt(8)  # nn.Linear's default init bound
    z = torch.randn(4, 8)
    raw = z / (z.norm(dim=1, keepdim=True) + 1e-5) @ head.weight.T  # with g = ||v||, w = v: a scaled dot product
    torch.testing.assert_close(head(z), 10.0 * raw)
    assert (chen_scale(5), chen_scale(200), chen_scale(201), chen_scale(4112)) == (2.0, 2.0, 10.0, 10.0)


# -- the test-time head: vectorised fine-tuning against torch.optim.SGD ----------------------------------------


def _reference_finetune(support: torch.Tensor, labels: torch.Tensor, ways: int, recipe: FinetuneConfig,
                        seed: int, cosine: bool, scale: float | None) -> list[dict[str, torch.Tensor]]:
    """Per task: the authors' loop with torch.optim.SGD on a plain module, from the same initial head and the same
    support orders as :func:`finetune_heads` draws from ``seed``."""
    tasks, n, dim = support.shape
    gen = torch.Generator().manual_seed(seed)
    init = {k: v.detach() for k, v in init_heads(tasks, ways, dim, cosine, gen, support).items()}
    orders = [support_order(gen, tasks, n) for _ in range(recipe.epochs)]
    heads = []
    for t in range(tasks):
        params = {k: nn.Parameter(v[t].clone()) for k, v in init.items()}
        opt = torch.optim.SGD(params.values(), lr=recipe.lr, momentum=recipe.momentum, dampening=recipe.dampening,
                              weight_decay=recipe.weight_decay)
        for order in orders:
            for start in range(0, n, recipe.batch_size):
                rows = order[t, start:start + recipe.batch_size]
                opt.zero_grad()
                z = support[t, rows]
                if cosine:
                    logits = cosine_logits(z, params["weight"], params["gain"], scale)
                else:
                    logits = z @ params["weight"].T + params["bias"]
                F.cross_entropy(logits, labels[t, rows]).backward()
                opt.step()
        heads.append({k: v.detach() for k, v in params.items()})
    return heads


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("shots", [1, 3])
def test_finetune_heads_equal_torch_sgd_per_task(cosine: bool, shots: int) -> None:
    gen = torch.Generator().manual_seed(1)
    tasks, ways, dim = 3, 5, 6
    support = torch.randn(tasks, ways * shots, dim, generator=gen, dtype=DT)
    labels = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    recipe = FinetuneConfig(epochs=7)  # the authors' SGD settings, fewer passes
    scale = 2.0 if cosine else None
    ours = finetune_heads(support, labels, ways, recipe, torch.Generator().manual_seed(5), cosine=cosine, scale=scale)
    reference = _reference_finetune(support, labels, ways, recipe, 5, cosine, scale)
    assert set(ours) == ({"weight", "gain"} if cosine else {"weight", "bias"})
    for t, ref in enumerate(reference):
        for k, v in ref.items():
            torch.testing.assert_close(ours[k][t], v, rtol=1e-12, atol=1e-12)
    # and the heads did move, and fit the support set
    start = init_heads(tasks, ways, dim, cosine, torch.Generator().manual_seed(5), support)
    assert (ours["weight"] - start["weight"].detach()).abs().max() > 1e-3
    def support_loss(heads: dict[str, torch.Tensor]) -> float:
        return float(F.cross_entropy(head_logits(heads, support, scale).flatten(0, 1), labels.flatten()))

    assert support_loss(ours) < support_loss({k: v.detach() for k, v in start.items()})


# -- the Lightning modules on a tiny network -------------------------------------------------------------------


def _batch(tasks: int = 2, ways: int = 5, shots: int = 1, queries: int = 3, seed: int = 0) -> MetaBatch:
    gen = torch.Generator().manual_seed(seed)
    sx = torch.randint(0, 256, (tasks, ways * shots, 1, 28, 28), generator=gen, dtype=torch.uint8)
    qx = torch.randint(0, 256, (tasks, ways * queries, 1, 28, 28), generator=gen, dtype=torch.uint8)
    sy = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    qy = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
    return MetaBatch(sx, sy, qx, qy, torch.zeros(tasks, ways, dtype=torch.long))


def _module(name: str, classes: int = 12, **fields) -> ProtoNet | Baseline:
    torch.manual_seed(0)
    backbone = build_backbone("conv4-omniglot", 1, classes, 28, hidden=4)
    config = algorithm_config(name=name, **fields)
    return build_algorithm(backbone, Classification(), config, max_steps=10)  # type: ignore[return-value]


@pytest.mark.parametrize("name", ["baseline", "baseline++", "protonet"])
@pytest.mark.parametrize("bn_mode", ["transductive", "non-transductive"])
def test_frozen_network_is_bit_identical_after_test_time_fine_tuning(name: str, bn_mode: str) -> None:
    module = _module(name, bn_mode=bn_mode, finetune=FinetuneConfig(epochs=5))
    before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    outputs = module.evaluate_outputs(_batch())
    assert outputs.shape == (2, 15, 5) and torch.isfinite(outputs).all()
    after = module.backbone.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in module.backbone.parameters())


@pytest.mark.parametrize(("name", "options"), [("conv4", {"hidden": 4, "pool": True}), ("resnet12", {"hidden": 2}),
                                              ("mlp-omniglot", {"hidden": [8, 6]})])
def test_native_batch_norm_equals_the_plain_ops_one(name: str, options: dict) -> None:
    """ProtoNet and the baselines switch batch norm to the fused kernel: same features and gradients (float64), in
    both batch-norm modes (non-transductive runs under vmap)."""
    torch.manual_seed(0)
    plain = build_backbone(name, 1, 5, 28, **options).double()
    native = build_backbone(name, 1, 5, 28, **options).double()
    native.load_state_dict(plain.state_dict())
    use_native_norm(native)
    assert all(m.native for m in native.modules() if is_norm(m)) and not any(m.native for m in plain.modules()
                                                                              if is_norm(m))
    gen = torch.Generator().manual_seed(1)
    sx, qx = torch.rand(2, 5, 1, 28, 28, generator=gen, dtype=DT), torch.rand(2, 6, 1, 28, 28, generator=gen, dtype=DT)
    for mode in ("transductive", "non-transductive"):
        for a, b in zip(episode_features(plain.embed, sx, qx, mode), episode_features(native.embed, sx, qx, mode)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    grads = [torch.autograd.grad(net.embed(sx[0]).square().sum(), list(net.parameters()), allow_unused=True,
                                 materialize_grads=True) for net in (plain, native)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_baseline_heads_and_evaluation_are_reproducible() -> None:
    plain, cosine = _module("baseline"), _module("baseline++")
    assert isinstance(plain.backbone.head, nn.Linear) and torch.all(plain.backbone.head.bias == 0)
    assert isinstance(cosine.backbone.head, CosineClassifier) and cosine.backbone.head.scale == 2.0  # 12 classes
    assert isinstance(plain, FineTuning) and issubclass(Transfer, FineTuning)  # one training loop for both
    batch = _batch()
    first = cosine.evaluate_outputs(batch)
    cosine.on_test_epoch_start()  # a new evaluation draws the same heads and support orders
    torch.testing.assert_close(cosine.evaluate_outputs(batch), first, rtol=0, atol=0)
    assert _module("baseline++", cosine_scale=7.0).backbone.head.scale == 7.0


def test_protonet_outputs_and_batch_norm_modes() -> None:
    module = _module("protonet")
    batch = _batch()
    x = module.problem.inputs
    logits = module.evaluate_outputs(batch)
    z = module.backbone.embed(torch.cat([x(batch.support_x[0]), x(batch.query_x[0])]))  # transductive: one batch
    torch.testing.assert_close(logits[0], prototype_logits(z[:5], batch.support_y[0], z[5:], 5))
    # non-transductive: a query's logits do not depend on the other queries of its episode
    module.config.bn_mode = "non-transductive"
    other = MetaBatch(batch.support_x, batch.support_y, batch.query_x.clone(), batch.query_y, batch.classes)
    other.query_x[:, 1:] = 255 - other.query_x[:, 1:]
    a, b = module.evaluate_outputs(batch), module.evaluate_outputs(other)
    torch.testing.assert_close(a[:, 0], b[:, 0])
    assert not torch.allclose(a[:, 1], b[:, 1])
    support, query = episode_features(module.backbone.embed, x(batch.support_x), x(batch.query_x), "non-transductive")
    torch.testing.assert_close(support[1], module.backbone.embed(x(batch.support_x[1])))
    lone = module.backbone.embed(torch.cat([x(batch.support_x[1]), x(batch.query_x[1, 4:5])]))[-1]
    torch.testing.assert_close(query[1, 4], lone)


def test_protonet_training_step_is_adam_on_the_prototype_loss(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, "protonet", steps=1, extra=["episodes.train_ways=8", "algorithm.meta_batch=1"])
    dm = build_datamodule(config)
    module = build_module(config, dm)
    batch = first_meta_batch(dm)
    assert batch.support_x.shape[:2] == (1, 8) and batch.classes.shape == (1, 8)  # train_ways: 8-way episodes
    net = module.backbone
    reference = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    x = module.problem.inputs(torch.cat([batch.support_x[0], batch.query_x[0]]))
    embedded = torch.func.functional_call(net.features, {k[len("features."):]: v for k, v in reference.items()
                                                         if k.startswith("features.")}, (x,))
    loss = F.cross_entropy(prototype_logits(embedded[:8], batch.support_y[0], embedded[8:], 8), batch.query_y[0])
    loss.backward()
    adam = torch.optim.Adam(reference.values(), lr=config.algorithm.meta_lr)
    adam.step()
    fit_one_step(module, dm)
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), reference[name].detach(), rtol=1e-5, atol=1e-6)


def test_protonet_early_stopping_keeps_the_best_weights(tmp_path: Path) -> None:
    # lr 1e-30 leaves the float32 weights as they are: the validation loss never improves after the first check,
    # so with patience 1 training stops at the third validation (the authors' rule: wait > patience)
    config = tiny_config(tmp_path, "protonet", steps=40, extra=[
        "algorithm.patience=1", "algorithm.meta_lr=1e-30", "trainer.val_every=2", "trainer.checkpoint_every=2"])
    result = run(config, progress=False)
    assert result.record.training_steps == 6 and [p[0] for p in result.record.curve] == [2, 4, 6]
    checkpoint = torch.load(result.run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    saved = checkpoint["metabench_early_stop"]
    assert saved["stopped"] and saved["best_step"] == 2 and saved["wait"] == 2
    # the best validation's weights are restored before the final checkpoint
    module = _module("protonet")
    module.best_state = {k: torch.zeros_like(v) for k, v in module.backbone.state_dict().items()}
    module.on_train_end()
    assert all(torch.all(v == 0) for v in module.backbone.state_dict().values())


def test_step_decay_halves_the_learning_rate(tmp_path: Path) -> None:
    module = _module("protonet", lr_decay_every=3, lr_decay_factor=0.5, meta_lr=0.01)
    setup = module.configure_optimizers()
    optimizer, scheduler = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    assert setup["lr_scheduler"]["interval"] == "step"
    rates = []
    for _ in range(7):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.01] * 3 + [0.005] * 3 + [0.0025])


def test_wrong_uses_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="classification only"):
        build_algorithm(build_backbone("conv4-seg", 3, 1, 16, hidden=4), Segmentation(),
                        algorithm_config(name="protonet"), 1)
    with pytest.raises(ValueError, match="patience is not used by .*protonet"):
        algorithm_config(name="maml", patience=3)
    config = tiny_config(tmp_path, "maml", extra=["episodes.train_ways=10"])
    with pytest.raises(ConfigError, match="only protonet can train on episodes of other ways"):
        build_module(config, build_datamodule(config))
    config = tiny_config(tmp_path, "baseline", extra=["algorithm.pretrain.classes=5"])
    with pytest.raises(ConfigError, match="fewer than the 40 classes of the training split"):
        build_module(config, build_datamodule(config))


# -- the non-episodic training data ----------------------------------------------------------------------------


def _split(classes: int = 6, per_class: int = 5) -> ImageSplit:
    n = classes * per_class
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 8, 8).contiguous()
    return ImageSplit("toy/train", images, np.arange(classes + 1) * per_class, tuple(f"c{k}" for k in range(classes)),
                      tuple(f"i{k}" for k in range(n)))


def _supervised(batch_size: int = 4, seed: int = 0, augment: bool = False) -> SupervisedDataModule:
    splits = {"train": _split(), "val": _split(), "test": _split()}
    return SupervisedDataModule(splits.__getitem__, EpisodeSpec(2, 1, 1), 1, batch_size=batch_size, augment=augment,
                                seed=seed, val_episodes=2, test_episodes=2, eval_batch=2)


def test_supervised_batches_cover_each_epoch_once_with_global_labels() -> None:
    dm = _supervised(batch_size=4)
    batches = iter(dm.train_dataloader())
    epoch = [next(batches) for _ in range(30 // 4)]  # 7 batches; the last 2 images of the epoch are dropped
    rows = torch.cat([b.images[:, 0, 0, 0] for b in epoch]).long()
    assert len(set(rows.tolist())) == 28 and all(isinstance(b, LabelledBatch) for b in epoch)
    assert torch.equal(torch.cat([b.labels for b in epoch]), rows // 5)  # row r is of class r // 5
    assert torch.equal(rows, torch.from_numpy(epoch_order(0, 0, 30)[:28]))
    assert not torch.equal(next(batches).images[:, 0, 0, 0].long(), rows[:4])  # epoch 1: a new order
    resumed = _supervised(batch_size=4)
    resumed.start_step = 3  # a resumed run draws the batches an uninterrupted one would have
    assert torch.equal(next(iter(resumed.train_dataloader())).images, epoch[3].images)


def test_augmentation_keeps_shape_and_dtype_and_is_seeded() -> None:
    images = torch.randint(0, 256, (4, 3, 21, 21), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    a = augment_images(images, np.random.default_rng(3))
    b = augment_images(images, np.random.default_rng(3))
    assert a.shape == images.shape and a.dtype == torch.uint8 and torch.equal(a, b)
    assert not torch.equal(a, images)
    gray = augment_images(images[:, :1], np.random.default_rng(3))  # no saturation for one channel
    assert gray.shape == (4, 1, 21, 21)
    dm = _supervised(augment=True)
    first = next(iter(dm.train_dataloader()))
    assert first.images.shape == (4, 3, 8, 8) and first.labels.shape == (4,)


def test_baseline_training_step_is_adam_on_the_classifier_of_the_training_classes(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, "baseline", steps=1)
    dm = build_datamodule(config)
    assert isinstance(dm, SupervisedDataModule)
    module = build_module(config, dm)
    assert module.backbone.head.out_features == 40  # TINY_RUN's 40 training classes
    batch = next(iter(dm.train_dataloader()))
    assert batch.images.shape[0] == config.algorithm.pretrain.batch_size == 16
    net = module.backbone
    reference = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    logits = torch.func.functional_call(net, reference, (module.problem.inputs(batch.images),))
    F.cross_entropy(logits, batch.labels).backward()
    adam = torch.optim.Adam(reference.values(), lr=config.algorithm.meta_lr)
    adam.step()
    fit_one_step(module, dm)
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), reference[name].detach(), rtol=1e-5, atol=1e-6)


# -- end to end ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["protonet", "baseline", "baseline++"])
def test_metabench_run_writes_a_record(tmp_path: Path, algorithm: str) -> None:
    """`metabench run --benchmark synthetic-5w1s --algorithm X` offline, on the same fixed test episodes (digest) as
    the meta-learners, with the same record schema and the random-init column."""
    flags = set_flags(TINY_RUN + local_run(tmp_path)[:2] + ["episodes.train_ways=5"] * (algorithm == "protonet"))
    code = cli_main(["run", "--benchmark", "synthetic-5w1s", "--algorithm", algorithm, "--max-steps", "4",
                     "--quiet", "--accelerator", "cpu", *flags])
    assert code == 0
    [path] = (tmp_path / "records").glob(f"synthetic-5w1s__{algorithm}__*.json")
    record = read_record(path)
    split = make_glyphs("test", seed=0, num_classes=TINY_RUN_CLASSES)  # what every algorithm's tiny run tests on
    assert record.episode_digest == EpisodeSampler(split, EpisodeSpec(5, 1, 15)).digest(0, 20)
    assert len(record.scores) == 20
    assert record.algorithm == algorithm and record.training_steps == 4 and record.metric == "accuracy"
    assert "random_init_mean" in record.baseline and all(0 <= s <= 1 for s in record.scores)
