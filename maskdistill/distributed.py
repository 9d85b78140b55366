"""Several processes per training job (PyTorch DistributedDataParallel), one per GPU.

A training command started by ``torchrun --nproc_per_node N`` runs once per GPU; torchrun sets
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. :func:`session` joins the processes into one group
(NCCL on GPUs, gloo on the CPU); without those variables nothing changes: one process, the
helpers here are no-ops. Every process walks through the same global batches in the same order
and takes its share of each (:func:`share`), so N processes step as one process would on the
whole batch: :mod:`maskdistill.training` averages gradients with DDP, turns BatchNorm into
:class:`SyncBatchNorm` (statistics of the global batch) and lets rank 0 alone write files.

The convention for losses: a process's loss is its *contribution*, the part of the global
batch's loss its share accounts for, so that the sum over processes is the loss of one process on
the whole batch (a per-image mean weighs its share's mean by :func:`share_fraction`; a mean over
pixels divides by :func:`all_sum` of the pixel count).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

log = logging.getLogger("maskdistill")
T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints, models and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1


_WORLD = World()


def world() -> World:
    """The current process's :class:`World` (one process unless :func:`session` joined a group)."""
    return _WORLD


def world_from_env(env: dict[str, str] | None = None) -> World:
    """The world torchrun describes in ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; one process without."""
    env = dict(os.environ if env is None else env)
    size = int(env.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", env.get("RANK", "0")))
    if not 0 <= rank < size:
        raise RuntimeError(f"RANK={rank} outside 0..{size - 1} (WORLD_SIZE={size})")
    return World(rank, size, local)


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[World]:
    """Join the processes torchrun started (NCCL when ``device`` is a GPU, else gloo) for the
    duration of the block; a single process passes through. Ranks other than 0 log warnings only."""
    global _WORLD
    w = world_from_env()
    if not w.distributed or dist.is_initialized():
        yield _WORLD
        return
    gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if gpu:
        if torch.cuda.device_count() <= w.local_rank:
            raise RuntimeError(f"process {w.rank} of {w.world_size} needs GPU {w.local_rank}, but "
                               f"{torch.cuda.device_count()} are visible: ask the job for as many GPUs "
                               "as processes")
        torch.cuda.set_device(w.local_rank)
    dist.init_process_group("nccl" if gpu else "gloo")
    _WORLD = w
    if not w.is_main:
        log.setLevel(logging.WARNING)
    log.info("distributed: %d processes (%s)", w.world_size, dist.get_backend())
    try:
        yield w
    finally:
        _WORLD = World()
        dist.destroy_process_group()


def device_for(device: torch.device) -> torch.device:
    """``device`` with this process's GPU index when several processes share a node's GPUs."""
    if device.type == "cuda" and _WORLD.distributed and device.index is None:
        return torch.device("cuda", _WORLD.local_rank)
    return device


# ---------------------------------------------------------------- batches


def check_batch_size(batch_size: int, key: str, w: World | None = None) -> None:
    """Refuse a global batch that the processes cannot share equally, naming the config key."""
    w = w or _WORLD
    if batch_size % w.world_size:
        raise ValueError(f"config key '{key}': a batch of {batch_size} does not split into equal shares "
                         f"over {w.world_size} processes; make it a multiple of {w.world_size}")


def share(items: Sequence[T], w: World | None = None) -> list[T]:
    """This process's contiguous share of one global batch (shares differ by at most one item)."""
    w = w or _WORLD
    n = len(items)
    start, stop = n * w.rank // w.world_size, n * (w.rank + 1) // w.world_size
    return list(items[start:stop])


def share_fraction(n_share: int, n_global: int) -> float:
    """The weight of a share's per-item mean in the global batch's mean."""
    return n_share / n_global


def shared_batches(batches: Sequence[Sequence[T]],
                   w: World | None = None) -> list[tuple[int, list[T], float]]:
    """For each global batch: its position in ``batches``, this process's share and the share's
    fraction of the batch.

    A batch with fewer items than processes (a last, partial batch) would leave a process without
    work; every process leaves it out alike.
    """
    w = w or _WORLD
    out = [(i, share(b, w), share_fraction(len(share(b, w)), len(b))) for i, b in enumerate(batches)
           if len(b) >= w.world_size]
    if len(out) < len(batches):
        log.info("%d batch(es) smaller than the %d processes left out", len(batches) - len(out), w.world_size)
    return out


# ---------------------------------------------------------------- collectives (no-ops alone)


def _comm(t: Tensor) -> Tensor:
    """A detached copy of ``t`` on the device the process group communicates from."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    return t.detach().to(device, copy=True)


def all_sum(t: Tensor) -> Tensor:
    """The sum of ``t`` over processes (a new tensor, outside autograd); ``t`` itself alone."""
    if not _WORLD.distributed:
        return t
    out = _comm(t)
    dist.all_reduce(out)
    return out.to(t.device)


def all_max(t: Tensor) -> Tensor:
    """The element-wise maximum of ``t`` over processes (outside autograd); ``t`` itself alone."""
    if not _WORLD.distributed:
        return t
    out = _comm(t)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.to(t.device)


def all_gather(t: Tensor) -> Tensor:
    """``t`` of every process (equal shapes), concatenated along dim 0 in rank order."""
    if not _WORLD.distributed:
        return t
    mine = _comm(t).contiguous()
    parts = [torch.empty_like(mine) for _ in range(_WORLD.world_size)]
    dist.all_gather(parts, mine)
    return torch.cat(parts).to(t.device)


def batch_mean(t: Tensor) -> Tensor:
    """The mean of ``t`` over dim 0 of the global batch, as a (1, ...) tensor (outside autograd when
    shared: every process holds an equal share)."""
    if not _WORLD.distributed:
        return t.mean(dim=0, keepdim=True)
    return all_sum(t.sum(dim=0, keepdim=True)) / (len(t) * _WORLD.world_size)


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every process, in rank order (picklable objects, e.g. RNG states)."""
    if not _WORLD.distributed:
        return [obj]
    out: list[Any] = [None] * _WORLD.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every process (no-op alone)."""
    if _WORLD.distributed:
        dist.barrier()


# ---------------------------------------------------------------- BatchNorm over the global batch


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch, on the CPU (gloo).

    torch's :class:`~torch.nn.SyncBatchNorm` needs GPU tensors; this does the same with one
    differentiable all-reduce of the per-channel sums, squared sums and counts. Outside training
    (or alone) it is plain BatchNorm.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and _WORLD.distributed):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        local = torch.cat([xf.sum(dims), (xf * xf).sum(dims),
                           xf.new_full((1,), xf.numel() / xf.shape[1])])
        total = _AllSum.apply(local)
        c = x.shape[1]
        count = total[-1]
        mean = total[:c] / count
        var = (total[c:2 * c] / count - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            momentum = self.momentum if self.momentum is not None else 0.0
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    momentum = 1.0 / float(self.num_batches_tracked)
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.detach(), alpha=momentum)
        shape = [1, c] + [1] * (x.dim() - 2)
        out = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


class _AllSum(torch.autograd.Function):
    """Sum over processes, differentiable: the gradient of each process's input is the sum of the
    gradients of every process's output (each process's loss depends on the shared sum)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:
        out = t.detach().clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        out = grad.detach().clone()
        dist.all_reduce(out)
        return out


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every BatchNorm layer synchronised over the processes (torch's
    :class:`~torch.nn.SyncBatchNorm` on GPUs, :class:`CpuSyncBatchNorm` on the CPU). The layers
    keep their parameters (the same objects: an optimiser built before still holds them), buffers
    and train/eval mode; the state dict keys do not change."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _to_cpu_sync(module)


def _to_cpu_sync(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CpuSyncBatchNorm):
        out = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _to_cpu_sync(child))
    return out
