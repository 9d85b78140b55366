"""Stage 4: DeepLab-v3 (dilated ResNet) trained on pseudo-label PNGs with hard pixel mining."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import cv2
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

from maskdistill import distributed
from maskdistill.backbone import load_resnet_weights
from maskdistill.images import ImageRecord, read_rgb, resized_hw, to_tensor
from maskdistill.settings import SegmentationSettings, as_config, stored_settings
from maskdistill.storage import IGNORE_LABEL, read_label_png, write_label_png
from maskdistill.training import (
    Losses,
    TrainingRun,
    autocast_forward,
    check_precision,
    fit,
    load_model,
    memory_format,
    progress,
    save_model,
    seed_everything,
)

log = logging.getLogger("maskdistill")

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
# Backbone modules of each stage (IntermediateLayerGetter names); stage 1 includes the stem.
STAGES = {1: ("conv1", "bn1", "layer1"), 2: ("layer2",), 3: ("layer3",), 4: ("layer4",)}


# ---------------------------------------------------------------- loss

HARD_PIXEL_COUNTS = ("valid", "batch")


def hard_pixel_count(n_valid: int, n_pixels: int, fraction: float, count: str = "valid") -> int:
    """How many of a batch's pixels the hard-pixel loss keeps.

    ``count`` valid: ``max(1, int(fraction * n_valid))``; batch (the authors' loss):
    ``min(int(fraction * n_pixels), n_valid)``, ``n_pixels`` counting ignored pixels too. Never more
    than ``n_valid`` (0 when no pixel is valid).
    """
    if count not in HARD_PIXEL_COUNTS:
        raise ValueError(f"config key 'segmentation.hard_pixel_count': {count!r} is not one of "
                         f"{list(HARD_PIXEL_COUNTS)}")
    if n_valid == 0:
        return 0
    if count == "valid":
        return max(1, int(fraction * n_valid))
    return min(int(fraction * n_pixels), n_valid)


def hard_pixel_cross_entropy(logits: Tensor, target: Tensor, fraction: float = 0.2,
                             ignore_index: int = IGNORE_LABEL, count: str = "valid") -> Tensor:
    """Mean cross-entropy of the ``fraction`` hardest valid pixels of the whole batch.

    Keeps exactly ``k`` pixels (:func:`hard_pixel_count`: a share of the valid pixels, or with
    ``count`` batch of all pixels); ``fraction`` 1 with ``count`` valid is the plain cross-entropy
    over the valid pixels. No pixel kept -> a zero loss that is still connected to ``logits``.
    With several processes, each holding a share of the batch, the hardest pixels are those of the
    whole batch and the result is this process's contribution: its chosen pixels' losses over ``k``
    (the contributions add up to the loss).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"hard pixel fraction must lie in (0, 1], got {fraction}")
    per_pixel = F.cross_entropy(logits, target.long(), ignore_index=ignore_index, reduction="none")
    losses = per_pixel[target != ignore_index]
    if distributed.world().distributed:
        return _shared_hard_pixels(losses, logits, fraction, count, target.numel())
    k = hard_pixel_count(losses.numel(), target.numel(), fraction, count)
    if k == 0:
        return logits.sum() * 0.0
    if k == losses.numel():
        return losses.mean()
    return torch.topk(losses, k, sorted=False).values.mean()


def _shared_hard_pixels(losses: Tensor, logits: Tensor, fraction: float, count: str,
                        n_pixels: int) -> Tensor:
    """This process's part of the hard-pixel loss of a batch shared among processes: the k-th
    largest loss of the whole batch is found from every process's k largest."""
    sizes = distributed.all_sum(torch.tensor([losses.numel(), n_pixels], device=losses.device))
    n, total = (int(v) for v in sizes.tolist())
    k = hard_pixel_count(n, total, fraction, count)
    if k == 0:
        return logits.sum() * 0.0
    if k == n:
        return losses.sum() / k
    mine = torch.full((k,), float("-inf"), device=losses.device, dtype=losses.dtype)
    top = torch.topk(losses.detach(), min(k, losses.numel())).values
    mine[: len(top)] = top
    threshold = torch.topk(distributed.all_gather(mine), k).values[-1]
    return losses[losses >= threshold].sum() / k


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


