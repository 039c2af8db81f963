"""The Lightning modules against the inner-loop functions they are built from."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from metabench.models.inner_loop import adapt_tasks, engine_candidates, reptile_update
from metabench.run.config import resolve
from metabench.run.runner import build_datamodule, build_module
from tests.helpers import TINY_GLYPHS, first_meta_batch, fit_one_step

TINY = TINY_GLYPHS + ["algorithm.meta_batch=3"]


@pytest.mark.parametrize("inner_batch", [None, 10])
def test_reptile_step_equals_hand_update(tmp_path: Path, inner_batch) -> None:
    config = resolve("synthetic-5w1s", "reptile", overrides=TINY + [f"algorithm.inner_batch={inner_batch or 'null'}"])
    dm = build_datamodule(config, torch.device("cpu"))
    module = build_module(config, dm)
    theta = {k: v.detach().clone() for k, v in module.params().items()}
    batch = first_meta_batch(dm)
    sx, sy = module.problem.inputs(batch.support_x), batch.support_y
    inner = module.inner_config(True)
    if inner_batch:
        sx, sy = module.inner_minibatches(sx, sy)  # global_step 0: the same minibatches as the step
        inner = dataclasses.replace(inner, per_step_batches=True)
        assert sx.shape[:3] == (3, config.algorithm.inner_steps, inner_batch)
    fit_one_step(module, dm)  # engine "auto": the step picks (and keeps) the fastest engine
    # the reference runs the engine the step ran: engines differ by ~1e-5 in fp32 (conv biases right before
    # batch norm, whose true gradient is 0, pick up rounding noise of different sizes)
    assert module.engine in engine_candidates("cpu", module.backbone)
    adapted = adapt_tasks(theta, module.task_loss, sx, sy, inner, module.engine)
    expected = reptile_update(theta, adapted, config.algorithm.meta_lr)  # epsilon at step 0
    for name, p in module.params().items():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-6)


def test_reptile_epsilon_anneals_linearly_to_final() -> None:
    config = resolve("synthetic-5w1s", "reptile", overrides=TINY + ["algorithm.meta_lr=1.0",
                                                                   "algorithm.meta_lr_final=0.2"])
    dm = build_datamodule(config, torch.device("cpu"))
    module = build_module(config, dm)
    module.max_steps = 10
    schedule = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(11):
        lrs.append(schedule.get_last_lr()[0])
        schedule.optimizer.step()
        schedule.step()
    np.testing.assert_allclose(lrs, np.linspace(1.0, 0.2, 11), atol=1e-12)


@pytest.mark.parametrize("algorithm", ["maml", "fomaml"])
def test_maml_step_uses_meta_loss_gradient(algorithm: str) -> None:
    """One Lightning step == Adam on meta_loss's gradient (second order for MAML, first order for FOMAML)."""
    from metabench.models.inner_loop import meta_loss

    config = resolve("synthetic-5w1s", algorithm, overrides=TINY)
    dm = build_datamodule(config, torch.device("cpu"))
    module = build_module(config, dm)
    batch = first_meta_batch(dm)
    reference = {k: v.detach().clone().requires_grad_() for k, v in module.params().items()}
    fit_one_step(module, dm)  # engine "auto": the step picks (and keeps) the fastest engine
    # the reference runs the step's engine: Adam turns the ~1e-9 rounding noise in the gradients of conv biases
    # right before batch norm (true gradient 0) into ~lr-sized steps that differ between engines
    reference_model = build_module(config, dm).backbone
    loss, _ = meta_loss(reference_model, reference, module.inner_loss, module.problem.inputs(batch.support_x),
                        batch.support_y, module.problem.inputs(batch.query_x), batch.query_y,
                        module.inner_config(True), module.engine)
    loss.backward()
    adam = torch.optim.Adam(reference.values(), lr=config.algorithm.meta_lr)
    adam.step()
    for name, p in module.params().items():
        torch.testing.assert_close(p.detach(), reference[name].detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("algorithm,extra", [("maml", []), ("maml", ["algorithm.task_chunk=2"]), ("reptile", [])])
def test_auto_engine_times_candidates_on_the_first_step(algorithm: str, extra: list[str]) -> None:
    config = resolve("synthetic-5w1s", algorithm, overrides=TINY + extra)
    assert config.algorithm.engine == "auto"
    dm = build_datamodule(config, torch.device("cpu"))
    module = build_module(config, dm)
    assert module.engine == "auto" and module.engine_timings == {}
    fit_one_step(module, dm)
    assert set(module.engine_timings) == {"batched-fused", "batched", "sequential"}
    assert module.engine == min(module.engine_timings, key=module.engine_timings.get)

    # A resumed run keeps that choice instead of timing again (engines agree only up to float rounding).
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    resumed = build_module(config, dm)
    resumed.on_load_checkpoint(checkpoint)
    assert (resumed.engine, resumed.engine_timings) == (module.engine, module.engine_timings)


@pytest.mark.parametrize("algorithm", ["maml", "fomaml"])
def test_task_chunk_step_equals_unchunked_step(algorithm: str) -> None:
    """algorithm.task_chunk (manual optimization, meta-gradient in chunks) == the automatic one-chunk step."""
    params, init = {}, {}
    for chunk in ("null", "2"):  # meta-batch 3: chunks of 2 + 1
        config = resolve("synthetic-5w1s", algorithm,
                         overrides=TINY + ["algorithm.engine=sequential", f"algorithm.task_chunk={chunk}"])
        dm = build_datamodule(config, torch.device("cpu"))
        module = build_module(config, dm)
        init = init if chunk != "null" else {k: v.detach().clone() for k, v in module.backbone.state_dict().items()}
        module.backbone.load_state_dict(init)  # the same initialization for both steps
        assert module.automatic_optimization == (chunk == "null")
        fit_one_step(module, dm)
        assert module.global_step == 1
        params[chunk] = {k: v.detach().clone() for k, v in module.params().items()}
    for name, p in params["2"].items():
        torch.testing.assert_close(p, params["null"][name], rtol=1e-5, atol=1e-6)
