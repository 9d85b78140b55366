"""Where the images are: one dataset source per ``dataset.source`` (demo, images, voc, coco20k).

A :class:`DatasetSource` answers every question the workflow and the stages ask about the data:
which splits there are, which images a split holds (:meth:`~DatasetSource.records`), which split
is evaluated, and where its ground truth lies (COCO instances, VOC label PNGs, the linear probe's
label maps). :func:`dataset_source` makes the one that ``dataset.source`` names.

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
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from maskdistill.config import RESULTS
from maskdistill.images import IMAGE_EXTENSIONS, ImageRecord, file_problem
from maskdistill.settings import DatasetSettings, DemoSettings
from maskdistill.storage import (
    IGNORE_LABEL,
    encode_rle,
    key_of_file,
    mask_to_box,
    read_json,
    read_label_png,
    write_json,
)
from maskdistill.training import progress

log = logging.getLogger("maskdistill")
PathLike = str | os.PathLike[str]

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
VOC_SPLITS = ("train", "val", "trainval", "train_aug")
VOC_MASK_AP_SPLITS = {"seg_trainval": "trainval"}  # split -> VOC list; scored by mask AP only
VOC_TRAIN_AUG_LISTS = (
    "ImageSets/Segmentation/train_aug.txt",
    "ImageSets/Segmentation/trainaug.txt",
    "ImageSets/SegmentationAug/train_aug.txt",
)
GT_DIR = "gt"
DEMO_DIR = "demo"
SOURCES = ("demo", "images", "voc", "coco20k")
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


# ---------------------------------------------------------------- folders of images and COCO files


def _walk_images(base: Path) -> Iterator[Path]:
    """Image files below ``base`` (following folder links once: a link loop is not walked twice)."""
    seen: set[str] = set()
    for dirpath, dirnames, files in os.walk(base, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                yield Path(dirpath) / name


def has_images(root: str | os.PathLike[str]) -> bool:
    """Whether ``root`` holds at least one image file (stops at the first)."""
    return next(_walk_images(Path(root)), None) is not None


def list_image_folder(root: str | os.PathLike[str]) -> list[ImageRecord]:
    """All images below ``root`` (recursively), sorted by key.

    Files are listed, not decoded: a broken file is listed and met by the stage that reads it
    (which fails or skips it per ``dataset.on_bad_image``). Two files with the same key
    (``a/x.jpg`` and ``a/x.png``) are an error naming both.
    """
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"image folder not found: {base}")
    records = [ImageRecord(key=_key_of(path, base), path=path) for path in _walk_images(base)]
    records.sort(key=lambda r: r.key)
    _check_unique(records, base)
    return records


def list_coco_images(images_root: str | os.PathLike[str], annotations: str | os.PathLike[str]):
    """Images named by a COCO instances file, resolved under ``images_root``, sorted by key."""
    base = Path(images_root)
    data = read_json(annotations)
    if "images" not in data:
        raise ValueError(f"{annotations}: not a COCO instances file (no 'images' list)")
    records = [
        ImageRecord(key=_key_of(base / im["file_name"], base), path=base / im["file_name"],
                    image_id=int(im["id"]))
        for im in data["images"]
    ]
    records.sort(key=lambda r: r.key)
    _check_unique(records, base)
    return records


def _key_of(path: Path, base: Path) -> str:
    return key_of_file(path.relative_to(base).as_posix())


def _check_unique(records: list[ImageRecord], base: Path) -> None:
    seen: dict[str, Path] = {}
    for r in records:
        if r.key in seen:
            raise ValueError(f"two images share the key '{r.key}' under {base}: {seen[r.key]}, {r.path}")
        seen[r.key] = r.path


def records_from_paths(paths: Sequence[PathLike]) -> list[ImageRecord]:
    """The images named on a command line: files, or folders searched recursively, sorted by key.

    A folder's images are keyed by their path inside it (prefixed with the folder's name when more
    than one path is given) and a file by its name without extension; a key given twice is an
    error naming both files. Files are listed, not decoded (a broken one is met by the reader).
    """
    records: list[ImageRecord] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            prefix = f"{path.resolve().name}/" if len(paths) > 1 else ""
            records += [ImageRecord(f"{prefix}{r.key}", r.path) for r in list_image_folder(path)]
        elif path.is_symlink() or path.exists():
            records.append(ImageRecord(key_of_file(path.name), path))
        else:
            raise FileNotFoundError(f"no such image file or folder: {path}")
    records.sort(key=lambda r: r.key)
    _check_unique(records, Path("."))
    if not records:
        raise ValueError(f"no images found in {', '.join(map(str, paths))} "
                         f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
    return records


def without_skipped(records: list[ImageRecord], skipped_keys: set[str]) -> list[ImageRecord]:
    """The records whose key mining did not skip (policy ``skip``: later stages leave them out too)."""
    return [r for r in records if r.key not in skipped_keys]


# ---------------------------------------------------------------- shards and planned image lists


def shard_of(key: str, num_shards: int) -> int:
    """Stable shard index of an image key: adding images never moves existing ones."""
    return zlib.crc32(key.encode("utf-8")) % num_shards


def shard_records(records: list[ImageRecord], shard: int, num_shards: int) -> list[ImageRecord]:
    """The records of one shard, in key order."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} outside 0..{num_shards - 1}")
    return [r for r in records if shard_of(r.key, num_shards) == shard]