def model_from_settings(s: SegmentationSettings, num_classes: int, load_pretrained: bool) -> nn.Module:
    """The configured DeepLab-v3; its pretrained backbone weights are loaded when ``load_pretrained``.

    Its ``test_side`` attribute is the square side it predicts at (:func:`fixed_side`; None: the
    image's own size), so a model predicts the way it was trained.
    """
    model = build_deeplabv3(s.arch, num_classes, s.output_stride, s.atrous_rates,
                            s.pretrained_backbone if load_pretrained else None, s.frozen_stages)
    model.test_side = fixed_side(s.transform, s.crop_size)
    return model


# ---------------------------------------------------------------- data


def label_path(labels_dir: Path, key: str) -> Path:
    """Where the label PNG of an image key lives."""
    return Path(labels_dir) / f"{key}.png"


TRANSFORMS = ("crop", "reference")


def check_transform(transform: str, key: str = "segmentation.transform") -> str:
    """``transform`` when it is one of :data:`TRANSFORMS`; else an error naming the config key."""
    if transform not in TRANSFORMS:
        raise ValueError(f"config key '{key}': {transform!r} is not one of {list(TRANSFORMS)}")
    return transform


def fixed_side(transform: str, crop_size: int) -> int | None:
    """The square side every image is resized to, in training and prediction, under ``transform``:
    ``crop_size`` for reference, None for crop (native scale)."""
    return crop_size if check_transform(transform) == "reference" else None


