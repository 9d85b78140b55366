"""The paper's published MaskDistill numbers, to set this run's results beside them.

Values in % from the paper's Tables 2, 6 and S2 (see the reference facts).
"""

from __future__ import annotations

from maskdistill.datasets import VOC_CLASSES

# The names of PASCAL VOC's label ids 0..20: background, then the 20 classes (the order of the
# paper's per-class table).
VOC_CLASSES_WITH_BACKGROUND: tuple[str, ...] = ("background", *VOC_CLASSES)

# Per-class IoU on VOC 2012 val, in VOC_CLASSES_WITH_BACKGROUND order.
PAPER_VOC_PER_CLASS: dict[str, tuple[float, ...]] = {
    "clustering": (84.4, 74.7, 27.9, 70.9, 47.5, 0.0, 72.8, 33.2, 72.4, 0.0, 70.0, 29.6, 38.1, 67.5,
                   58.1, 28.1, 9.2, 65.8, 20.4, 65.5, 27.7),
    "clustering+crf": (85.4, 80.3, 28.8, 74.7, 50.4, 0.0, 72.5, 52.1, 75.7, 0.0, 76.5, 28.6, 38.7,
                       71.3, 63.8, 32.0, 11.2, 67.0, 20.5, 67.7, 28.7),
    "linear": (88.1, 80.5, 30.9, 76.7, 58.2, 52.2, 75.7, 70.1, 82.7, 12.9, 73.3, 35.4, 78.8, 72.2,
               62.1, 52.4, 27.9, 73.0, 19.7, 70.5, 39.0),
    "linear+crf": (89.8, 83.1, 34.0, 85.9, 63.3, 45.0, 79.1, 70.1, 86.3, 16.9, 81.5, 38.1, 84.0, 74.9,
                   69.7, 63.0, 31.3, 78.3, 23.3, 74.4, 46.1),
}

# (label, paper value, where this run's value comes from: stage names or extras paths, first found)
PAPER_REFERENCE: dict[str, list[tuple[str, float, tuple[str, ...]]]] = {
    "voc": [
        ("clustering mIoU: initial ViT masks + K-means", 39.0, ("initial_masks",)),
        ("clustering mIoU: Mask R-CNN masks", 42.0, ("maskrcnn",)),
        ("clustering mIoU: segmentation model", 45.8, ("segmentation",)),
        ("clustering mIoU: + CRF", 48.9, ("segmentation_crf+crf", "segmentation_crf",
                                         "segmentation+crf")),
        ("linear probe mIoU", 58.7, ("linear_probe.miou",)),
        ("linear probe mIoU + CRF", 62.8, ("linear_probe.miou_crf",)),
        ("mask AP50, single object", 35.5, ("mask_ap.single.AP50",)),
        ("mask AP50, multi object", 26.0, ("mask_ap.multi.AP50",)),
    ],
    "coco20k": [
        ("mask AP50, single object", 15.3, ("mask_ap.single.AP50",)),
        ("mask AP50, multi object", 8.0, ("mask_ap.multi.AP50",)),
    ],
}

# The paper's name of each dataset with reference numbers.
PAPER_DATASET_NAMES: dict[str, str] = {"voc": "PASCAL VOC 2012 val", "coco20k": "COCO20k"}
