"""Stage 5: clustering evaluation (Hungarian-matched mIoU) of each stage, with a report and a figure.

Predicted label maps hold cluster ids (0 = background, 1..K = clusters); they are matched to the
ground-truth classes (0 = background, 1..C = categories in sorted category-id order) one-to-one by
the Hungarian algorithm, or by majority vote when there are more clusters than classes.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from maskdistill.storage import (
    IGNORE_LABEL,
    atomic_path,
    decode_segmentation,
    key_of_file,
    read_json,
    read_label_png,
    write_json,
)

log = logging.getLogger("maskdistill")

MODES = ("iou", "confusion")
BACKGROUND_NAME = "background"
# PASCAL VOC class ids 0..20 (the order of the paper's per-class table).
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
# Published MaskDistill numbers (paper Tables 2, 6 and S2; see the reference facts), values in %.
PAPER_VOC_PER_CLASS = {
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


# ---------------------------------------------------------------- confusion and matching


def confusion_matrix(
    pred: np.ndarray, gt: np.ndarray, num_pred: int, num_gt: int, ignore: int = IGNORE_LABEL
) -> np.ndarray:
    """Counts (num_pred, num_gt): rows predicted labels, columns GT classes; GT ``ignore`` skipped."""
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth {gt.shape}")
    valid = gt != ignore
    p = pred[valid].astype(np.int64).ravel()
    g = gt[valid].astype(np.int64).ravel()
    if p.size and (p.min() < 0 or p.max() >= num_pred):
        bad = int(p.max()) if p.max() >= num_pred else int(p.min())
        raise ValueError(f"predicted label {bad} outside 0..{num_pred - 1}")
    if g.size and (g.min() < 0 or g.max() >= num_gt):
        bad = int(g.max()) if g.max() >= num_gt else int(g.min())
        raise ValueError(f"ground-truth label {bad} outside 0..{num_gt - 1} (ignore={ignore})")
    counts = np.bincount(p * num_gt + g, minlength=num_pred * num_gt)
    return counts.reshape(num_pred, num_gt).astype(np.int64)


def iou_matrix(conf: np.ndarray) -> np.ndarray:
    """IoU of every (predicted label, GT class) pair; 0 where both are empty."""
    conf = np.asarray(conf, dtype=np.float64)
    union = conf.sum(axis=1, keepdims=True) + conf.sum(axis=0, keepdims=True) - conf
    return np.divide(conf, union, out=np.zeros_like(conf), where=union > 0)


def match_clusters(conf: np.ndarray, mode: str = "iou") -> np.ndarray:
    """GT class of each predicted label: Hungarian one-to-one if num_pred <= num_gt, else majority.

    The Hungarian assignment maximises the total IoU (``mode="iou"``) or the total matched pixel
    count (``mode="confusion"``). With more predicted labels than GT classes (overclustering) each
    predicted label goes to the GT class it overlaps most (ties: lowest class id).
    """
    if mode not in MODES:
        raise ValueError(f"unknown matching mode {mode!r}; use one of {MODES}")
    conf = np.asarray(conf)
    if conf.ndim != 2 or conf.shape[0] == 0 or conf.shape[1] == 0:
        raise ValueError(f"confusion matrix must be 2-D and non-empty, got shape {conf.shape}")
    num_pred, num_gt = conf.shape
    if num_pred > num_gt:
        return conf.argmax(axis=1).astype(np.int64)
    score = iou_matrix(conf) if mode == "iou" else conf.astype(np.float64)
    rows, cols = linear_sum_assignment(score, maximize=True)
    mapping = np.full(num_pred, -1, dtype=np.int64)
    mapping[rows] = cols
    assert (mapping >= 0).all()  # num_pred <= num_gt: every predicted label is assigned
    return mapping


def miou_after_matching(
    conf: np.ndarray, mapping: np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
    """mIoU (0-100) over GT classes present in GT or prediction after mapping predicted labels.

    Returns {"miou", "per_class": {name: IoU or None when absent from both}, "pixel_accuracy",
    "mapping"}.
    """
    conf = np.asarray(conf, dtype=np.int64)
    mapping = np.asarray(mapping, dtype=np.int64)
    num_pred, num_gt = conf.shape
    if len(class_names) != num_gt:
        raise ValueError(f"{len(class_names)} class names for {num_gt} GT classes")
    if mapping.shape != (num_pred,) or (mapping < 0).any() or (mapping >= num_gt).any():
        raise ValueError(f"mapping must give a class in 0..{num_gt - 1} for each of {num_pred} "
                         f"predicted labels, got {mapping.tolist()}")
    total = int(conf.sum())
    if total == 0:
        raise ValueError("confusion matrix is empty: no labelled ground-truth pixels")
    merged = np.zeros((num_gt, num_gt), dtype=np.int64)
    np.add.at(merged, mapping, conf)  # rows: mapped prediction, cols: GT
    tp = np.diag(merged).astype(np.float64)
    pred_count = merged.sum(axis=1)
    gt_count = merged.sum(axis=0)
    union = pred_count + gt_count - tp
    present = union > 0
    per_class: dict[str, float | None] = {}
    for c, name in enumerate(class_names):
        per_class[str(name)] = float(100.0 * tp[c] / union[c]) if present[c] else None
    ious = [v for v in per_class.values() if v is not None]
    return {
        "miou": float(np.mean(ious)),
        "per_class": per_class,
        "pixel_accuracy": float(100.0 * tp.sum() / total),
        "mapping": [int(v) for v in mapping],
    }


# ---------------------------------------------------------------- ground truth from COCO


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


def _annotations_by_image(coco: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    index: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for ann in coco.get("annotations", []):
        index[int(ann["image_id"])].append(ann)
    return index


def _paste_semantic(
    anns: list[dict[str, Any]], to_label: dict[int, int], height: int, width: int, name: str
) -> np.ndarray:
    """Paste instances largest first (smaller ones end on top); crowd regions become ignore."""
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
    return _paste_semantic(anns, to_label, h, w, str(image_entry.get("file_name", image_id)))


def _gt_images(coco: dict[str, Any], gt_coco_path: Path) -> list[dict[str, Any]]:
    images = coco.get("images")
    if not images:
        raise ValueError(f"{gt_coco_path}: no images listed")
    for im in images:
        for field in ("id", "file_name", "height", "width"):
            if field not in im:
                raise ValueError(f"{gt_coco_path}: image entry {im} lacks '{field}'")
    return sorted(images, key=lambda im: key_of_file(im["file_name"]))


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
    index = _annotations_by_image(coco)
    images = {key_of_file(im["file_name"]): im for im in _gt_images(coco, gt_coco_path)}

    def load(key: str) -> np.ndarray:
        im = images[key]
        return _paste_semantic(index.get(int(im["id"]), []), to_label, int(im["height"]),
                               int(im["width"]), key)

    paths = {k: Path(images_root) / im["file_name"] for k, im in images.items()}
    return GroundTruth(tuple(images), tuple(names), load, paths, str(gt_coco_path))


def folder_ground_truth(gt_dir: Path, class_names: Sequence[str] = VOC_CLASSES,
                        image_paths: Mapping[str, Path] | None = None) -> GroundTruth:
    """Semantic ground truth from ``gt_dir/<key>.png`` label maps (searched recursively).

    Label ids index ``class_names`` (default: the 21 VOC classes); 255 is ignored. With
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


