"""Backbones: Conv4 shapes and parameter counts against hand-computed numbers, the plain-ops batch norm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metabench.models.backbones import BACKBONES, BatchNorm2d, Conv4, build_backbone


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_conv4_omniglot_shape_and_parameter_count() -> None:
    model = build_backbone("conv4-omniglot", in_channels=1, ways=5, image_size=28)
    assert model(torch.rand(7, 1, 28, 28)).shape == (7, 5)
    # stride-2 convs, padding 1: 28 -> 14 -> 7 -> 4 -> 2, so 64 * 2 * 2 = 256 features
    assert model.feature_size == 256
    conv1 = 64 * 1 * 3 * 3 + 64
    conv_k = 64 * 64 * 3 * 3 + 64
    bn = 2 * 64
    head = 256 * 5 + 5
    assert n_params(model) == conv1 + 3 * conv_k + 4 * bn + head == 113_221


def test_conv4_miniimagenet_shape_and_parameter_count() -> None:
    model = build_backbone("conv4-miniimagenet", in_channels=3, ways=5, image_size=84)
    assert model(torch.rand(4, 3, 84, 84)).shape == (4, 5)
    # stride-1 convs + 2x2 max-pool: 84 -> 42 -> 21 -> 10 -> 5, so 32 * 5 * 5 = 800 features
    assert model.feature_size == 800
    conv1 = 32 * 3 * 3 * 3 + 32
    conv_k = 32 * 32 * 3 * 3 + 32
    bn = 2 * 32
    head = 800 * 5 + 5
    assert n_params(model) == conv1 + 3 * conv_k + 4 * bn + head == 32_901


def test_conv4_generic_and_kwargs() -> None:
    model = build_backbone("conv4", in_channels=1, ways=20, image_size=28, hidden=8)
    assert isinstance(model, Conv4)
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 20)
    assert model.feature_size == 8 * 2 * 2
    pooled = build_backbone("conv4", in_channels=3, ways=5, image_size=32, hidden=4, pool=True)
    assert pooled.feature_size == 4 * 2 * 2  # 32 -> 16 -> 8 -> 4 -> 2


def test_no_buffers_and_init() -> None:
    model = Conv4(1, 5, 28)
    assert list(model.buffers()) == []
    assert all(len(list(m.buffers())) == 0 for m in model.modules())
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.all(p == 0), name  # conv, BN and head biases start at zero
    bn = [m for m in model.modules() if isinstance(m, BatchNorm2d)]
    assert len(bn) == 4 and all(torch.all(m.weight == 1) for m in bn)


def test_head_init_std_draws_the_head_from_a_normal() -> None:
    """MAML's Omniglot head is tf.random_normal (std 1); the convolutions keep Xavier, whatever the head."""
    torch.manual_seed(0)
    xavier = Conv4(1, 5, 28, hidden=64, global_pool=True)
    torch.manual_seed(0)
    normal = Conv4(1, 5, 28, hidden=64, global_pool=True, head_init_std=1.0)
    for (name, a), (_, b) in zip(xavier.named_parameters(), normal.named_parameters()):
        if name != "head.weight":
            assert torch.equal(a, b), name
    bound = (6 / (64 + 5)) ** 0.5  # Xavier-uniform's bound
    assert xavier.head.weight.abs().max() <= bound
    assert 0.8 < normal.head.weight.std().item() < 1.2 and normal.head.weight.abs().max() > bound
    assert torch.all(normal.head.bias == 0)
    with pytest.raises(ValueError, match="head_init_std must be positive"):
        Conv4(1, 5, 28, head_init_std=0.0)


def test_batchnorm_matches_functional_batch_norm() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 5, 4, 3, dtype=torch.float64) * 3 + 1
    bn = BatchNorm2d(5).double()
    with torch.no_grad():
        bn.weight.copy_(torch.randn(5))
        bn.bias.copy_(torch.randn(5))
    expected = F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=1e-5)
    torch.testing.assert_close(bn(x), expected, rtol=1e-12, atol=1e-12)
    # eval mode changes nothing: batch statistics always (MAML's protocol)
    bn.eval()
    torch.testing.assert_close(bn(x), expected, rtol=1e-12, atol=1e-12)


def test_batchnorm_gradients_match_functional_batch_norm() -> None:
    torch.manual_seed(1)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    bn = BatchNorm2d(3).double()
    ours = torch.autograd.grad(bn(x).sin().sum(), [x, bn.weight, bn.bias])
    ref = torch.autograd.grad(
        F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=1e-5).sin().sum(),
        [x, bn.weight, bn.bias])
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_registry_unknown_name_lists_known_ones() -> None:
    assert {"conv4", "conv4-omniglot", "conv4-miniimagenet"} <= set(BACKBONES)
    with pytest.raises(ValueError, match="unknown backbone 'resnet99'.*conv4-miniimagenet"):
        build_backbone("resnet99", in_channels=1, ways=5, image_size=28)


def test_bad_sizes_raise() -> None:
    with pytest.raises(ValueError, match="ways=0"):
        Conv4(1, 0, 28)
    with pytest.raises(ValueError, match="too small"):
        Conv4(3, 5, 8, hidden=4, pool=True)  # 8 -> 4 -> 2 -> 1 -> pooling a 1x1 map fails


def test_global_pool_gives_mamls_64_feature_omniglot_head() -> None:
    """MAML's Omniglot network averages the final 2x2 map: 64 features, head 64 * 5 + 5 parameters."""
    from metabench.models.backbones import build_backbone

    pooled = build_backbone("conv4-omniglot", 1, 5, 28, global_pool=True)
    flat = build_backbone("conv4-omniglot", 1, 5, 28)
    assert pooled.feature_size == 64 and flat.feature_size == 256
    n_pooled = sum(p.numel() for p in pooled.parameters())
    n_flat = sum(p.numel() for p in flat.parameters())
    assert n_flat - n_pooled == (256 - 64) * 5
    assert pooled(torch.rand(3, 1, 28, 28)).shape == (3, 5)
