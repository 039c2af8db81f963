"""Shared test helpers (import them with ``from tests.helpers import ...``): seeded float64 networks and
meta-batches, relative errors, tiny run configurations, one Lightning step, the CLI's ``--set`` flags. Fixtures live
in ``tests/conftest.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metabench.core.stats import mean_ci95
from metabench.models.backbones import MLP, Conv4
from metabench.models.inner_loop import Params
from metabench.run.records import Record, write_record

if TYPE_CHECKING:
    import lightning as L

    from metabench.datasets.datamodule import EpisodicDataModule
    from metabench.datasets.episodes import MetaBatch
    from metabench.run.config import RunConfig

REPO = Path(__file__).resolve().parents[1]

DT = torch.float64
TASKS, WAYS = 3, 5  # the small float64 meta-batches: 3 tasks of 5 classes


def flat(tensors: Sequence[Tensor]) -> Tensor:
    """The tensors flattened and joined into one vector (autograd kept)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def rel_err(a: Tensor | Sequence[Tensor], b: Tensor | Sequence[Tensor]) -> float:
    """``||a - b|| / ||b||`` for tensors or sequences of tensors (flattened and joined), outside autograd."""
    a = a.detach() if isinstance(a, Tensor) else flat(a).detach()
    b = b.detach() if isinstance(b, Tensor) else flat(b).detach()
    return float((a - b).norm() / b.norm())


def assert_grads_close(ours: Sequence[Tensor], ref: Sequence[Tensor], rtol: float = 1e-10) -> None:
    """Meta-gradients equal to ``rtol`` relative to the reference's norm, as a whole and tensor by tensor (conv
    biases before batch norm are ~0, so each tensor is judged against the whole); a ~0 reference is refused."""
    scale = flat(ref).norm()
    assert scale > 1e-3, "reference meta-gradient is ~0: the comparison would be vacuous"
    assert rel_err(ours, ref) <= rtol
    for a, b in zip(ours, ref):
        assert (a - b).norm() <= rtol * scale


def conv4_image(pool: bool) -> tuple[int, int, int]:
    """The test Conv4's input shape: 1x28x28 (Omniglot-like), or 2x21x21 pooled (odd sizes: floor pooling)."""
    return (2, 21, 21) if pool else (1, 28, 28)


def seeded_conv4(hidden: int = 6, *, pool: bool = False, global_pool: bool = False, bn_noise: float = 0.0,
                  generator: torch.Generator | None = None, dtype: torch.dtype = DT) -> Conv4:
    """A 5-way Conv4 (float64 unless told) from seed 0, global RNG untouched; batch-norm affine += bn_noise*N(0,1)."""
    channels, size, _ = conv4_image(pool)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Conv4(channels, WAYS, size, hidden=hidden, pool=pool, global_pool=global_pool).to(dtype)
        if bn_noise:  # drawn from ``generator``, else from the seeded stream right after the init
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "features" in name and p.ndim == 1:
                        p.add_(bn_noise * torch.randn(p.shape, generator=generator, dtype=dtype))
    return model


def seeded_mlp(image_size: int, hidden: tuple[int, ...], *, scale: bool = False, only_norm: bool = True) -> MLP:
    """A 5-way one-channel float64 MLP from seed 0 (global RNG untouched), batch norm (or all) moved by 0.3*N(0,1)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = MLP(1, WAYS, image_size, hidden=hidden, norm_scale=scale).double()
        with torch.no_grad():  # larger than the 0.01 init, so that the gradients are not all ~0
            for name, p in model.named_parameters():
                if ".norm." in name or not only_norm:
                    p.add_(0.3 * torch.randn_like(p))
    return model


Labels = Literal["random", "balanced", "ordered"]


def _labels(kind: Labels, lead: tuple[int, ...], n: int, ways: int, gen: torch.Generator) -> Tensor:
    """``[*lead, n]`` labels: iid, n/ways per class in a shuffled class order per row, or 0..ways-1 repeated."""
    if kind == "random":
        return torch.randint(0, ways, (*lead, n), generator=gen)
    if kind == "balanced":
        count = math.prod(lead)
        rows = [torch.randperm(ways, generator=gen).repeat_interleave(n // ways) for _ in range(count)]
        return torch.stack(rows).reshape(*lead, n)
    return torch.arange(ways).repeat(*lead, n // ways)


def meta_batch(support: int, query: int, image: tuple[int, ...], *, seed: int | torch.Generator = 1,
               steps: int | None = None, tasks: int = TASKS, ways: int = WAYS, dtype: torch.dtype = DT,
               normal: bool = False, support_labels: Labels = "random", query_labels: Labels = "random",
               interleave: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``sx [T, (steps,) support, *image], sy, qx [T, query, *image], qy``: U[0, 1) (or N(0, 1)) images from seed."""
    # draws both image sets then both label sets, or set by set if ``interleave``: each test keeps its own data
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    draw = torch.randn if normal else torch.rand
    lead = (tasks,) if steps is None else (tasks, steps)
    sx = draw(*lead, support, *image, generator=gen, dtype=dtype)
    if interleave:
        sy = _labels(support_labels, lead, support, ways, gen)
        qx = draw(tasks, query, *image, generator=gen, dtype=dtype)
    else:
        qx = draw(tasks, query, *image, generator=gen, dtype=dtype)
        sy = _labels(support_labels, lead, support, ways, gen)
    qy = _labels(query_labels, (tasks,), query, ways, gen)
    return sx, sy, qx, qy


