"""Honest FLOP counts (``metabench.perf.flops``): a Conv4 forward against a hand-derived count, a grouped convolution's
backward against its groups counted one by one, grouped and per-task second-order gradients (one count), and the
same meta-step on the batched and the sequential engine (equal to first order; to second order the batched engine
skips work autograd's native double backward wastes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from metabench.models.backbones import Conv4
from metabench.models.inner_loop import InnerConfig, meta_loss
from metabench.perf.flops import count_flops, gemm_rate
from tests.helpers import conv4_image, meta_batch, seeded_conv4


def _conv4_flops_by_hand(sizes: list[int], hidden: int, in_channels: int, head_in: int, ways: int) -> int:
    """2 FLOPs per multiply-add: each 3x3 conv is out_h * out_w * C_out * C_in * 9 of them, the head in x out."""
    convs = sum(s * s * hidden * (in_channels if i == 0 else hidden) * 9 for i, s in enumerate(sizes))
    return 2 * (convs + head_in * ways)


@pytest.mark.parametrize("global_pool,head_in,expected", [(False, 256, 5_315_584), (True, 64, 5_313_664)])
def test_conv4_forward_of_one_28x28_image(global_pool: bool, head_in: int, expected: int) -> None:
    """MAML's Omniglot Conv4 (64 filters, stride 2: 28 -> 14 -> 7 -> 4 -> 2): 5.32 MFLOP flattened, 5.31 with the
    paper preset's global pooling."""
    model = Conv4(1, 5, 28, hidden=64, global_pool=global_pool)
    by_hand = _conv4_flops_by_hand([14, 7, 4, 2], 64, 1, head_in, 5)
    assert by_hand == expected
    with torch.no_grad():
        assert count_flops(lambda: model(torch.rand(1, 1, 28, 28))) == by_hand


def test_grouped_conv_backward_is_counted_per_group() -> None:
    """groups=G: forward, input and weight gradients are G times one group's dense convolution, which is
    2 x (out positions x C_out/G x C_in/G x k^2) x batch for each of the three."""
    groups, c_in, c_out, n, size = 4, 3, 5, 2, 9
    x = torch.rand(n, groups * c_in, size, size, requires_grad=True)
    w = torch.rand(groups * c_out, c_in, 3, 3, requires_grad=True)
    out_positions = ((size + 2 - 3) // 2 + 1) ** 2
    one_group = 2 * n * out_positions * c_out * c_in * 9

    def step() -> None:
        y = F.conv2d(x, w, stride=2, padding=1, groups=groups)
        torch.autograd.grad(y.square().sum(), [x, w])

    assert count_flops(step) == 3 * groups * one_group
    torch_counter = FlopCounterMode(display=False)
    with torch_counter:
        step()
    assert torch_counter.get_total_flops() == (2 + groups) * groups * one_group  # what torch's formula says


def test_grouped_and_per_task_second_order_counts_agree() -> None:
    """Second-order gradients through two stride-2 convolutions of 3 tasks, as ONE grouped convolution per layer
    and as a loop of dense ones per task (both autograd's native convolution and its double backward): one count."""
    tasks, channels, n = 3, 4, 2
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, tasks, channels, 14, 14, generator=gen)
    weights = [torch.rand(tasks, channels, channels, 3, 3, generator=gen, requires_grad=True) for _ in range(2)]

    def second_order(grouped: bool) -> None:
        if grouped:
            h = x.reshape(n, tasks * channels, 14, 14)
            for w in weights:
                h = F.conv2d(h, w.reshape(-1, channels, 3, 3), stride=2, padding=1, groups=tasks).tanh()
            inner = torch.autograd.grad(h.square().sum(), weights, create_graph=True)
        else:
            per_task = []
            for t in range(tasks):
                h = x[:, t]
                for w in weights:
                    h = F.conv2d(h, w[t], stride=2, padding=1).tanh()
                per_task.append(h.square().sum())
            inner = torch.autograd.grad(sum(per_task), weights, create_graph=True)
        torch.autograd.grad(sum(g.square().sum() for g in inner), weights)

    assert count_flops(lambda: second_order(True)) == count_flops(lambda: second_order(False)) > 0


def _meta_gradient(pool: bool, global_pool: bool, steps: int, first_order: bool):
    model = seeded_conv4(6, pool=pool, global_pool=global_pool, dtype=torch.float32)
    sx, sy, qx, qy = meta_batch(5, 4, conv4_image(pool), dtype=torch.float32)
    params = dict(model.named_parameters())
    config = InnerConfig(steps=steps, lr=0.3, first_order=first_order)

    def step(engine: str) -> None:
        loss, _ = meta_loss(model, params, F.cross_entropy, sx, sy, qx, qy, config, engine)
        torch.autograd.grad(loss, list(params.values()))

    return step


@pytest.mark.parametrize("pool,global_pool", [(False, True), (True, False)])
@pytest.mark.parametrize("steps", [1, 2])
def test_first_order_counts_agree_across_engines(pool: bool, global_pool: bool, steps: int) -> None:
    """A FOMAML meta-gradient counts the same FLOPs on the batched and the sequential engine, and on the sequential
    one (dense convolutions only) the same as torch's own counter."""
    step = _meta_gradient(pool, global_pool, steps, first_order=True)
    sequential, batched = count_flops(lambda: step("sequential")), count_flops(lambda: step("batched"))
    assert batched == sequential > 0
    torch_counter = FlopCounterMode(display=False)
    with torch_counter:
        step("sequential")
    assert torch_counter.get_total_flops() == sequential


@pytest.mark.parametrize("pool,global_pool", [(False, True), (True, False)])
def test_second_order_batched_count_is_at_most_the_reference(pool: bool, global_pool: bool) -> None:
    """Second-order MAML: autograd's native double backward, which the sequential reference runs, also computes the
    gradient w.r.t. the input images (never used) and weight gradients on a padded kernel (4x4 for 3x3 after a
    stride-2 convolution of an even size) that it then crops; the batched engine does the same or (with a
    convolution that computes each derivative once, at its size) less, never more."""
    step = _meta_gradient(pool, global_pool, 1, first_order=False)
    sequential, batched = count_flops(lambda: step("sequential")), count_flops(lambda: step("batched"))
    assert 0.85 * sequential < batched <= sequential


def test_gemm_rate() -> None:
    assert gemm_rate(64, repeats=2) > 1e6  # FLOP/s of any machine that runs the suite
    with pytest.raises(ValueError, match="size >= 1 and repeats >= 1"):
        gemm_rate(0)
