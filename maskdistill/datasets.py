"""Benchmark dataset layouts: PASCAL VOC 2012 and COCO20k (listing, ground-truth instances files).

PASCAL VOC 2012 uses the standard ``VOCdevkit/VOC2012`` folder::

    JPEGImages/<name>.jpg
    SegmentationClass/<name>.png        palette PNG: 0 background, 1..20 classes, 255 void
    SegmentationObject/<name>.png       palette PNG: 0 background, 1..N instances, 255 void
    ImageSets/Segmentation/{train,val,trainval}.txt
    SegmentationClassAug/<name>.png     (SBD-augmented labels; only used to list train_aug)

VOC itself ships no ``train_aug`` list. It is read from the first list file that exists among
``ImageSets/Segmentation/train_aug.txt``, ``ImageSets/Segmentation/trainaug.txt`` and
``ImageSets/SegmentationAug/train_aug.txt`` (or from ``dataset.voc.train_list``); without one it is
every ``SegmentationClassAug/*.png`` name that is not in ``val.txt`` (12031 - 1449 = 10582 images).

COCO20k is the 19817-image subset of COCO train2014 named by ``coco_20k_filenames.txt`` (published
with LOST and TokenCut, one file name per line). Its images are read from the train2014 folder and
its ground truth is ``instances_train2014.json`` reduced to the listed images. As in the paper, the
unsupervised pipeline runs on these images and is evaluated on the same images.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from maskdistill.images import ImageRecord, file_problem
from maskdistill.storage import IGNORE_LABEL, encode_rle, mask_to_box, read_json, read_label_png, write_json

log = logging.getLogger("maskdistill")
PathLike = str | os.PathLike[str]

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
VOC_SPLITS = ("train", "val", "trainval", "train_aug")
VOC_TRAIN_AUG_LISTS = (
    "ImageSets/Segmentation/train_aug.txt",
    "ImageSets/Segmentation/trainaug.txt",
    "ImageSets/SegmentationAug/train_aug.txt",
)
GT_DIR = "gt"
SOURCES = ("voc", "coco20k")
_MAX_NAMED = 5  # missing files named in an error before "... and N more"


class DatasetLayoutError(FileNotFoundError):
    """A dataset folder, list file or listed file is missing; the message says where it is expected."""


# ---------------------------------------------------------------- shared helpers


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetLayoutError(f"{what} folder not found: expected {path}")
    return path


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DatasetLayoutError(f"{what} not found: expected {path}")
    return path


def _name_missing(paths: Sequence[Path], what: str) -> None:
    """Raise naming the first few of ``paths`` that do not exist (one stat per path)."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:_MAX_NAMED])
        more = f" and {len(missing) - _MAX_NAMED} more" if len(missing) > _MAX_NAMED else ""
        raise DatasetLayoutError(f"{len(missing)} {what} missing: {shown}{more}")


def read_name_list(path: PathLike, what: str = "image list") -> list[str]:
    """Names of a list file: the first field of each non-empty line, in file order, unique."""
    p = _require_file(Path(path), what)
    names = [line.split()[0] for line in p.read_text().splitlines() if line.strip()]
    dup = [n for n, c in Counter(names).items() if c > 1]
    if dup:
        raise ValueError(f"{p}: {len(dup)} names listed twice, e.g. {dup[:_MAX_NAMED]}")
    if not names:
        raise ValueError(f"{p}: the list is empty")
    return names


def _stem(name: str) -> str:
    return Path(name).name.rsplit(".", 1)[0]


# ---------------------------------------------------------------- PASCAL VOC 2012


def voc_image_ids(names: Sequence[str]) -> list[int]:
    """COCO image ids of VOC names: ``2007_000032`` -> 2007000032; otherwise the 1-based position."""
    ids = []
    for pos, name in enumerate(names, start=1):
        m = re.fullmatch(r"(\d{4})_(\d{6})", name)
        ids.append(int(m.group(1)) * 1_000_000 + int(m.group(2)) if m else pos)
    if len(set(ids)) != len(ids):  # mixed naming schemes could collide: fall back to positions
        ids = list(range(1, len(names) + 1))
    return ids


