"""``metabench bench profile``: the phases of a batched meta-step, each with the profiler's operators; the
decomposition computes the inner loop's own meta-gradient."""

from __future__ import annotations

import json

import pytest
import torch

from metabench.cli import main
from metabench.models.inner_loop import InnerConfig, meta_loss
from metabench.perf.profile_step import PHASES, PhasedStep, profile_phases
from tests.helpers import meta_batch, seeded_conv4


class _Module(torch.nn.Module):
    """The three things PhasedStep reads from an algorithm module."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def params(self) -> dict[str, torch.Tensor]:
        return dict(self.backbone.named_parameters())

    def inner_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(outputs, targets) * 5


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("engine", ["batched", "batched-fused"])
def test_phased_step_is_the_inner_loops_meta_gradient(first_order: bool, engine: str) -> None:
    module = _Module(seeded_conv4(6, global_pool=True))
    inputs = meta_batch(5, 4, (1, 28, 28))
    config = InnerConfig(steps=2, lr=0.3, first_order=first_order)
    step = PhasedStep(module, inputs, config, engine)
    timings: dict[str, list[float]] = {p: [] for p in PHASES}
    got = step.phased(timings)
    loss, _ = meta_loss(module.backbone, module.params(), module.inner_loss, *inputs, config, "sequential")
    ref = torch.autograd.grad(loss, step.targets)
    scale = torch.cat([g.reshape(-1) for g in ref]).norm()
    assert all(float((a - b).norm()) <= 1e-10 * float(scale) for a, b in zip(got, ref))
    assert all(len(timings[p]) == 1 and timings[p][0] > 0 for p in PHASES)


def test_profile_phases_and_cli(tmp_path) -> None:
    result = profile_phases("omniglot-5w1s", "maml", steps=1, warmup=0, top=3, tiny=True)
    assert set(result["phases"]) == set(PHASES) and result["real_step_ms"] > 0
    assert any("conv" in op["op"] for op in result["phases"]["support forward"]["ops"])
    for phase in result["phases"].values():
        assert 0 < len(phase["ops"]) <= 3 and phase["ms"] > 0
        assert sum(op["self_ms"] for op in phase["ops"]) <= phase["self_ms_total"] + 1e-9
    out = tmp_path / "profile.json"
    assert main(["bench", "profile", "--tiny", "--steps", "1", "--warmup", "0", "--threads", "1",
                 "--engine", "batched", "--engine", "batched-fused", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [(r["algorithm"], r["engine"]) for r in results] == [("maml", "batched"), ("maml", "batched-fused")]
    with pytest.raises(ValueError, match="batched engines"):
        PhasedStep(_Module(seeded_conv4(2)), meta_batch(2, 1, (1, 28, 28)), InnerConfig(1, 0.1), "vmap")
    with pytest.raises(ValueError, match="SGD inner loops"):
        profile_phases("omniglot-5w1s", "reptile", steps=1, warmup=0, tiny=True)
