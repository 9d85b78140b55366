"""Stage 5: clustering evaluation (Hungarian-matched mIoU) of each stage, with a report and a figure.

Predicted label maps hold cluster ids (0 = background, 1..K = clusters); they are matched to the
ground-truth classes (0 = background, 1..C = categories in sorted category-id order) one-to-one by
the Hungarian algorithm, or by majority vote when there are more clusters than classes.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from maskdistill.storage import (
    IGNORE_LABEL,
    atomic_path,
    decode_segmentation,
    read_json,
    read_label_png,
    write_json,
)

log = logging.getLogger("maskdistill")

MODES = ("iou", "confusion")
BACKGROUND_NAME = "background"


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


def _key(file_name: str) -> str:
    return Path(file_name).as_posix().rsplit(".", 1)[0]


def _gt_images(coco: dict[str, Any], gt_coco_path: Path) -> list[dict[str, Any]]:
    images = coco.get("images")
    if not images:
        raise ValueError(f"{gt_coco_path}: no images listed")
    for im in images:
        for field in ("id", "file_name", "height", "width"):
            if field not in im:
                raise ValueError(f"{gt_coco_path}: image entry {im} lacks '{field}'")
    return sorted(images, key=lambda im: _key(im["file_name"]))


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
    stages: dict[str, Path], coco: dict[str, Any], gt_coco_path: Path, num_pred: int
) -> tuple[dict[str, np.ndarray], list[str], int]:
    """One pass over the GT images accumulating a confusion matrix per stage."""
    to_label, names = category_labels(coco)
    num_gt = len(names)
    index = _annotations_by_image(coco)
    confs = {s: np.zeros((num_pred, num_gt), dtype=np.int64) for s in stages}
    images = _gt_images(coco, gt_coco_path)
    for im in images:
        key = _key(im["file_name"])
        gt = _paste_semantic(index.get(int(im["id"]), []), to_label, int(im["height"]),
                             int(im["width"]), key)
        for stage, pred_dir in stages.items():
            pred = _read_prediction(pred_dir, key, stage, gt.shape)
            try:
                confs[stage] += confusion_matrix(pred, gt, num_pred, num_gt)
            except ValueError as err:
                raise ValueError(f"stage '{stage}', {Path(pred_dir) / (key + '.png')}: {err}") \
                    from err
    return confs, names, len(images)


def evaluate_stage(
    pred_dir: Path, gt_coco_path: Path, gt_images_root: Path, num_pred: int, mode: str = "iou"
) -> tuple[dict[str, Any], np.ndarray]:
    """Hungarian-matched mIoU of one folder of predicted label PNGs over the whole GT split."""
    coco = read_json(gt_coco_path)
    confs, names, _ = _confusions({"stage": Path(pred_dir)}, coco, Path(gt_coco_path), num_pred)
    mapping = match_clusters(confs["stage"], mode)
    return miou_after_matching(confs["stage"], mapping, names), mapping


def evaluate(
    stages: dict[str, Path],
    gt_coco_path: Path,
    gt_images_root: Path,
    num_pred: int,
    out_metrics: Path,
    out_report: Path,
    out_figure: Path,
    notes: list[str],
    mode: str = "iou",
    max_figure_rows: int = 6,
) -> dict[str, Any]:
    """Evaluate every stage, write metrics.json, a Markdown report and a figure; return metrics."""
    if not stages:
        raise ValueError("no stages to evaluate")
    if mode not in MODES:
        raise ValueError(f"unknown matching mode {mode!r}; use one of {MODES}")
    coco = read_json(gt_coco_path)
    stage_dirs = {name: Path(d) for name, d in stages.items()}
    confs, names, num_images = _confusions(stage_dirs, coco, Path(gt_coco_path), num_pred)
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
        "ground_truth": str(gt_coco_path),
        "predictions": {s: str(d) for s, d in stage_dirs.items()},
        "notes": list(notes),
    }
    rows = _gt_images(coco, Path(gt_coco_path))[: max(0, max_figure_rows)]
    _write_figure(out_figure, rows, coco, Path(gt_images_root), stage_dirs, mappings, names)
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


def _write_figure(
    out_figure: Path,
    rows: list[dict[str, Any]],
    coco: dict[str, Any],
    images_root: Path,
    stage_dirs: dict[str, Path],
    mappings: dict[str, np.ndarray],
    names: list[str],
) -> None:
    """Grid: one row per image; columns image, ground truth, then each stage recoloured."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from maskdistill.images import read_rgb

    to_label, _ = category_labels(coco)
    index = _annotations_by_image(coco)
    titles = ["image", "ground truth"] + list(stage_dirs)
    ncols, nrows = len(titles), max(1, len(rows))
    fig = Figure(figsize=(2.6 * ncols, 2.3 * nrows + 0.8), dpi=100)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    seen: set[int] = set()
    for r, im in enumerate(rows):
        key = _key(im["file_name"])
        gt = _paste_semantic(index.get(int(im["id"]), []), to_label, int(im["height"]),
                             int(im["width"]), key)
        seen.update(int(v) for v in np.unique(gt) if v != IGNORE_LABEL)
        panels = [read_rgb(images_root / im["file_name"]), colourise(gt)]
        for stage, d in stage_dirs.items():
            pred = _read_prediction(d, key, stage, gt.shape)
            panels.append(colourise(pred, mappings[stage]))
            seen.update(int(mappings[stage][v]) for v in np.unique(pred))
        for c, panel in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=10)
            if c == 0:
                ax.set_ylabel(key, fontsize=7)
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


def _write_report(
    out_report: Path,
    out_figure: Path,
    metrics: dict[str, Any],
    stages: list[str],
    names: list[str],
    notes: list[str],
) -> None:
    meta = metrics["meta"]
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
    lines += ["## mIoU per stage", "", "| stage | mIoU | pixel accuracy |", "|---|---:|---:|"]
    lines += [f"| {s} | {metrics[s]['miou']:.1f} | {metrics[s]['pixel_accuracy']:.1f} |"
              for s in stages]
    lines += ["", "## IoU per class", "", "| class | " + " | ".join(stages) + " |",
              "|---|" + "---:|" * len(stages)]
    for name in names:
        lines.append(f"| {name} | "
                     + " | ".join(_fmt(metrics[s]["per_class"][name]) for s in stages) + " |")
    rel = Path(os.path.relpath(Path(out_figure).resolve(), Path(out_report).resolve().parent))
    lines += ["", "## Examples", "",
              "Columns: image, ground truth, then each stage with its predicted labels recoloured "
              "by its matching, so colours mean ground-truth classes (white = ignore).", "",
              f"![examples]({rel.as_posix()})", ""]
    with atomic_path(out_report) as tmp:
        tmp.write_text("\n".join(lines))