def voc_split_names(root: PathLike, split: str, list_file: str | None = None) -> list[str]:
    """Image names of a VOC 2012 segmentation split (see the module docstring for ``train_aug``)."""
    base = _require_dir(Path(root), "PASCAL VOC 2012 (VOCdevkit/VOC2012)")
    if list_file:
        return read_name_list(list_file, f"{split} list file (dataset.voc.train_list)")
    if split not in VOC_SPLITS:
        raise ValueError(f"unknown VOC split '{split}'; use one of {VOC_SPLITS}")
    sets = base / "ImageSets" / "Segmentation"
    if split != "train_aug":
        return read_name_list(sets / f"{split}.txt", f"VOC '{split}' list file")
    for rel in VOC_TRAIN_AUG_LISTS:
        if (base / rel).is_file():
            return read_name_list(base / rel, "VOC 'train_aug' list file")
    aug = base / "SegmentationClassAug"
    if not aug.is_dir():
        raise DatasetLayoutError(
            f"VOC 'train_aug' needs a list file ({', '.join(str(base / r) for r in VOC_TRAIN_AUG_LISTS)}) "
            f"or the SegmentationClassAug folder: expected {aug}")
    val = set(read_name_list(sets / "val.txt", "VOC 'val' list file"))
    names = sorted(p.stem for p in aug.glob("*.png") if p.stem not in val)
    if not names:
        raise DatasetLayoutError(f"no label PNGs outside val in {aug}")
    return names


def voc_records(root: PathLike, split: str, list_file: str | None = None,
                on_bad_image: str = "fail") -> list[ImageRecord]:
    """The JPEG images of a VOC split, sorted by key (the VOC name).

    Under ``on_bad_image: fail`` every listed file must exist; under ``skip`` a missing one (or a
    dangling link) is listed like any other and met by the stage that reads it, which skips it.
    """
    names = voc_split_names(root, split, list_file)
    jpegs = _require_dir(Path(root) / "JPEGImages", "VOC JPEGImages")
    paths = [jpegs / f"{n}.jpg" for n in names]
    if on_bad_image == "fail":
        _name_missing(paths, f"VOC '{split}' images listed but")
    records = [ImageRecord(key=n, path=p, image_id=i)
               for n, p, i in zip(names, paths, voc_image_ids(names), strict=True)]
    return sorted(records, key=lambda r: r.key)


def voc_categories() -> list[dict[str, Any]]:
    """COCO categories of VOC: ids 1..20 in VOC order."""
    return [{"id": i, "name": n, "supercategory": "voc"} for i, n in enumerate(VOC_CLASSES, start=1)]


