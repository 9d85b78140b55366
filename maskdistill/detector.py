"""Stage 2: train an instance segmentation model on the clustered pseudo-labels, then predict.

The paper used detectron2's R50-C4 Mask R-CNN; here the detector sits behind the small
:class:`DetectorBackend` interface: a torchvision Mask R-CNN (ResNet-FPN, or ResNet-C4 from
:mod:`maskdistill.maskrcnn_c4`) and detectron2 itself (:mod:`maskdistill.detectron2_backend`,
imported only when selected), both registered in :data:`BACKENDS`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from maskdistill import distributed
from maskdistill.backbone import load_resnet_weights
from maskdistill.images import IMAGENET_MEAN, IMAGENET_STD, ImageRecord, read_rgb
from maskdistill.maskrcnn_c4 import build_c4_model, convert_batchnorm
from maskdistill.settings import DetectorSettings, as_config, stored_settings
from maskdistill.storage import decode_segmentation, encode_rle, read_json, write_json
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

BACKBONES = ("resnet18", "resnet34", "resnet50")
WARMUP_FACTOR = 0.001
# Settings that apply at prediction time; the rest of the architecture comes from the model file.
INFERENCE_KEYS = ("test_min_size", "max_size", "score_threshold", "detections_per_image")


class DetectorBackend(Protocol):
    """What the workflow needs from an instance segmentation implementation."""

    def train(self, train_json: Path, images_root: Path, checkpoint_dir: Path,
              out_model: Path) -> None:
        """Train on a COCO instances file (resumable from ``checkpoint_dir``); write ``out_model``."""
        ...

    def predict(self, model_path: Path, records: list[ImageRecord], out_json: Path) -> None:
        """Write COCO-format predictions (masks, classes, scores) for ``records``."""
        ...


# ---------------------------------------------------------------- model


def _fpn_backbone(resnet: nn.Module, channels: int) -> BackboneWithFPN:
    """ResNet trunk (stages already frozen as configured) under an FPN."""
    width = resnet.inplanes // 8  # channels of layer1's output
    return BackboneWithFPN(resnet, {f"layer{i}": str(i - 1) for i in range(1, 5)},
                           [width * 2 ** (i - 1) for i in range(1, 5)], channels,
                           extra_blocks=LastLevelMaxPool())


ARCHITECTURES = ("fpn", "c4")
BATCHNORM = ("auto", "frozen", "train")
STAGES = ("conv1", "layer1", "layer2", "layer3", "layer4")  # stem, res2-res5


def _resnet(s: DetectorSettings, load_pretrained: bool) -> nn.Module:
    """The configured torchvision ResNet with its batch norm mode (``s.batchnorm``), weights loaded
    from ``s.pretrained_backbone`` when ``load_pretrained``, and its first ``5 - trainable_layers``
    stages frozen; the frozen stages' batch norm is frozen in every mode but ``auto``.

    ``auto`` is frozen BN with pretrained weights, else trainable BN; ``train`` loads the weights
    into frozen BN and turns the norms of the trained stages into BatchNorm2d with those values
    (under DistributedDataParallel, :func:`maskdistill.training.fit` makes them SyncBatchNorm).
    """
    name = s.backbone
    if name not in BACKBONES:
        raise ValueError(f"config key 'detector.backbone': unknown '{name}', choose from {BACKBONES}")
    if s.batchnorm not in BATCHNORM:
        raise ValueError(f"config key 'detector.batchnorm': unknown '{s.batchnorm}', choose from {BATCHNORM}")
    layers = s.trainable_layers
    if not 0 <= layers <= 5:
        raise ValueError(f"config key 'detector.trainable_layers': {layers} outside 0..5")
    pretrained = s.pretrained_backbone
    frozen_bn = s.batchnorm != "auto" or bool(pretrained)
    # zero-initialised residual branches keep activations bounded when training from scratch
    resnet = getattr(torchvision.models, name)(
        weights=None, norm_layer=FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d,
        zero_init_residual=True)
    if pretrained and load_pretrained:
        load_resnet_weights(resnet, pretrained)
        log.info("backbone %s initialised from %s", name, pretrained)
    if layers < 5 and not pretrained and load_pretrained:
        log.warning("detector: trainable_layers=%d freezes randomly initialised backbone stages "
                    "(no pretrained_backbone given)", layers)
    train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:layers]
    if layers == 5:
        train.append("bn1")
    if s.batchnorm == "train":
        for stage in train:
            setattr(resnet, stage, convert_batchnorm(getattr(resnet, stage), train=True))
    for pname, param in resnet.named_parameters():
        if not pname.startswith(tuple(train)):
            param.requires_grad_(False)
    return resnet


def build_model(s: DetectorSettings, num_classes: int, load_pretrained: bool = True) -> GeneralizedRCNN:
    """Mask R-CNN as configured (``num_classes`` includes background): ResNet-FPN or ResNet-C4
    (``s.architecture``), batch norm as :func:`_resnet` describes."""
    if s.architecture not in ARCHITECTURES:
        raise ValueError(f"config key 'detector.architecture': unknown '{s.architecture}', "
                         f"choose from {ARCHITECTURES}")
    resnet = _resnet(s, load_pretrained)
    sizes = dict(min_size=(s.train_min_size[0],), max_size=s.max_size, image_mean=list(IMAGENET_MEAN),
                 image_std=list(IMAGENET_STD))
    if s.architecture == "c4":
        model = build_c4_model(
            resnet, num_classes, **sizes, score_thresh=s.score_threshold,
            detections_per_img=s.detections_per_image, rpn_batch_size_per_image=s.rpn_batch_size_per_image,
            roi_batch_size_per_image=s.roi_batch_size_per_image)
    else:
        ch = s.fpn_channels
        model = MaskRCNN(
            _fpn_backbone(resnet, ch), num_classes=None, **sizes,
            box_score_thresh=s.score_threshold,
            box_detections_per_img=s.detections_per_image,
            rpn_batch_size_per_image=s.rpn_batch_size_per_image,
            box_batch_size_per_image=s.roi_batch_size_per_image,
            box_head=TwoMLPHead(ch * 7 * 7, s.box_head_dim),
            box_predictor=FastRCNNPredictor(s.box_head_dim, num_classes),
            mask_head=MaskRCNNHeads(ch, [ch] * s.mask_head_convs, 1),
            mask_predictor=MaskRCNNPredictor(ch, ch, num_classes),
        )
    # detectron2-style small init of the mask logits: torchvision's kaiming init (fan_out =
    # num_classes) gives huge initial logits and diverges when training from scratch
    logits = model.roi_heads.mask_predictor.mask_fcn_logits
    nn.init.normal_(logits.weight, std=0.001)
    nn.init.zeros_(logits.bias)
    model.rpn.fg_bg_sampler = ImageSeededSampler(s.rpn_batch_size_per_image, 0.5)
    model.roi_heads.fg_bg_sampler = ImageSeededSampler(s.roi_batch_size_per_image, 0.25)
    return model


def mixed_precision_modules(model: GeneralizedRCNN) -> tuple[nn.Module, ...]:
    """The parts of Mask R-CNN that run under autocast with mixed precision: the ResNet trunk (with
    the FPN), the RPN head and the box and mask heads (C4: res5 and the identity). The box
    predictor, box decoding and the losses stay in float32
    (bfloat16 box coordinates would be off by pixels)."""
    return (model.backbone, model.rpn.head, model.roi_heads.box_head, model.roi_heads.mask_head)


class ImageSeededSampler(BalancedPositiveNegativeSampler):
    """torchvision's sampler of the positive and negative anchors (RPN) or proposals (box head) that
    each training image contributes, drawn from a generator of the image's own: ``seeds[i]`` for
    the i-th image of the forward pass. Seeded by (seed, step, image), a step draws the same samples
    whether its batch runs in one process or is split over several, and again after a resume."""

    def __init__(self, batch_size_per_image: int, positive_fraction: float):
        super().__init__(batch_size_per_image, positive_fraction)
        self.seeds: list[int] = []

    def __call__(self, matched_idxs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if len(self.seeds) != len(matched_idxs):
            raise RuntimeError(f"sampler seeded for {len(self.seeds)} images, called for {len(matched_idxs)}")
        pos_masks, neg_masks = [], []
        for seed, matched in zip(self.seeds, matched_idxs, strict=True):
            g = torch.Generator(device=matched.device).manual_seed(seed)
            positive = torch.where(matched >= 1)[0]
            negative = torch.where(matched == 0)[0]
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            chosen_pos = positive[torch.randperm(len(positive), generator=g, device=g.device)[:num_pos]]
            chosen_neg = negative[torch.randperm(len(negative), generator=g, device=g.device)[:num_neg]]
            pos, neg = (torch.zeros_like(matched, dtype=torch.uint8) for _ in range(2))
            pos[chosen_pos] = 1
            neg[chosen_neg] = 1
            pos_masks.append(pos)
            neg_masks.append(neg)
        return pos_masks, neg_masks


def seed_samplers(model: GeneralizedRCNN, seed: int, step: int, images: Sequence[int]) -> None:
    """Seed the RPN's and the box head's samplers for one training step of dataset ``images``."""
    seeds = [int(np.random.SeedSequence([seed % 2**32, step, int(i)]).generate_state(1, np.uint64)[0] >> 1)
             for i in images]
    model.rpn.fg_bg_sampler.seeds = seeds
    model.roi_heads.fg_bg_sampler.seeds = seeds


# ---------------------------------------------------------------- training data


class CocoInstances(torch.utils.data.Dataset):
    """COCO instances as Mask R-CNN targets; items are indexed by ``(index, flip)``."""

    def __init__(self, train_json: Path, images_root: Path):
        data = read_json(train_json)
        for field in ("images", "annotations", "categories"):
            if field not in data:
                raise ValueError(f"{train_json}: not a COCO instances file (no '{field}')")
        self.categories = sorted(data["categories"], key=lambda c: int(c["id"]))
        cat_ids = {int(c["id"]) for c in self.categories}
        if not cat_ids or min(cat_ids) < 1:
            raise ValueError(f"{train_json}: category ids must be 1..K, got {sorted(cat_ids)}")
        self.num_classes = max(cat_ids) + 1
        by_image: dict[int, list[dict[str, Any]]] = {}
        for ann in data["annotations"]:
            if int(ann["category_id"]) not in cat_ids:
                raise ValueError(f"{train_json}: annotation {ann.get('id')} has category_id "
                                 f"{ann['category_id']} not among the categories")
            if ann.get("iscrowd", 0) or ann["bbox"][2] <= 0 or ann["bbox"][3] <= 0:
                continue
            by_image.setdefault(int(ann["image_id"]), []).append(ann)
        self.root = Path(images_root)
        self.items = [(im, by_image[int(im["id"])]) for im in data["images"]
                      if int(im["id"]) in by_image]
        self.skipped = len(data["images"]) - len(self.items)
        self.source = train_json

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, item: tuple[int, bool]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        index, flip = item
        im, anns = self.items[index]
        path = self.root / im["file_name"]
        rgb = read_rgb(path)
        h, w = int(im["height"]), int(im["width"])
        if rgb.shape[:2] != (h, w):
            raise ValueError(f"{self.source}: {path} is {rgb.shape[0]}x{rgb.shape[1]} but the "
                             f"annotations say {h}x{w}")
        masks = np.stack([decode_segmentation(a["segmentation"], h, w) for a in anns])
        x, y, bw, bh = (np.array([a["bbox"][i] for a in anns], np.float32) for i in range(4))
        boxes = np.stack([x, y, x + bw, y + bh], axis=1)
        image = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float().div_(255.0)
        target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.tensor([int(a["category_id"]) for a in anns], dtype=torch.int64),
            "masks": torch.from_numpy(masks.astype(np.uint8)),
        }
        if flip:
            image = image.flip(-1)
            target["masks"] = target["masks"].flip(-1)
            b = target["boxes"].clone()
            b[:, 0], b[:, 2] = w - target["boxes"][:, 2], w - target["boxes"][:, 0]
            target["boxes"] = b
        return image, target


def _collate(batch: list[Any]) -> tuple[list[Any], list[Any]]:
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def epoch_plan(n: int, batch_size: int, size_range: tuple[int, int], seed: int,
               epoch: int) -> tuple[list[list[tuple[int, bool]]], list[int]]:
    """The batches of one epoch as ``(index, flip)`` lists plus each batch's shorter-side size.

    Deterministic given ``seed + epoch``: a resumed run sees exactly the same epochs.
    """
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n, generator=g).tolist()
    flips = (torch.rand(n, generator=g) < 0.5).tolist()
    batches = [[(i, bool(flips[i])) for i in order[s:s + batch_size]]
               for s in range(0, n, batch_size)]
    sizes = torch.randint(size_range[0], size_range[1] + 1, (len(batches),), generator=g).tolist()
    return batches, sizes


def lr_factor(step: int, steps_per_epoch: int, warmup_iters: int, drops: Sequence[int]) -> float:
    """Linear warmup from ``WARMUP_FACTOR`` over ``warmup_iters`` steps, x0.1 at each drop epoch."""
    warm = 1.0
    if step < warmup_iters:
        alpha = step / warmup_iters
        warm = WARMUP_FACTOR * (1 - alpha) + alpha
    epoch = step // steps_per_epoch
    return warm * 0.1 ** sum(epoch >= d for d in drops)


# ---------------------------------------------------------------- backend


def load_trained(model_path: Path, current: DetectorSettings) -> tuple[dict[str, Any], DetectorSettings]:
    """A trained detector file and the settings to rebuild its model: the architecture it was
    trained with, the inference keys of ``current``. Raises ValueError when another backend than
    ``current.backend`` trained it."""
    saved = load_model(model_path, "detector model", "num_classes", "cfg", "categories")
    stored = stored_settings("detector", saved["cfg"])
    if stored.backend != current.backend:
        raise ValueError(f"{model_path}: trained by the '{stored.backend}' backend, but "
                         f"'detector.backend' is '{current.backend}'")
    return saved, dataclasses.replace(stored, **{key: getattr(current, key) for key in INFERENCE_KEYS})


class TorchvisionMaskRCNN:
    """torchvision Mask R-CNN, ResNet-FPN or ResNet-C4 (``detector.architecture``)."""

    def __init__(self, s: DetectorSettings, device: torch.device | str, precision: str = "fp32"):
        self.s = s
        self.device = torch.device(device)
        self.precision = precision
        self.history: list[dict[str, float]] = []  # losses of the steps run by the last train()

    def train(self, train_json: Path, images_root: Path, checkpoint_dir: Path,
              out_model: Path) -> None:
        """Train (resuming from ``checkpoint_dir/last.pt``) and write the final model file (rank 0 of
        several processes, which each take a share of every batch)."""
        s = self.s
        distributed.check_batch_size(s.batch_size, "detector.batch_size")
        dataset = CocoInstances(Path(train_json), Path(images_root))
        if len(dataset) == 0:
            raise ValueError(f"{train_json}: no image has an annotation to train on")
        log.info("detector: %d training images (%d without annotations skipped), %d classes",
                 len(dataset), dataset.skipped, dataset.num_classes - 1)
        seed_everything(s.seed)
        model = build_model(s, dataset.num_classes).to(self.device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
        steps_per_epoch = math.ceil(len(dataset) / s.batch_size)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, steps_per_epoch, s.warmup_iters, s.lr_drop_epochs))
        result = fit(TrainingRun(
            name="detector", model=model, optimizer=optimizer, epochs=s.epochs,
            steps_per_epoch=steps_per_epoch, batches=lambda epoch: self._batches(dataset, epoch),
            loss=lambda net, batch, step: self._loss(model, net, batch, step),
            checkpoint_dir=Path(checkpoint_dir), log_every=s.log_every, scheduler=scheduler,
            scheduler_interval="step", checkpoint_every=s.checkpoint_every_epochs,
            meta={"num_classes": dataset.num_classes}, precision=self.precision,
            autocast_modules=mixed_precision_modules(model), channels_last=True))
        self.history = result.history
        if distributed.world().is_main:
            save_model(out_model, model.state_dict(), num_classes=dataset.num_classes, cfg=as_config(s),
                       categories=dataset.categories, steps=result.steps)
            log.info("detector: wrote %s after %d steps", out_model, result.steps)

    def _batches(self, dataset: CocoInstances, epoch: int) -> Iterator[tuple[Any, int, float, list[int]]]:
        """This process's share of each batch of one epoch, with the shorter-side size it is trained
        at, the share's fraction of the batch and the dataset indices of its images."""
        s = self.s
        batches, sizes = epoch_plan(len(dataset), s.batch_size, s.train_min_size, s.seed, epoch)
        shares = distributed.shared_batches(batches)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=[share for _, share, _ in shares], collate_fn=_collate,
            num_workers=s.num_workers, pin_memory=self.device.type == "cuda")
        return zip(loader, [sizes[i] for i, _, _ in shares], [f for _, _, f in shares],
                   [[index for index, _ in share] for _, share, _ in shares], strict=True)

    def _loss(self, model: GeneralizedRCNN, net: nn.Module, batch: tuple[Any, int, float, list[int]],
              step: int) -> Losses:
        """Mask R-CNN's summed losses on one batch (``net`` is ``model`` or its DDP wrapper), and
        each loss to log (plus ``total``); a share of a batch contributes its losses weighed by its
        fraction of the batch."""
        (images, targets), size, fraction, indices = batch
        model.transform.min_size = (size,)
        seed_samplers(model, self.s.seed, step, indices)
        images = [im.to(self.device, non_blocking=True) for im in images]
        targets = [{k: v.to(self.device) for k, v in t.items()} for t in targets]
        losses = net(images, targets)
        if fraction != 1.0:
            losses = {k: v * fraction for k, v in losses.items()}
        total = sum(losses.values())
        values = {k: float(v.detach()) for k, v in losses.items()} | {"total": float(total.detach())}
        return total, values

    def load(self, model_path: Path) -> tuple[GeneralizedRCNN, dict[str, Any]]:
        """The trained model (eval mode, on the device, at ``test_min_size``) and its file."""
        saved, arch = load_trained(model_path, self.s)
        model = build_model(arch, saved["num_classes"], load_pretrained=False)
        model.load_state_dict(saved["state_dict"])
        model.transform.min_size = (self.s.test_min_size,)
        model = model.to(self.device).eval()
        check_precision(self.precision, self.device)
        memory_format(model, self.precision)
        for module in mixed_precision_modules(model):
            autocast_forward(module, self.device, self.precision)
        return model, saved

    def predict(self, model_path: Path, records: list[ImageRecord], out_json: Path) -> None:
        """Write COCO-format predictions for every record to ``out_json`` (atomically).

        Layout: ``{"images": [{"id", "file_name", "height", "width", "key"}], "annotations":
        [{"id", "image_id", "category_id", "score", "bbox" (x, y, w, h), "segmentation" (RLE of
        the mask at 0.5), "area"}], "categories": [...]}``. Image ids are ``record.image_id`` or
        else the record's index in ``records``; ``file_name`` is the key plus the file's suffix,
        i.e. the path relative to the images root the keys were made from; height and width are
        those of the decoded image, at which the masks are given.
        """
        model, saved = self.load(model_path)
        loader = torch.utils.data.DataLoader(
            _Images(records), batch_size=self.s.batch_size, collate_fn=_collate,
            num_workers=self.s.num_workers)
        images, anns = [], []
        with torch.inference_mode():
            for tensors, idxs in progress(loader, len(loader), "detector predictions", unit="batch"):
                outputs = model([t.to(self.device) for t in tensors])
                for t, i, out in zip(tensors, idxs, outputs, strict=True):
                    rec = records[i]
                    image_id = rec.image_id if rec.image_id is not None else i
                    h, w = t.shape[-2:]
                    images.append({"id": image_id, "file_name": rec.key + rec.path.suffix,
                                   "height": int(h), "width": int(w), "key": rec.key})
                    anns.extend(prediction_annotations(out, image_id, start_id=len(anns) + 1))
        write_json(out_json, {"images": images, "annotations": anns,
                              "categories": saved["categories"]})
        log.info("detector: wrote %d predictions for %d images to %s", len(anns), len(images),
                 out_json)


