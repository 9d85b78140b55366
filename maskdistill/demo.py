"""The embedded demo dataset: deterministic synthetic scenes of textured shapes with ground truth.

Each category has its own shape and texture family (disc/dots, square/stripes, triangle/checker,
star/plain, ring/concentric); colours are drawn per object independently of the category, so a
model must tell categories apart by shape and texture. The background is a near-neutral grey
(``background: plain``), the same grey under a strong per-pixel grain (``grain``: a rough surface,
stationary and alike in every scene, on which local contrast no longer marks the objects), or a
blurred mosaic of cells drawn from the objects' own colours (``clutter``): "stuff" that colour
contrast alone cannot tell from the "things" on it. Every image depends only on
``(seed, split, index)``.
"""

from __future__ import annotations

import colorsys
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from maskdistill.datasets import demo_image_keys
from maskdistill.settings import DemoSettings
from maskdistill.storage import atomic_path, encode_rle, mask_to_box, write_json, write_label_png
from maskdistill.training import progress

DEMO_CATEGORIES: tuple[str, ...] = ("disc", "square", "triangle", "star", "ring")
GRAIN_STD = 20.0  # grey levels, per pixel, shared by the three channels
SPLITS = ("train", "val")
MIN_VISIBLE_PIXELS = 20
_SPLIT_CODE = {"train": 1, "val": 2}
_SUBPIXEL = 4  # cv2.fillPoly fractional bits


def generate_demo(out_dir: Path, demo: DemoSettings, splits: tuple[str, ...] = SPLITS) -> None:
    """Write images, COCO instances and semantic label maps of the demo splits under ``out_dir``:
    ``{split}/images/{key}.png``, ``{split}/semantic/{key}.png`` and ``{split}/instances.json``."""
    for split in splits:
        _split_count(demo, split)  # an unknown split is an error naming it
        root = Path(out_dir) / split
        images, annotations = [], []
        keys = demo_image_keys(demo, split)
        for index, key in progress(enumerate(keys), total=len(keys), desc=f"demo {split}", unit="scene"):
            rgb, inst_ids, inst_cats = draw_scene(demo, split, index)
            image_id = index + 1
            _write_rgb_png(root / "images" / f"{key}.png", rgb)
            semantic = np.zeros(inst_ids.shape, np.uint8)
            h, w = inst_ids.shape
            images.append({"id": image_id, "file_name": f"{key}.png", "height": h, "width": w})
            for n, cat in enumerate(inst_cats, start=1):
                mask = inst_ids == n
                semantic[mask] = cat
                x0, y0, x1, y1 = mask_to_box(mask)
                annotations.append({
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(cat),
                    "segmentation": encode_rle(mask),
                    "area": int(mask.sum()),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "iscrowd": 0,
                })
            write_label_png(root / "semantic" / f"{key}.png", semantic)
        categories = [{"id": i + 1, "name": name, "supercategory": "shape"}
                      for i, name in enumerate(DEMO_CATEGORIES)]
        write_json(root / "instances.json",
                   {"images": images, "annotations": annotations, "categories": categories})


