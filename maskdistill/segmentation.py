"""Stage 4: DeepLab-v3 (dilated ResNet) trained on pseudo-label PNGs with hard pixel mining."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock
from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from maskdistill.backbone import load_resnet_weights
from maskdistill.config import section_defaults
from maskdistill.images import ImageRecord, read_rgb, resized_hw, to_tensor
from maskdistill.storage import IGNORE_LABEL, read_label_png, write_label_png
from maskdistill.training import (
    ProgressLog,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)

log = logging.getLogger("maskdistill")

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
# Backbone modules of each stage (IntermediateLayerGetter names); stage 1 includes the stem.
STAGES = {1: ("conv1", "bn1", "layer1"), 2: ("layer2",), 3: ("layer3",), 4: ("layer4",)}


# ---------------------------------------------------------------- loss


def hard_pixel_cross_entropy(logits: Tensor, target: Tensor, fraction: float = 0.2,
                             ignore_index: int = IGNORE_LABEL) -> Tensor:
    """Mean cross-entropy of the ``fraction`` hardest valid pixels of the whole batch.

    Keeps exactly ``k = max(1, int(fraction * n_valid))`` pixels; all pixels ignored -> a zero loss
    that is still connected to ``logits``.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"hard pixel fraction must lie in (0, 1], got {fraction}")
    per_pixel = F.cross_entropy(logits, target.long(), ignore_index=ignore_index, reduction="none")
    losses = per_pixel[target != ignore_index]
    if losses.numel() == 0:
        return logits.sum() * 0.0
    k = max(1, int(fraction * losses.numel()))
    return torch.topk(losses, k, sorted=False).values.mean()


# ---------------------------------------------------------------- model


class FrozenStagesDeepLabV3(DeepLabV3):
    """torchvision DeepLabV3 whose frozen backbone stages stay in eval mode (frozen BatchNorm)."""

    def __init__(self, backbone: nn.Module, classifier: nn.Module, frozen: Sequence[str] = ()):
        super().__init__(backbone, classifier)
        self.frozen_modules = tuple(frozen)
        for name in self.frozen_modules:
            for p in self.backbone[name].parameters():
                p.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> FrozenStagesDeepLabV3:
        super().train(mode)
        for name in self.frozen_modules:
            self.backbone[name].eval()
        return self


def _dilate_basic_layer(layer: nn.Sequential, previous: int, dilation: int) -> None:
    """Turn a strided BasicBlock layer into a dilated one (stride 1, 3x3 convs dilated).

    Mirrors torchvision's Bottleneck behaviour: the first block's first conv keeps the previous
    dilation, every later 3x3 conv uses ``dilation``.
    """
    for i, block in enumerate(layer):
        if not isinstance(block, BasicBlock):
            raise TypeError(f"expected BasicBlock, got {type(block).__name__}")
        for j, conv in enumerate((block.conv1, block.conv2)):
            d = previous if (i == 0 and j == 0) else dilation
            conv.stride = (1, 1)
            conv.dilation = (d, d)
            conv.padding = (d, d)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)
        block.stride = 1


def _resnet(arch: str, output_stride: int) -> nn.Module:
    """A torchvision ResNet (random init) with layer3/layer4 dilated for the output stride."""
    if arch not in ARCHS:
        raise ValueError(f"unknown segmentation arch '{arch}'; choose one of {ARCHS}")
    dilate = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}
    if output_stride not in dilate:
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    factory = getattr(torchvision.models, arch)
    if arch in ("resnet18", "resnet34"):
        net = factory(weights=None)
        d = 1
        for name, flag in zip(("layer2", "layer3", "layer4"), dilate[output_stride], strict=True):
            if flag:
                _dilate_basic_layer(getattr(net, name), d, d * 2)
                d *= 2
        return net
    return factory(weights=None, replace_stride_with_dilation=dilate[output_stride])


def build_deeplabv3(arch: str, num_classes: int, output_stride: int = 8,
                    atrous_rates: Sequence[int] = (12, 24, 36),
                    pretrained_backbone: str | None = None, frozen_stages: int = 2) -> nn.Module:
    """DeepLab-v3 on a dilated torchvision ResNet; the first ``frozen_stages`` stages are frozen."""
    if not 0 <= frozen_stages <= 4:
        raise ValueError(f"frozen_stages must lie in 0..4, got {frozen_stages}")
    net = _resnet(arch, output_stride)
    channels = net.fc.in_features
    backbone = IntermediateLayerGetter(net, return_layers={"layer4": "out"})
    if pretrained_backbone:
        load_resnet_weights(backbone, pretrained_backbone)
    head = DeepLabHead(channels, num_classes, atrous_rates=tuple(atrous_rates))
    frozen = [name for s in range(1, frozen_stages + 1) for name in STAGES[s]]
    return FrozenStagesDeepLabV3(backbone, head, frozen)