def write_image_list(path: str | os.PathLike[str], pairs: list[tuple[str, str]]) -> None:
    """Write the (key, path) pairs of the images a job is planned to read, atomically, as JSON.

    Mining reads its shard from this list rather than the folder, so an image that vanishes after
    planning is met as unreadable (``file not found``) instead of silently dropped.
    """
    write_json(path, {"images": [{"key": key, "path": str(p)} for key, p in pairs]})


def read_image_list(path: str | os.PathLike[str]) -> list[ImageRecord]:
    """The records of a list written by :func:`write_image_list`."""
    try:
        return [ImageRecord(key=im["key"], path=Path(im["path"])) for im in read_json(path)["images"]]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: not an image list written by maskdistill ({err!r})") from err


# ---------------------------------------------------------------- extra images for K-means

EXTRA_IMAGES_KEY = "clustering.extra_images"


def extra_splits(folders: Sequence[PathLike]) -> dict[str, str]:
    """The ``clustering.extra_images`` folders as splits, in config order: ``extra0``, ``extra1``, ..."""
    return {f"extra{i}": str(folder) for i, folder in enumerate(folders)}


def extra_records(folder: PathLike) -> list[ImageRecord]:
    """The images below one ``clustering.extra_images`` folder, sorted by key; a missing or empty
    folder is an error naming the key."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise DatasetLayoutError(f"config key '{EXTRA_IMAGES_KEY}': folder not found: {path}")
    records = list_image_folder(path)
    if not records:
        raise ValueError(f"config key '{EXTRA_IMAGES_KEY}': no images found in {path} "
                         f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
    return records


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
    pairs = sorted(zip(names, voc_image_ids(names), strict=True))
    for name, image_id in progress(pairs, total=len(pairs), desc=f"VOC {split} instances"):
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


# ---------------------------------------------------------------- the demo's keys


def demo_image_keys(demo: DemoSettings, split: str) -> list[str]:
    """Keys of a demo split ("scene_0000", ...), known without drawing anything."""
    counts = {"train": demo.num_train, "val": demo.num_val}
    if split not in counts:
        raise ValueError(f"the demo has no split {split!r}; it has {', '.join(counts)}")
    count = counts[split]
    width = max(4, len(str(count - 1)))
    return [f"scene_{i:0{width}d}" for i in range(count)]


# ---------------------------------------------------------------- dataset sources


@dataclass(frozen=True)
class DatasetSource:
    """The images and ground truth of one ``dataset.source``; paths written by the workflow lie
    below ``results`` (relative to the working directory)."""

    dataset: DatasetSettings
    results: str = RESULTS

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits the workflow mines and segments."""
        return ("train", "val")

    @property
    def evaluation_split(self) -> str:
        """The split that is scored (COCO20k: its own train images, as in the paper)."""
        return "val"

    def images_root(self, split: str) -> Path:
        """The folder that image keys are relative to."""
        raise NotImplementedError

    def records(self, split: str) -> list[ImageRecord]:
        """The images of ``split``, sorted by key (listed, not decoded)."""
        raise NotImplementedError

    def planned(self, split: str) -> list[tuple[str, str]]:
        """``(key, path)`` of the images of ``split`` as the planner sees them before any job."""
        return [(r.key, str(r.path)) for r in self.records(split)]

    def gt_instances(self, split: str) -> str | None:
        """The COCO instances file that is the ground truth of ``split`` (None: there is none)."""
        return None

    def gt_semantic(self, split: str) -> str | None:
        """A folder of ground-truth label PNGs ``<key>.png`` of ``split`` (VOC), else None."""
        return None

    def probe_labels(self, split: str) -> str | None:
        """The ground-truth label PNGs the linear probe uses when the config names none."""
        return None

    def images_key(self, split: str) -> str:
        """The config key that says where the images of ``split`` are (for error messages)."""
        return f"dataset.{split}.images"

    @property
    def mask_ap_splits(self) -> tuple[str, ...]:
        """Splits with ground-truth instances that only mask AP reads (the detector predicts on
        them; nothing is mined there): ``evaluation.mask_ap_split`` may name them."""
        return ()

    def check_split(self, split: str) -> None:
        if split not in self.splits and split not in self.mask_ap_splits:
            raise ValueError(f"config key 'dataset.{split}': split '{split}' is not configured "
                             f"(dataset.source {self.dataset.source} has {', '.join(self.splits)})")