# -- tiny runs ----------------------------------------------------------------------------------------------

# The smallest useful synthetic-glyph classification: 20 classes per split, a Conv4 of 4 filters.
TINY_GLYPHS = ["data.options.num_classes=20", "model.options.hidden=4"]

# A whole `metabench run` in seconds on 2 cores: 40 classes per split, hidden 8, few episodes.
TINY_RUN_CLASSES = 40
TINY_RUN = [f"data.options.num_classes={TINY_RUN_CLASSES}", "model.options.hidden=8", "episodes.val_episodes=10",
            "episodes.test_episodes=20", "episodes.eval_batch=10", "trainer.val_every=4",
            "trainer.checkpoint_every=4", "trainer.log_every=2", "algorithm.meta_batch=4", "algorithm.eval_steps=2"]


def local_run(tmp_path: Path) -> list[str]:
    """Overrides that keep a test run on the CPU, its run folders and records under ``tmp_path``."""
    return [f"out_dir={tmp_path / 'runs'}", f"records_dir={tmp_path / 'records'}", "trainer.accelerator=cpu"]


def tiny_config(tmp_path: Path, algorithm: str, steps: int = 8, extra: list[str] | None = None) -> RunConfig:
    """``synthetic-5w1s`` with :data:`TINY_RUN`, ``steps`` training steps, :func:`local_run` and ``extra``."""
    from metabench.run.config import resolve

    overrides = TINY_RUN + [f"trainer.max_steps={steps}"] + local_run(tmp_path) + (extra or [])
    return resolve("synthetic-5w1s", algorithm, overrides=overrides)


def set_flags(overrides: Iterable[str]) -> list[str]:
    """The ``--set key=value`` arguments of the metabench CLI for ``overrides``."""
    return [arg for item in overrides for arg in ("--set", item)]


def first_meta_batch(dm: EpisodicDataModule) -> MetaBatch:
    """The meta-batch a data module's first training step gets (its seed, step 0)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([dm.seed, 0])))
    return dm.train_sampler.gather(dm.train_sampler.sample(rng, dm.meta_batch))


def fit_one_step(module: L.LightningModule, dm: EpisodicDataModule) -> None:
    """One quiet Lightning training step of ``module`` on ``dm``, on the CPU, no validation, nothing saved."""
    import lightning as L

    from metabench.run.runner import quiet_lightning

    quiet_lightning()
    L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, inference_mode=False,
              accelerator="cpu").fit(module, datamodule=dm)


# -- a plug-in distribution (tests/test_registry.py, tests/test_example_package.py) -----------------------------


def write_distribution(site, name: str, entry_points: dict[str, dict[str, str]]) -> None:
    """An installed distribution's metadata as pip leaves it (``<name>-0.1.dist-info``), entry points included."""
    dist = site / f"{name}-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = []
    for group, points in entry_points.items():
        lines += [f"[{group}]", *(f"{key} = {value}" for key, value in points.items()), ""]
    (dist / "entry_points.txt").write_text("\n".join(lines))


# -- the sequential MAML reference (tests/test_inner_loop.py, tests/test_resnet12.py) ----------------------------


def reference_maml_grad(model: nn.Module, params: Params, sx, sy, qx, qy, lr: float, steps: int,
                        first_order: bool) -> Tensor:
    """Sequential (F)MAML meta-gradient with plain torch.autograd over explicit parameter dicts."""
    names = list(params)
    total = torch.zeros((), dtype=DT)
    for t in range(sx.shape[0]):
        p = dict(params)
        if first_order:  # adapt on detached copies; the meta-gradient is the query gradient at the end point
            p = {k: v.detach().requires_grad_() for k, v in p.items()}
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, p, (sx[t],)), sy[t])
            grads = torch.autograd.grad(loss, [p[k] for k in names], create_graph=not first_order)
            p = {k: p[k] - lr * g for k, g in zip(names, grads)}
            if first_order:
                p = {k: v.detach().requires_grad_() for k, v in p.items()}
        query_loss = F.cross_entropy(functional_call(model, p, (qx[t],)), qy[t]) / sx.shape[0]
        wrt = [p[k] for k in names] if first_order else [params[k] for k in names]
        total = total + flat(torch.autograd.grad(query_loss, wrt))
    return total


