"""Convert YOLO segmentation labels (normalised polygons, one instance a line) to COCO instances."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from pycocotools import mask as mask_utils

from maskdistill.datasets import list_image_folder
from maskdistill.images import ImageReadError
from maskdistill.storage import write_json

log = logging.getLogger("maskdistill")

COCO80_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

_EXIF_ORIENTATION = 0x0112
_COORD_SLACK = 0.05  # normalised coordinates may overshoot [0, 1] this much; they are clipped


def yolo_to_coco(images_dir: Path, labels_dir: Path, class_names: Sequence[str]) -> dict[str, Any]:
    """COCO instances dict for every image under ``images_dir`` with YOLO polygons from
    ``labels_dir/{key}.txt`` (images without a label file get no annotations)."""
    names = [str(n) for n in class_names]
    if not names:
        raise ValueError("yolo_to_coco needs at least one class name")
    labels_root = Path(labels_dir)
    if not labels_root.is_dir():
        raise FileNotFoundError(f"label folder not found: {labels_root}")
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, record in enumerate(list_image_folder(images_dir), start=1):
        height, width = image_size(record.path)
        file_name = record.path.relative_to(Path(images_dir)).as_posix()
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        label_path = labels_root / f"{record.key}.txt"
        if not label_path.is_file():
            continue
        for category_id, polygon in read_yolo_labels(label_path, len(names), width, height):
            annotations.append(
                _annotation(len(annotations) + 1, image_id, category_id, polygon, height, width)
            )
    orphans = orphan_label_files(images_dir, labels_root)
    if orphans:
        log.warning("%d label file(s) under %s have no image and were ignored: %s", len(orphans),
                    labels_root, ", ".join(orphans[:10]) + (" ..." if len(orphans) > 10 else ""))
    categories = [{"id": i + 1, "name": n, "supercategory": "object"} for i, n in enumerate(names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def orphan_label_files(images_dir: Path, labels_dir: Path) -> list[str]:
    """Label files (relative paths) under ``labels_dir`` whose image is missing."""
    keys = {r.key for r in list_image_folder(images_dir)}
    base = Path(labels_dir)
    return sorted(p.relative_to(base).as_posix() for p in base.rglob("*.txt")
                  if p.relative_to(base).as_posix()[: -len(".txt")] not in keys)


def write_coco(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """Write a COCO instances dict as JSON (atomic)."""
    write_json(path, data)


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(height, width) from the file header, as read_rgb returns it (EXIF orientation applied)."""
    try:
        with Image.open(path) as im:
            width, height = im.size
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"{path}: cannot read image header ({err})") from err
    if orientation in (5, 6, 7, 8):  # transposed or rotated by 90 degrees
        width, height = height, width
    return height, width


def read_yolo_labels(
    path: str | os.PathLike[str], num_classes: int, width: int, height: int
) -> list[tuple[int, list[float]]]:
    """(category id 1..num_classes, absolute polygon [x1, y1, ...]) for each line of a label file."""
    out = []
    text = Path(path).read_text()
    for lineno, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        where = f"{path}, line {lineno}"
        try:
            values = [float(t) for t in tokens]
        except ValueError as err:
            raise ValueError(f"{where}: non-numeric value ({err})") from None
        cls, coords = values[0], values[1:]
        if not cls.is_integer() or not 0 <= cls < num_classes:
            raise ValueError(f"{where}: class {tokens[0]} outside 0..{num_classes - 1}")
        if len(coords) % 2:
            raise ValueError(f"{where}: odd number of polygon coordinates ({len(coords)})")
        if len(coords) < 6:
            raise ValueError(f"{where}: a polygon needs at least 3 vertices, got {len(coords) // 2}")
        if any(not math.isfinite(c) or not -_COORD_SLACK <= c <= 1 + _COORD_SLACK for c in coords):
            raise ValueError(f"{where}: polygon coordinates must be normalised to [0, 1]")
        polygon = []
        for i in range(0, len(coords), 2):
            polygon.append(min(max(coords[i], 0.0), 1.0) * width)
            polygon.append(min(max(coords[i + 1], 0.0), 1.0) * height)
        out.append((int(cls) + 1, polygon))
    return out


def _annotation(
    ann_id: int, image_id: int, category_id: int, polygon: list[float], height: int, width: int
) -> dict[str, Any]:
    """COCO annotation with a polygon segmentation; area and bbox from the rasterised mask."""
    polygon = [round(v, 2) for v in polygon]
    rle = mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))
    area = int(mask_utils.area(rle))
    if area > 0:
        bbox = [float(v) for v in mask_utils.toBbox(rle)]
    else:  # degenerate sliver: fall back to the polygon's extent
        xs, ys = polygon[0::2], polygon[1::2]
        bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
        log.warning("image %d: annotation %d rasterises to an empty mask", image_id, ann_id)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": [polygon],
        "area": area,
        "bbox": bbox,
        "iscrowd": 0,
    }
