"""Shared training plumbing: device choice, seeding, resumable checkpoints, progress lines."""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskdistill.storage import CorruptFileError, atomic_path

log = logging.getLogger("maskdistill")


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' requested but CUDA is not available")
    return torch.device(name)


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
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    try:
        state = torch.load(p, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises several types for truncated files
        raise CorruptFileError(f"{p}: unreadable checkpoint ({err}); delete it and rerun") from err
    if not isinstance(state, dict) or not state.get("checkpoint_complete"):
        raise CorruptFileError(f"{p}: not a complete maskdistill checkpoint")
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

    stamp = fingerprint(json.loads(json.dumps(identity, default=str)))
    marker = path / "RUN_ID"
    if path.exists() and not marker.is_file() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path}: not a maskdistill checkpoint folder (no RUN_ID marker) and not "
                              "empty; refusing to use it for checkpoints: give a new or empty folder")
    if marker.is_file() and marker.read_text().strip() != stamp:
        log.info("checkpoints in %s belong to other settings; starting fresh", path)
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    marker.write_text(stamp + "\n")
    return path
