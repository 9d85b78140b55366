"""Stage 2 with detectron2 itself (``detector.backend: detectron2``): Mask R-CNN configured from our
settings, trained on our COCO pseudo-label file and writing predictions in our format.

detectron2 is not on PyPI and not a dependency of the package: it is imported only here, inside the
functions, and a missing install is a clear error (see :data:`INSTALL_HINT`).

Layout: ``architecture`` c4 is ``Base-RCNN-C4.yaml`` (paper), fpn is ``Base-RCNN-FPN.yaml``, with a
ResNet-50 in torchvision's layout (stride in the 3x3 conv, RGB input normalised with ImageNet's
mean and std), so that torchvision and MoCo weights load as they are (renamed to detectron2's keys).
The model file holds detectron2's state dict with our settings and categories, like the torchvision
backend's.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskdistill import distributed
from maskdistill.backbone import resnet_state_dict
from maskdistill.detector import WARMUP_FACTOR, CocoInstances, load_trained, prediction_annotations
from maskdistill.images import IMAGENET_MEAN, IMAGENET_STD, ImageRecord, read_rgb
from maskdistill.settings import DetectorSettings, as_config
from maskdistill.storage import write_json
from maskdistill.training import progress, save_model

log = logging.getLogger("maskdistill")

INSTALL_HINT = (
    "config key 'detector.backend' is 'detectron2', but detectron2 is not installed in this "
    "environment. It publishes no wheels: build it from its repository against the installed torch "
    "(with the CUDA toolkit that matches torch's CUDA version for GPU ops), e.g. "
    "`uv pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'`; "
    "see docs/detector.md")
BASE_CONFIGS = {"c4": "Base-RCNN-C4.yaml", "fpn": "Base-RCNN-FPN.yaml"}
INIT_WEIGHTS = "init_backbone.pth"


def require_detectron2() -> Any:
    """The detectron2 package, or an ImportError that says how to install it."""
    try:
        import detectron2
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return detectron2


def base_config_file(architecture: str) -> Path:
    """detectron2's base config of ``architecture`` from the installed package's model zoo folder
    (its ``model_zoo.get_config_file`` needs ``pkg_resources``, which recent setuptools lacks)."""
    d2 = require_detectron2()
    if architecture not in BASE_CONFIGS:
        raise ValueError(f"config key 'detector.architecture': unknown '{architecture}', "
                         f"choose from {sorted(BASE_CONFIGS)}")
    path = Path(d2.__file__).parent / "model_zoo" / "configs" / BASE_CONFIGS[architecture]
    if not path.is_file():
        raise FileNotFoundError(f"detectron2 is installed without its model zoo configs: {path}")
    return path


def norm_name(s: DetectorSettings) -> str:
    """detectron2's ``MODEL.RESNETS.NORM`` for ``detector.batchnorm`` (SyncBN across several GPUs)."""
    if s.batchnorm == "frozen" or (s.batchnorm == "auto" and s.pretrained_backbone):
        return "FrozenBN"
    return "SyncBN" if s.gpus > 1 else "BN"


