"""ResNet-C4 Mask R-CNN in torchvision, laid out as detectron2's ``Base-RCNN-C4`` builds it.

- trunk: the ResNet's stem and res2-res4 (torchvision ``layer1``-``layer3``), one stride-16 map;
- RPN on that map: one level, anchors of sizes 32-512 and aspect ratios 0.5, 1, 2 (15 per
  position), 12000/6000 proposals kept before NMS and 2000/1000 after (train/test);
- box head: ROIAlign 14x14 (``aligned=True``, adaptive sampling, as ROIAlignV2) on the stride-16
  map, then res5 (``layer4``, stride 2 in its first block: 7x7), average pooled, fc class/box;
- mask head: the res5 features of the same ROIs (in training the positive proposals' features of
  the box branch, not recomputed; at test res5 of the detected boxes), ConvTranspose 2x2 to 14x14,
  ReLU, 1x1 conv per class: 14x14 mask logits.

Also the batch norm modes of the detector's ResNet (frozen / fine-tuned).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.models.detection.roi_heads import (
    RoIHeads,
    fastrcnn_loss,
    maskrcnn_inference,
    maskrcnn_loss,
)
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import RoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

C4_STRIDE = 16
POOLER_SIZE = 14
ANCHOR_SIZES = (32, 64, 128, 256, 512)
ASPECT_RATIOS = (0.5, 1.0, 2.0)
MASK_HEAD_DIM = 256  # detectron2's ROI_MASK_HEAD.CONV_DIM: channels after the deconvolution
# detectron2's RPN defaults (Base-RCNN-C4 keeps them): top-k before and after NMS
RPN_PRE_NMS = {"training": 12000, "testing": 6000}
RPN_POST_NMS = {"training": 2000, "testing": 1000}


class C4Pooler(nn.Module):
    """ROIAlign of boxes (image coordinates) on the stride-16 feature map ``features["0"]``."""

    def __init__(self, output_size: int = POOLER_SIZE, stride: int = C4_STRIDE):
        super().__init__()
        self.align = RoIAlign(output_size, spatial_scale=1.0 / stride, sampling_ratio=0, aligned=True)

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor],
                image_shapes: list[tuple[int, int]]) -> Tensor:
        """(sum of boxes, C, 14, 14) features, boxes of all images in order."""
        return self.align(features["0"], [b.to(features["0"].dtype) for b in boxes])


class C4RoIHeads(RoIHeads):
    """torchvision's RoIHeads with detectron2's ``Res5ROIHeads`` data flow: ``box_head`` is res5 and
    its output feeds both the box predictor (after average pooling) and, for the positive
    proposals, the mask predictor; ``mask_head`` is the identity."""

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor],
                image_shapes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None,
                ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("C4RoIHeads: targets are needed in training")
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(
                proposals, targets)
        res5 = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(res5.mean(dim=(2, 3)))
        if self.training:
            loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels,
                                                          regression_targets)
            positive = [torch.where(lab > 0)[0] for lab in labels]
            offsets = torch.tensor([0] + [len(p) for p in proposals[:-1]]).cumsum(0).tolist()
            rows = torch.cat([p + off for p, off in zip(positive, offsets, strict=True)])
            mask_logits = self.mask_predictor(self.mask_head(res5[rows]))
            loss_mask = maskrcnn_loss(
                mask_logits, [p[i] for p, i in zip(proposals, positive, strict=True)],
                [t["masks"] for t in targets], [t["labels"] for t in targets],
                [m[i] for m, i in zip(matched_idxs, positive, strict=True)])
            return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg,
                        "loss_mask": loss_mask}
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals,
                                                            image_shapes)
        mask_features = self.box_head(self.box_roi_pool(features, boxes, image_shapes))
        masks = maskrcnn_inference(self.mask_predictor(self.mask_head(mask_features)), labels)
        return [{"boxes": b, "labels": lab, "scores": s, "masks": m}
                for b, lab, s, m in zip(boxes, labels, scores, masks, strict=True)], {}


def c4_trunk(resnet: nn.Module) -> nn.Sequential:
    """The stem and res2-res4 of a torchvision ResNet (shared modules), output stride 16; its
    ``out_channels`` is res4's width."""
    trunk = nn.Sequential(OrderedDict((name, getattr(resnet, name)) for name in
                                      ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")))
    trunk.out_channels = resnet.inplanes // 2  # inplanes: res5's width after construction
    return trunk


def build_c4_model(resnet: nn.Module, num_classes: int, *, min_size: int, max_size: int,
                   image_mean: list[float], image_std: list[float], score_thresh: float,
                   detections_per_img: int, rpn_batch_size_per_image: int,
                   roi_batch_size_per_image: int) -> GeneralizedRCNN:
    """Mask R-CNN R-C4 on ``resnet`` (its ``layer4`` becomes the ROI head; ``num_classes`` includes
    background)."""
    trunk = c4_trunk(resnet)
    res4, res5 = trunk.out_channels, resnet.inplanes
    anchors = AnchorGenerator((ANCHOR_SIZES,), (ASPECT_RATIOS,))
    rpn = RegionProposalNetwork(
        anchors, RPNHead(res4, anchors.num_anchors_per_location()[0]), fg_iou_thresh=0.7,
        bg_iou_thresh=0.3, batch_size_per_image=rpn_batch_size_per_image, positive_fraction=0.5,
        pre_nms_top_n=RPN_PRE_NMS, post_nms_top_n=RPN_POST_NMS, nms_thresh=0.7)
    pooler = C4Pooler()
    heads = C4RoIHeads(
        pooler, resnet.layer4, FastRCNNPredictor(res5, num_classes), fg_iou_thresh=0.5,
        bg_iou_thresh=0.5, batch_size_per_image=roi_batch_size_per_image, positive_fraction=0.25,
        bbox_reg_weights=None, score_thresh=score_thresh, nms_thresh=0.5,
        detections_per_img=detections_per_img, mask_roi_pool=pooler, mask_head=nn.Identity(),
        mask_predictor=MaskRCNNPredictor(res5, MASK_HEAD_DIM, num_classes))
    transform = GeneralizedRCNNTransform(min_size, max_size, image_mean, image_std)
    return GeneralizedRCNN(trunk, rpn, heads, transform)


# ---------------------------------------------------------------- batch norm


def frozen_batchnorm(bn: nn.BatchNorm2d | FrozenBatchNorm2d) -> FrozenBatchNorm2d:
    """``bn``'s affine and running statistics as a FrozenBatchNorm2d."""
    if isinstance(bn, FrozenBatchNorm2d):
        return bn
    out = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
    with torch.no_grad():
        if bn.affine:
            out.weight.copy_(bn.weight)
            out.bias.copy_(bn.bias)
        out.running_mean.copy_(bn.running_mean)
        out.running_var.copy_(bn.running_var)
    return out


def trainable_batchnorm(bn: FrozenBatchNorm2d) -> nn.BatchNorm2d:
    """A FrozenBatchNorm2d's affine and statistics as an ordinary (trainable) BatchNorm2d."""
    out = nn.BatchNorm2d(bn.weight.numel(), eps=bn.eps)
    with torch.no_grad():
        out.weight.copy_(bn.weight)
        out.bias.copy_(bn.bias)
        out.running_mean.copy_(bn.running_mean)
        out.running_var.copy_(bn.running_var)
    return out


def convert_batchnorm(module: nn.Module, train: bool) -> nn.Module:
    """Every batch norm under ``module`` as trainable BatchNorm2d (``train``) or FrozenBatchNorm2d,
    keeping its values; returns ``module`` (or its replacement when it is itself a norm)."""
    if train and isinstance(module, FrozenBatchNorm2d):
        return trainable_batchnorm(module)
    if not train and isinstance(module, nn.BatchNorm2d):
        return frozen_batchnorm(module)
    for name, child in module.named_children():
        setattr(module, name, convert_batchnorm(child, train))
    return module