# -- leaderboard fixture records (tests/test_leaderboard*.py) -----------------------------------------------------

DIGEST_A, DIGEST_B, DIGEST_S = "a" * 64, "b" * 64, "5" * 64


def make_record(run_id: str, algorithm: str, scores: list[float], *, benchmark: str = "omniglot-5w1s",
                seed: int = 0, digest: str = DIGEST_A, bn_mode: str = "transductive", preset: str = "paper",
                metric: str = "accuracy", metrics: dict[str, float] | None = None,
                curve: list[list[float]] | None = None, steps: int = 1000, train_seconds: float = 60.0,
                backbone: str = "conv4-omniglot", queries: int = 1, scheme: str | None = "maml") -> Record:
    """A valid record with hand-chosen scores (mean and CI computed as the runner does). By default on the MAML
    paper's test protocol (its class split, 1 query per class), so that paper numbers attach."""
    mean, ci = mean_ci95(scores)
    config = {"benchmark": benchmark, "preset": preset, "algorithm": {"name": algorithm, "bn_mode": bn_mode},
              "model": {"backbone": backbone}, "trainer": {"seed": seed}, "episodes": {"queries": queries},
              "data": {"options": {} if scheme is None else {"scheme": scheme}}}
    return Record(run_id=run_id, benchmark=benchmark, algorithm=algorithm, preset=preset, config=config, seed=seed,
                  episode_digest=digest, num_episodes=len(scores), metric=metric, scores=scores, mean=mean, ci95=ci,
                  training_steps=steps, train_seconds=train_seconds, eval_seconds=4.0 + seed, tasks_per_second=150.0,
                  device="NVIDIA H100 80GB HBM3", versions={"metabench": "0.1.0"}, git_commit="0" * 40,
                  created="2026-01-01T00:00:00+00:00", metrics=metrics or {}, curve=curve or [])


def score_pattern(base: float, n: int, step: float, period: int, offset: int = 0) -> list[float]:
    """Deterministic, varied per-episode scores: base + step * ((i + offset) % period)."""
    return [base + step * ((i + offset) % period) for i in range(n)]


def fixture_records() -> list[Record]:
    n = 40
    maml0 = score_pattern(0.96, n, 0.01, 5)  # mean 0.98
    maml1 = score_pattern(0.965, n, 0.01, 5, offset=2)  # mean 0.985
    # FOMAML: MAML's run-averaged scores minus a small, noisy difference -> not significantly worse.
    avg = [(a + b) / 2 for a, b in zip(maml0, maml1)]
    fomaml = [x + (0.02 if i % 2 else -0.03) for i, x in enumerate(avg)]  # mean difference 0.005, sd 0.025
    reptile = [x - 0.03 - 0.005 * (i % 3) for i, x in enumerate(avg)]  # clearly worse everywhere
    curve = [[100.0, 30.0, 0.70], [500.0, 150.0, 0.90], [1000.0, 300.0, 0.95]]
    seg_a = score_pattern(0.40, 10, 0.02, 4)
    seg_b = [x - 0.05 for x in seg_a]
    return [
        make_record("r-maml-0", "maml", maml0, seed=0, curve=curve),
        make_record("r-maml-1", "maml", maml1, seed=1, curve=[[100.0, 35.0, 0.72], [1000.0, 320.0, 0.96]]),
        make_record("r-fomaml-0", "fomaml", fomaml, train_seconds=30.0),
        make_record("r-reptile-0", "reptile", reptile, train_seconds=20.0, scheme="reptile"),
        make_record("r-reptile-b", "reptile", score_pattern(0.95, 20, 0.01, 3), digest=DIGEST_B, seed=5,
                    scheme="reptile"),
        make_record("r-reptile-nt", "reptile", score_pattern(0.95, n, 0.01, 4), bn_mode="non-transductive",
                    scheme="reptile"),
        make_record("r-seg-transfer", "transfer", seg_a, benchmark="fss-1w5s", digest=DIGEST_S, metric="fg_iou",
                    metrics={"miou": 0.55, "fb_iou": 0.66}, preset="default", scheme=None),
        make_record("r-seg-maml", "maml", seg_b, benchmark="fss-1w5s", digest=DIGEST_S, metric="fg_iou",
                    metrics={"miou": 0.50}, preset="default", scheme=None),
    ]


def write_fixture(records_dir: Path) -> list[Path]:
    return [write_record(r, records_dir) for r in fixture_records()]