def _model_from_cfg(cfg: dict[str, Any], num_classes: int, load_pretrained: bool) -> nn.Module:
    cfg = {**section_defaults("segmentation"), **cfg}
    return build_deeplabv3(
        cfg["arch"], num_classes, cfg["output_stride"], cfg["atrous_rates"],
        cfg["pretrained_backbone"] if load_pretrained else None, cfg["frozen_stages"])


# ---------------------------------------------------------------- data


def label_path(labels_dir: Path, key: str) -> Path:
    """Where the label PNG of an image key lives."""
    return Path(labels_dir) / f"{key}.png"


class SegmentationDataset(Dataset):
    """Images with label PNGs, augmented with scale, rotation, flip and a random crop.

    Random draws come from a generator seeded by (seed, epoch, index), so augmentation does not
    depend on worker count or on where a run was resumed; call :meth:`set_epoch` each epoch.
    """

    def __init__(self, records: list[ImageRecord], labels_dir: Path, crop_size: int,
                 scale_range: Sequence[float] = (0.75, 1.25), rotation_degrees: float = 5.0,
                 seed: int = 0):
        self.records = list(records)
        self.labels_dir = Path(labels_dir)
        self.crop = int(crop_size)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.rotation = float(rotation_degrees)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> tuple[Tensor, Tensor]:
        """Normalised image (3, H, W) and int64 labels (H, W) of one record, unaugmented."""
        rec = self.records[index]
        lpath = label_path(self.labels_dir, rec.key)
        labels = read_label_png(lpath)
        rgb = read_rgb(rec.path)
        if labels.shape != rgb.shape[:2]:
            raise ValueError(f"{lpath}: label size {labels.shape} differs from image {rec.path} "
                             f"size {rgb.shape[:2]}")
        return to_tensor(rgb), torch.from_numpy(labels.astype(np.int64))

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image, labels = self.load(index)
        lab = labels[None].float()
        h, w = image.shape[-2:]
        scale = rng.uniform(*self.scale_range)
        size = [max(1, round(h * scale)), max(1, round(w * scale))]
        if size != [h, w]:
            image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
            lab = F.interpolate(lab[None], size=size, mode="nearest")[0]
        angle = float(rng.uniform(-self.rotation, self.rotation)) if self.rotation > 0 else 0.0
        if angle != 0.0:
            image = TF.rotate(image, angle, interpolation=InterpolationMode.BILINEAR, fill=[0.0])
            lab = TF.rotate(lab, angle, interpolation=InterpolationMode.NEAREST,
                            fill=[float(IGNORE_LABEL)])
        if rng.random() < 0.5:
            image, lab = image.flip(-1), lab.flip(-1)
        h, w = image.shape[-2:]
        ph, pw = max(0, self.crop - h), max(0, self.crop - w)
        if ph or pw:  # pad with the mean colour (0 after normalisation) / ignore
            image = F.pad(image, (0, pw, 0, ph), value=0.0)
            lab = F.pad(lab, (0, pw, 0, ph), value=float(IGNORE_LABEL))
        h, w = image.shape[-2:]
        y0 = int(rng.integers(0, h - self.crop + 1))
        x0 = int(rng.integers(0, w - self.crop + 1))
        image = image[:, y0:y0 + self.crop, x0:x0 + self.crop].contiguous()
        lab = lab[0, y0:y0 + self.crop, x0:x0 + self.crop].round().long().contiguous()
        return image, lab


# ---------------------------------------------------------------- training