def fixed_resize(rgb: np.ndarray, labels: np.ndarray | None, side: int
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """The whole image resized to ``side`` x ``side`` (aspect not kept): uint8 RGB bicubic, labels
    nearest (OpenCV, as the authors' FixedResize)."""
    rgb = cv2.resize(np.ascontiguousarray(rgb), (side, side), interpolation=cv2.INTER_CUBIC)
    if labels is not None:
        labels = cv2.resize(np.ascontiguousarray(labels), (side, side), interpolation=cv2.INTER_NEAREST)
    return rgb, labels


def reference_augment(rgb: np.ndarray, labels: np.ndarray, flip: bool, scale: float, angle: float,
                      side: int) -> tuple[np.ndarray, np.ndarray]:
    """The authors' training transform of a uint8 RGB image (H, W, 3) and its uint8 labels (H, W).

    Horizontal flip (when ``flip``), then scale by ``scale`` and rotate by ``angle`` degrees
    (counter-clockwise) about the image centre on the same H x W canvas, image bicubic and labels
    nearest, the uncovered border black in the image and label 0 in the labels; then the whole
    image resized to ``side`` x ``side`` (:func:`fixed_resize`). Returns (side, side, 3), (side, side).
    """
    if flip:
        rgb, labels = rgb[:, ::-1], labels[:, ::-1]
    rgb, labels = np.ascontiguousarray(rgb), np.ascontiguousarray(labels)
    h, w = labels.shape
    if scale != 1.0 or angle != 0.0:
        m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
        rgb = cv2.warpAffine(rgb, m, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_CONSTANT,
                             borderValue=(0, 0, 0))
        labels = cv2.warpAffine(labels, m, (w, h), flags=cv2.INTER_NEAREST,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    rgb, resized = fixed_resize(rgb, labels, side)
    assert resized is not None
    return rgb, resized


class SegmentationDataset(Dataset):
    """Images with label PNGs, augmented as ``transform`` says.

    crop: scale, rotation (border ignored), flip and a random ``crop_size`` crop at native scale;
    reference: :func:`reference_augment` (flip, scale and rotation on the same canvas with border
    label 0, the whole image resized to ``crop_size`` x ``crop_size``).
    Random draws come from a generator seeded by (seed, epoch, index), so augmentation does not
    depend on worker count or on where a run was resumed; call :meth:`set_epoch` each epoch.
    """

    def __init__(self, records: list[ImageRecord], labels_dir: Path, crop_size: int,
                 scale_range: Sequence[float] = (0.75, 1.25), rotation_degrees: float = 5.0,
                 seed: int = 0, transform: str = "crop"):
        self.records = list(records)
        self.labels_dir = Path(labels_dir)
        self.crop = crop_size
        self.scale_range = (scale_range[0], scale_range[1])
        self.rotation = rotation_degrees
        self.seed = seed
        self.transform = check_transform(transform)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the augmentations of ``epoch`` from now on."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def load_arrays(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """uint8 RGB (H, W, 3) and uint8 labels (H, W) of one record, unaugmented."""
        rec = self.records[index]
        lpath = label_path(self.labels_dir, rec.key)
        labels = read_label_png(lpath)
        rgb = read_rgb(rec.path)
        if labels.shape != rgb.shape[:2]:
            raise ValueError(f"{lpath}: label size {labels.shape} differs from image {rec.path} "
                             f"size {rgb.shape[:2]}")
        return rgb, labels

    def load(self, index: int) -> tuple[Tensor, Tensor]:
        """Normalised image (3, H, W) and int64 labels (H, W) of one record, unaugmented."""
        rgb, labels = self.load_arrays(index)
        return to_tensor(rgb), torch.from_numpy(labels.astype(np.int64))

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self.transform == "reference":
            return self._reference_item(index, rng)
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

    def _reference_item(self, index: int, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        """One record through :func:`reference_augment` with draws from ``rng``."""
        rgb, labels = self.load_arrays(index)
        flip = bool(rng.random() < 0.5)
        scale = float(rng.uniform(*self.scale_range))
        angle = float(rng.uniform(-self.rotation, self.rotation)) if self.rotation > 0 else 0.0
        rgb, labels = reference_augment(rgb, labels, flip, scale, angle, self.crop)
        return to_tensor(rgb), torch.from_numpy(labels.astype(np.int64))


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


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The full global batches of one epoch (image indices, shuffled by (seed, epoch))."""
    order = _epoch_order(n, seed, epoch)
    return [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def train_segmentation(records: list[ImageRecord], labels_dir: Path, checkpoint_dir: Path,
                       out_model: Path, s: SegmentationSettings, num_classes: int,
                       device: torch.device, precision: str = "fp32") -> None:
    """Train DeepLab-v3 on ``{labels_dir}/{key}.png``; resumable from ``checkpoint_dir/last.pt``.

    Writes ``out_model`` with the weights, ``num_classes`` and the settings (``cfg``). With several
    processes each trains on its share of every batch and rank 0 writes the model.
    """
    labels_dir = Path(labels_dir)
    _check_labels(records, labels_dir)
    batch_size = min(s.batch_size, len(records))
    if batch_size < 2:
        raise ValueError("segmentation training needs batches of at least 2 images (BatchNorm in "
                         f"the ASPP pooling branch); batch_size={s.batch_size}, "
                         f"{len(records)} training images")
    distributed.check_batch_size(batch_size, "segmentation.batch_size")
    seed_everything(s.seed)
    model = model_from_settings(s, num_classes, load_pretrained=True).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(s.lr_drop_epochs),
                                                     gamma=0.1)
    dataset = SegmentationDataset(records, labels_dir, s.crop_size, s.scale_range,
                                  s.rotation_degrees, s.seed, s.transform)

    def batches(epoch: int) -> DataLoader:
        dataset.set_epoch(epoch)
        shares = distributed.shared_batches(epoch_batches(len(dataset), batch_size, s.seed, epoch))
        return DataLoader(dataset, batch_sampler=[share for _, share, _ in shares],
                          num_workers=s.num_workers, pin_memory=device.type == "cuda",
                          generator=torch.Generator().manual_seed(s.seed + epoch))

    def loss(net: nn.Module, batch: tuple[Tensor, Tensor], _step: int) -> Losses:
        images, labels = (t.to(device, non_blocking=True) for t in batch)
        value = hard_pixel_cross_entropy(net(images)["out"], labels, s.hard_pixel_fraction,
                                         count=s.hard_pixel_count)
        return value, {"loss": value.item()}

    log.info("segmentation: %d training images, batches of %d", len(records), batch_size)
    result = fit(TrainingRun(
        name="segmentation", model=model, optimizer=optimizer, epochs=s.epochs,
        steps_per_epoch=len(records) // batch_size,  # full batches only: BatchNorm needs them
        batches=batches, loss=loss, checkpoint_dir=Path(checkpoint_dir), log_every=s.log_every,
        scheduler=scheduler, precision=precision, channels_last=True))
    if distributed.world().is_main:
        save_model(out_model, model.state_dict(), cfg=as_config(s), num_classes=num_classes)
        log.info("segmentation model written to %s (%d steps)", out_model, result.steps)


# ---------------------------------------------------------------- prediction


def load_segmentation_model(model_path: Path, device: torch.device) -> tuple[nn.Module, int]:
    """A trained model (eval mode) and its number of classes from :func:`train_segmentation`."""
    state = load_model(model_path, "segmentation model", "cfg", "num_classes")
    num_classes = state["num_classes"]
    settings = stored_settings("segmentation", state["cfg"])
    model = model_from_settings(settings, num_classes, load_pretrained=False)
    model.load_state_dict(state["state_dict"])
    return model.to(device).eval(), num_classes


def mixed_precision(model: nn.Module, device: torch.device, precision: str) -> nn.Module:
    """A model for inference in ``precision``: its forward under autocast (float32 logits out),
    channels-last under mixed precision. Unchanged in fp32."""
    check_precision(precision, device)
    return autocast_forward(memory_format(model, precision), device, precision)


def input_size(h: int, w: int, short_side: int | None = None, side: int | None = None) -> tuple[int, int]:
    """The size an H x W image enters the model at: ``side`` x ``side`` when given (the reference
    transform; ``short_side`` is then not used), else shorter side ``short_side``, else as is."""
    if side:
        return side, side
    return resized_hw(h, w, short_side) if short_side else (h, w)


def model_input(rgb: np.ndarray, size: tuple[int, int], side: int | None) -> Tensor:
    """Normalised (1, 3, h, w) input of a uint8 RGB image at ``size``: OpenCV bicubic for a fixed
    ``side`` (as in training, :func:`fixed_resize`), else :func:`to_tensor`'s resize."""
    if side:
        return to_tensor(fixed_resize(rgb, None, side)[0])[None]
    return to_tensor(rgb, size)[None]


def classifier_head(model: nn.Module) -> nn.Module:
    """The module whose output is the low-resolution logits (the DeepLab head; for a linear probe,
    the head of the model inside it)."""
    inner = getattr(model, "model", model)
    return inner.classifier


def forward_logits(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """The model's logits at the input size (1, C, h, w) and the head's low-resolution logits
    (1, C, h/stride, w/stride) they were upsampled from, both float32."""
    captured: list[Tensor] = []
    hook = classifier_head(model).register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        out = model(x)["out"]
    finally:
        hook.remove()
    return out.float(), captured[-1].float()


def labels_at_image_size(logits: Tensor, hw: tuple[int, int], side: int | None) -> np.ndarray:
    """uint8 (H, W) labels of (1, C, h, w) logits: argmax, then nearest resize to ``hw`` for a
    fixed ``side`` (the authors' test); else the logits upsampled bilinearly, then argmax."""
    if logits.shape[-2:] == hw:
        return logits[0].argmax(0).to(torch.uint8).cpu().numpy()
    if side:
        labels = logits.argmax(1, keepdim=True).float()
        return F.interpolate(labels, size=hw, mode="nearest")[0, 0].to(torch.uint8).cpu().numpy()
    logits = F.interpolate(logits, size=hw, mode="bilinear", align_corners=False)
    return logits[0].argmax(0).to(torch.uint8).cpu().numpy()


@torch.no_grad()
def predict_logits(model: nn.Module, rgb: np.ndarray, device: torch.device,
                   short_side: int | None = None) -> tuple[np.ndarray, Tensor, Tensor]:
    """Prediction of one RGB image at the model's ``test_side`` (or ``short_side``, or as is).

    Returns the uint8 label map (H, W) at the image's size, the logits at the input size
    (1, C, h, w) and the head's low-resolution logits (1, C, h', w'), on ``device``.
    """
    h, w = rgb.shape[:2]
    side = getattr(model, "test_side", None)
    size = input_size(h, w, short_side, side)
    logits, low = forward_logits(model, model_input(rgb, size, side).to(device))
    return labels_at_image_size(logits, (h, w), side), logits, low


def predict_label_map(model: nn.Module, rgb: np.ndarray, device: torch.device,
                      short_side: int | None = None) -> np.ndarray:
    """uint8 label map (H, W) of one RGB image, at the image's original size (see
    :func:`predict_logits`)."""
    return predict_logits(model, rgb, device, short_side)[0]


def logits_path(logits_dir: Path, key: str) -> Path:
    """Where the low-resolution logits of an image key live (see :func:`write_logits`)."""
    return Path(logits_dir) / f"{key}.npz"


def write_logits(path: Path, low: Tensor, input_hw: tuple[int, int]) -> None:
    """Store an image's low-resolution logits (C, h', w') as float16 with the model's input size
    (what they were upsampled to): ``np.savez`` arrays ``logits`` and ``input_hw``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # keys may name sub-folders
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, logits=low[0].to(torch.float16).cpu().numpy(), input_hw=np.asarray(input_hw, np.int64))
    tmp.replace(path)


def predict_segmentation(model_path: Path, records: list[ImageRecord], out_dir: Path,
                         device: torch.device, short_side: int | None = None, *,
                         resume: bool = False, precision: str = "fp32",
                         logits_dir: Path | None = None) -> None:
    """Write ``{out_dir}/{key}.png`` label maps, predicted at the model's ``test_side`` x
    ``test_side`` (reference transform) or with the shorter image side at ``short_side`` (None: the
    original size) in ``precision``; with ``logits_dir`` also ``{logits_dir}/{key}.npz``, the
    low-resolution logits (:func:`write_logits`, what a CRF from probabilities needs). With
    ``resume`` skip images already written."""
    model, _ = load_segmentation_model(Path(model_path), device)
    mixed_precision(model, device, precision)
    side = getattr(model, "test_side", None)
    if side and short_side:
        log.info("model trained with transform 'reference': predicting at %dx%d, "
                 "test_short_side %d not used", side, side, short_side)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if logits_dir is not None:
        Path(logits_dir).mkdir(parents=True, exist_ok=True)
    done = skipped = 0
    for rec in progress(records, total=len(records), desc="segmentation predictions"):
        target = label_path(out_dir, rec.key)
        if resume and target.is_file() and (logits_dir is None or logits_path(logits_dir, rec.key).is_file()):
            skipped += 1
            continue
        labels, logits, low = predict_logits(model, read_rgb(rec.path), device, short_side)
        if logits_dir is not None:
            write_logits(logits_path(logits_dir, rec.key), low, tuple(logits.shape[-2:]))
        write_label_png(target, labels)
        done += 1
    log.info("wrote %d label maps to %s (%d already there)", done, out_dir, skipped)
