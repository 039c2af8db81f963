"""MAML's non-convolutional network (``mlp-omniglot``): shape, size and init as in the authors' code, batch norm
without a scale, ``adapt_norm=false`` (batch-norm offsets meta-learned, not adapted), and float64 parity of the
batched engine against the sequential reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from metabench.models.algorithms import adapted_parameter_names
from metabench.models.backbones import MLP, BatchNorm1d, build_backbone
from metabench.models.inner_loop import InnerConfig, adapt_tasks, functional_loss, meta_loss, task_outputs
from metabench.models.learners import algorithm_config
from metabench.run.config import ConfigError, resolve
from tests.helpers import DT, WAYS, meta_batch, rel_err, seeded_mlp
from tests.helpers import TASKS as T

SIZE, HIDDEN = 8, (12, 8, 6, 6)  # a narrow MLP on 8x8 images


def batch() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """5 support examples (one per class) and 10 random-label queries per task, 8x8 float64 images, seed 1."""
    return meta_batch(5, 10, (1, SIZE, SIZE), support_labels="balanced")


def test_paper_network_shape_size_and_init() -> None:
    """784 -> 256 -> 128 -> 64 -> 64 -> 5 with a batch-norm offset per hidden unit and no scale (the paper's
    Sec. 5.2 widths; tf batch_norm's defaults); truncated-normal(0.01) weights cut at 2 std, zero biases."""
    torch.manual_seed(0)
    model = build_backbone("mlp-omniglot", 1, 5, 28)
    linear = 784 * 256 + 256 + 256 * 128 + 128 + 128 * 64 + 64 + 64 * 64 + 64 + 64 * 5 + 5
    assert sum(p.numel() for p in model.parameters()) == linear + 256 + 128 + 64 + 64
    norms = [m for m in model.modules() if isinstance(m, BatchNorm1d)]
    assert [n.num_features for n in norms] == [256, 128, 64, 64]
    assert all(n.weight is None and n.eps == 1e-3 for n in norms)
    weights = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, torch.nn.Linear)])
    assert weights.abs().max() <= 0.02 and 0.007 < weights.std() < 0.009  # std of N(0, .01) cut at 2 std: .0088
    assert all(m.bias.abs().sum() == 0 for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert model(torch.rand(7, 1, 28, 28)).shape == (7, 5)


def test_batch_norm_without_scale_normalises_then_offsets() -> None:
    bn = BatchNorm1d(3, eps=1e-3, scale=False).double()
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    x = torch.randn(6, 3, dtype=torch.float64) * 4 + 1
    expected = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-3) + bn.bias
    assert torch.allclose(bn(x), expected, atol=1e-12)
    assert [name for name, _ in bn.named_parameters()] == ["bias"]


def test_bad_sizes_fail_with_a_message() -> None:
    with pytest.raises(ValueError, match="MLP needs positive sizes"):
        MLP(1, 5, 28, hidden=())
    with pytest.raises(ValueError, match="MLP needs positive sizes"):
        MLP(1, 5, 28, hidden=(256, 0))


@pytest.mark.parametrize("scale", [False, True])
def test_batched_forward_equals_forward_per_task(scale: bool) -> None:
    model = seeded_mlp(SIZE, HIDDEN, scale=scale)
    params = {k: torch.stack([p + 0.01 * t for t in range(T)]) for k, p in model.named_parameters()}
    x = torch.rand(T, 4, 1, SIZE, SIZE, dtype=DT)
    batched = model.batched_forward(params, x)
    looped = torch.stack([torch.func.functional_call(model, {k: p[t] for k, p in params.items()}, (x[t],))
                          for t in range(T)])
    assert rel_err(batched, looped) <= 1e-13


