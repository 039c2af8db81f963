"""ResNet-12: parameter counts against the architecture's published layer list, shapes, no buffers, a float64
second-order MAML meta-gradient against a plain sequential autograd loop, and a tiny run of every classification
algorithm with ``--set model.backbone=resnet12``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metabench.models.backbones import BatchNorm2d, build_backbone
from metabench.models.inner_loop import InnerConfig, meta_loss
from metabench.models.resnet12 import METAOPTNET_WIDTHS, TADAM_WIDTHS, ResNet12
from metabench.run.config import preset_algorithms
from metabench.run.records import read_record
from metabench.run.runner import run
from tests.helpers import DT, WAYS, flat, meta_batch, reference_maml_grad, rel_err, tiny_config


def trunk_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("head."))


def layer_list_count(in_channels: int, widths: tuple[int, ...]) -> int:
    """Parameters of the layer list in MetaOptNet's models/ResNet12_embedding.py, per block: three 3x3 convs
    without bias, a 1x1 shortcut conv without bias, four batch norms with weight and bias."""
    total = 0
    for c_in, c_out in zip((in_channels, *widths[:-1]), widths):
        total += 9 * c_in * c_out + 2 * 9 * c_out * c_out + c_in * c_out + 4 * 2 * c_out
    return total


def test_parameter_count_matches_the_published_architecture() -> None:
    metaoptnet = build_backbone("resnet12", 3, 5, 84)
    assert metaoptnet.widths == METAOPTNET_WIDTHS == (64, 160, 320, 640)
    # 12,424,320: the "12.4M parameters" quoted for MetaOptNet's ResNet-12, computed from its layer list
    assert trunk_parameters(metaoptnet) == layer_list_count(3, METAOPTNET_WIDTHS) == 12_424_320
    tadam = build_backbone("resnet12", 3, 5, 84, widths=list(TADAM_WIDTHS))
    assert trunk_parameters(tadam) == layer_list_count(3, TADAM_WIDTHS) == 7_996_800
    head = metaoptnet.feature_size * 5 + 5
    assert sum(p.numel() for p in metaoptnet.parameters()) == 12_424_320 + head


def test_shapes_pooling_and_options() -> None:
    model = build_backbone("resnet12", 3, 5, 84)
    assert model.feature_size == 640 * 5 * 5  # 84 -> 42 -> 21 -> 10 -> 5, flattened (MetaOptNet avg_pool=False)
    pooled = build_backbone("resnet12", 3, 5, 84, global_pool=True, widths=[64, 128, 256, 512])
    assert pooled.feature_size == 512  # TADAM: global average pool
    small = build_backbone("resnet12", 1, 20, 28, hidden=4, activation="swish")
    assert small.widths == (4, 10, 20, 40) and small.feature_size == 40  # 28 -> 14 -> 7 -> 3 -> 1
    x = torch.rand(3, 1, 28, 28)
    assert small(x).shape == (3, 20) and small.embed(x).shape == (3, 40)
    with pytest.raises(ValueError, match="too small"):
        build_backbone("resnet12", 1, 5, 12)
    with pytest.raises(ValueError, match="activation"):
        build_backbone("resnet12", 1, 5, 28, activation="relu")


def test_buffer_free_and_initialised_as_metaoptnet() -> None:
    model = ResNet12(3, 5, 32, hidden=8)
    assert list(model.buffers()) == []
    norms = [m for m in model.modules() if isinstance(m, BatchNorm2d)]
    assert len(norms) == 16 and all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in norms)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 16 and all(m.bias is None for m in convs)
    # kaiming_normal_(mode="fan_out", nonlinearity="leaky_relu"): std sqrt(2 / (out * k * k)) (a = 0 in the gain)
    last = model.blocks[3].conv3.weight.detach()
    std = (2.0 / (last.shape[0] * 9)) ** 0.5
    assert abs(float(last.std()) - std) < 0.1 * std


@pytest.mark.parametrize("engine", ["sequential", "vmap", "batched"])
def test_maml_meta_gradient_float64_matches_sequential_autograd(engine: str) -> None:
    """2 tasks, 5-way 1-shot with 2 queries per class, 16x16 images, widths 2-5-10-20, 2 inner steps."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ResNet12(1, WAYS, 16, hidden=2).to(DT)
        with torch.no_grad():  # batch-norm affine away from 1 / 0, so that no gradient is trivially zero
            for name, p in model.named_parameters():
                if ".norm" in name or "shortcut_norm" in name:
                    p.add_(0.2 * torch.randn_like(p))
    params = dict(model.named_parameters())
    sx, sy, qx, qy = meta_batch(WAYS, 2 * WAYS, (1, 16, 16), tasks=2, support_labels="ordered",
                                query_labels="ordered")
    reference = reference_maml_grad(model, params, sx, sy, qx, qy, 0.3, 2, first_order=False)
    loss, _ = meta_loss(model, params, F.cross_entropy, sx, sy, qx, qy, InnerConfig(steps=2, lr=0.3), engine)
    ours = flat(torch.autograd.grad(loss, list(params.values())))
    assert float(reference.norm()) > 1e-3
    assert rel_err(ours, reference) <= 1e-10
    first_order = reference_maml_grad(model, params, sx, sy, qx, qy, 0.3, 2, first_order=True)
    assert rel_err(first_order, reference) > 1e-4  # the second-order terms are really there


@pytest.mark.parametrize("algorithm", preset_algorithms("synthetic-5w1s"))
def test_every_algorithm_runs_with_resnet12(tmp_path: Path, algorithm: str) -> None:
    config = tiny_config(tmp_path, algorithm, steps=3, extra=["model.backbone=resnet12", "model.options.hidden=4"])
    record = read_record(run(config, progress=False).record_path)
    assert record.config["model"]["backbone"] == "resnet12" and record.training_steps == 3
    assert len(record.scores) == 20 and "random_init_mean" in record.baseline