def _check_labels(records: list[ImageRecord], labels_dir: Path) -> None:
    if not records:
        raise ValueError("no training images for the segmentation model")
    for rec in records:
        p = label_path(labels_dir, rec.key)
        if not p.is_file():
            raise FileNotFoundError(f"label map for image '{rec.key}' not found: {p}")


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Shuffled indices of one epoch, reproducible from (seed, epoch) alone."""
    g = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n, generator=g).tolist()


def train_segmentation(records: list[ImageRecord], labels_dir: Path, checkpoint_dir: Path,
                       out_model: Path, cfg: dict[str, Any], device: torch.device) -> None:
    """Train DeepLab-v3 on ``{labels_dir}/{key}.png``; resumable from ``checkpoint_dir/last.pt``."""
    labels_dir, checkpoint_dir = Path(labels_dir), Path(checkpoint_dir)
    cfg = {**section_defaults("segmentation"), **cfg}
    _check_labels(records, labels_dir)
    num_classes = int(cfg["num_classes"])
    epochs = int(cfg["epochs"])
    batch_size = int(cfg["batch_size"])
    seed = int(cfg["seed"])
    fraction = float(cfg["hard_pixel_fraction"])
    batch_size = min(batch_size, len(records))
    if batch_size < 2:
        raise ValueError("segmentation training needs batches of at least 2 images (BatchNorm in "
                         f"the ASPP pooling branch); batch_size={cfg.get('batch_size')}, "
                         f"{len(records)} training images")

    seed_everything(seed)
    model = _model_from_cfg(cfg, num_classes, load_pretrained=True).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=float(cfg["lr"]), momentum=float(cfg["momentum"]),
                                weight_decay=float(cfg["weight_decay"]))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=[int(e) for e in cfg["lr_drop_epochs"]], gamma=0.1)

    dataset = SegmentationDataset(records, labels_dir, int(cfg["crop_size"]), cfg["scale_range"],
                                  float(cfg["rotation_degrees"]), seed)
    steps_per_epoch = len(records) // batch_size  # drop_last: BatchNorm needs full batches
    start_epoch, global_step = 0, 0
    last = checkpoint_dir / "last.pt"
    if last.is_file():
        state = load_checkpoint(last, map_location="cpu")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, global_step = int(state["epoch"]), int(state["global_step"])
        set_rng_state(state["rng"])
        log.info("resuming segmentation training from %s: %d/%d epochs done, step %d", last,
                 start_epoch, epochs, global_step)
    else:
        log.info("segmentation training from scratch: %d images, %d epochs x %d steps",
                 len(records), epochs, steps_per_epoch)

    progress = ProgressLog(epochs * steps_per_epoch, int(cfg["log_every"]), "segmentation")
    num_workers = int(cfg["num_workers"])
    model.train()
    for epoch in range(start_epoch, epochs):
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=batch_size,
                            sampler=_epoch_order(len(dataset), seed, epoch),
                            num_workers=num_workers, drop_last=True,
                            pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(seed + epoch))
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            logits = model(images)["out"]
            loss = hard_pixel_cross_entropy(logits, labels, fraction)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"segmentation loss is {loss.item()} at step {global_step + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            global_step += 1
            lr = optimizer.param_groups[0]["lr"]
            progress.step(global_step, epoch + 1, {"loss": loss.item()}, lr)
        scheduler.step()
        save_checkpoint(last, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), "epoch": epoch + 1,
                               "global_step": global_step, "rng": rng_state()})
    save_checkpoint(out_model, {"state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                                "cfg": dict(cfg), "num_classes": num_classes})
    log.info("segmentation model written to %s (%d steps)", out_model, global_step)


# ---------------------------------------------------------------- prediction


def load_segmentation_model(model_path: Path, device: torch.device) -> tuple[nn.Module, int]:
    """A trained model (eval mode) and its number of classes from :func:`train_segmentation`."""
    state = load_checkpoint(model_path, map_location="cpu")
    if "state_dict" not in state or "cfg" not in state:
        raise ValueError(f"{model_path}: not a segmentation model file")
    num_classes = int(state["num_classes"])
    model = _model_from_cfg(state["cfg"], num_classes, load_pretrained=False)
    model.load_state_dict(state["state_dict"])
    return model.to(device).eval(), num_classes


@torch.no_grad()
def predict_label_map(model: nn.Module, rgb: np.ndarray, device: torch.device,
                      short_side: int | None = None) -> np.ndarray:
    """uint8 label map (H, W) of one RGB image, at the image's original size."""
    h, w = rgb.shape[:2]
    size = resized_hw(h, w, short_side) if short_side else None
    x = to_tensor(rgb, size)[None].to(device)
    logits = model(x)["out"]
    if logits.shape[-2:] != (h, w):
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    return logits[0].argmax(0).to(torch.uint8).cpu().numpy()


def predict_segmentation(model_path: Path, records: list[ImageRecord], out_dir: Path,
                         cfg: dict[str, Any], device: torch.device, *, resume: bool = False,
                         log_every: int = 50) -> None:
    """Write ``{out_dir}/{key}.png`` label maps; with ``resume`` skip images already written."""
    model, num_classes = load_segmentation_model(Path(model_path), device)
    if cfg.get("num_classes") not in (None, num_classes):
        log.warning("config says %s classes but %s holds %d; using the model's", cfg["num_classes"],
                    model_path, num_classes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    short_side = cfg.get("test_short_side")
    done = skipped = 0
    n = len(records)
    for i, rec in enumerate(records, 1):
        target = label_path(out_dir, rec.key)
        if resume and target.is_file():
            skipped += 1
            continue
        write_label_png(target, predict_label_map(model, read_rgb(rec.path), device, short_side))
        done += 1
        if i % max(1, log_every) == 0 or i == n:
            log.info("segmentation predictions %d/%d (%d skipped)", i, n, skipped)
    log.info("wrote %d label maps to %s (%d already there)", done, out_dir, skipped)