def _as_ground_truth(gt: Path | GroundTruth, images_root: Path) -> GroundTruth:
    return gt if isinstance(gt, GroundTruth) else coco_ground_truth(Path(gt), Path(images_root))


# ---------------------------------------------------------------- evaluating stages


def _read_prediction(pred_dir: Path, key: str, stage: str, shape: tuple[int, int]) -> np.ndarray:
    path = Path(pred_dir) / f"{key}.png"
    if not path.is_file():
        raise FileNotFoundError(f"stage '{stage}': prediction file missing: {path}")
    pred = read_label_png(path)
    if pred.shape != shape:
        raise ValueError(f"stage '{stage}': {path} is {pred.shape[0]}x{pred.shape[1]} but the "
                         f"ground truth of '{key}' is {shape[0]}x{shape[1]}")
    return pred


def _confusions(
    stages: dict[str, Path], gt: GroundTruth, num_pred: int
) -> tuple[dict[str, np.ndarray], list[str], int]:
    """One pass over the GT label maps accumulating a confusion matrix per stage."""
    names = list(gt.class_names)
    num_gt = len(names)
    confs = {s: np.zeros((num_pred, num_gt), dtype=np.int64) for s in stages}
    for key in gt.keys:
        labels = gt.load(key)
        for stage, pred_dir in stages.items():
            pred = _read_prediction(pred_dir, key, stage, labels.shape)
            try:
                confs[stage] += confusion_matrix(pred, labels, num_pred, num_gt)
            except ValueError as err:
                raise ValueError(f"stage '{stage}', {Path(pred_dir) / (key + '.png')} vs ground "
                                 f"truth '{key}' of {gt.source}: {err}") from err
    return confs, names, len(gt.keys)


