"""Linear probe: a new 1x1 classifier on the frozen segmentation model, trained on ground truth.

The trained DeepLab-v3 is frozen as a whole (weights and BatchNorm statistics, eval mode); its last
1x1 convolution (cluster logits) is replaced by a new 1x1 convolution from the decoder's features
to the ground-truth classes, and only that layer is trained: SGD, cross-entropy with ignore 255,
the paper's schedule (60 epochs, lr 0.1 x0.1 at epoch 25, batch 16). Evaluated by the standard mIoU
on the val split (the classifier predicts ground-truth classes: no matching).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from maskdistill.config import section_defaults
from maskdistill.evaluation import confusion_matrix, miou_after_matching
from maskdistill.images import ImageRecord, read_rgb
from maskdistill.segmentation import SegmentationDataset, load_segmentation_model, predict_label_map
from maskdistill.storage import IGNORE_LABEL, read_label_png
from maskdistill.training import (
    ProgressLog,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)

log = logging.getLogger("maskdistill")


class LinearProbe(nn.Module):
    """A frozen segmentation model whose final 1x1 conv is replaced by a trainable one."""

    def __init__(self, model: nn.Module, num_classes: int):
        super().__init__()
        head = model.classifier
        last = head[-1]
        if not (isinstance(last, nn.Conv2d) and last.kernel_size == (1, 1)):
            raise TypeError(f"expected the segmentation head to end in a 1x1 conv, got {last}")
        for p in model.parameters():
            p.requires_grad_(False)
        head[-1] = nn.Conv2d(last.in_channels, num_classes, kernel_size=1)
        self.model = model
        self.classifier = head[-1]
        self.num_classes = num_classes
        self.train(False)

    def train(self, mode: bool = True) -> LinearProbe:
        """Only the new classifier trains; the frozen model (BatchNorm included) stays in eval."""
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(x)


def build_probe(segmentation_model: Path, num_classes: int, device: torch.device) -> LinearProbe:
    """The probe around a trained model from :func:`maskdistill.segmentation.train_segmentation`."""
    model, _ = load_segmentation_model(Path(segmentation_model), torch.device("cpu"))
    return LinearProbe(model, num_classes).to(device)


def _check_labels(records: Sequence[ImageRecord], labels_dir: Path, split: str) -> None:
    if not records:
        raise ValueError(f"linear probe: no {split} images")
    missing = [r.key for r in records if not (Path(labels_dir) / f"{r.key}.png").is_file()]
    if missing:
        raise FileNotFoundError(f"linear probe: {len(missing)} {split} images have no ground-truth "
                                f"label map in {labels_dir}, e.g. '{missing[0]}.png'")


def train_linear_probe(segmentation_model: Path, records: list[ImageRecord], labels_dir: Path,
                       checkpoint_dir: Path, out_model: Path, cfg: Mapping[str, Any],
                       device: torch.device) -> None:
    """Train the probe's classifier on ``labels_dir/<key>.png``; resumable per epoch."""
    cfg = {**section_defaults("linear_probe"), **cfg}
    num_classes = int(cfg["num_classes"])
    labels_dir, checkpoint_dir = Path(labels_dir), Path(checkpoint_dir)
    _check_labels(records, labels_dir, "train")
    epochs, seed = int(cfg["epochs"]), int(cfg["seed"])
    batch_size = min(int(cfg["batch_size"]), len(records))
    seed_everything(seed)
    probe = build_probe(segmentation_model, num_classes, device)
    params = list(probe.classifier.parameters())
    optimizer = torch.optim.SGD(params, lr=float(cfg["lr"]), momentum=float(cfg["momentum"]),
                                weight_decay=float(cfg["weight_decay"]))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=[int(e) for e in cfg["lr_drop_epochs"]], gamma=0.1)
    dataset = SegmentationDataset(records, labels_dir, int(cfg["crop_size"]), cfg["scale_range"],
                                  0.0, seed)
    start_epoch, step = 0, 0
    last = checkpoint_dir / "last.pt"
    if last.is_file():
        state = load_checkpoint(last)
        probe.classifier.load_state_dict(state["classifier"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, step = int(state["epoch"]), int(state["global_step"])
        set_rng_state(state["rng"])
        log.info("resuming linear probe from %s: %d/%d epochs done", last, start_epoch, epochs)
    steps_per_epoch = -(-len(records) // batch_size)
    progress = ProgressLog(epochs * steps_per_epoch, int(cfg["log_every"]), "linear_probe")
    probe.train()
    for epoch in range(start_epoch, epochs):
        dataset.set_epoch(epoch)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch))
        loader = DataLoader(dataset, batch_size=batch_size, sampler=order.tolist(),
                            num_workers=int(cfg["num_workers"]))
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            logits = probe(images)["out"]
            loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_LABEL)
            if not torch.isfinite(loss):
                if (labels == IGNORE_LABEL).all():
                    continue  # a batch of ignored pixels only
                raise FloatingPointError(f"linear probe loss is {loss.item()} at step {step + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            progress.step(step, epoch + 1, {"loss": loss.item()}, optimizer.param_groups[0]["lr"])
        scheduler.step()
        save_checkpoint(last, {"classifier": probe.classifier.state_dict(),
                               "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                               "epoch": epoch + 1, "global_step": step, "rng": rng_state()})
    save_checkpoint(out_model, {"classifier": {k: v.cpu() for k, v in probe.classifier.state_dict().items()},
                                "segmentation_model": str(segmentation_model),
                                "num_classes": num_classes, "cfg": dict(cfg), "epochs": epochs,
                                "num_train_images": len(records)})
    log.info("linear probe written to %s (%d steps)", out_model, step)


def load_probe(probe_path: Path, segmentation_model: Path, device: torch.device) -> LinearProbe:
    """A trained probe (eval mode) from :func:`train_linear_probe`."""
    state = load_checkpoint(probe_path)
    if "classifier" not in state or "num_classes" not in state:
        raise ValueError(f"{probe_path}: not a linear probe file")
    probe = build_probe(segmentation_model, int(state["num_classes"]), device)
    probe.classifier.load_state_dict(state["classifier"])
    return probe.eval()


@torch.no_grad()
def evaluate_probe(probe: LinearProbe, records: list[ImageRecord], labels_dir: Path,
                   class_names: Sequence[str], device: torch.device, short_side: int | None = None,
                   crf: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Standard mIoU (0-100, no matching) of the probe on ``records``; with ``crf`` also after CRF.

    Returns miou_after_matching's fields plus ``miou_crf`` / ``per_class_crf`` (None without CRF).
    """
    _check_labels(records, labels_dir, "val")
    n = len(class_names)
    if probe.num_classes != n:
        raise ValueError(f"the probe predicts {probe.num_classes} classes but {n} class names given")
    conf = np.zeros((n, n), dtype=np.int64)
    conf_crf = np.zeros((n, n), dtype=np.int64)
    for rec in records:
        gt = read_label_png(Path(labels_dir) / f"{rec.key}.png")
        rgb = read_rgb(rec.path)
        if gt.shape != rgb.shape[:2]:
            raise ValueError(f"{labels_dir}/{rec.key}.png: size {gt.shape} differs from {rec.path}")
        pred = predict_label_map(probe, rgb, device, short_side)
        conf += confusion_matrix(pred, gt, n, n)
        if crf is not None:
            from maskdistill.crf import refine_labels

            conf_crf += confusion_matrix(refine_labels(rgb, pred, crf), gt, n, n)
    identity = np.arange(n)
    result = miou_after_matching(conf, identity, class_names)
    result.pop("mapping")
    result["miou_crf"] = result["per_class_crf"] = None
    if crf is not None:
        with_crf = miou_after_matching(conf_crf, identity, class_names)
        result["miou_crf"], result["per_class_crf"] = with_crf["miou"], with_crf["per_class"]
    result["num_images"] = len(records)
    return result