class DemoSource(DatasetSource):
    """The embedded demo: scenes that the ``make_demo`` rule draws into ``results/demo``."""

    def _root(self, split: str) -> Path:
        return Path(self.results) / DEMO_DIR / split

    def images_root(self, split: str) -> Path:
        return self._root(split) / "images"

    def records(self, split: str) -> list[ImageRecord]:
        self.check_split(split)
        annotated = self.gt_instances(split) is not None
        return [ImageRecord(key, self.images_root(split) / f"{key}.png", i + 1 if annotated else None)
                for i, key in enumerate(demo_image_keys(self.dataset.demo, split))]

    def gt_instances(self, split: str) -> str | None:
        return str(self._root(split) / "instances.json") if split == "val" else None

    def probe_labels(self, split: str) -> str | None:
        return str(self._root(split) / "semantic")


class ImageFolderSource(DatasetSource):
    """Folders of the user's images (``dataset.train``, ``dataset.val``), optionally with COCO
    instances files that list the images and are their ground truth."""

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", "val") if self.dataset.val.images else ("train",)

    def _split(self, split: str):
        self.check_split(split)
        return {"train": self.dataset.train, "val": self.dataset.val}[split]

    def images_root(self, split: str) -> Path:
        return Path(self._split(split).images or "")

    def records(self, split: str) -> list[ImageRecord]:
        spec = self._split(split)
        ann = spec.annotations
        records = list_coco_images(spec.images, ann) if ann else list_image_folder(spec.images)
        if not records:
            where = f"{ann} (images under {spec.images})" if ann else spec.images
            raise ValueError(f"config key '{self.images_key(split)}': empty dataset, no images found "
                             f"in {where} (extensions {', '.join(IMAGE_EXTENSIONS)})")
        return records

    def gt_instances(self, split: str) -> str | None:
        return self._split(split).annotations if split in self.splits else None


class VocSource(DatasetSource):
    """PASCAL VOC 2012: ``train_split`` is mined and trained on, ``val_split`` is evaluated;
    ``seg_trainval`` (ImageSets/Segmentation/trainval.txt, 2913 images) is scored by mask AP only."""

    @property
    def mask_ap_splits(self) -> tuple[str, ...]:
        return tuple(VOC_MASK_AP_SPLITS)

    def _voc_split(self, split: str) -> tuple[str, str | None]:
        """The VOC list name of a split and its explicit list file (train only)."""
        voc = self.dataset.voc
        if split == "train":
            return voc.train_split, voc.train_list
        return VOC_MASK_AP_SPLITS.get(split, voc.val_split), None

    def images_root(self, split: str) -> Path:
        return Path(self.dataset.voc.root or "") / "JPEGImages"

    def records(self, split: str) -> list[ImageRecord]:
        self.check_split(split)
        name, list_file = self._voc_split(split)
        return voc_records(self.dataset.voc.root or "", name, list_file, self.dataset.on_bad_image)

    def gt_instances(self, split: str) -> str | None:
        if split == "val" or split in VOC_MASK_AP_SPLITS:
            return voc_gt_path(self._voc_split(split)[0], self.results)
        return None

    def gt_semantic(self, split: str) -> str | None:
        return str(Path(self.dataset.voc.root or "") / "SegmentationClass") if split == "val" else None

    def probe_labels(self, split: str) -> str | None:
        if split == "val":
            return self.gt_semantic(split)
        return str(Path(self.dataset.voc.root or "") / "SegmentationClassAug")

    def images_key(self, split: str) -> str:
        return "dataset.voc.root"


class Coco20kSource(DatasetSource):
    """COCO20k: one split, mined, trained on and evaluated (the paper's protocol)."""

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train",)

    @property
    def evaluation_split(self) -> str:
        return "train"

    def images_root(self, split: str) -> Path:
        return Path(self.dataset.coco20k.images or "")

    def records(self, split: str) -> list[ImageRecord]:
        self.check_split(split)
        coco = self.dataset.coco20k
        return coco20k_records(coco.images or "", coco.filenames or "", self.dataset.on_bad_image)

    def gt_instances(self, split: str) -> str | None:
        return coco20k_gt_path(self.results) if self.dataset.coco20k.annotations else None

    def images_key(self, split: str) -> str:
        return "dataset.coco20k.images"


_SOURCES: dict[str, type[DatasetSource]] = {"demo": DemoSource, "images": ImageFolderSource,
                                            "voc": VocSource, "coco20k": Coco20kSource}


def dataset_source(dataset: DatasetSettings, results: str = RESULTS) -> DatasetSource:
    """The source that ``dataset.source`` names."""
    return _SOURCES[dataset.source](dataset, results)


def voc_gt_path(val_split: str, results: str = RESULTS) -> str:
    """Where the workflow writes the COCO instances of a VOC segmentation list (the evaluated one,
    or the mask-AP split's)."""
    return str(Path(results) / GT_DIR / f"voc_{val_split}.json")


def coco20k_gt_path(results: str = RESULTS) -> str:
    """Where the workflow writes the COCO20k instances file."""
    return str(Path(results) / GT_DIR / "coco20k.json")