def evaluate_stage(
    pred_dir: Path, gt_coco_path: Path | GroundTruth, gt_images_root: Path, num_pred: int,
    mode: str = "iou",
) -> tuple[dict[str, Any], np.ndarray]:
    """Hungarian-matched mIoU of one folder of predicted label PNGs over the whole GT split.

    ``gt_coco_path`` is a COCO instances file or a :class:`GroundTruth` (e.g. a label folder).
    """
    gt = _as_ground_truth(gt_coco_path, gt_images_root)
    confs, names, _ = _confusions({"stage": Path(pred_dir)}, gt, num_pred)
    mapping = match_clusters(confs["stage"], mode)
    return miou_after_matching(confs["stage"], mapping, names), mapping


def evaluate(
    stages: dict[str, Path],
    gt_coco_path: Path | GroundTruth,
    gt_images_root: Path,
    num_pred: int,
    out_metrics: Path,
    out_report: Path,
    out_figure: Path,
    notes: list[str],
    mode: str = "iou",
    max_figure_rows: int = 6,
    extras: Mapping[str, Path] | None = None,
    paper: str | None = None,
) -> dict[str, Any]:
    """Evaluate every stage, write metrics.json, a Markdown report and a figure; return metrics.

    ``gt_coco_path`` is a COCO instances file or a :class:`GroundTruth` (e.g. a label folder).
    ``extras`` names JSON results of other protocols (``mask_ap``, ``linear_probe``) copied into
    the metrics and the report; ``paper`` (``voc``, ``coco20k``) adds the published numbers beside
    this run's (any other value: the report says there is no paper reference).
    """
    if not stages:
        raise ValueError("no stages to evaluate")
    if mode not in MODES:
        raise ValueError(f"unknown matching mode {mode!r}; use one of {MODES}")
    gt = _as_ground_truth(gt_coco_path, gt_images_root)
    stage_dirs = {name: Path(d) for name, d in stages.items()}
    confs, names, num_images = _confusions(stage_dirs, gt, num_pred)
    metrics: dict[str, Any] = {}
    mappings: dict[str, np.ndarray] = {}
    for stage, conf in confs.items():
        mappings[stage] = match_clusters(conf, mode)
        metrics[stage] = miou_after_matching(conf, mappings[stage], names)
        log.info("%s: mIoU %.2f, pixel accuracy %.2f", stage, metrics[stage]["miou"],
                 metrics[stage]["pixel_accuracy"])
    matching = "hungarian" if num_pred <= len(names) else "majority_vote"
    metrics["meta"] = {
        "num_images": num_images,
        "num_pred": num_pred,
        "num_gt": len(names),
        "class_names": names,
        "matching": matching,
        "mode": mode,
        "ignore_label": IGNORE_LABEL,
        "ground_truth": gt.source,
        "predictions": {s: str(d) for s, d in stage_dirs.items()},
        "notes": list(notes),
        "paper": paper if paper in PAPER_REFERENCE else None,
    }
    for name, path in (extras or {}).items():
        if name in metrics:
            raise ValueError(f"extra result '{name}' clashes with a stage name")
        metrics[name] = read_json(path)
    rows = list(gt.keys[: max(0, max_figure_rows)])
    _write_figure(out_figure, rows, gt, stage_dirs, mappings, names)
    write_json(out_metrics, metrics)
    _write_report(out_report, out_figure, metrics, list(confs), names, notes)
    return metrics


# ---------------------------------------------------------------- report and figure


def palette(n: int = 256) -> np.ndarray:
    """Fixed (n, 3) uint8 colour table (PASCAL VOC bit pattern); index 255 is white (ignore)."""
    colours = np.zeros((max(n, 256), 3), dtype=np.uint8)
    for i in range(colours.shape[0]):
        c, r, g, b = i, 0, 0, 0
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        colours[i] = (r, g, b)
    colours[IGNORE_LABEL] = (255, 255, 255)
    return colours


def colourise(labels: np.ndarray, mapping: np.ndarray | None = None) -> np.ndarray:
    """Label map -> RGB; predicted labels go through ``mapping`` first; 255 stays white."""
    labels = np.asarray(labels)
    out = labels.astype(np.int64)
    if mapping is not None:
        lut = np.full(256, IGNORE_LABEL, dtype=np.int64)
        m = np.asarray(mapping, dtype=np.int64)[:256]
        lut[: len(m)] = m
        out = lut[out]
    return palette()[out]


