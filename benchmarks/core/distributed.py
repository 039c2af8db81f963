"""One meta-batch split over processes (DDP): each rank's share of the tasks, the exact meta-gradient, and the
evaluation episodes gathered back in order.

A training meta-batch of ``T`` tasks is a pure function of ``(seed, step)`` (``datasets/datamodule.py``). With
``W`` processes, rank ``r`` takes the contiguous tasks :func:`task_slice` gives it (``T // W`` or one more: the
first ``T % W`` ranks take the extra ones), so the union over ranks is exactly the single-process meta-batch.

Every algorithm's meta-loss (and Reptile's outer "gradient") is a mean over the ``T`` tasks. Rank ``r``
differentiates the mean over its own ``n_r`` tasks; scaling that gradient by ``n_r / T`` and summing over ranks
(:func:`all_reduce_gradients`, one ``all_reduce`` of one flat buffer) gives the single-process gradient for any
split, even or not: uneven splits are weighted exactly, never refused (only ``T < W``, which would leave a rank
without a task, is refused by :func:`check_world`). Every rank then takes the same optimizer step from the same
gradient, so the weights stay identical without a broadcast.

The module does this itself instead of relying on ``torch.nn.parallel.DistributedDataParallel``: DDP's reducer
hooks assume one ``backward`` per forward of the wrapper, which manual optimization (Reptile, chunked MAML) and
second-order inner loops do not follow. Nothing here depends on Lightning; with no process group (or a world of
one) every function is the identity.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_world(tasks: int, size: int) -> None:
    """Refuse a meta-batch that leaves a rank without a task (``tasks < size``), with what to change."""
    if size < 1:
        raise ValueError(f"world size must be >= 1, got {size}")
    if tasks < size:
        raise ValueError(f"a meta-batch of {tasks} task(s) cannot be split over {size} processes (each needs at "
                         f"least one task): use at most {tasks} devices x nodes, or a larger algorithm.meta_batch")


def task_slice(tasks: int, rank: int, size: int) -> slice:
    """Rank ``rank``'s contiguous share of ``tasks`` tasks: ``tasks // size`` of them, one more for the first
    ``tasks % size`` ranks. The shares of ranks ``0 .. size-1`` tile ``range(tasks)`` in order."""
    check_world(tasks, size)
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is outside a world of {size}")
    base, extra = divmod(tasks, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def all_reduce_gradients(parameters: Iterable[nn.Parameter], share: float,
                         loss: torch.Tensor | None = None) -> torch.Tensor | None:
    """Turn each rank's gradient of its own mean into the gradient of the global mean, in place.

    Every ``.grad`` (parameters without one are left alone: they have none on any rank) is scaled by ``share``
    (this rank's ``n_r / T``) and summed over ranks in one flat ``all_reduce``. ``loss`` (this rank's mean
    loss, detached) rides in the same buffer; the global mean loss is returned (``loss`` itself without a
    process group), so that every rank sees the same value, e.g. to stop all of them on a diverged loss.
    """
    rank, size = world()
    if size == 1:
        return loss
    with_grad = [p for p in parameters if p.grad is not None]
    pieces = [p.grad.reshape(-1) for p in with_grad]
    if loss is not None:
        pieces.append(loss.detach().reshape(1).to(pieces[0].dtype if pieces else loss.dtype))
    if not pieces:
        return loss
    flat = torch.cat(pieces) * share
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in with_grad:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n
    return None if loss is None else flat[offset].to(loss.dtype)


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` as rank ``src`` has it, on every rank (e.g. the engine that rank 0's timing chose)."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_in_order(local: Sequence[Any], size: int | None = None) -> list[Any]:
    """All ranks' items in global order, when rank ``r`` holds items ``r, r + W, r + 2W, ...`` (round-robin
    evaluation batches, see ``datasets/datamodule.py``): item ``i`` of rank ``r`` is global item ``i * W + r``."""
    size = world()[1] if size is None else size
    if size == 1:
        return list(local)
    parts: list[list[Any]] = [[] for _ in range(size)]
    dist.all_gather_object(parts, list(local))
    ordered: list[Any] = []
    for i in range(max(len(p) for p in parts)):
        ordered.extend(p[i] for p in parts if i < len(p))
    return ordered


def round_robin(count: int, rank: int, size: int) -> range:
    """The items of ``range(count)`` that rank ``rank`` of ``size`` takes in round-robin order."""
    return range(rank, count, size)