def build_config(s: DetectorSettings, num_classes: int, *, device: str = "cpu",
                 steps_per_epoch: int = 1, output_dir: str = "", train_dataset: str | None = None,
                 precision: str = "fp32", overrides: Sequence[str] = ()) -> Any:
    """A detectron2 CfgNode from our settings; ``num_classes`` counts the foreground classes,
    ``steps_per_epoch`` turns our epochs into detectron2's iterations and ``overrides`` (detectron2's
    ``KEY VALUE ...`` list) is applied last."""
    from detectron2.config import get_cfg

    if s.backbone != "resnet50":
        raise ValueError(f"config key 'detector.backbone': the detectron2 backend builds resnet50 only, "
                         f"got '{s.backbone}'")
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"config key 'precision': the detectron2 backend trains in fp32 or fp16 (AMP), "
                         f"not '{precision}'")
    cfg = get_cfg()
    cfg.merge_from_file(str(base_config_file(s.architecture)))
    m = cfg.MODEL
    m.DEVICE = device
    m.MASK_ON = True
    m.WEIGHTS = ""
    m.PIXEL_MEAN = [255.0 * v for v in IMAGENET_MEAN]
    m.PIXEL_STD = [255.0 * v for v in IMAGENET_STD]
    m.RESNETS.DEPTH = 50
    m.RESNETS.STRIDE_IN_1X1 = False  # torchvision / MoCo layout: stride in the 3x3 conv
    m.RESNETS.NORM = norm_name(s)
    m.BACKBONE.FREEZE_AT = 5 - s.trainable_layers  # 2: stem and res2, as trainable_layers 3
    m.RPN.BATCH_SIZE_PER_IMAGE = s.rpn_batch_size_per_image
    m.ROI_HEADS.BATCH_SIZE_PER_IMAGE = s.roi_batch_size_per_image
    m.ROI_HEADS.NUM_CLASSES = num_classes
    m.ROI_HEADS.SCORE_THRESH_TEST = s.score_threshold
    if s.architecture == "fpn":
        m.FPN.OUT_CHANNELS = s.fpn_channels
        m.ROI_BOX_HEAD.FC_DIM = s.box_head_dim
        m.ROI_MASK_HEAD.NUM_CONV = s.mask_head_convs
        m.ROI_MASK_HEAD.CONV_DIM = s.fpn_channels
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MASK_FORMAT = "bitmask"  # our pseudo-labels are RLE
    cfg.INPUT.MIN_SIZE_TRAIN = tuple(s.train_min_size)
    cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING = "range"  # one size in [min, max] per image
    cfg.INPUT.MAX_SIZE_TRAIN = s.max_size
    cfg.INPUT.MIN_SIZE_TEST = s.test_min_size
    cfg.INPUT.MAX_SIZE_TEST = s.max_size
    cfg.DATASETS.TRAIN = (train_dataset,) if train_dataset else ()
    cfg.DATASETS.TEST = ()
    cfg.DATALOADER.NUM_WORKERS = s.num_workers
    sol = cfg.SOLVER
    sol.IMS_PER_BATCH = s.batch_size
    sol.BASE_LR = s.lr
    sol.MOMENTUM = s.momentum
    sol.WEIGHT_DECAY = s.weight_decay
    sol.MAX_ITER = s.epochs * steps_per_epoch
    sol.STEPS = tuple(d * steps_per_epoch for d in s.lr_drop_epochs)
    sol.WARMUP_ITERS = s.warmup_iters
    sol.WARMUP_FACTOR = WARMUP_FACTOR
    sol.WARMUP_METHOD = "linear"
    sol.CHECKPOINT_PERIOD = s.checkpoint_every_epochs * steps_per_epoch
    sol.AMP.ENABLED = precision == "fp16"
    cfg.TEST.DETECTIONS_PER_IMAGE = s.detections_per_image
    cfg.TEST.EVAL_PERIOD = 0
    cfg.SEED = s.seed
    cfg.OUTPUT_DIR = output_dir
    cfg.merge_from_list(list(overrides))
    return cfg


# ---------------------------------------------------------------- weights


def _detectron2_resnet_key(key: str) -> str | None:
    """A torchvision ResNet key as detectron2's ResNet names it (``None`` for ``fc``)."""
    if key.startswith("fc."):
        return None
    stem = re.fullmatch(r"(conv1|bn1)\.(\w+)", key)
    if stem:
        return f"stem.conv1.{'norm.' if stem[1] == 'bn1' else ''}{stem[2]}"
    conv = re.fullmatch(r"layer(\d)\.(\d+)\.(conv|bn)(\d)\.(\w+)", key)
    if conv:
        stage, index, kind, number, leaf = conv.groups()
        return f"res{int(stage) + 1}.{index}.conv{number}.{'norm.' if kind == 'bn' else ''}{leaf}"
    shortcut = re.fullmatch(r"layer(\d)\.(\d+)\.downsample\.([01])\.(\w+)", key)
    if shortcut:
        stage, index, part, leaf = shortcut.groups()
        return f"res{int(stage) + 1}.{index}.shortcut.{'norm.' if part == '1' else ''}{leaf}"
    raise ValueError(f"not a torchvision ResNet key: {key}")


