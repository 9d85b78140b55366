"""Galleries: what each cluster and each predicted class looks like, one row of sample crops each.

:func:`cluster_gallery` shows, for each K-means cluster (ids 1..K, as in the pseudo-label COCO
files), the mined masks whose whitened feature lies nearest the cluster's centroid, as box crops
with the mask tinted and outlined. :func:`class_gallery` shows, for each class of the segmentation
model, the images where the class covers the largest area, cropped square around its pixels.
Each row is labelled on the left with its size and, given a matching (:func:`matched_classes`),
the ground-truth class it was matched to and that class's IoU. Both write one JPEG atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from maskdistill.clustering import assign_clusters, crop_box, read_features, whiten
from maskdistill.images import ImageRecord, read_rgb
from maskdistill.report import palette
from maskdistill.segmentation import label_path
from maskdistill.storage import (
    CorruptFileError,
    MinedMask,
    atomic_path,
    read_json,
    read_label_png,
    read_mask_shard,
)
from maskdistill.training import progress

log = logging.getLogger("maskdistill")

Matched = Mapping[int, tuple[str, float | None]]
DPI = 100
FONT_PT = 9
GAP = 4  # pixels between crops, and around the grid
TITLE_PX = 30  # height of the title strip above the rows
MAX_SIDE_PX = 65000  # JPEG's limit is 65535 pixels a side
TINT_ALPHA = 0.4
OUTLINE_PX = 2
CLASS_MARGIN = 0.15  # class crops: margin on each side, as a fraction of the class box's longer side
ASSIGN_CHUNK = 4096  # rows per assign_clusters call (it builds a rows x K x dim array)


# ---------------------------------------------------------------- drawing one crop


def erode(mask: np.ndarray) -> np.ndarray:
    """Bool mask (H, W) shrunk by one pixel (4-neighbourhood); pixels outside count as False."""
    p = np.pad(mask, 1, constant_values=False)
    return p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def outline(mask: np.ndarray, width: int = OUTLINE_PX) -> np.ndarray:
    """The inner border of a bool mask (H, W), ``width`` pixels thick."""
    inner = mask
    for _ in range(width):
        inner = erode(inner)
    return mask & ~inner


def tint(rgb: np.ndarray, mask: np.ndarray, colour: np.ndarray, alpha: float = TINT_ALPHA) -> np.ndarray:
    """uint8 RGB (H, W, 3) with ``mask`` blended towards ``colour`` (``alpha``) and outlined in it."""
    out = rgb.astype(np.float64)
    out[mask] = (1.0 - alpha) * out[mask] + alpha * np.asarray(colour, np.float64)
    out[outline(mask)] = colour
    return out.round().astype(np.uint8)


def mask_crop(mask: np.ndarray, box: Sequence[float], size: int) -> np.ndarray:
    """Bool mask (H, W) cut to ``box`` [x0, y0, x1, y1] and resized to ``size`` x ``size``, with the
    same geometry as :func:`maskdistill.clustering.crop_box` of the image."""
    return crop_box(mask.astype(np.uint8) * 255, list(box), size) >= 128


def square_box(mask: np.ndarray, margin: float = CLASS_MARGIN) -> list[float]:
    """Square [x0, y0, x1, y1] around the True pixels of a non-empty bool mask (H, W), ``margin``
    times the longer side added on each side, kept inside the image (the margin shrinks first; the
    box is non-square only where the pixels span more than the image's shorter side)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("square_box: empty mask")
    h, w = mask.shape
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    longest = max(x1 - x0, y1 - y0)
    side = max(min(longest * (1.0 + 2.0 * margin), min(h, w)), longest)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    (ax0, ax1), (ay0, ay1) = _span(cx, side, w), _span(cy, side, h)
    return [float(v) for v in (ax0, ay0, ax1, ay1)]


def _span(centre: float, side: float, limit: int) -> tuple[float, float]:
    """[lo, hi) of length ``side`` centred on ``centre``, shifted (then clipped) into [0, limit]."""
    lo = min(max(centre - side / 2.0, 0.0), max(limit - side, 0.0))
    return lo, min(lo + side, float(limit))


# ---------------------------------------------------------------- row labels and the figure


def row_label(kind: str, ident: int, size: int, unit: str, matched: Matched | None) -> str:
    """'<kind> <ident> · <size> <unit>' and, when ``matched`` names ``ident``, a second line
    '= <class> (IoU x.x)'."""
    text = f"{kind} {ident} · {size} {unit if size != 1 else unit.rstrip('s')}"
    if matched and ident in matched:
        name, iou = matched[ident]
        text += f"\n= {name} (IoU {'n/a' if iou is None else f'{iou:.1f}'})"
    return text


def gallery_grid(rows: Sequence[Sequence[np.ndarray]], samples: int, crop_size: int) -> np.ndarray:
    """White uint8 canvas with each row's crops (``crop_size`` squares) left to right, ``GAP`` apart."""
    cell = crop_size + GAP
    grid = np.full((max(len(rows), 1) * cell + GAP, samples * cell + GAP, 3), 255, np.uint8)
    for r, crops in enumerate(rows):
        for c, crop in enumerate(crops[:samples]):
            y, x = GAP + r * cell, GAP + c * cell
            grid[y:y + crop_size, x:x + crop_size] = crop
    return grid


def draw_gallery(out: Path, title: str, labels: Sequence[str], rows: Sequence[Sequence[np.ndarray]],
                 empty_text: str, samples: int, crop_size: int) -> tuple[int, int]:
    """Write the gallery JPEG ``out``: ``title`` on top, then per row its label on the left and its
    crops (``empty_text`` where it has none); returns the image's (width, height) in pixels."""
    from matplotlib.figure import Figure

    grid = gallery_grid(rows, samples, crop_size)
    line_px = FONT_PT * DPI / 72.0
    chars = max((len(line) for text in labels for line in text.splitlines()), default=10)
    label_w = int(2 * GAP + 0.62 * line_px * chars)
    title_w = int(2 * GAP + 0.7 * line_px * len(title))
    width, height = max(label_w + grid.shape[1], title_w), TITLE_PX + grid.shape[0]
    if height > MAX_SIDE_PX:
        raise ValueError(f"{out}: {len(rows)} rows of {crop_size} px crops make a {height} px tall "
                         f"image, over JPEG's limit; lower gallery.crop_size")
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    ax = fig.add_axes((label_w / width, 0.0, grid.shape[1] / width, grid.shape[0] / height))
    ax.imshow(grid, interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    fig.text(GAP / width, 1.0 - (TITLE_PX / 2) / height, title, fontsize=FONT_PT + 1, va="center",
             ha="left", weight="bold")
    cell = crop_size + GAP
    for r, (text, crops) in enumerate(zip(labels, rows, strict=True)):
        y = 1.0 - (TITLE_PX + GAP + r * cell + crop_size / 2) / height
        fig.text(GAP / width, y, text, fontsize=FONT_PT, va="center", ha="left")
        if not crops:
            fig.text((label_w + 2 * GAP) / width, y, empty_text, fontsize=FONT_PT, va="center",
                     ha="left", style="italic", color="0.4")
    with atomic_path(out, suffix=".tmp.jpg") as tmp:
        fig.savefig(tmp, format="jpeg", dpi=DPI, pil_kwargs={"quality": 90})
    return width, height


# ---------------------------------------------------------------- clusters


def read_kmeans(path: Path) -> dict[str, np.ndarray]:
    """The K-means model file (``mean``, ``std``, ``centroids``) that clustering wrote."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"K-means model not found: {path}")
    try:
        with np.load(path) as npz:
            model = {name: npz[name] for name in ("mean", "std", "centroids")}
    except KeyError as err:
        raise CorruptFileError(f"{path}: K-means model lacks the array {err}; rerun clustering") from err
    except (OSError, ValueError) as err:
        raise CorruptFileError(f"{path}: unreadable K-means model ({err}); rerun clustering") from err
    if model["centroids"].ndim != 2 or model["mean"].shape != model["centroids"].shape[1:]:
        raise CorruptFileError(f"{path}: centroids {model['centroids'].shape} and mean "
                               f"{model['mean'].shape} disagree; rerun clustering")
    return model


def read_feature_shards(paths: Sequence[Path], dim: int) -> tuple[list[str], np.ndarray]:
    """Keys and features (N, ``dim``) of every feature shard, in order; a shard of another width
    is refused by name."""
    keys: list[str] = []
    parts = [np.zeros((0, dim), np.float32)]
    for path in paths:
        k, f = read_features(Path(path))
        if len(k) and (f.ndim != 2 or f.shape[1] != dim):
            raise ValueError(f"{path}: features of shape {f.shape} do not fit the K-means model "
                             f"({dim} dimensions); rerun clustering")
        keys += k
        parts.append(f.reshape(len(k), dim))
    return keys, np.concatenate(parts)


def assign_all(features: np.ndarray, model: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Cluster (0..K-1, as :func:`assign_clusters` gives it) of each row and the squared distance
    of its whitened feature to that cluster's centroid."""
    labels = np.concatenate([np.zeros(0, np.int64)] + [
        assign_clusters(features[lo:lo + ASSIGN_CHUNK], dict(model))
        for lo in range(0, len(features), ASSIGN_CHUNK)])
    z = whiten(features, model["mean"], model["std"])
    return labels, ((z - model["centroids"][labels]) ** 2).sum(1)


def nearest_members(labels: np.ndarray, dist: np.ndarray, k: int, samples: int) -> list[np.ndarray]:
    """For each cluster 0..k-1 the row indices of its (at most ``samples``) members nearest the
    centroid, nearest first (ties: earlier row first)."""
    order = np.lexsort((np.arange(len(dist)), dist))
    return [order[labels[order] == c][:samples] for c in range(k)]


def masks_by_key(mask_shards: Sequence[Path], wanted: set[str]) -> dict[str, MinedMask]:
    """The mined masks of ``wanted`` keys from the shards (one shard in memory at a time)."""
    return {m.key: m for shard in mask_shards for m in read_mask_shard(shard) if m.key in wanted}


def mask_tile(mined: MinedMask, images_root: Path, cluster: int, crop_size: int) -> np.ndarray:
    """The box crop of a mined mask's image, resized to ``crop_size``, the mask tinted and outlined
    in the cluster's palette colour."""
    rgb = read_rgb(Path(images_root) / mined.file_name)
    if rgb.shape[:2] != mined.mask.shape:
        raise ValueError(f"{Path(images_root) / mined.file_name} is {rgb.shape[1]}x{rgb.shape[0]} but its "
                         f"mined mask '{mined.key}' is {mined.width}x{mined.height}; rerun mining")
    return tint(crop_box(rgb, mined.box, crop_size), mask_crop(mined.mask, mined.box, crop_size),
                palette()[cluster % 256])


def cluster_gallery(mask_shards: Sequence[Path], feature_shards: Sequence[Path], kmeans: Path,
                    images_root: Path, out: Path, *, samples: int = 8, crop_size: int = 96,
                    matched: Matched | None = None) -> dict[str, Any]:
    """Write ``out`` (JPEG): one row per cluster 1..K with the ``samples`` mined masks nearest its
    centroid; returns {"clusters": K, "rows": [{"cluster", "size", "keys", "label"}]}."""
    _check_sizes(samples, crop_size)
    model = read_kmeans(kmeans)
    k, dim = model["centroids"].shape
    keys, features = read_feature_shards(feature_shards, dim)
    labels, dist = assign_all(features, model)
    chosen = nearest_members(labels, dist, k, samples)
    mined = masks_by_key(mask_shards, {keys[i] for rows in chosen for i in rows})
    sizes = np.bincount(labels, minlength=k)
    rows, tiles = [], []
    for c in progress(range(k), total=k, desc="cluster gallery", unit="cluster"):
        shown = [keys[i] for i in chosen[c]]
        missing = [key for key in shown if key not in mined]
        if missing:
            raise ValueError(f"mask '{missing[0]}' of the feature shards is in none of the mask shards "
                             f"{[str(p) for p in mask_shards]}; rerun clustering")
        tiles.append([mask_tile(mined[key], images_root, c + 1, crop_size) for key in shown])
        rows.append({"cluster": c + 1, "size": int(sizes[c]), "keys": shown,
                     "label": row_label("cluster", c + 1, int(sizes[c]), "masks", matched)})
    title = f"{k} clusters of {len(keys)} masks: the {samples} masks nearest each centre"
    draw_gallery(Path(out), title, [r["label"] for r in rows], tiles, "no masks in this cluster",
                 samples, crop_size)
    log.info("cluster gallery of %d clusters written to %s", k, out)
    return {"clusters": int(k), "rows": rows}


# ---------------------------------------------------------------- predicted classes


def read_prediction(predictions: Path, key: str, num_labels: int) -> np.ndarray:
    """The predicted label map ``<predictions>/<key>.png``, refused by name when a label is not
    below ``num_labels``."""
    path = label_path(Path(predictions), key)
    labels = read_label_png(path)
    top = int(labels.max(initial=0))
    if top >= num_labels:
        raise ValueError(f"{path}: label {top} but the model has {num_labels} labels (0..{num_labels - 1})")
    return labels


def class_areas(records: Sequence[ImageRecord], predictions: Path, num_labels: int) -> np.ndarray:
    """(len(records), num_labels) pixel count of each label in each image's prediction."""
    areas = np.zeros((len(records), num_labels), np.int64)
    for i, rec in enumerate(progress(records, total=len(records), desc="class areas")):
        areas[i] = np.bincount(read_prediction(predictions, rec.key, num_labels).ravel(),
                               minlength=num_labels)
    return areas


def largest_areas(areas: np.ndarray, samples: int) -> list[np.ndarray]:
    """For each label 1..L-1 the row indices of the (at most ``samples``) images where it covers
    the most pixels, largest first (ties: earlier image first); images without it are left out."""
    out = []
    for c in range(1, areas.shape[1]):
        order = np.lexsort((np.arange(len(areas)), -areas[:, c]))
        out.append(order[areas[order, c] > 0][:samples])
    return out


def class_tile(rec: ImageRecord, predictions: Path, label: int, num_labels: int,
               crop_size: int) -> np.ndarray:
    """The image cropped square (with a margin) around the pixels predicted as ``label``, resized
    to ``crop_size``, that region tinted and outlined in the label's palette colour."""
    rgb = read_rgb(rec.path)
    region = read_prediction(predictions, rec.key, num_labels) == label
    if region.shape != rgb.shape[:2]:
        raise ValueError(f"{label_path(Path(predictions), rec.key)} is {region.shape[1]}x{region.shape[0]} "
                         f"but its image {rec.path} is {rgb.shape[1]}x{rgb.shape[0]}")
    box = square_box(region)
    return tint(crop_box(rgb, box, crop_size), mask_crop(region, box, crop_size), palette()[label % 256])


def class_gallery(records: Sequence[ImageRecord], predictions: Path, num_labels: int, out: Path, *,
                  samples: int = 8, crop_size: int = 96, matched: Matched | None = None) -> dict[str, Any]:
    """Write ``out`` (JPEG): one row per predicted class 1..num_labels-1 with the ``samples`` images
    where it covers most; returns {"classes": num_labels - 1, "rows": [{"class", "size" (images
    with the class), "keys", "label"}]}."""
    _check_sizes(samples, crop_size)
    if num_labels < 2:
        raise ValueError(f"class gallery: num_labels must be at least 2 (background and a class), "
                         f"got {num_labels}")
    areas = class_areas(records, predictions, num_labels)
    chosen = largest_areas(areas, samples)
    rows, tiles = [], []
    for c in progress(range(1, num_labels), total=num_labels - 1, desc="class gallery", unit="class"):
        shown = [records[i] for i in chosen[c - 1]]
        size = int((areas[:, c] > 0).sum())
        tiles.append([class_tile(rec, predictions, c, num_labels, crop_size) for rec in shown])
        rows.append({"class": c, "size": size, "keys": [rec.key for rec in shown],
                     "label": row_label("class", c, size, "images", matched)})
    title = (f"{num_labels - 1} predicted classes over {len(records)} images: the {samples} images "
             "where each covers most")
    draw_gallery(Path(out), title, [r["label"] for r in rows], tiles, "not predicted in any image",
                 samples, crop_size)
    log.info("class gallery of %d classes written to %s", num_labels - 1, out)
    return {"classes": num_labels - 1, "rows": rows}


def _check_sizes(samples: int, crop_size: int) -> None:
    """Refuse gallery sizes that cannot draw anything."""
    if samples < 1 or crop_size < 8:
        raise ValueError(f"gallery: samples must be >= 1 and crop_size >= 8, got {samples} and {crop_size}")


# ---------------------------------------------------------------- the matching of an evaluation


def matched_classes(metrics_json: Path, stage: str) -> dict[int, tuple[str, float | None]]:
    """Predicted label (>= 1) -> (the ground-truth class it was matched to, that class's IoU in %
    or None) from an evaluation's metrics.json; {} when the file or the stage is missing."""
    path = Path(metrics_json)
    if not path.is_file():
        return {}
    metrics = read_json(path)
    result = metrics.get(stage) if isinstance(metrics, dict) else None
    if not isinstance(result, dict):
        return {}
    try:
        names = list(metrics["meta"]["class_names"])
        mapping, per_class = list(result["mapping"]), dict(result["per_class"])
    except (KeyError, TypeError) as err:
        raise CorruptFileError(f"{path}: stage '{stage}' has no matching ({err!r} missing)") from err
    out: dict[int, tuple[str, float | None]] = {}
    for label, gt in enumerate(mapping[1:], start=1):
        if not isinstance(gt, int) or not 0 <= gt < len(names):
            raise CorruptFileError(f"{path}: stage '{stage}' matches label {label} to class {gt!r}, "
                                   f"not one of the {len(names)} classes of meta.class_names")
        iou = per_class.get(names[gt])
        out[label] = (str(names[gt]), None if iou is None else float(iou))
    return out