def _voc_image_annotations(name: str, obj: np.ndarray, cls: np.ndarray, image_id: int,
                           first_ann_id: int) -> list[dict[str, Any]]:
    """One COCO annotation per instance index of SegmentationObject (class from SegmentationClass)."""
    anns = []
    for value in np.unique(obj):
        if value == 0 or value == IGNORE_LABEL:
            continue
        mask = obj == value
        classes = cls[mask]
        classes = classes[(classes != 0) & (classes != IGNORE_LABEL)]
        if classes.size == 0:
            raise ValueError(f"VOC '{name}': instance {int(value)} of SegmentationObject has no class "
                             "in SegmentationClass")
        label = int(np.bincount(classes).argmax())
        if label > len(VOC_CLASSES):
            raise ValueError(f"VOC '{name}': class {label} in SegmentationClass is outside 1..20")
        x0, y0, x1, y1 = mask_to_box(mask)
        anns.append({"id": first_ann_id + len(anns), "image_id": image_id, "category_id": label,
                     "segmentation": encode_rle(mask), "area": float(mask.sum()),
                     "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0})
    return anns


def voc_instances(root: PathLike, split: str = "val") -> dict[str, Any]:
    """COCO instances of a VOC split from SegmentationObject + SegmentationClass (255 = void, left out)."""
    base = Path(root)
    names = voc_split_names(base, split)
    obj_dir = _require_dir(base / "SegmentationObject", "VOC SegmentationObject")
    cls_dir = _require_dir(base / "SegmentationClass", "VOC SegmentationClass")
    jpegs = _require_dir(base / "JPEGImages", "VOC JPEGImages")
    _name_missing([obj_dir / f"{n}.png" for n in names], f"VOC '{split}' SegmentationObject PNGs")
    _name_missing([cls_dir / f"{n}.png" for n in names], f"VOC '{split}' SegmentationClass PNGs")
    images, annotations = [], []
    for name, image_id in sorted(zip(names, voc_image_ids(names), strict=True)):
        obj = read_label_png(obj_dir / f"{name}.png")
        cls = read_label_png(cls_dir / f"{name}.png")
        height, width = _voc_image_hw(jpegs / f"{name}.jpg", obj.shape)
        if obj.shape != cls.shape or obj.shape != (height, width):
            raise ValueError(f"VOC '{name}': sizes differ: image {height}x{width}, "
                             f"SegmentationObject {obj.shape[0]}x{obj.shape[1]}, "
                             f"SegmentationClass {cls.shape[0]}x{cls.shape[1]}")
        images.append({"id": image_id, "file_name": f"{name}.jpg", "height": height, "width": width})
        annotations += _voc_image_annotations(name, obj, cls, image_id, len(annotations) + 1)
    return {"info": {"description": f"PASCAL VOC 2012 {split} instances (SegmentationObject)"},
            "images": images, "annotations": annotations, "categories": voc_categories()}


def _voc_image_hw(jpeg: Path, label_hw: tuple[int, ...]) -> tuple[int, int]:
    """Height and width of a VOC image from its header; its label map's size when it cannot be read.

    The ground truth needs only the label PNGs: an image that is missing or a dangling link is
    met by mining, which fails or skips it per ``dataset.on_bad_image``.
    """
    problem = file_problem(jpeg)
    if problem is None:
        try:
            with Image.open(jpeg) as im:
                return im.size[1], im.size[0]
        except OSError as err:
            problem = f"cannot read the header ({err})"
    log.warning("%s: %s; its ground truth keeps its label map's size", jpeg, problem)
    return int(label_hw[0]), int(label_hw[1])


def write_voc_instances(root: PathLike, split: str, out: PathLike) -> dict[str, int]:
    """Write the COCO instances file of a VOC split (atomically); return counts."""
    data = voc_instances(root, split)
    write_json(out, data)
    return {"images": len(data["images"]), "annotations": len(data["annotations"])}


# ---------------------------------------------------------------- COCO20k


def coco_image_id(name: str) -> int | None:
    """COCO id from a file name such as ``COCO_train2014_000000000009.jpg`` (trailing digits)."""
    m = re.search(r"(\d+)$", _stem(name))
    return int(m.group(1)) if m else None


def coco20k_records(images: PathLike, filenames: PathLike, on_bad_image: str = "fail") -> list[ImageRecord]:
    """The listed images under the COCO train2014 folder, sorted by key (file name without extension).

    ``on_bad_image`` as in :func:`voc_records`: ``fail`` refuses a listed file that does not exist.
    """
    names = [Path(n).name for n in read_name_list(filenames, "COCO20k file list (dataset.coco20k.filenames)")]
    root = _require_dir(Path(images), "COCO train2014 image (dataset.coco20k.images)")
    paths = [root / n for n in names]
    if on_bad_image == "fail":
        _name_missing(paths, f"COCO20k images listed in {filenames} but")
    records = [ImageRecord(key=_stem(n), path=p, image_id=coco_image_id(n))
               for n, p in zip(names, paths, strict=True)]
    return sorted(records, key=lambda r: r.key)


def coco20k_instances(annotations: PathLike, filenames: PathLike) -> dict[str, Any]:
    """``instances_train2014.json`` reduced to the listed images (their annotations, all categories)."""
    names = [Path(n).name for n in read_name_list(filenames, "COCO20k file list (dataset.coco20k.filenames)")]
    data = read_json(_require_file(Path(annotations), "COCO instances file (dataset.coco20k.annotations)"))
    for field in ("images", "annotations", "categories"):
        if field not in data:
            raise ValueError(f"{annotations}: not a COCO instances file (no '{field}' list)")
    by_name = {Path(im["file_name"]).name: im for im in data["images"]}
    missing = [n for n in names if n not in by_name]
    if missing:
        more = f" and {len(missing) - _MAX_NAMED} more" if len(missing) > _MAX_NAMED else ""
        raise ValueError(f"{annotations}: {len(missing)} images listed in {filenames} are not in this "
                         f"instances file: {', '.join(missing[:_MAX_NAMED])}{more}")
    images = sorted((by_name[n] for n in names), key=lambda im: _stem(im["file_name"]))
    keep = {int(im["id"]) for im in images}
    out = {k: v for k, v in data.items() if k not in ("images", "annotations")}
    out["images"] = images
    out["annotations"] = [a for a in data["annotations"] if int(a["image_id"]) in keep]
    return out


def write_coco20k_instances(annotations: PathLike, filenames: PathLike,
                            out: PathLike) -> dict[str, int]:
    """Write the COCO20k instances file (atomically); return counts."""
    data = coco20k_instances(annotations, filenames)
    write_json(out, data)
    return {"images": len(data["images"]), "annotations": len(data["annotations"]),
            "categories": len(data["categories"])}


# ---------------------------------------------------------------- workflow splits


def evaluation_split(dataset_cfg: dict[str, Any]) -> str:
    """The split that is evaluated: COCO20k is evaluated on its own (training) images, as in the paper."""
    return "train" if dataset_cfg["source"] == "coco20k" else "val"


def voc_gt_path(voc_cfg: dict[str, Any], results_dir: str = "results") -> str:
    """Where the workflow writes the COCO instances of the evaluated VOC split."""
    return str(Path(results_dir) / GT_DIR / f"voc_{voc_cfg['val_split']}.json")


def coco20k_gt_path(results_dir: str = "results") -> str:
    """Where the workflow writes the COCO20k instances file."""
    return str(Path(results_dir) / GT_DIR / "coco20k.json")


def gt_instances_path(dataset_cfg: dict[str, Any], results_dir: str = "results") -> str | None:
    """The ground-truth COCO file the workflow writes for a benchmark source (None: it writes none)."""
    source = dataset_cfg["source"]
    if source == "voc":
        return voc_gt_path(dataset_cfg["voc"], results_dir)
    if source == "coco20k" and dataset_cfg["coco20k"].get("annotations"):
        return coco20k_gt_path(results_dir)
    return None


def semantic_gt_dir(dataset_cfg: dict[str, Any]) -> str | None:
    """Folder of semantic label PNGs used as ground truth (VOC: SegmentationClass, 255 ignored)."""
    if dataset_cfg["source"] == "voc":
        return str(Path(dataset_cfg["voc"]["root"]) / "SegmentationClass")
    return None


def dataset_splits(dataset_cfg: dict[str, Any], results_dir: str = "results") -> dict[str, dict]:
    """Split -> {images, annotations, layout} of a benchmark source; ``layout`` says how to list it."""
    source = dataset_cfg["source"]
    gt = gt_instances_path(dataset_cfg, results_dir)
    policy = dataset_cfg.get("on_bad_image", "fail")
    if source == "voc":
        voc = dataset_cfg["voc"]
        jpegs = str(Path(voc["root"]) / "JPEGImages")
        return {
            "train": {"images": jpegs, "annotations": None,
                      "layout": {"source": "voc", "root": voc["root"], "split": voc["train_split"],
                                 "list": voc.get("train_list"), "on_bad_image": policy}},
            "val": {"images": jpegs, "annotations": gt,
                    "layout": {"source": "voc", "root": voc["root"], "split": voc["val_split"],
                               "list": None, "on_bad_image": policy}},
        }
    if source == "coco20k":
        coco = dataset_cfg["coco20k"]
        return {"train": {"images": coco["images"], "annotations": gt,
                          "layout": {"source": "coco20k", "images": coco["images"],
                                     "filenames": coco["filenames"], "on_bad_image": policy}}}
    raise ValueError(f"dataset.source '{source}' is not a benchmark layout; use one of {SOURCES}")


def list_layout(layout: dict[str, Any]) -> list[ImageRecord]:
    """The images of a split produced by :func:`dataset_splits`."""
    policy = layout.get("on_bad_image", "fail")
    if layout["source"] == "voc":
        return voc_records(layout["root"], layout["split"], layout.get("list"), policy)
    if layout["source"] == "coco20k":
        return coco20k_records(layout["images"], layout["filenames"], policy)
    raise ValueError(f"unknown dataset layout {layout['source']!r}")
