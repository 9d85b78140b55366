"""Class-aware mask AP / AP50 of instance predictions (COCO ``segm``) after Hungarian matching.

Predictions carry cluster ids (``category_id`` 1..K) and scores. Clusters are matched to the
ground-truth categories by the Hungarian algorithm on the split-level mask IoU between clusters and
classes: each image's predictions are pasted into a label map (most confident mask wins a pixel,
as the pseudo-labels are pasted), the ground-truth instances into a semantic map (crowd = ignore),
and IoU[k, c] = |cluster k ∩ class c| / |cluster k ∪ class c| summed over the split (background
pixels count in the unions but background is not matched). The assignment maximises the total IoU,
one-to-one when K <= C; with more clusters than classes each cluster takes its best class
(majority). Then pycocotools' COCOeval (``iouType="segm"``) scores the relabelled predictions.

Settings:

- ``multi``: every prediction against every ground-truth object.
- ``single``: per image only the most confident prediction, against the one ground-truth object
  (non-crowd) whose box has the largest IoU with the prediction's box (ties: the larger object);
  other ground-truth objects of that image are dropped. An image without a prediction keeps its
  largest object as a miss (rule ``ours``) or is skipped (rule ``reference``, the authors').

Memory does not grow with the number of predictions: the predictions file is streamed image by
image (:func:`maskdistill.storage.annotation_groups`), twice (the matching, then AP), and AP is
accumulated over chunks of images (:class:`SegmAccumulator`), keeping per detection only its
score and whether it matched at each IoU threshold. The numbers are pycocotools' own.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maskdistill.ground_truth import (
    annotations_by_image,
    category_labels,
    check_image_entries,
    paste_semantic,
)
from maskdistill.metrics import confusion_matrix, hungarian, iou_matrix
from maskdistill.storage import (
    IGNORE_LABEL,
    annotation_groups,
    box_iou,
    decode_segmentation,
    iter_json_items,
    json_top_level,
    key_of_file,
    read_json,
)
from maskdistill.training import progress

log = logging.getLogger("maskdistill")

SETTINGS = ("multi", "single")
SINGLE_OBJECT_RULES = ("reference", "ours")  # evaluation.single_object
CHUNK_IMAGES = 500  # images matched at once by pycocotools


# ---------------------------------------------------------------- reading


def _checked(predictions: Path, ann: dict[str, Any], image_id: int) -> dict[str, Any]:
    """A prediction checked for its fields and cluster id, with ``image_id`` set to the GT's."""
    name = f"{predictions}: prediction {ann.get('id', '?')} of image {ann.get('image_id')}"
    for key in ("image_id", "category_id", "score", "segmentation"):
        if key not in ann:
            raise ValueError(f"{name} lacks '{key}'")
    if int(ann["category_id"]) < 1:
        raise ValueError(f"{name} has cluster id {ann['category_id']}; clusters are 1..K")
    return dict(ann, image_id=image_id)


def _has_top_level_key(path: Path, key: str) -> bool:
    """Whether the JSON object in ``path`` has ``key`` at its top level (streamed)."""
    import ijson

    with open(path, "rb") as f:
        return any(prefix == "" and event == "map_key" and value == key
                   for prefix, event, value in ijson.parse(f))


def prediction_groups(predictions: Path, gt: dict[str, Any]) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """Each GT image id with its predictions (file order), streamed from the predictions file.

    Accepts a COCO results list, or a dict with ``annotations`` (and optionally ``images``, whose
    file names are then matched to the GT's by key, so differing ids do not matter). Predictions of
    images outside the ground truth are left out (e.g. predictions for a larger split).
    """
    predictions = Path(predictions)
    top = json_top_level(predictions)
    remap: dict[int, int] | None = None
    if top == "dict":
        images = list(iter_json_items(predictions, "images.item"))
        if images:
            by_key = {key_of_file(im["file_name"]): int(im["id"]) for im in gt["images"]}
            remap = {int(im["id"]): by_key[key_of_file(im["file_name"])] for im in images
                     if key_of_file(im["file_name"]) in by_key}
    gt_ids = {int(im["id"]) for im in gt["images"]}
    seen = False
    for raw_id, anns in annotation_groups(predictions, "item" if top == "list" else "annotations.item"):
        seen = True
        image_id = int(raw_id)
        image_id = remap.get(image_id, -1) if remap is not None else image_id
        if image_id in gt_ids:
            yield image_id, [_checked(predictions, a, image_id) for a in anns]
    if top == "dict" and not seen and not _has_top_level_key(predictions, "annotations"):
        raise ValueError(f"{predictions}: neither a COCO results list nor a dict with 'annotations'")


