"""The training engine and its plumbing: device choice, precision, seeding, resumable checkpoints,
progress.

:func:`fit` runs every training job of the package (detector, segmentation model, linear probe,
DINO pretraining): a stage describes its job as a :class:`TrainingRun` (model, optimiser, the
batches of each epoch and a loss function) and :func:`fit` resumes from the last checkpoint, steps
the optimiser and the learning-rate schedule, stops on a non-finite loss, logs progress with a rate
and an ETA, and writes a checkpoint at the end of each epoch (RNG states included, so a resumed run
ends with the same weights as an uninterrupted one). :func:`save_model` writes the final model.

Mixed precision (``precision``: fp32, bf16, fp16): the loss runs under autocast, fp16 with a
gradient scaler, ResNets in channels-last memory layout. Several processes (torchrun, see
:mod:`maskdistill.distributed`): the network is wrapped in DistributedDataParallel, BatchNorm
synchronised, and only rank 0 writes checkpoints; every process resumes from the same one.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from torch import nn

from maskdistill import distributed
from maskdistill.storage import CorruptFileError, atomic_path

log = logging.getLogger("maskdistill")
T = TypeVar("T")
LAST_CHECKPOINT = "last.pt"
# The layout of what fit() stores in last.pt; a checkpoint folder of another layout starts afresh.
CHECKPOINT_FORMAT = 2


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; otherwise the named device. One of several
    processes on a node gets its own GPU (``cuda:LOCAL_RANK``)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' requested but CUDA is not available")
    return distributed.device_for(torch.device(name))


# ---------------------------------------------------------------- precision

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision the device cannot compute, naming the config key."""
    if precision not in PRECISIONS:
        raise ValueError(f"config key 'precision': {precision!r} is not one of {list(PRECISIONS)}")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"config key 'precision': bf16 needs a GPU that computes bfloat16 (Ampere or "
                         f"newer); {torch.cuda.get_device_name(device)} does not: use fp16 or fp32")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to the precision's dtype on ``device`` (nothing for fp32)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def autocast_forward(module: nn.Module, device: torch.device, precision: str) -> nn.Module:
    """Run ``module``'s forward under autocast and hand its floating outputs on as float32, so that
    what follows it (the detector's box arithmetic, say) stays in full precision. No-op for fp32;
    the module's parameters and state dict are untouched."""
    if PRECISIONS[precision] is None:
        return module
    inner = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        with autocast(device, precision):
            out = inner(*args, **kwargs)
        return _to_float32(out)

    module.forward = forward  # type: ignore[method-assign]
    return module


