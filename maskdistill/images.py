"""Datasets and image reading: list a split's images, assign stable shards, decode and resize."""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from maskdistill.storage import read_json

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageReadError(RuntimeError):
    """An image file could not be decoded."""


@dataclass(frozen=True)
class ImageRecord:
    """One image of a split: a stable key, its file, and its COCO id when it has one."""

    key: str  # relative path without extension, '/' separated; unique in the split
    path: Path
    image_id: int | None = None


def list_image_folder(root: str | os.PathLike[str]) -> list[ImageRecord]:
    """All images below ``root`` (recursively), sorted by key."""
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"image folder not found: {base}")
    records = []
    for dirpath, _, files in os.walk(base, followlinks=True):
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                path = Path(dirpath) / name
                records.append(ImageRecord(key=_key_of(path, base), path=path))
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


def list_split(split_cfg: dict[str, Any]) -> list[ImageRecord]:
    """Images of a split config ``{images: dir, annotations: json | null}``."""
    ann = split_cfg.get("annotations")
    if ann:
        return list_coco_images(split_cfg["images"], ann)
    return list_image_folder(split_cfg["images"])


def _key_of(path: Path, base: Path) -> str:
    rel = path.relative_to(base).as_posix()
    return rel.rsplit(".", 1)[0]


def _check_unique(records: list[ImageRecord], base: Path) -> None:
    seen: dict[str, Path] = {}
    for r in records:
        if r.key in seen:
            raise ValueError(f"two images share the key '{r.key}' under {base}: {seen[r.key]}, {r.path}")
        seen[r.key] = r.path


def shard_of(key: str, num_shards: int) -> int:
    """Stable shard index of an image key: adding images never moves existing ones."""
    return zlib.crc32(key.encode("utf-8")) % num_shards


def shard_records(records: list[ImageRecord], shard: int, num_shards: int) -> list[ImageRecord]:
    """The records of one shard, in key order."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} outside 0..{num_shards - 1}")
    return [r for r in records if shard_of(r.key, num_shards) == shard]


def read_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an image as uint8 RGB (H, W, 3), applying its EXIF orientation."""
    p = Path(path)
    if not p.exists():
        raise ImageReadError(f"{p}: file not found")
    try:
        with Image.open(p) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32)
                top = max(float(arr.max()), 1.0)
                im = Image.fromarray((arr * (255.0 / top)).astype(np.uint8))
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                canvas = Image.new("RGB", im.size, (0, 0, 0))
                canvas.paste(im, mask=im.getchannel("A"))
                im = canvas
            rgb = np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"{p}: cannot decode image ({err})") from err
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ImageReadError(f"{p}: empty image")
    return rgb


def resized_hw(height: int, width: int, short_side: int) -> tuple[int, int]:
    """Size after scaling the shorter side to ``short_side`` (aspect kept, at least 1 px)."""
    scale = short_side / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def to_tensor(rgb: np.ndarray, size_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """uint8 RGB -> normalised float tensor (3, H, W), optionally resized (bilinear)."""
    im = rgb
    if size_hw is not None and size_hw != rgb.shape[:2]:
        im = np.asarray(Image.fromarray(rgb).resize((size_hw[1], size_hw[0]), Image.BICUBIC))
    t = torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return t.sub_(mean).div_(std)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the last two dims (bottom, right) up to a multiple of ``multiple``."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    return torch.nn.functional.pad(x, (0, pw, 0, ph))


DEMO_DIR = "demo"


def resolve_splits(dataset_cfg: dict[str, Any], results_dir: str = "results") -> dict[str, dict]:
    """Split name -> {images, annotations} for the configured source (the demo lives in results/)."""
    if dataset_cfg["source"] == "demo":
        root = Path(results_dir) / DEMO_DIR
        return {
            "train": {"images": str(root / "train" / "images"), "annotations": None},
            "val": {"images": str(root / "val" / "images"),
                    "annotations": str(root / "val" / "instances.json")},
        }
    splits = {"train": dict(dataset_cfg["train"])}
    if dataset_cfg["val"].get("images"):
        splits["val"] = dict(dataset_cfg["val"])
    return splits
