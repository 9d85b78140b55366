"""detector.backend detectron2: the config built from our settings, weight renaming, and a tiny train
and predict run that writes the torchvision backend's predictions format.

detectron2 is not on PyPI; without it these tests skip, unless MASKDISTILL_REQUIRE_DETECTRON2=1 (set
by .ci/run when it installed detectron2 from ../shared/vendor/) turns the skip into a failure."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torchvision
from test_detector import SIZE, make_dataset

from maskdistill.datasets import list_image_folder
from maskdistill.detector import get_backend
from maskdistill.settings import section_settings
from maskdistill.storage import decode_segmentation, read_json

if importlib.util.find_spec("detectron2") is None:
    if os.environ.get("MASKDISTILL_REQUIRE_DETECTRON2") == "1":
        pytest.fail("MASKDISTILL_REQUIRE_DETECTRON2=1 but detectron2 cannot be imported", pytrace=False)
    pytest.skip("detectron2 is not installed", allow_module_level=True)

from maskdistill.detectron2_backend import (  # noqa: E402
    Detectron2MaskRCNN,
    build_config,
    detectron2_backbone_state,
    instances_output,
)

# a ResNet-50 of 1/8 width (res5: 256 channels) and few test proposals keep the CPU run short
NARROW = ("MODEL.RESNETS.STEM_OUT_CHANNELS", 8, "MODEL.RESNETS.RES2_OUT_CHANNELS", 32,
          "MODEL.RESNETS.WIDTH_PER_GROUP", 8, "MODEL.RPN.POST_NMS_TOPK_TEST", 50,
          "MODEL.RPN.PRE_NMS_TOPK_TEST", 100)


def d2_settings(**over):
    cfg = {"backend": "detectron2", "architecture": "c4", "backbone": "resnet50", "batchnorm": "train",
           "trainable_layers": 3, "train_min_size": [480, 800], "test_min_size": 800, "max_size": 1333,
           "warmup_iters": 100, "detections_per_image": 100, "epochs": 12, "lr_drop_epochs": [8, 11],
           "batch_size": 4, "gpus": 2}
    return section_settings("detector", cfg | over)


def test_config_from_settings_has_the_papers_values():
    cfg = build_config(d2_settings(), num_classes=20, steps_per_epoch=10, train_dataset="pseudo")
    m = cfg.MODEL
    assert m.META_ARCHITECTURE == "GeneralizedRCNN" and m.ROI_HEADS.NAME == "Res5ROIHeads"
    assert m.MASK_ON and m.ROI_HEADS.NUM_CLASSES == 20
    assert m.RPN.IN_FEATURES == ["res4"] and m.ROI_HEADS.IN_FEATURES == ["res4"]
    assert m.ROI_BOX_HEAD.POOLER_RESOLUTION == 14
    assert m.RESNETS.NORM == "SyncBN" and m.BACKBONE.FREEZE_AT == 2 and m.RESNETS.DEPTH == 50
    assert not m.RESNETS.STRIDE_IN_1X1 and cfg.INPUT.FORMAT == "RGB"
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (480, 800) and cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "range"
    assert cfg.INPUT.MIN_SIZE_TEST == 800 and cfg.INPUT.MAX_SIZE_TEST == 1333
    assert cfg.SOLVER.WARMUP_ITERS == 100 and cfg.TEST.DETECTIONS_PER_IMAGE == 100
    assert cfg.SOLVER.MAX_ITER == 120 and tuple(cfg.SOLVER.STEPS) == (80, 110)
    assert cfg.SOLVER.IMS_PER_BATCH == 4 and cfg.DATASETS.TRAIN == ("pseudo",)
    # one GPU: plain BN; frozen BN on request; FPN from its own base config
    assert build_config(d2_settings(gpus=1), 20).MODEL.RESNETS.NORM == "BN"
    assert build_config(d2_settings(batchnorm="frozen"), 20).MODEL.RESNETS.NORM == "FrozenBN"
    fpn = build_config(d2_settings(architecture="fpn", fpn_channels=64), 20).MODEL
    assert fpn.ROI_HEADS.NAME == "StandardROIHeads" and fpn.FPN.OUT_CHANNELS == 64


def test_settings_detectron2_cannot_build_are_named():
    with pytest.raises(ValueError, match="detector.backbone"):
        build_config(d2_settings(backbone="resnet18"), 2)
    with pytest.raises(ValueError, match="precision"):
        build_config(d2_settings(), 2, precision="bf16")


def test_torchvision_weights_fill_detectron2_resnet(tmp_path):
    """Every weight of a torchvision ResNet-50 lands on a detectron2 R50-C4 parameter of its shape
    (res5 in the ROI heads), every backbone and res5 tensor of the model gets one, and MoCo's file
    reaches the model through the weights file detectron2's checkpointer loads."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    tv = {k: v + torch.rand_like(v) if "running_var" in k else v
          for k, v in torchvision.models.resnet50(weights=None).state_dict().items()}
    model = build_model(build_config(d2_settings(batchnorm="frozen", gpus=1), 2))
    target = model.state_dict()
    renamed = detectron2_backbone_state(tv, "c4")
    assert renamed["roi_heads.res5.2.conv3.norm.running_var"] is tv["layer4.2.bn3.running_var"]
    assert renamed["backbone.res2.0.shortcut.weight"] is tv["layer1.0.downsample.0.weight"]
    assert renamed["backbone.stem.conv1.norm.weight"] is tv["bn1.weight"]
    for key, value in renamed.items():
        assert target[key].shape == value.shape, key
    resnet_keys = {k for k in target if k.startswith(("backbone.", "roi_heads.res5."))}
    assert resnet_keys == set(renamed)
    moco = tmp_path / "moco.pth"
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in tv.items()}}, moco)
    backend = Detectron2MaskRCNN(d2_settings(pretrained_backbone=str(moco)), "cpu")
    DetectionCheckpointer(model).load(str(backend._init_weights(tmp_path)))
    assert torch.equal(model.roi_heads.res5[0].conv2.weight, tv["layer4.0.conv2.weight"])
    assert torch.equal(model.backbone.res3[1].conv1.norm.running_var, tv["layer2.1.bn1.running_var"])