def _to_float32(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return type(value)((k, _to_float32(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_to_float32(v) for v in value)
    return value


def memory_format(module: nn.Module, precision: str) -> nn.Module:
    """A convolutional network in channels-last layout under mixed precision (faster tensor-core
    convolutions); unchanged in fp32. Parameters stay the same objects."""
    if PRECISIONS[precision] is not None:
        module.to(memory_format=torch.channels_last)
    return module


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Save a training state atomically (a kill mid-write leaves the previous checkpoint intact)."""
    state = dict(state, checkpoint_complete=True)
    with atomic_path(path, suffix=".tmp.pt") as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu"):
    """Load a checkpoint saved by :func:`save_checkpoint`, with a clear error when it is damaged."""
    state = _torch_load(Path(path), map_location)
    if not state.get("checkpoint_complete"):
        raise CorruptFileError(f"{path}: not a complete maskdistill checkpoint")
    return state


def save_model(path: str | os.PathLike[str], state_dict: dict[str, torch.Tensor], **info: Any) -> None:
    """Write a trained model: its weights (on the CPU) and what is needed to rebuild it, atomically."""
    save_checkpoint(path, {"state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}, **info})


def load_model(path: str | os.PathLike[str], what: str, *required: str) -> dict[str, Any]:
    """A model file written by :func:`save_model`; ``required`` keys must be in it.

    Model files of earlier versions (written without the completeness flag) are accepted.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    state = _torch_load(p, "cpu")
    missing = [k for k in ("state_dict", *required) if k not in state]
    if missing:
        raise ValueError(f"{p}: not a {what} file (no {', '.join(missing)})")
    return state


def _torch_load(p: Path, map_location: str | torch.device) -> dict[str, Any]:
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    try:
        state = torch.load(p, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises several types for truncated files
        raise CorruptFileError(f"{p}: unreadable checkpoint ({err}); delete it and rerun") from err
    if not isinstance(state, dict):
        raise CorruptFileError(f"{p}: not a maskdistill checkpoint")
    return state


def rng_state() -> dict[str, Any]:
    """Every RNG state a resumed run needs to continue identically."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ProgressLog:
    """Log a line every ``every`` steps with loss, rate and ETA."""

    def __init__(self, total_steps: int, every: int = 10, name: str = "train"):
        self.total = total_steps
        self.every = max(1, every)
        self.name = name
        self.start = time.perf_counter()
        self.start_step: int | None = None

    def step(self, step: int, epoch: int, losses: dict[str, float], lr: float) -> None:
        """Report step ``step`` (1-based) when it falls on the reporting interval or is the last."""
        if self.start_step is None:
            self.start_step = step - 1
        if step % self.every and step != self.total:
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(done, 1) * (self.total - step)
        parts = " ".join(f"{k}={v:.4f}" for k, v in losses.items())
        log.info("%s epoch %d step %d/%d %s lr=%.2e %.2fs/step eta %.0fs", self.name, epoch, step,
                 self.total, parts, lr, elapsed / max(done, 1), eta)


def setup_logging(verbose: bool = True) -> None:
    """Plain timestamped log lines on stderr (Snakemake redirects them to the rule's log)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def prepare_checkpoint_dir(path: Path, identity: Any) -> Path:
    """Create ``path`` for resumable checkpoints of one run, identified by ``identity``.

    Checkpoints left by a run with different settings or inputs are removed, so a rerun after a
    config change starts fresh while a rerun after a crash resumes. Only a folder this function
    made (it holds its ``RUN_ID`` marker) is ever emptied: an existing folder without the marker
    that holds anything is refused, so a mistyped path cannot delete someone's files.
    """
    import json
    import shutil

    from maskdistill.config import fingerprint

    stamp = fingerprint(json.loads(json.dumps([CHECKPOINT_FORMAT, identity], default=str)))
    marker = path / "RUN_ID"
    if not distributed.world().is_main:  # rank 0 prepares the folder, the others wait for it
        distributed.barrier()
        return path
    if path.exists() and not marker.is_file() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path}: not a maskdistill checkpoint folder (no RUN_ID marker) and not "
                              "empty; refusing to use it for checkpoints: give a new or empty folder")
    if marker.is_file() and marker.read_text().strip() != stamp:
        log.info("checkpoints in %s belong to other settings; starting fresh", path)
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    marker.write_text(stamp + "\n")
    distributed.barrier()
    return path


# ---------------------------------------------------------------- the training engine


Losses = tuple[torch.Tensor, dict[str, float]]


@dataclass
class TrainingRun:
    """One training job, as a stage describes it to :func:`fit`.

    ``batches(epoch)`` yields the batches of an epoch (with several processes, each process's share
    of each global batch: :func:`maskdistill.distributed.shared_batches`); ``loss(net, batch,
    step)`` calls ``net`` (the network, or its DistributedDataParallel wrapper) and returns the loss
    to minimise and the values to log, or None to pass over a batch without a step (``step`` counts
    from 0 over the whole run; with several processes, the loss and values are the process's
    contribution, see :mod:`maskdistill.distributed`, and all skip a batch or none).
    ``model`` is what is checkpointed and ``network`` what the loss calls (default: ``model``; the
    linear probe trains its classifier inside a frozen network). The hooks are optional:
    ``before_step`` sets per-step schedules, ``before_update`` edits gradients (after backward,
    before the optimiser), ``after_step`` runs after the optimiser (an EMA teacher, say) and
    ``after_epoch`` sees the epoch's logged values. ``state`` names more objects with a
    ``state_dict`` to checkpoint, ``extra`` is plain data kept across a resume, and ``meta`` is
    stored and must match when a checkpoint is resumed.

    ``precision`` (fp32, bf16, fp16) runs the loss under autocast, or with ``autocast_modules`` only
    those modules' forwards; ``channels_last`` puts a convolutional network in channels-last layout
    under mixed precision.
    """

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    epochs: int
    steps_per_epoch: int
    batches: Callable[[int], Iterable[Any]]
    loss: Callable[[nn.Module, Any, int], Losses | None]
    checkpoint_dir: Path
    log_every: int = 20
    scheduler: Any = None
    scheduler_interval: Literal["step", "epoch"] = "epoch"
    checkpoint_every: int = 1
    state: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    before_step: Callable[[int, int], None] | None = None
    before_update: Callable[[int, int], None] | None = None
    after_step: Callable[[int, int], None] | None = None
    after_epoch: Callable[[int, list[dict[str, float]]], None] | None = None
    hint: str = ""
    network: nn.Module | None = None
    precision: str = "fp32"
    autocast_modules: tuple[nn.Module, ...] = ()
    channels_last: bool = False


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` did: the step count of the whole run and the values logged by this call."""

    steps: int
    history: list[dict[str, float]]


def fit(run: TrainingRun) -> FitResult:
    """Train as ``run`` describes, resuming from ``run.checkpoint_dir/last.pt`` when it exists."""
    world = distributed.world()
    last = Path(run.checkpoint_dir) / LAST_CHECKPOINT
    network = run.network if run.network is not None else run.model
    device = next(network.parameters()).device
    check_precision(run.precision, device)
    if run.channels_last:
        memory_format(network, run.precision)
    for module in run.autocast_modules:
        autocast_forward(module, device, run.precision)
    if world.distributed:
        network = distributed.convert_sync_batchnorm(network, device)
    scaler = torch.amp.GradScaler(device.type) if run.precision == "fp16" else None
    start_epoch, step = _resume(run, last, scaler) if last.is_file() else (0, 0)
    if start_epoch == 0:
        log.info("%s: training from scratch, %d epochs of %d steps", run.name, run.epochs,
                 run.steps_per_epoch)
    net = _data_parallel(network, device) if world.distributed else network
    whole_loss = autocast(device, run.precision) if not run.autocast_modules else contextlib.nullcontext()
    progress = ProgressLog(run.epochs * run.steps_per_epoch, run.log_every, run.name)
    history: list[dict[str, float]] = []
    for epoch in range(start_epoch, run.epochs):
        network.train()
        run.model.train()
        logged: list[dict[str, float]] = []
        for batch in run.batches(epoch):
            if run.before_step:
                run.before_step(step, epoch)
            with whole_loss:
                losses = run.loss(net, batch, step)
            if _agreed_skip(losses is None, world):
                continue
            assert losses is not None
            total, values = losses
            _check_finite(run, total, values, step, world)
            run.optimizer.zero_grad(set_to_none=True)
            if world.distributed:
                total = total * world.world_size  # DDP averages gradients; the contributions add up
            (scaler.scale(total) if scaler else total).backward()
            if scaler and run.before_update:
                scaler.unscale_(run.optimizer)  # the hook sees true gradients (clipping)
            if run.before_update:
                run.before_update(step, epoch)
            if scaler:
                scaler.step(run.optimizer)
                scaler.update()
            else:
                run.optimizer.step()
            if run.after_step:
                run.after_step(step, epoch)
            if run.scheduler is not None and run.scheduler_interval == "step":
                run.scheduler.step()
            step += 1
            values = _summed_values(values, world)
            logged.append(values)
            progress.step(step, epoch + 1, values, run.optimizer.param_groups[0]["lr"])
        if run.scheduler is not None and run.scheduler_interval == "epoch":
            run.scheduler.step()
        if run.after_epoch:
            run.after_epoch(epoch, logged)
        history += logged
        if (epoch + 1) % run.checkpoint_every == 0 or epoch + 1 == run.epochs:
            state = _training_state(run, epoch + 1, step, scaler)  # every process: RNG states gathered
            if world.is_main:
                save_checkpoint(last, state)
            distributed.barrier()
    return FitResult(steps=step, history=history)


def _data_parallel(network: nn.Module, device: torch.device) -> nn.Module:
    """``network`` in DistributedDataParallel (gradients averaged over the processes during backward).

    Buffers are given rank 0's values once, not at every forward: BatchNorm is synchronised, so its
    running statistics agree anyway.
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
    return DistributedDataParallel(network, device_ids=ids, **no_sync)


def _agreed_skip(skip: bool, world: distributed.World) -> bool:
    """Whether every process passes over the batch; processes that disagree are an error."""
    if not world.distributed:
        return skip
    votes = int(distributed.all_sum(torch.tensor([float(skip)])).item())
    if 0 < votes < world.world_size:
        raise RuntimeError(f"{votes} of {world.world_size} processes passed over a batch the others "
                           "trained on; a stage must skip a global batch on every process or none")
    return votes == world.world_size


def _check_finite(run: TrainingRun, total: torch.Tensor, values: dict[str, float], step: int,
                  world: distributed.World) -> None:
    """Stop on a non-finite loss (on every process when any sees one)."""
    bad = not bool(torch.isfinite(total.detach()).item())
    if world.distributed:
        bad = bool(distributed.all_sum(torch.tensor([float(bad)])).item())
    if bad:
        raise FloatingPointError(f"{run.name}: non-finite loss at step {step + 1} ({values}){run.hint}")


def _summed_values(values: dict[str, float], world: distributed.World) -> dict[str, float]:
    """The logged values of the global batch: the processes' contributions added up."""
    if not world.distributed or not values:
        return values
    summed = distributed.all_sum(torch.tensor([float(v) for v in values.values()], dtype=torch.float64))
    return dict(zip(values, summed.tolist(), strict=True))


def _training_state(run: TrainingRun, epoch: int, step: int, scaler: Any = None) -> dict[str, Any]:
    ranks = distributed.gather_objects(rng_state())
    state = {"format": CHECKPOINT_FORMAT, "epoch": epoch, "step": step, "rng": ranks[0],
             "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "state": {k: v.state_dict() for k, v in run.state.items()},
             "extra": run.extra, "meta": run.meta}
    if len(ranks) > 1:
        state["rng_ranks"] = ranks
    if run.scheduler is not None:
        state["scheduler"] = run.scheduler.state_dict()
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    return state


def _resume(run: TrainingRun, last: Path, scaler: Any = None) -> tuple[int, int]:
    """Load ``last`` into ``run``; return the epoch and step it reached. Every process reads the
    same file; each takes back its own RNG state when the file has one per process."""
    state = load_checkpoint(last, map_location="cpu")  # RNG states must stay on the CPU
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CorruptFileError(f"{last}: checkpoint of another format; delete it and rerun")
    for key, value in run.meta.items():
        if state["meta"].get(key) != value:
            raise ValueError(f"{last}: checkpoint has {key}={state['meta'].get(key)}, this run "
                             f"{value}; delete it and rerun")
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scheduler is not None:
        run.scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    for key, obj in run.state.items():
        obj.load_state_dict(state["state"][key])
    run.extra.update(state["extra"])
    world = distributed.world()
    ranks = state.get("rng_ranks", [state["rng"]])
    set_rng_state(ranks[world.rank] if len(ranks) == world.world_size else state["rng"])
    epoch, step = int(state["epoch"]), int(state["step"])
    log.info("resuming %s training: resumed from %s at epoch %d/%d (step %d)", run.name, last, epoch,
             run.epochs, step)
    return epoch, step


# ---------------------------------------------------------------- progress of long loops


class _LogLines(io.StringIO):
    """A file for tqdm that turns each refresh into one log line (logs have no carriage returns)."""

    def write(self, text: str) -> int:
        line = text.strip("\r\n ")
        if line:
            log.info("%s", line)
        return len(text)


def progress(items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "img") -> Iterator[T]:
    """``items`` with a progress line in the log (count, rate and ETA) about every 30 seconds."""
    from tqdm import tqdm

    yield from tqdm(items, total=total, desc=desc, unit=unit, file=_LogLines(), mininterval=30,
                    maxinterval=300, ascii=True, dynamic_ncols=False, ncols=100)
