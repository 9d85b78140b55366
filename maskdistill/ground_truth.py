"""Ground-truth semantic label maps: pasted from a COCO instances file or read from a label folder.

Label ids: 0 background, 1..C the categories (COCO: in sorted category-id order), 255 ignore
(crowd regions, VOC's void border).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from maskdistill.paper import VOC_CLASSES_WITH_BACKGROUND
from maskdistill.storage import IGNORE_LABEL, decode_segmentation, key_of_file, read_json, read_label_png

BACKGROUND_NAME = "background"
IMAGE_FIELDS = ("id", "file_name", "height", "width")


# ---------------------------------------------------------------- COCO instances -> semantic maps


def category_labels(coco: dict[str, Any]) -> tuple[dict[int, int], list[str]]:
    """COCO category id -> contiguous label 1..C (sorted ids), and names with background first."""
    cats = sorted(coco.get("categories", []), key=lambda c: int(c["id"]))
    if len(cats) >= IGNORE_LABEL:
        raise ValueError(f"{len(cats)} categories do not fit in a uint8 label map")
    to_label = {int(c["id"]): i + 1 for i, c in enumerate(cats)}
    names = [BACKGROUND_NAME]
    for c in cats:
        name = str(c.get("name", c["id"]))
        names.append(name if name not in names else f"{name}_{c['id']}")  # keep names unique
    return to_label, names


def annotations_by_image(coco: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    """Image id -> its annotations (in file order)."""
    index: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for ann in coco.get("annotations", []):
        index[int(ann["image_id"])].append(ann)
    return index


def paste_semantic(
    anns: list[dict[str, Any]], to_label: dict[int, int], height: int, width: int, name: str
) -> np.ndarray:
    """(H, W) uint8 label map of one image's annotations ``anns``; ``name`` names it in errors.

    Instances are pasted largest first (smaller ones end on top); crowd regions become ignore.
    """
    labels = np.zeros((height, width), dtype=np.uint8)
    decoded = []
    for ann in anns:
        cat = int(ann["category_id"])
        if cat not in to_label:
            raise ValueError(f"{name}: annotation {ann.get('id')} has unknown category_id {cat}")
        mask = decode_segmentation(ann["segmentation"], height, width)
        if mask.shape != (height, width):
            raise ValueError(f"{name}: annotation {ann.get('id')} mask is {mask.shape[0]}x"
                             f"{mask.shape[1]}, image is {height}x{width}")
        value = IGNORE_LABEL if ann.get("iscrowd", 0) else to_label[cat]
        decoded.append((int(mask.sum()), int(ann.get("id", 0)), value, mask))
    decoded.sort(key=lambda t: (-t[0], t[1]))
    for _, _, value, mask in decoded:
        labels[mask] = value
    return labels


def semantic_from_coco(coco: dict[str, Any], image_entry: dict[str, Any]) -> np.ndarray:
    """GT semantic label map (H, W) uint8 of one COCO image: 0 background, 1..C, 255 crowd."""
    to_label, _ = category_labels(coco)
    image_id = int(image_entry["id"])
    anns = [a for a in coco.get("annotations", []) if int(a["image_id"]) == image_id]
    h, w = int(image_entry["height"]), int(image_entry["width"])
    return paste_semantic(anns, to_label, h, w, str(image_entry.get("file_name", image_id)))


def check_image_entries(coco: dict[str, Any], source: Path | str) -> list[dict[str, Any]]:
    """The ``images`` of a COCO file, each checked for id, file_name, height and width."""
    images = coco.get("images")
    if not images:
        raise ValueError(f"{source}: no images listed")
    for im in images:
        for field in IMAGE_FIELDS:
            if field not in im:
                raise ValueError(f"{source}: image entry {im} lacks '{field}'")
    return list(images)


# ---------------------------------------------------------------- ground-truth sources


@dataclass(frozen=True)
class GroundTruth:
    """Ground-truth label maps of a split: keys, class names (index = label id), a loader.

    ``load(key)`` returns the (H, W) uint8 label map (0 background, 1..C-1 classes, 255 ignore);
    ``image_paths`` maps keys to their image files (for the figure).
    """

    keys: tuple[str, ...]
    class_names: tuple[str, ...]
    load: Callable[[str], np.ndarray]
    image_paths: Mapping[str, Path]
    source: str


def coco_ground_truth(gt_coco_path: Path, images_root: Path) -> GroundTruth:
    """Semantic ground truth pasted from a COCO instances file (categories in sorted-id order)."""
    gt_coco_path = Path(gt_coco_path)
    coco = read_json(gt_coco_path)
    to_label, names = category_labels(coco)
    index = annotations_by_image(coco)
    entries = sorted(check_image_entries(coco, gt_coco_path), key=lambda im: key_of_file(im["file_name"]))
    images = {key_of_file(im["file_name"]): im for im in entries}

    def load(key: str) -> np.ndarray:
        im = images[key]
        return paste_semantic(index.get(int(im["id"]), []), to_label, int(im["height"]),
                              int(im["width"]), key)

    paths = {k: Path(images_root) / im["file_name"] for k, im in images.items()}
    return GroundTruth(tuple(images), tuple(names), load, paths, str(gt_coco_path))


def folder_ground_truth(gt_dir: Path, class_names: Sequence[str] = VOC_CLASSES_WITH_BACKGROUND,
                        image_paths: Mapping[str, Path] | None = None) -> GroundTruth:
    """Semantic ground truth from ``gt_dir/<key>.png`` label maps (searched recursively).

    Label ids index ``class_names`` (default: the 21 VOC labels); 255 is ignored. With
    ``image_paths`` (key -> image file) the split's keys are scored: each needs ``<key>.png``, and
    other maps in the folder (VOC's SegmentationClass also holds train) are ignored.
    """
    gt_dir = Path(gt_dir)
    if not gt_dir.is_dir():
        raise FileNotFoundError(f"ground-truth label folder not found: {gt_dir}")
    if len(class_names) < 2 or len(class_names) >= IGNORE_LABEL:
        raise ValueError(f"ground truth needs 2..{IGNORE_LABEL - 1} class names, got {len(class_names)}")
    paths = dict(image_paths or {})
    if image_paths is not None:
        keys = sorted(paths)
        missing = [k for k in keys if not (gt_dir / f"{k}.png").is_file()]
        if missing:
            raise FileNotFoundError(f"{gt_dir}: {len(missing)} images of the split have no label map, "
                                    f"e.g. '{missing[0]}.png'")
    else:
        keys = sorted(p.relative_to(gt_dir).as_posix()[: -len(".png")] for p in gt_dir.rglob("*.png")
                      if not p.name.startswith("."))
    if not keys:
        raise ValueError(f"{gt_dir}: no label PNGs")

    def load(key: str) -> np.ndarray:
        return read_label_png(gt_dir / f"{key}.png")

    return GroundTruth(tuple(keys), tuple(str(n) for n in class_names), load, paths, str(gt_dir))


def as_ground_truth(gt: Path | GroundTruth, images_root: Path) -> GroundTruth:
    """``gt`` itself, or the ground truth of the COCO instances file it names."""
    return gt if isinstance(gt, GroundTruth) else coco_ground_truth(Path(gt), Path(images_root))


def read_class_names(text: str) -> list[str]:
    """Class names from a COCO instances file (categories in id order), a text file (one per line)
    or a comma-separated list; background first."""
    path = Path(text)
    if path.suffix == ".json" and path.is_file():
        return category_labels(read_json(path))[1]
    names = path.read_text().splitlines() if path.is_file() else text.split(",")
    names = [n.strip() for n in names if n.strip()]
    if len(names) < 2:
        raise ValueError(f"class names {text!r}: need background plus at least one class")
    return names