def test_instances_become_our_output_dict():
    from detectron2.structures import Boxes, Instances

    inst = Instances((5, 6))
    inst.pred_boxes = Boxes(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    inst.scores = torch.tensor([0.75])
    inst.pred_classes = torch.tensor([1])  # contiguous index 1 -> our category id 7
    inst.pred_masks = torch.ones(1, 5, 6, dtype=torch.bool)
    out = instances_output(inst, torch.tensor([3, 7]))
    assert out["labels"].tolist() == [7] and out["masks"].shape == (1, 1, 5, 6)
    assert out["boxes"].tolist() == [[1.0, 2.0, 3.0, 4.0]] and out["scores"].tolist() == [0.75]


def test_tiny_train_and_predict_write_our_format(tmp_path):
    """Two iterations of a narrow R50-C4 on 64 px images: the model file loads, and predictions carry
    the torchvision backend's keys with masks at the original image size."""
    train_json = make_dataset(tmp_path, n=2)
    s = d2_settings(train_min_size=[48, 64], test_min_size=64, max_size=96, epochs=2, batch_size=2,
                    lr_drop_epochs=[100], warmup_iters=1, num_workers=0, gpus=1, score_threshold=0.0,
                    detections_per_image=7, rpn_batch_size_per_image=32, roi_batch_size_per_image=32)
    backend = Detectron2MaskRCNN(s, "cpu", overrides=NARROW)
    assert isinstance(get_backend(s, "cpu"), Detectron2MaskRCNN)
    backend.train(train_json, tmp_path / "images", tmp_path / "ckpt", tmp_path / "model.pt")
    saved = torch.load(tmp_path / "model.pt", weights_only=False)
    assert saved["steps"] == 2 and [c["id"] for c in saved["categories"]] == [1, 2]
    assert saved["cfg"]["backend"] == "detectron2"
    assert saved["state_dict"]["roi_heads.res5.0.conv1.weight"].shape == (64, 128, 1, 1)
    records = list_image_folder(tmp_path / "images")[:2]
    backend.predict(tmp_path / "model.pt", records, tmp_path / "pred.json")
    data = read_json(tmp_path / "pred.json")
    assert set(data) == {"images", "annotations", "categories"}
    assert [im["key"] for im in data["images"]] == [r.key for r in records]
    assert all(set(im) == {"id", "file_name", "height", "width", "key"} for im in data["images"])
    assert all(im["height"] == SIZE and im["width"] == SIZE for im in data["images"])
    anns = data["annotations"]
    for im in data["images"]:
        assert sum(a["image_id"] == im["id"] for a in anns) <= 7
    for a in anns:
        assert set(a) == {"id", "image_id", "category_id", "score", "bbox", "segmentation", "area"}
        assert a["category_id"] in (1, 2)
        mask = decode_segmentation(a["segmentation"], SIZE, SIZE)
        assert a["segmentation"]["size"] == [SIZE, SIZE] and a["area"] == int(mask.sum())
    with pytest.raises(ValueError, match="'detectron2' backend"):
        get_backend(section_settings("detector", {}), "cpu").predict(tmp_path / "model.pt", records,
                                                                     tmp_path / "x.json")
