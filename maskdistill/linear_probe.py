"""Linear probe: a new 1x1 classifier on the frozen segmentation model, trained on ground truth.

The trained DeepLab-v3 is frozen as a whole (weights and BatchNorm statistics, eval mode); its last
1x1 convolution (cluster logits) is replaced by a new 1x1 convolution from the decoder's features
to the ground-truth classes (``head_init`` normal: weights N(0, 0.01), bias 0, as the authors), and
only that layer is trained: SGD, cross-entropy over the valid pixels with ignore 255 (the shared
:func:`~maskdistill.segmentation.hard_pixel_cross_entropy` keeping every pixel), the paper's
schedule (60 epochs, lr 0.1 x0.1 at epoch 25, batch 16), augmented as ``transform`` says (reference:
whole images resized to crop_size, predicted at that size). Evaluated by the standard mIoU on the
val split (the classifier predicts ground-truth classes: no matching).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from maskdistill import distributed
from maskdistill.images import ImageRecord, read_rgb
from maskdistill.metrics import confusion_matrix, miou_after_matching
from maskdistill.segmentation import (
    SegmentationDataset,
    check_transform,
    fixed_side,
    hard_pixel_cross_entropy,
    load_segmentation_model,
    mixed_precision,
    predict_logits,
)
from maskdistill.settings import CrfSettings, LinearProbeSettings, as_config, stored_settings
from maskdistill.storage import IGNORE_LABEL, read_label_png
from maskdistill.training import Losses, TrainingRun, fit, load_model, progress, save_model, seed_everything

log = logging.getLogger("maskdistill")
HEAD_INITS = ("default", "normal")


def init_head(conv: nn.Conv2d, head_init: str) -> nn.Conv2d:
    """Initialise the probe's new classifier in place: default = PyTorch's Conv2d init (as
    constructed); normal = weights N(0, 0.01) and bias 0 (the authors' probe)."""
    if head_init not in HEAD_INITS:
        raise ValueError(f"config key 'linear_probe.head_init': {head_init!r} is not one of "
                         f"{list(HEAD_INITS)}")
    if head_init == "normal":
        with torch.no_grad():
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
    return conv


class LinearProbe(nn.Module):
    """A frozen segmentation model whose final 1x1 conv is replaced by a trainable one.

    ``head_init``: see :func:`init_head`; ``test_side``: the square side it predicts at (None: the
    image's own size), see :func:`maskdistill.segmentation.fixed_side`.
    """

    def __init__(self, model: nn.Module, num_classes: int, head_init: str = "default",
                 test_side: int | None = None):
        super().__init__()
        head = model.classifier
        last = head[-1]
        if not (isinstance(last, nn.Conv2d) and last.kernel_size == (1, 1)):
            raise TypeError(f"expected the segmentation head to end in a 1x1 conv, got {last}")
        for p in model.parameters():
            p.requires_grad_(False)
        head[-1] = init_head(nn.Conv2d(last.in_channels, num_classes, kernel_size=1), head_init)
        self.model = model
        self.classifier = head[-1]
        self.num_classes = num_classes
        self.test_side = test_side
        self.train(False)

    def train(self, mode: bool = True) -> LinearProbe:
        """Only the new classifier trains; the frozen model (BatchNorm included) stays in eval."""
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(x)


def build_probe(segmentation_model: Path, num_classes: int, device: torch.device,
                s: LinearProbeSettings | None = None) -> LinearProbe:
    """The probe around a trained model from :func:`maskdistill.segmentation.train_segmentation`,
    its head initialised and its test size set as ``s`` says (None: default init, native size)."""
    model, _ = load_segmentation_model(Path(segmentation_model), torch.device("cpu"))
    head_init, side = "default", None
    if s is not None:
        head_init = s.head_init
        side = fixed_side(check_transform(s.transform, "linear_probe.transform"), s.crop_size)
    return LinearProbe(model, num_classes, head_init, side).to(device)


def _check_labels(records: Sequence[ImageRecord], labels_dir: Path, split: str) -> None:
    if not records:
        raise ValueError(f"linear probe: no {split} images")
    missing = [r.key for r in records if not (Path(labels_dir) / f"{r.key}.png").is_file()]
    if missing:
        raise FileNotFoundError(f"linear probe: {len(missing)} {split} images have no ground-truth "
                                f"label map in {labels_dir}, e.g. '{missing[0]}.png'")


def probe_dataset(records: list[ImageRecord], labels_dir: Path,
                  s: LinearProbeSettings) -> SegmentationDataset:
    """The probe's training images, augmented as ``s`` says (transform, crop_size, scale_range,
    rotation_degrees, seed)."""
    return SegmentationDataset(records, labels_dir, s.crop_size, s.scale_range, s.rotation_degrees,
                               s.seed, check_transform(s.transform, "linear_probe.transform"))


def train_linear_probe(segmentation_model: Path, records: list[ImageRecord], labels_dir: Path,
                       checkpoint_dir: Path, out_model: Path, s: LinearProbeSettings, num_classes: int,
                       device: torch.device, precision: str = "fp32") -> None:
    """Train the probe's classifier on ``labels_dir/<key>.png``; resumable per epoch.

    Writes ``out_model`` (rank 0 of several processes): the classifier's weights (``state_dict``),
    ``num_classes``, the segmentation model it sits on and the settings (``cfg``).
    """
    labels_dir = Path(labels_dir)
    _check_labels(records, labels_dir, "train")
    batch_size = min(s.batch_size, len(records))
    distributed.check_batch_size(batch_size, "linear_probe.batch_size")
    shared = distributed.world().distributed
    seed_everything(s.seed)
    probe = build_probe(segmentation_model, num_classes, device, s)
    optimizer = torch.optim.SGD(probe.classifier.parameters(), lr=s.lr, momentum=s.momentum,
                                weight_decay=s.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(s.lr_drop_epochs),
                                                     gamma=0.1)
    dataset = probe_dataset(records, labels_dir, s)

    def batches(epoch: int) -> DataLoader:
        dataset.set_epoch(epoch)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(s.seed + epoch)).tolist()
        chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        shares = distributed.shared_batches(chunks)
        return DataLoader(dataset, batch_sampler=[share for _, share, _ in shares], num_workers=s.num_workers)

    def loss(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], _step: int) -> Losses | None:
        images, labels = (t.to(device) for t in batch)
        valid = (labels != IGNORE_LABEL).sum()
        if shared:  # every process sees the same count of the whole batch
            valid = distributed.all_sum(valid)
        if valid.item() == 0:
            return None  # a batch of ignored pixels only: nothing to learn, no step
        # mean over the valid pixels of the whole batch (with several processes, this one's part)
        value = hard_pixel_cross_entropy(net(images)["out"], labels, fraction=1.0)
        return value, {"loss": value.item()}

    # only the classifier is trained and checkpointed; the frozen model stays in eval mode
    result = fit(TrainingRun(
        name="linear_probe", model=probe.classifier, optimizer=optimizer, epochs=s.epochs,
        steps_per_epoch=-(-len(records) // batch_size), batches=batches, loss=loss,
        checkpoint_dir=Path(checkpoint_dir), log_every=s.log_every, scheduler=scheduler,
        network=probe, precision=precision, channels_last=True))
    if distributed.world().is_main:
        save_model(out_model, probe.classifier.state_dict(), segmentation_model=str(segmentation_model),
                   num_classes=num_classes, cfg=as_config(s), epochs=s.epochs,
                   num_train_images=len(records))
        log.info("linear probe written to %s (%d steps)", out_model, result.steps)


def load_probe(probe_path: Path, segmentation_model: Path, device: torch.device,
               precision: str = "fp32") -> LinearProbe:
    """A trained probe (eval mode, for inference in ``precision``) from :func:`train_linear_probe`."""
    state = load_model(probe_path, "linear probe", "num_classes")
    settings = stored_settings("linear_probe", state.get("cfg", {}))
    probe = build_probe(segmentation_model, state["num_classes"], device, settings)
    probe.classifier.load_state_dict(state["state_dict"])
    return mixed_precision(probe.eval(), device, precision)


@torch.no_grad()
def evaluate_probe(probe: LinearProbe, records: list[ImageRecord], labels_dir: Path,
                   class_names: Sequence[str], device: torch.device, short_side: int | None = None,
                   crf: CrfSettings | None = None) -> dict[str, Any]:
    """Standard mIoU (0-100, no matching) of the probe on ``records``; with ``crf`` also after CRF.

    Returns miou_after_matching's fields plus ``miou_crf`` / ``per_class_crf`` (None without CRF).
    """
    _check_labels(records, labels_dir, "val")
    n = len(class_names)
    if probe.num_classes != n:
        raise ValueError(f"the probe predicts {probe.num_classes} classes but {n} class names given")
    conf = np.zeros((n, n), dtype=np.int64)
    conf_crf = np.zeros((n, n), dtype=np.int64)
    for rec in progress(records, total=len(records), desc="linear probe val"):
        gt = read_label_png(Path(labels_dir) / f"{rec.key}.png")
        rgb = read_rgb(rec.path)
        if gt.shape != rgb.shape[:2]:
            raise ValueError(f"{labels_dir}/{rec.key}.png: size {gt.shape} differs from {rec.path}")
        pred, logits, _ = predict_logits(probe, rgb, device, short_side)
        conf += confusion_matrix(pred, gt, n, n)
        if crf is not None:
            from maskdistill.crf import refine_image

            hw = tuple(logits.shape[-2:])
            refined = refine_image(rgb, pred, crf, (logits[0].cpu().numpy(), hw))
            conf_crf += confusion_matrix(refined, gt, n, n)
    identity = np.arange(n)
    result = miou_after_matching(conf, identity, class_names)
    result.pop("mapping")
    result["miou_crf"] = result["per_class_crf"] = None
    if crf is not None:
        with_crf = miou_after_matching(conf_crf, identity, class_names)
        result["miou_crf"], result["per_class_crf"] = with_crf["miou"], with_crf["per_class"]
    result["num_images"] = len(records)
    return result