def detectron2_backbone_state(state: dict[str, torch.Tensor], architecture: str) -> dict[str, torch.Tensor]:
    """torchvision ResNet weights (or MoCo's, already renamed) under the keys of detectron2's model:
    C4 has res5 in the ROI heads, FPN has the whole ResNet as ``backbone.bottom_up``."""
    out = {}
    for key, value in state.items():
        name = _detectron2_resnet_key(key)
        if name is None or name.endswith("num_batches_tracked"):
            continue
        if architecture == "fpn":
            out[f"backbone.bottom_up.{name}"] = value
        elif name.startswith("res5."):
            out[f"roi_heads.{name}"] = value
        else:
            out[f"backbone.{name}"] = value
    return out


# ---------------------------------------------------------------- backend


def _dataset_name(train_json: Path, images_root: Path) -> str:
    """The name under which the pseudo-label file is registered in detectron2's catalogue."""
    digest = hashlib.sha1(f"{Path(train_json).resolve()}|{Path(images_root).resolve()}".encode()).hexdigest()
    return f"maskdistill_{digest[:12]}"


def register_dataset(train_json: Path, images_root: Path) -> str:
    """Register our COCO instances file with detectron2 (once per process); returns its name."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    name = _dataset_name(train_json, images_root)
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, str(train_json), str(images_root))
    return name


def _local_process_group() -> None:
    """Under torchrun, give detectron2 the per-machine process group its ``launch`` would create."""
    import torch.distributed as dist
    from detectron2.utils import comm

    if dist.is_available() and dist.is_initialized() and comm._LOCAL_PROCESS_GROUP is None:
        comm.create_local_process_group(int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())))


class Detectron2MaskRCNN:
    """detectron2's Mask R-CNN behind our :class:`~maskdistill.detector.DetectorBackend` interface."""

    def __init__(self, s: DetectorSettings, device: torch.device | str, precision: str = "fp32",
                 overrides: Sequence[str] = ()):
        """``overrides``: detectron2 config options (``KEY VALUE ...``) applied over our settings in
        training and prediction (e.g. a narrower ResNet for tests)."""
        require_detectron2()
        self.s = s
        self.overrides = tuple(overrides)
        self.device = torch.device(device)
        self.precision = precision

    def train(self, train_json: Path, images_root: Path, checkpoint_dir: Path, out_model: Path) -> None:
        """Train with detectron2's trainer (resuming from ``checkpoint_dir``); write ``out_model``."""
        from detectron2.engine import DefaultTrainer, hooks
        from detectron2.utils.env import seed_all_rng

        s = self.s
        distributed.check_batch_size(s.batch_size, "detector.batch_size")
        dataset = CocoInstances(Path(train_json), Path(images_root))
        if len(dataset) == 0:
            raise ValueError(f"{train_json}: no image has an annotation to train on")
        steps_per_epoch = math.ceil(len(dataset) / s.batch_size)
        checkpoint_dir = Path(checkpoint_dir)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        cfg = build_config(s, len(dataset.categories), device=str(self.device),
                           steps_per_epoch=steps_per_epoch, output_dir=str(checkpoint_dir),
                           train_dataset=register_dataset(Path(train_json), Path(images_root)),
                           precision=self.precision, overrides=self.overrides)
        if s.pretrained_backbone:
            cfg.MODEL.WEIGHTS = str(self._init_weights(checkpoint_dir))
        _local_process_group()
        seed_all_rng(s.seed + distributed.world().rank)

        class Trainer(DefaultTrainer):
            def build_hooks(self) -> list[Any]:
                """detectron2's hooks without evaluation (later rules evaluate), keeping only the
                latest periodic checkpoint (enough to resume)."""
                kept = [h for h in super().build_hooks() if not isinstance(h, hooks.EvalHook)]
                for h in kept:
                    if isinstance(h, hooks.PeriodicCheckpointer):
                        h.max_to_keep = 1
                return kept

        log.info("detector (detectron2): %d training images, %d classes, %d iterations",
                 len(dataset), len(dataset.categories), cfg.SOLVER.MAX_ITER)
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=True)
        trainer.train()
        if distributed.world().is_main:
            model = getattr(trainer.model, "module", trainer.model)
            save_model(out_model, model.state_dict(), num_classes=len(dataset.categories) + 1,
                       cfg=as_config(s), categories=dataset.categories, steps=cfg.SOLVER.MAX_ITER)
            log.info("detector (detectron2): wrote %s after %d iterations", out_model, cfg.SOLVER.MAX_ITER)

    def _init_weights(self, checkpoint_dir: Path) -> Path:
        """Our ResNet weights (torchvision or MoCo) renamed for detectron2, as a file it loads."""
        path = checkpoint_dir / INIT_WEIGHTS
        if distributed.world().is_main:
            state = detectron2_backbone_state(resnet_state_dict(self.s.pretrained_backbone),
                                              self.s.architecture)
            torch.save({"model": state}, path)
        distributed.barrier()
        return path

    def load(self, model_path: Path) -> tuple[torch.nn.Module, dict[str, Any], Any]:
        """The trained detectron2 model (eval mode, on the device), its file and config."""
        from detectron2.modeling import build_model as build_detectron2_model

        saved, arch = load_trained(model_path, self.s)
        cfg = build_config(arch, len(saved["categories"]), device=str(self.device), overrides=self.overrides)
        model = build_detectron2_model(cfg)
        model.load_state_dict(saved["state_dict"])
        return model.eval(), saved, cfg

    def predict(self, model_path: Path, records: list[ImageRecord], out_json: Path) -> None:
        """Write predictions for every record to ``out_json`` in the torchvision backend's format
        (:meth:`maskdistill.detector.TorchvisionMaskRCNN.predict`), masks at the image size."""
        from detectron2.data import transforms

        model, saved, cfg = self.load(model_path)
        resize = transforms.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        category_ids = torch.tensor([int(c["id"]) for c in saved["categories"]])
        images, anns = [], []
        batch = self.s.batch_size
        with torch.inference_mode():
            for start in progress(range(0, len(records), batch), math.ceil(len(records) / batch),
                                  "detector predictions", unit="batch"):
                chunk = list(enumerate(records[start:start + batch], start))
                inputs = [_model_input(np.asarray(read_rgb(rec.path)), resize) for _, rec in chunk]
                outputs = model(inputs)
                for (i, rec), inp, out in zip(chunk, inputs, outputs, strict=True):
                    image_id = rec.image_id if rec.image_id is not None else i
                    images.append({"id": image_id, "file_name": rec.key + rec.path.suffix,
                                   "height": inp["height"], "width": inp["width"], "key": rec.key})
                    anns.extend(prediction_annotations(instances_output(out["instances"], category_ids),
                                             image_id, start_id=len(anns) + 1))
        write_json(out_json, {"images": images, "annotations": anns, "categories": saved["categories"]})
        log.info("detector (detectron2): wrote %d predictions for %d images to %s", len(anns),
                 len(images), out_json)


def _model_input(rgb: np.ndarray, resize: Any) -> dict[str, Any]:
    """One image (H, W, 3 uint8 RGB) as detectron2's model input: resized float CHW, original size."""
    h, w = rgb.shape[:2]
    resized = resize.get_transform(rgb).apply_image(rgb)
    return {"image": torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)), dtype=torch.float32),
            "height": h, "width": w}


def instances_output(instances: Any, category_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """detectron2 Instances (boxes, contiguous classes, scores, masks at the image size) as the
    torchvision output dict :func:`maskdistill.detector.prediction_annotations` reads (our category ids)."""
    instances = instances.to("cpu")
    return {"boxes": instances.pred_boxes.tensor, "labels": category_ids[instances.pred_classes],
            "scores": instances.scores, "masks": instances.pred_masks[:, None].float()}