def draw_panel_row(axes_row: Sequence[Any], panels: Sequence[np.ndarray], key: str,
                   titles: Sequence[str] | None = None, title_size: int = 10) -> None:
    """One figure row: each panel without ticks, the image key on the left, titles if given."""
    for c, panel in enumerate(panels):
        ax = axes_row[c]
        ax.imshow(panel, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if titles is not None:
            ax.set_title(titles[c], fontsize=title_size)
        if c == 0:
            ax.set_ylabel(key, fontsize=7)


def _write_figure(
    out_figure: Path,
    rows: list[str],
    gt: GroundTruth,
    stage_dirs: dict[str, Path],
    mappings: dict[str, np.ndarray],
    names: list[str],
) -> None:
    """Grid: one row per image; columns image, ground truth, then each stage recoloured."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from maskdistill.images import read_rgb

    titles = ["image", "ground truth"] + list(stage_dirs)
    ncols, nrows = len(titles), max(1, len(rows))
    fig = Figure(figsize=(2.6 * ncols, 2.3 * nrows + 0.8), dpi=100)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    seen: set[int] = set()
    for r, key in enumerate(rows):
        labels = gt.load(key)
        seen.update(int(v) for v in np.unique(labels) if v != IGNORE_LABEL)
        if key in gt.image_paths:
            image = read_rgb(gt.image_paths[key])
        else:  # no image known for this key: a grey panel
            image = np.full(labels.shape + (3,), 128, dtype=np.uint8)
        panels = [image, colourise(labels)]
        for stage, d in stage_dirs.items():
            pred = _read_prediction(d, key, stage, labels.shape)
            panels.append(colourise(pred, mappings[stage]))
            seen.update(int(mappings[stage][v]) for v in np.unique(pred))
        draw_panel_row(axes[r], panels, key, titles if r == 0 else None)
    for ax in axes.ravel()[len(rows) * ncols:]:
        ax.axis("off")
    pal = palette() / 255.0
    handles = [Patch(color=pal[c], label=names[c]) for c in sorted(seen) if c < len(names)]
    handles.append(Patch(facecolor="white", edgecolor="black", label="ignore"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=7,
               frameon=False)
    fig.tight_layout(rect=(0, 0.8 / (2.3 * nrows + 0.8), 1, 1))
    with atomic_path(out_figure, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, format="png")


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _lookup(metrics: dict[str, Any], sources: Sequence[str]) -> tuple[float | None, str]:
    """This run's value for a paper row: the first source present (stage mIoU or a dotted path)."""
    for src in sources:
        if src in metrics and isinstance(metrics[src], dict) and "miou" in metrics[src]:
            return float(metrics[src]["miou"]), src
        node: Any = metrics
        for part in src.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, (int, float)) and node is not None and node >= 0:
            return float(node), src
    return None, ""


def paper_comparison(metrics: dict[str, Any], paper: str | None) -> list[str]:
    """Markdown lines: this run beside the published numbers, or a line saying there are none."""
    lines = ["## Compared with the paper", ""]
    if paper not in PAPER_REFERENCE:
        return lines + ["No paper reference for this dataset (the paper reports PASCAL VOC 2012 val "
                        "and COCO20k); the numbers below stand alone.", ""]
    lines += [f"MaskDistill's published numbers on {'PASCAL VOC 2012 val' if paper == 'voc' else 'COCO20k'}"
              " (DINO ViT-S, MoCo-initialised ResNet-50) beside this run's. `-`: not computed in this "
              "run (enable it in the config).", "",
              "| metric | this run | paper | difference | from |", "|---|---:|---:|---:|---|"]
    for label, ref, sources in PAPER_REFERENCE[paper]:
        value, src = _lookup(metrics, sources)
        diff = "-" if value is None else f"{value - ref:+.1f}"
        lines.append(f"| {label} | {_fmt(value)} | {ref:.1f} | {diff} | {src or '-'} |")
    return lines + [""]


def _paper_class_columns(names: list[str], paper: str | None) -> dict[str, tuple[float, ...]]:
    """Paper per-class columns when the classes are VOC's 21 in id order, else none."""
    if paper != "voc" or [n.lower() for n in names] != list(VOC_CLASSES):
        return {}
    return {"paper clustering": PAPER_VOC_PER_CLASS["clustering"],
            "paper clustering+CRF": PAPER_VOC_PER_CLASS["clustering+crf"],
            "paper linear": PAPER_VOC_PER_CLASS["linear"]}