def load_predictions(predictions: Path, gt: dict[str, Any]) -> list[dict[str, Any]]:
    """Every prediction of :func:`prediction_groups`, in one list (all in memory)."""
    return [p for _, preds in prediction_groups(predictions, gt) for p in preds]


# ---------------------------------------------------------------- single-object selection


def annotation_box(ann: dict[str, Any], h: int, w: int) -> np.ndarray:
    """x0, y0, x1, y1 of an annotation (its bbox, else its mask's extent)."""
    if "bbox" in ann:
        x, y, bw, bh = (float(v) for v in ann["bbox"])
        return np.array([x, y, x + bw, y + bh])
    m = decode_segmentation(ann["segmentation"], h, w)
    ys, xs = np.nonzero(m)
    if ys.size == 0:
        return np.zeros(4)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=float)


def single_object(image: dict[str, Any], gt_anns: list[dict[str, Any]], preds: list[dict[str, Any]],
                  rule: str = "ours") -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The single-object setting of one image: its most confident prediction (the first of equal
    scores) and the non-crowd GT object of largest box IoU with it (ties: the larger object); no GT
    object when the image has none. Without a prediction, ``rule`` ``ours`` keeps the largest
    object (a miss) and ``reference`` (the authors') skips the image: nothing is kept."""
    best: dict[str, Any] | None = None
    for p in preds:
        if best is None or float(p["score"]) > float(best["score"]):
            best = p
    objects = [a for a in gt_anns if not a.get("iscrowd", 0)]
    if not objects:
        return [], [best] if best else []
    h, w = int(image["height"]), int(image["width"])
    if best is None:  # no prediction: ours keeps the largest object as a miss, the reference skips
        return ([max(objects, key=lambda a: float(a.get("area", 0)))], []) if rule == "ours" else ([], [])
    pbox = annotation_box(best, h, w)
    scored = [(box_iou(pbox, annotation_box(a, h, w)), float(a.get("area", 0)), a) for a in objects]
    return [max(scored, key=lambda t: (t[0], t[1]))[2]], [best]


def select_single(gt: dict[str, Any], preds: list[dict[str, Any]], rule: str = "ours"
                  ) -> tuple[dict[str, Any], list]:
    """The single-object setting of a whole split: top prediction per image, GT object of largest
    box IoU (:func:`single_object` under ``rule``); the GT keeps every image."""
    index = annotations_by_image(gt)
    by_image: dict[int, list[dict[str, Any]]] = {}
    for p in preds:
        by_image.setdefault(int(p["image_id"]), []).append(p)
    kept, best = [], []
    for im in gt["images"]:
        objects, top = single_object(im, index.get(int(im["id"]), []), by_image.get(int(im["id"]), []), rule)
        kept += objects
        best += top
    return dict(gt, annotations=kept), sorted(best, key=lambda p: p["image_id"])


# ---------------------------------------------------------------- matching


def _pasted(preds: list[dict[str, Any]], h: int, w: int) -> np.ndarray:
    """Cluster label map of one image's predictions, most confident first (no overwrite)."""
    labels = np.zeros((h, w), dtype=np.int64)
    for p in sorted(preds, key=lambda p: -float(p["score"])):
        m = decode_segmentation(p["segmentation"], h, w) & (labels == 0)
        labels[m] = int(p["category_id"])
    return labels


def image_confusion(image: dict[str, Any], gt_anns: list[dict[str, Any]], preds: list[dict[str, Any]],
                    to_label: dict[int, int], num_classes: int, num_clusters: int) -> np.ndarray:
    """Pixel counts (K+1, C+1) of one image's pasted predictions vs its GT semantic map."""
    h, w = int(image["height"]), int(image["width"])
    sem = paste_semantic(gt_anns, to_label, h, w, str(image["file_name"]))
    return confusion_matrix(_pasted(preds, h, w), sem, num_clusters + 1, num_classes, IGNORE_LABEL)


def cluster_class_confusion(gt: dict[str, Any], preds: list[dict[str, Any]], num_clusters: int
                            ) -> np.ndarray:
    """Pixel counts (K+1, C+1) of pasted predictions vs the GT semantic maps over the split."""
    to_label, names = category_labels(gt)
    index = annotations_by_image(gt)
    by_image: dict[int, list[dict[str, Any]]] = {}
    for p in preds:
        by_image.setdefault(p["image_id"], []).append(p)
    conf = np.zeros((num_clusters + 1, len(names)), dtype=np.int64)
    for im in gt["images"]:
        conf += image_confusion(im, index.get(int(im["id"]), []), by_image.get(int(im["id"]), []), to_label,
                                len(names), num_clusters)
    return conf


def match_to_categories(conf: np.ndarray) -> np.ndarray:
    """GT class index (1..C) of each cluster 1..K (index 0 unused, -1) from a (K+1, C+1) confusion."""
    score = iou_matrix(conf)[1:, 1:]
    k, c = score.shape
    mapping = np.full(k + 1, -1, dtype=np.int64)
    if k > c:
        mapping[1:] = score.argmax(axis=1) + 1
    else:
        matched = hungarian(score)
        mapping[1:] = np.where(matched >= 0, matched + 1, -1)
    return mapping


# ---------------------------------------------------------------- AP


@dataclass
class _Detections:
    """One category's detections over the images seen so far, compactly: the image id, the score,
    and per IoU threshold whether it matched a GT object and whether it is ignored."""

    image_ids: list[np.ndarray] = field(default_factory=list)
    scores: list[np.ndarray] = field(default_factory=list)
    matched: list[np.ndarray] = field(default_factory=list)  # (T, D) bool
    ignored: list[np.ndarray] = field(default_factory=list)  # (T, D) bool
    num_gt: int = 0  # GT objects not ignored
    images: int = 0  # images with a GT object or a detection of this category


class SegmAccumulator:
    """COCO ``segm`` AP, AP50, AP75 accumulated over chunks of images, equal to pycocotools' COCOeval
    on all images at once.

    :meth:`add` runs pycocotools' per-image matching (``evaluate``) on a chunk of images and keeps,
    per category, each detection's score and whether it matched / is ignored at each IoU threshold
    (area range ``all``, at most 100 detections per image and category: what AP, AP50 and AP75
    read); :meth:`stats` then does what ``accumulate`` and ``summarize`` do, with the detections
    in pycocotools' order (image id, then score within an image).
    """

    def __init__(self, categories: list[dict[str, Any]]):
        from pycocotools.cocoeval import Params

        self.categories = [dict(c) for c in categories]
        self.cat_ids = sorted({int(c["id"]) for c in categories})
        self.params = Params(iouType="segm")
        self.max_det = self.params.maxDets[-1]
        self.per_cat = {c: _Detections() for c in self.cat_ids}
        self.num_results = 0
        self._next_gt_id = 1

    def add(self, images: list[dict[str, Any]], gt_anns: list[dict[str, Any]],
            results: list[dict[str, Any]]) -> None:
        """Match one chunk: its image entries, their GT annotations and results (``image_id``,
        ``category_id``, ``score``, ``segmentation``) of those images only."""
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        if not images:
            return
        sizes = {int(im["id"]): (int(im["height"]), int(im["width"])) for im in images}
        anns = []
        for a in gt_anns:
            ann = dict(a, id=self._next_gt_id, iscrowd=a.get("iscrowd", 0))  # ids unique and >= 1
            self._next_gt_id += 1
            if "area" not in ann:
                h, w = sizes[int(ann["image_id"])]
                ann["area"] = float(decode_segmentation(ann["segmentation"], h, w).sum())
            anns.append(ann)
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO()
            coco_gt.dataset = {"images": [dict(im) for im in images], "annotations": anns,
                               "categories": self.categories, "info": {}, "licenses": []}
            coco_gt.createIndex()
            dets = [{k: r[k] for k in ("image_id", "category_id", "score", "segmentation")} for r in results]
            if dets:
                coco_dt = coco_gt.loadRes(dets)
            else:  # pycocotools cannot load an empty result list
                coco_dt = COCO()
                coco_dt.dataset = dict(coco_gt.dataset, annotations=[])
                coco_dt.createIndex()
            ev = COCOeval(coco_gt, coco_dt, iouType="segm")
            ev.params.areaRng, ev.params.areaRngLbl = [self.params.areaRng[0]], ["all"]
            ev.params.catIds = self.cat_ids
            ev.evaluate()
        self.num_results += len(dets)
        chunk: dict[int, _Detections] = {}
        for e in ev.evalImgs:
            if e is None:
                continue
            acc = chunk.setdefault(int(e["category_id"]), _Detections())
            scores = np.asarray(e["dtScores"][:self.max_det], dtype=np.float64)
            acc.image_ids.append(np.full(len(scores), int(e["image_id"]), dtype=np.int64))
            acc.scores.append(scores)
            acc.matched.append(np.asarray(e["dtMatches"])[:, :self.max_det] > 0)
            acc.ignored.append(np.asarray(e["dtIgnore"], dtype=bool)[:, :self.max_det])
            acc.num_gt += int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
            acc.images += 1
        for cat, acc in chunk.items():  # one array per chunk and category: ~36 bytes per detection
            total = self.per_cat[cat]
            total.image_ids.append(np.concatenate(acc.image_ids))
            total.scores.append(np.concatenate(acc.scores))
            total.matched.append(np.concatenate(acc.matched, axis=1))
            total.ignored.append(np.concatenate(acc.ignored, axis=1))
            total.num_gt += acc.num_gt
            total.images += acc.images

    def precision(self) -> np.ndarray:
        """(T, R, K) interpolated precision at each IoU threshold, recall threshold and category;
        -1 where a category has no GT object (as pycocotools' ``accumulate``)."""
        p = self.params
        num_t, num_r = len(p.iouThrs), len(p.recThrs)
        precision = -np.ones((num_t, num_r, len(self.cat_ids)))
        for k, cat in enumerate(self.cat_ids):
            acc = self.per_cat[cat]
            if not acc.images or acc.num_gt == 0:
                continue
            image_order = np.argsort(np.concatenate(acc.image_ids), kind="stable")
            scores = np.concatenate(acc.scores)[image_order]
            inds = np.argsort(-scores, kind="mergesort")
            dtm = np.concatenate(acc.matched, axis=1)[:, image_order][:, inds]
            dt_ig = np.concatenate(acc.ignored, axis=1)[:, image_order][:, inds]
            tps = np.logical_and(dtm, np.logical_not(dt_ig))
            fps = np.logical_and(np.logical_not(dtm), np.logical_not(dt_ig))
            tp_sum = np.cumsum(tps, axis=1).astype(float)
            fp_sum = np.cumsum(fps, axis=1).astype(float)
            for t, (tp, fp) in enumerate(zip(tp_sum, fp_sum, strict=True)):
                nd = len(tp)
                rc = tp / acc.num_gt
                pr = (tp / (fp + tp + np.spacing(1))).tolist()
                q = np.zeros((num_r,)).tolist()
                for i in range(nd - 1, 0, -1):  # precision made monotone, as pycocotools does
                    if pr[i] > pr[i - 1]:
                        pr[i - 1] = pr[i]
                for ri, pi in enumerate(np.searchsorted(rc, p.recThrs, side="left")):
                    if pi >= nd:
                        break
                    q[ri] = pr[pi]
                precision[t, :, k] = np.array(q)
        return precision

    def stats(self) -> dict[str, float]:
        """AP, AP50, AP75 (0-100; -1 when undefined); all 0 when there were no results."""
        if not self.num_results:
            return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
        precision = self.precision()
        thresholds = self.params.iouThrs

        def mean(iou: float | None) -> float:
            s = precision if iou is None else precision[np.where(iou == thresholds)[0]]
            valid = s[s > -1]
            return float(100.0 * np.mean(valid)) if len(valid) else -1.0

        return {"AP": mean(None), "AP50": mean(0.5), "AP75": mean(0.75)}


def coco_segm_stats(gt: dict[str, Any], results: list[dict[str, Any]], chunk_images: int = CHUNK_IMAGES
                    ) -> dict[str, float]:
    """AP, AP50, AP75 (0-100; -1 when undefined) of COCO results with pycocotools ``segm``, matched
    ``chunk_images`` images at a time (:class:`SegmAccumulator`)."""
    acc = SegmAccumulator(gt["categories"])
    index = annotations_by_image(gt)
    by_image: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        by_image.setdefault(int(r["image_id"]), []).append(r)
    images = gt["images"]
    for lo in range(0, len(images), chunk_images):
        chunk = images[lo:lo + chunk_images]
        ids = [int(im["id"]) for im in chunk]
        acc.add(chunk, [a for i in ids for a in index.get(i, [])],
                [r for i in ids for r in by_image.get(i, [])])
    return acc.stats()


def mask_ap(gt_instances: Path, predictions: Path, setting: str = "multi",
            chunk_images: int = CHUNK_IMAGES, single_rule: str = "ours") -> dict[str, Any]:
    """Class-aware mask AP / AP50 / AP75 (0-100) of cluster predictions after Hungarian matching.

    The predictions are streamed twice (the matching, then AP over chunks of ``chunk_images``
    images); ``single_rule`` is the single-object rule (:func:`single_object`). Returns ``{"AP",
    "AP50", "AP75", "setting", "single_object" (single only), "mapping" {cluster id: GT category
    id}, "num_images", "num_predictions", "num_gt_objects", "num_matched"}``.
    """
    if setting not in SETTINGS:
        raise ValueError(f"unknown mask AP setting {setting!r}; use one of {SETTINGS}")
    if single_rule not in SINGLE_OBJECT_RULES:
        raise ValueError(f"unknown single-object rule {single_rule!r} (evaluation.single_object); "
                         f"use one of {SINGLE_OBJECT_RULES}")
    gt = read_json(gt_instances)
    if not gt.get("images") or not gt.get("categories"):
        raise ValueError(f"{gt_instances}: a COCO instances file needs 'images' and 'categories'")
    images = {int(im["id"]): im for im in check_image_entries(gt, gt_instances)}
    index = annotations_by_image(gt)

    def cases() -> Iterator[tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]]:
        """Each GT image with the GT objects and predictions the setting scores (images with
        predictions first, in the predictions file's order, then the others)."""
        seen: set[int] = set()
        for image_id, preds in prediction_groups(Path(predictions), gt):
            seen.add(image_id)
            yield case(images[image_id], preds)
        for image_id, im in images.items():
            if image_id not in seen:
                yield case(im, [])

    def case(im: dict[str, Any], preds: list[dict[str, Any]]):
        objects = index.get(int(im["id"]), [])
        if setting == "single":
            return (im, *single_object(im, objects, preds, single_rule))
        return im, objects, preds

    to_label, names = category_labels(gt)
    conf = np.zeros((1, len(names)), dtype=np.int64)
    num_gt_objects = 0
    for im, objects, preds in progress(cases(), total=len(images), desc=f"{setting}: matching"):
        k = max([len(conf) - 1, *(int(p["category_id"]) for p in preds)])
        if k >= len(conf):  # a larger cluster id: more rows (counts are exact integers)
            conf = np.vstack([conf, np.zeros((k + 1 - len(conf), len(names)), dtype=np.int64)])
        conf += image_confusion(im, objects, preds, to_label, len(names), k)
        num_gt_objects += sum(1 for a in objects if not a.get("iscrowd", 0))
    num_clusters = len(conf) - 1
    cats = sorted(int(c["id"]) for c in gt["categories"])
    mapping: dict[int, int] = {}
    if num_clusters:
        label_of = match_to_categories(conf)
        mapping = {k: cats[int(label_of[k]) - 1] for k in range(1, num_clusters + 1) if label_of[k] >= 1}
    acc = SegmAccumulator(gt["categories"])
    chunk: list[tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]] = []
    for item in progress(cases(), total=len(images), desc=f"{setting}: AP"):
        chunk.append(item)
        if len(chunk) == chunk_images:
            _add_chunk(acc, chunk, mapping)
            chunk = []
    _add_chunk(acc, chunk, mapping)
    stats = acc.stats()
    out = {**stats, "setting": setting, **({"single_object": single_rule} if setting == "single" else {}),
           "mapping": {str(k): v for k, v in mapping.items()},
           "num_images": len(gt["images"]), "num_predictions": acc.num_results,
           "num_gt_objects": num_gt_objects, "num_matched": len(set(mapping.values()))}
    log.info("mask AP (%s): AP %.2f AP50 %.2f over %d images, %d predictions", setting, out["AP"],
             out["AP50"], out["num_images"], out["num_predictions"])
    return out


def _add_chunk(acc: SegmAccumulator, chunk: list, mapping: dict[int, int]) -> None:
    """Relabel a chunk's predictions (cluster -> matched category; unmatched clusters dropped) and
    add the chunk to ``acc``."""
    acc.add([im for im, _, _ in chunk], [a for _, objects, _ in chunk for a in objects],
            [dict(p, category_id=mapping[int(p["category_id"])]) for _, _, preds in chunk for p in preds
             if int(p["category_id"]) in mapping])


def mask_ap_report(gt_instances: Path, predictions: Path, single_rule: str = "ours") -> dict[str, Any]:
    """Both settings: ``{"multi": {...}, "single": {...}, "ground_truth", "predictions"}``."""
    return {"multi": mask_ap(gt_instances, predictions, "multi"),
            "single": mask_ap(gt_instances, predictions, "single", single_rule=single_rule),
            "ground_truth": str(gt_instances), "predictions": str(predictions)}