@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("adapt_norm", [True, False])
@pytest.mark.parametrize("steps,first_order", [(1, False), (2, False), (2, True)])
def test_meta_gradient_parity_float64(scale: bool, adapt_norm: bool, steps: int, first_order: bool) -> None:
    """Batched (one bmm per layer, native batch norm per task) and vmap against the sequential reference."""
    model = seeded_mlp(SIZE, HIDDEN, scale=scale)
    names = adapted_parameter_names(model, None, adapt_norm)
    sx, sy, qx, qy = batch()
    grads = {}
    for engine in ("sequential", "batched", "vmap"):
        params = {k: p for k, p in model.named_parameters() if k in names}
        loss, _ = meta_loss(model, params, lambda o, y: 5 * F.cross_entropy(o, y), sx, sy, qx, qy,
                            InnerConfig(steps, 0.4, first_order), engine)
        grads[engine] = torch.autograd.grad(loss, list(model.parameters()))
    assert rel_err(grads["batched"], grads["sequential"]) <= 1e-10
    assert rel_err(grads["vmap"], grads["sequential"]) <= 1e-10
    norm_grads = [g for (name, _), g in zip(model.named_parameters(), grads["sequential"]) if ".norm." in name]
    assert all(g.abs().sum() > 0 for g in norm_grads)  # meta-learned either way


def test_adapt_norm_false_adapts_everything_but_batch_norm() -> None:
    """MAML's code adapts only its ``weights`` dict: batch-norm offsets keep their meta-learned value inside a
    task (and are still trained by the outer step, checked by the parity test above)."""
    model = seeded_mlp(SIZE, HIDDEN, scale=True)
    names = adapted_parameter_names(model, None, adapt_norm=False)
    assert names == {n for n, _ in model.named_parameters() if ".norm." not in n}
    sx, sy, _, _ = batch()
    for engine in ("sequential", "batched"):
        params = {k: p.detach() for k, p in model.named_parameters() if k in names}
        adapted = adapt_tasks(params, functional_loss(model, F.cross_entropy), sx, sy, InnerConfig(2, 0.4, True),
                              engine)
        assert set(adapted) == names
        assert all((adapted[k] - params[k]).abs().amax() > 0 for k in names)
        outputs = task_outputs(model, adapted, sx, engine)
        assert outputs.shape == (T, 5, WAYS)


def test_adapt_norm_false_with_prefixes_and_errors() -> None:
    model = seeded_mlp(SIZE, HIDDEN)
    assert adapted_parameter_names(model, ["head"], adapt_norm=False) == {"head.weight", "head.bias"}
    with pytest.raises(ValueError, match="adapt_norm=false is not supported by reptile"):
        algorithm_config(name="reptile", adapt_norm=False)
    only_norm = torch.nn.Sequential(BatchNorm1d(3))
    with pytest.raises(ValueError, match="leaves no parameter"):
        adapted_parameter_names(only_norm, None, adapt_norm=False)


@pytest.mark.parametrize("benchmark,queries", [("omniglot-5w1s", 1), ("omniglot-5w5s", 5)])
def test_paper_mlp_preset_is_the_papers_protocol(benchmark: str, queries: int) -> None:
    config = resolve(benchmark, "maml", "paper-mlp")
    a = config.algorithm
    assert (a.meta_batch, a.inner_steps, a.inner_lr, a.inner_loss_scale, a.eval_steps, a.meta_lr) == (
        32, 1, 0.4, 5.0, 3, 1e-3)
    assert a.inner_optimizer == "sgd" and a.bn_mode == "transductive" and not a.adapt_norm and a.name == "maml"
    assert config.trainer.max_steps == 60000
    assert config.episodes.train_queries == queries
    assert config.data.options == {"scheme": "maml"}
    assert config.model.backbone == "mlp-omniglot" and config.model.invert
    assert config.model.options == {"hidden": [256, 128, 64, 64], "norm_eps": 0.001, "norm_scale": False,
                                    "init_std": 0.01}
    with pytest.raises(ConfigError, match="defines no 'reptile'"):
        resolve(benchmark, "reptile", "paper-mlp")