class _Images(torch.utils.data.Dataset):
    """Records as float [0, 1] tensors, with their index."""

    def __init__(self, records: list[ImageRecord]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        rgb = read_rgb(self.records[i].path)
        return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float().div_(255.0), i


def prediction_annotations(out: dict[str, torch.Tensor], image_id: int,
                 start_id: int) -> list[dict[str, Any]]:
    """One model output -> COCO annotations (mask thresholded at 0.5, bbox xywh, score)."""
    anns = []
    masks = (out["masks"][:, 0] >= 0.5).cpu().numpy()
    for j, (box, label, score) in enumerate(zip(out["boxes"].tolist(), out["labels"].tolist(),
                                                out["scores"].tolist(), strict=True)):
        x0, y0, x1, y1 = box
        anns.append({"id": start_id + j, "image_id": image_id, "category_id": int(label),
                     "score": float(score), "bbox": [x0, y0, x1 - x0, y1 - y0],
                     "segmentation": encode_rle(masks[j]), "area": int(masks[j].sum())})
    return anns


def _detectron2(s: DetectorSettings, device: torch.device, precision: str) -> DetectorBackend:
    """detectron2's Mask R-CNN (imported only now: the package works without detectron2)."""
    from maskdistill.detectron2_backend import Detectron2MaskRCNN

    return Detectron2MaskRCNN(s, device, precision)


BACKENDS: dict[str, Callable[[DetectorSettings, torch.device, str], DetectorBackend]] = {
    "torchvision": TorchvisionMaskRCNN, "detectron2": _detectron2}


def get_backend(s: DetectorSettings, device: torch.device | str, precision: str = "fp32") -> DetectorBackend:
    """The detector implementation named by ``s.backend``, computing in ``precision``."""
    if s.backend not in BACKENDS:
        raise ValueError(f"config key 'detector.backend': unknown backend '{s.backend}', "
                         f"available: {sorted(BACKENDS)}")
    return BACKENDS[s.backend](s, torch.device(device), precision)