def draw_scene(demo: DemoSettings, split: str, index: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Draw one scene: RGB uint8 (S, S, 3), instance map (0 = none, n = n-th kept instance) and
    the category id (1..C) of each kept instance."""
    if not 0 <= index < _split_count(demo, split):
        raise ValueError(f"demo index {index} outside split '{split}'")
    size = demo.image_size
    rng = np.random.default_rng([demo.seed & 0xFFFFFFFF, _SPLIT_CODE[split], index])
    canvas = _background(rng, size)
    kind = demo.background
    if kind != "plain":  # the grey one is still drawn, and the variant from its own stream,
        # so the objects' draws (and so the objects) stay the same; one stream serves every variant
        # (a scene has one background), so adding a variant never redraws another's scenes
        stream = [demo.seed & 0xFFFFFFFF, _SPLIT_CODE[split], index, 1]
        if kind == "clutter":
            canvas = _clutter(np.random.default_rng(stream), size)
        else:
            canvas += _grain(np.random.default_rng(stream), size)
    owner = np.zeros((size, size), np.int32)  # index+1 of the object owning each pixel
    cats: list[int] = []
    num = int(rng.integers(demo.min_objects, demo.max_objects + 1))
    for _ in range(num):
        cat = int(rng.integers(len(DEMO_CATEGORIES)))
        for _attempt in range(8):  # avoid hiding most of an earlier object
            mask, local = _shape(rng, DEMO_CATEGORIES[cat], size)
            if _keeps_others_visible(owner, mask, len(cats)):
                break
        texture = _texture(rng, DEMO_CATEGORIES[cat], local, mask)
        canvas[mask] = texture
        cats.append(cat + 1)
        owner[mask] = len(cats)
    noise = rng.normal(0.0, 3.0, canvas.shape)
    rgb = np.clip(np.rint(canvas + noise), 0, 255).astype(np.uint8)
    inst = np.zeros_like(owner)
    kept: list[int] = []
    for n, cat in enumerate(cats, start=1):
        visible = owner == n
        if visible.sum() >= MIN_VISIBLE_PIXELS:
            kept.append(cat)
            inst[visible] = len(kept)
    return rgb, inst, kept


# ---------------------------------------------------------------- private helpers


def _split_count(demo: DemoSettings, split: str) -> int:
    """Scenes in ``split``; an unknown split is an error naming it."""
    if split not in _SPLIT_CODE:
        raise ValueError(f"unknown demo split '{split}' (expected one of {', '.join(SPLITS)})")
    return {"train": demo.num_train, "val": demo.num_val}[split]


def _write_rgb_png(path: Path, rgb: np.ndarray) -> None:
    with atomic_path(path, suffix=".tmp.png") as tmp:
        Image.fromarray(rgb, mode="RGB").save(tmp)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float64) * 255.0


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A near-neutral grey with faint smooth noise, from one shared distribution. Backgrounds
    carry nothing that identifies a scene, so what tells two scenes (or two crops of one scene)
    apart is their objects: what a self-supervised ViT should then learn to look at."""
    base = _hsv(rng.random(), rng.uniform(0.0, 0.05), rng.uniform(0.42, 0.5))
    img = np.empty((size, size, 3), np.float64)
    img[:] = base
    coarse = rng.normal(0.0, 4.0, (max(2, size // 8), max(2, size // 8)))
    img += cv2.resize(coarse, (size, size), interpolation=cv2.INTER_LINEAR)[..., None]
    return img


def _grain(rng: np.random.Generator, size: int) -> np.ndarray:
    """Grey per-pixel Gaussian grain (std ``GRAIN_STD``): every 8x8 patch of the background
    differs from its neighbours about as much as an object's edge does, so the contrast cue that a
    random ViT uses to find objects on the plain grey is gone, while nothing in it tells two scenes
    apart. Objects are drawn over it, so it lies on the background only."""
    return GRAIN_STD * rng.normal(0.0, 1.0, (size, size, 1))


def _clutter(rng: np.random.Generator, size: int) -> np.ndarray:
    """A blurred Voronoi mosaic of 6-13 cells whose hues span the objects' colour range, with
    smooth noise: a background as colourful as the objects but without their shapes and textures,
    so any colour-contrast cue (which a random ViT already has) stops marking the objects."""
    cells = int(rng.integers(6, 14))
    centres = rng.uniform(0.0, size, (cells, 2))
    yy, xx = np.mgrid[0:size, 0:size]
    nearest = ((xx[..., None] - centres[:, 0]) ** 2 + (yy[..., None] - centres[:, 1]) ** 2).argmin(-1)
    colours = np.stack([_hsv(rng.random(), rng.uniform(0.3, 0.9), rng.uniform(0.4, 0.9))
                        for _ in range(cells)])
    img = cv2.GaussianBlur(colours[nearest], (0, 0), size / 40.0)
    coarse = rng.normal(0.0, 6.0, (max(2, size // 8), max(2, size // 8)))
    return img + cv2.resize(coarse, (size, size), interpolation=cv2.INTER_LINEAR)[..., None]


def _shape(rng: np.random.Generator, name: str, size: int) -> tuple[np.ndarray, dict[str, Any]]:
    """A random placement of one shape: its bool mask and the object's local frame."""
    radius = rng.uniform(0.25, 0.5) * size / 2.0
    cx, cy = rng.uniform(0.8 * radius, size - 0.8 * radius, 2)
    theta = rng.uniform(0.0, 2.0 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cos, sin = math.cos(theta), math.sin(theta)
    u = ((xx - cx) * cos + (yy - cy) * sin) / radius  # object-local coordinates, radius 1
    v = (-(xx - cx) * sin + (yy - cy) * cos) / radius
    rho = np.hypot(u, v)
    if name == "disc":
        mask = rho <= 1.0
    elif name == "ring":
        mask = (rho <= 1.0) & (rho >= rng.uniform(0.45, 0.6))
    else:
        if name == "square":
            angles = np.deg2rad([45, 135, 225, 315])
            radii = np.full(4, 1.1)
        elif name == "triangle":
            angles = np.deg2rad([90, 210, 330])
            radii = np.full(3, 1.2)
        elif name == "star":
            angles = np.deg2rad(np.arange(10) * 36.0 + 90.0)
            radii = np.tile([1.0, rng.uniform(0.4, 0.5)], 5)
        else:
            raise ValueError(f"unknown demo shape '{name}'")
        lx, ly = radii * np.cos(angles), radii * np.sin(angles)
        px = cx + radius * (lx * cos - ly * sin)  # local -> image
        py = cy + radius * (lx * sin + ly * cos)
        pts = np.rint(np.stack([px, py], 1) * (1 << _SUBPIXEL)).astype(np.int32)
        canvas = np.zeros((size, size), np.uint8)
        cv2.fillPoly(canvas, [pts], 1, lineType=cv2.LINE_8, shift=_SUBPIXEL)
        mask = canvas.astype(bool)
    return mask, {"u": u, "v": v, "rho": rho}


def _object_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A saturated primary colour and a contrasting secondary (darker or lighter) one."""
    hue = rng.random()
    primary = _hsv(hue, rng.uniform(0.55, 1.0), rng.uniform(0.65, 1.0))
    if rng.random() < 0.5:
        secondary = primary * rng.uniform(0.25, 0.45)
    else:
        secondary = _hsv(hue + rng.uniform(-0.08, 0.08), rng.uniform(0.0, 0.25), 1.0)
    return primary, secondary


def _texture(rng: np.random.Generator, name: str, local: dict[str, Any], mask: np.ndarray):
    """Colours of the object's pixels (N, 3) under its category's texture family."""
    primary, secondary = _object_colours(rng)
    u, v, rho = local["u"][mask], local["v"][mask], local["rho"][mask]
    if name == "disc":  # dots
        k = rng.uniform(2.5, 4.0)
        fu, fv = (u * k) % 1.0 - 0.5, (v * k) % 1.0 - 0.5
        alt = fu**2 + fv**2 < rng.uniform(0.06, 0.1)
    elif name == "square":  # stripes
        alt = np.sin(u * rng.uniform(6.0, 10.0) + rng.uniform(0, 2 * math.pi)) > 0
    elif name == "triangle":  # checker
        k = rng.uniform(1.8, 3.0)
        alt = (np.floor(u * k) + np.floor(v * k)) % 2 == 1
    elif name == "star":  # plain with soft shading
        shade = 1.0 - 0.15 * np.clip(rho, 0, 1)
        return primary[None, :] * shade[:, None]
    elif name == "ring":  # concentric bands
        alt = np.sin(rho * rng.uniform(14.0, 20.0)) > 0
    else:
        raise ValueError(f"unknown demo shape '{name}'")
    return np.where(alt[:, None], secondary[None, :], primary[None, :])


def _keeps_others_visible(owner: np.ndarray, mask: np.ndarray, count: int) -> bool:
    """True if every earlier object keeps at least half of its visible pixels."""
    for n in range(1, count + 1):
        visible = owner == n
        area = int(visible.sum())
        if area and int((visible & mask).sum()) * 2 > area:
            return False
    return True
