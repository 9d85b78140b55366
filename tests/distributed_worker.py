"""Training jobs that tests/test_distributed.py runs in one process (:func:`run_jobs`) and under
``torchrun --nproc_per_node 2`` (this file as a script, gloo on the CPU), to compare the weights.

    torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py SPEC.json

SPEC: ``{"config": {...}, "jobs": [{"stage": ..., "out": ..., "checkpoints": ..., ...}]}`` with
stage ``segmentation`` (``labels``, ``num_classes``), ``detector`` (``train_json``) or
``linear_probe`` (``model``, ``labels``, ``num_classes``); image records come from the config.
Stage ``hard_pixels`` saves each process's part of the hard-pixel loss of :func:`hard_pixel_case`
and its gradient (``out.<rank>``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maskdistill import distributed, segmentation
from maskdistill.datasets import dataset_source
from maskdistill.settings import load_settings
from maskdistill.training import prepare_checkpoint_dir

CPU = torch.device("cpu")
_build = segmentation.build_deeplabv3


def deeplab_without_dropout(*args: Any, **kwargs: Any) -> nn.Module:
    """DeepLab-v3 with its ASPP dropout off: dropout masks come from each process's own random
    numbers, so only without it can one process and two reach the same weights."""
    model = _build(*args, **kwargs)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def hard_pixel_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of a batch of 4 (float64): the first image holds no valid pixel."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 6, 6, dtype=torch.float64, generator=g)
    target = torch.randint(0, 3, (4, 6, 6), generator=g)
    target[0] = 255
    target[1:, :2] = 255
    return logits, target


def hard_pixel_share(out: Path) -> None:
    """This process's contribution to the hard-pixel loss of the whole batch, and its gradient."""
    w = distributed.world()
    logits, target = hard_pixel_case()
    mine = torch.cat(distributed.share(list(logits.split(1)))).requires_grad_()
    labels = torch.cat(distributed.share(list(target.split(1))))
    value = segmentation.hard_pixel_cross_entropy(mine, labels, 0.2)
    value.backward()
    torch.save((value.item(), mine.grad), f"{out}.{w.rank}")


def run_jobs(spec: dict[str, Any]) -> None:
    """Run every job of ``spec`` in this process (one of several under torchrun)."""
    from maskdistill.detector import get_backend
    from maskdistill.linear_probe import train_linear_probe

    s = load_settings(spec["config"])
    source = dataset_source(s.dataset)
    records = source.records("train")
    segmentation.build_deeplabv3 = deeplab_without_dropout
    try:
        for job in spec["jobs"]:
            out = Path(job["out"])
            if job["stage"] == "hard_pixels":
                hard_pixel_share(out)
                continue
            ckpt = prepare_checkpoint_dir(Path(job["checkpoints"]), job["stage"])
            if job["stage"] == "segmentation":
                segmentation.train_segmentation(records, Path(job["labels"]), ckpt, out, s.segmentation,
                                                job["num_classes"], CPU, s.precision)
            elif job["stage"] == "detector":
                get_backend(s.detector, CPU, s.precision).train(Path(job["train_json"]),
                                                                source.images_root("train"), ckpt, out)
            elif job["stage"] == "linear_probe":
                train_linear_probe(Path(job["model"]), records, Path(job["labels"]), ckpt, out,
                                   s.linear_probe, job["num_classes"], CPU, s.precision)
            else:
                raise ValueError(f"unknown stage {job['stage']}")
    finally:
        segmentation.build_deeplabv3 = _build


if __name__ == "__main__":
    from maskdistill.training import setup_logging

    setup_logging()
    torch.set_num_threads(1)
    with distributed.session("cpu"):
        run_jobs(json.loads(Path(sys.argv[1]).read_text()))