def _extra_lines(metrics: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    lp = metrics.get("linear_probe")
    if isinstance(lp, dict) and "miou" in lp:
        lines += ["## Linear probe", "",
                  f"A 1x1 classifier trained on ground-truth labels over the frozen segmentation model "
                  f"({lp.get('epochs', '?')} epochs, {lp.get('num_train_images', '?')} training images): "
                  f"mIoU {lp['miou']:.1f}"
                  + (f", with CRF {lp['miou_crf']:.1f}" if lp.get("miou_crf") is not None else "")
                  + " (no matching: the classifier predicts ground-truth classes).", ""]
    ap = metrics.get("mask_ap")
    if isinstance(ap, dict):
        lines += ["## Mask AP", "",
                  "COCO mask AP (pycocotools `segm`, class-aware after Hungarian matching of clusters "
                  "to classes).", "", "| setting | AP | AP50 | AP75 | matched classes |",
                  "|---|---:|---:|---:|---:|"]
        for setting in ("multi", "single"):
            r = ap.get(setting)
            if isinstance(r, dict):
                lines.append(f"| {setting} object | {_fmt(r.get('AP'))} | {_fmt(r.get('AP50'))} | "
                             f"{_fmt(r.get('AP75'))} | {r.get('num_matched', '-')} |")
        lines.append("")
    quality = metrics.get("mask_quality")
    if isinstance(quality, dict) and "mask_iou" in quality:
        lines += ["## Mined masks (class-agnostic)", "",
                  f"Over {quality['images']} images with objects: mean IoU of each mined mask with its "
                  f"best-matching ground-truth object **{quality['mask_iou']:.1f}**, CorLoc (mined box "
                  f"IoU >= 0.5 with some object) **{quality['corloc']:.1f}**"
                  + (f"; {quality['missing']} images had no mined mask." if quality.get("missing") else "."),
                  ""]
        bounds = quality.get("label_bounds")
        if isinstance(bounds, dict):
            lines += [f"Pasted as the initial_masks stage pastes them, the same masks score mIoU "
                      f"**{bounds['oracle_miou']:.1f}** with oracle labels (the ground-truth category "
                      f"under each mask: the ceiling set by mask quality) and "
                      f"**{bounds['random_miou']:.1f}** ± {bounds['random_miou_std']:.1f} with random "
                      f"labels among {bounds['num_clusters']} clusters (what clustering scores when it "
                      "ignores the category).", ""]
    return lines


def _write_report(
    out_report: Path,
    out_figure: Path,
    metrics: dict[str, Any],
    stages: list[str],
    names: list[str],
    notes: list[str],
) -> None:
    meta = metrics["meta"]
    paper = meta.get("paper")
    lines = [
        "# MaskDistill evaluation",
        "",
        f"Clustering evaluation on {meta['num_images']} validation images: {meta['num_pred']} "
        f"predicted labels matched to {meta['num_gt']} ground-truth classes by "
        f"{'the Hungarian algorithm' if meta['matching'] == 'hungarian' else 'majority vote'}"
        f" (criterion: {meta['mode']}); ignore label {IGNORE_LABEL} skipped. Values in %.",
        "",
    ]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += paper_comparison(metrics, paper)
    lines += ["## mIoU per stage", "", "| stage | mIoU | pixel accuracy |", "|---|---:|---:|"]
    lines += [f"| {s} | {metrics[s]['miou']:.1f} | {metrics[s]['pixel_accuracy']:.1f} |"
              for s in stages]
    lines += [""] + _extra_lines(metrics)
    paper_cols = _paper_class_columns(names, paper)
    lp = metrics.get("linear_probe")
    lp_cls = lp.get("per_class") if isinstance(lp, dict) else None
    cols = list(stages) + (["linear_probe"] if isinstance(lp_cls, dict) else []) + list(paper_cols)
    lines += ["## IoU per class", "", "| class | " + " | ".join(cols) + " |",
              "|---|" + "---:|" * len(cols)]
    for c, name in enumerate(names):
        cells = [_fmt(metrics[s]["per_class"][name]) for s in stages]
        if isinstance(lp_cls, dict):
            cells.append(_fmt(lp_cls.get(name)))
        cells += [_fmt(col[c]) for col in paper_cols.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    rel = Path(os.path.relpath(Path(out_figure).resolve(), Path(out_report).resolve().parent))
    lines += ["", "## Examples", "",
              "Columns: image, ground truth, then each stage with its predicted labels recoloured "
              "by its matching, so colours mean ground-truth classes (white = ignore).", "",
              f"![examples]({rel.as_posix()})", ""]
    with atomic_path(out_report) as tmp:
        tmp.write_text("\n".join(lines))
