"""Segment new photos with the trained segmentation model: label maps, overlays and area tables.

For a list of images (any size or mode, see :func:`maskdistill.images.read_rgb`),
:func:`segment_images` writes under ``out_dir``::

    labels/<key>.png      uint8 label map at the image's original size (0 = background)
    overlays/<key>.jpg    the photo with each class's colour blended in (background left as is)
    areas.csv             one row per image and class present: key, class, label, pixels, fraction
    areas.md              total area per class over all images (class, images, pixels, fraction)
    input_report.{json,md,csv}   the images read and those skipped (split ``segment``)

Images are resized so their shorter side is ``short_side`` (a model trained with the reference
transform: to its ``test_side`` square) and batched by equal resized shape; the logits of each image
are upsampled to its own original size (reference: its argmax resized with nearest), so an image's
labels do not depend on the batch it was in. :func:`matched_class_names` names the model's labels
after the ground-truth classes an evaluation matched them to.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from maskdistill.images import (
    BAD_IMAGE_POLICIES,
    ImageReadError,
    ImageRecord,
    read_rgb,
)
from maskdistill.input_report import write_input_report
from maskdistill.report import colourise
from maskdistill.segmentation import (
    input_size,
    labels_at_image_size,
    load_segmentation_model,
    mixed_precision,
    model_input,
)
from maskdistill.storage import atomic_path, read_json, write_label_png
from maskdistill.training import progress

log = logging.getLogger("maskdistill")
SPLIT = "segment"  # the split name of the input report
AREA_COLUMNS = ("key", "class", "label", "pixels", "fraction")
SUMMARY_COLUMNS = ("class", "images", "pixels", "fraction")
JPEG_QUALITY = 90
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


# ---------------------------------------------------------------- class names


def default_class_names(num_classes: int) -> list[str]:
    """``background``, ``cluster 1`` .. ``cluster K`` for a model of ``num_classes`` = K + 1 labels."""
    return ["background"] + [f"cluster {i}" for i in range(1, num_classes)]


def checked_class_names(names: Sequence[str] | None, num_classes: int, model_path: Path) -> list[str]:
    """``names`` (one distinct name per label of the model at ``model_path``) or the default names;
    a wrong count or a repeated name is a ValueError."""
    if names is None:
        return default_class_names(num_classes)
    names = [str(n) for n in names]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names given, but the model {model_path} has {num_classes} "
                         f"labels (background + {num_classes - 1} clusters): give one name per label")
    repeated = sorted(n for n, count in Counter(names).items() if count > 1)
    if repeated:
        raise ValueError(f"class names must be distinct; repeated: {', '.join(repeated)}")
    return names


def matched_class_names(metrics_json: Path, stage: str, num_labels: int) -> list[str] | None:
    """Names of a model's ``num_labels`` labels after the ground-truth classes that an evaluation
    (``metrics_json``, as :func:`maskdistill.evaluation.evaluate` writes it) matched them to in
    ``stage``: ``meta.class_names[mapping[i]]``, with `` (cluster i)`` appended for i > 0 so that
    two labels matched to one class stay distinct. None when the file or the stage is missing; a
    mapping of another length or outside the class list is a ValueError naming the file."""
    path = Path(metrics_json)
    if not path.is_file():
        return None
    metrics = read_json(path)
    entry = metrics.get(stage) if isinstance(metrics, dict) else None
    if not isinstance(entry, dict):
        return None
    try:
        mapping = [int(v) for v in entry["mapping"]]
        classes = [str(n) for n in metrics["meta"]["class_names"]]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: stage '{stage}' has no usable mapping or meta.class_names "
                         f"({err})") from err
    if len(mapping) != num_labels:
        raise ValueError(f"{path}: stage '{stage}' maps {len(mapping)} labels, but the model has "
                         f"{num_labels}: the metrics belong to another model")
    if any(not 0 <= m < len(classes) for m in mapping):
        raise ValueError(f"{path}: stage '{stage}' mapping {mapping} points outside the "
                         f"{len(classes)} classes of meta.class_names")
    return [classes[m] if i == 0 else f"{classes[m]} (cluster {i})" for i, m in enumerate(mapping)]


# ---------------------------------------------------------------- batching


def input_hw(image_hw: tuple[int, int], short_side: int | None, side: int | None = None) -> tuple[int, int]:
    """The size an image of ``image_hw`` enters the model at: ``side`` x ``side`` (a model's
    ``test_side``), else shorter side ``short_side``, else as is."""
    return input_size(image_hw[0], image_hw[1], short_side, side)


def header_hw(path: Path) -> tuple[int, int] | None:
    """An image's (height, width) from its header, EXIF rotation applied; None when unreadable.

    Only orders the images for batching: batches are formed from the decoded sizes.
    """
    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.getexif().get(_EXIF_ORIENTATION, 1) in _TRANSPOSED_ORIENTATIONS:
                w, h = h, w
    except Exception:  # any failure: read_rgb names the reason when the image is read
        return None
    return h, w


def plan_batches(records: Sequence[ImageRecord], short_side: int | None,
                 batch_size: int, side: int | None = None) -> list[list[ImageRecord]]:
    """Records sorted by input size (from the headers; unreadable ones first, alone) and cut into
    runs of one size, at most ``batch_size`` each."""
    sizes = {r.key: header_hw(r.path) for r in records}

    def shape(r: ImageRecord) -> tuple[int, int]:
        hw = sizes[r.key]
        return (0, 0) if hw is None else input_hw(hw, short_side, side)

    batches: list[list[ImageRecord]] = []
    ordered = sorted(records, key=lambda r: (sizes[r.key] is not None, shape(r), r.key))
    for hw, run in groupby(ordered, key=shape):
        run = list(run)
        step = 1 if hw == (0, 0) else batch_size
        batches += [run[i:i + step] for i in range(0, len(run), step)]
    return batches


@dataclass(frozen=True)
class Decoded:
    """One image as read: its RGB pixels, or why it could not be read."""

    record: ImageRecord
    rgb: np.ndarray | None
    error: str | None = None


def decode(record: ImageRecord) -> Decoded:
    """Read one image; a decoding failure is kept (with read_rgb's reason), not raised."""
    try:
        return Decoded(record, read_rgb(record.path))
    except ImageReadError as err:
        return Decoded(record, None, str(err))


def decode_batch(records: Sequence[ImageRecord]) -> list[Decoded]:
    """Read the images of one planned batch."""
    return [decode(r) for r in records]


def decoded_batches(batches: Sequence[Sequence[ImageRecord]],
                    pool: ThreadPoolExecutor) -> Iterator[list[Decoded]]:
    """Each planned batch decoded, in order; the next batch is read in ``pool`` while this one is used."""
    future = pool.submit(decode_batch, batches[0]) if batches else None
    for i in range(len(batches)):
        current = future.result()
        if i + 1 < len(batches):
            future = pool.submit(decode_batch, batches[i + 1])
        yield current


def same_shape_runs(items: Sequence[Decoded], short_side: int | None,
                    side: int | None = None) -> list[list[Decoded]]:
    """Decoded images (all readable) split into runs of equal input size, in order (a header that
    disagreed with the decoded image splits its planned batch)."""
    def shape(d: Decoded) -> tuple[int, int]:
        return input_hw(d.rgb.shape[:2], short_side, side)

    return [list(run) for _, run in groupby(items, key=shape)]


# ---------------------------------------------------------------- prediction


@torch.no_grad()
def predict_batch(model: nn.Module, rgbs: Sequence[np.ndarray], device: torch.device,
                  short_side: int | None) -> list[np.ndarray]:
    """uint8 label maps (H, W) of RGB images of one input size, at each image's original size: one
    forward pass, then each image's logits upsampled (bilinear) to its size and argmaxed alone (a
    model with a ``test_side``: argmax, then nearest resize)."""
    side = getattr(model, "test_side", None)
    size = input_hw(rgbs[0].shape[:2], short_side, side)
    x = torch.cat([model_input(rgb, size, side) for rgb in rgbs]).to(device)
    logits = model(x)["out"].float()
    return [labels_at_image_size(logits[i:i + 1], rgb.shape[:2], side) for i, rgb in enumerate(rgbs)]


# ---------------------------------------------------------------- per-image outputs


def overlay(rgb: np.ndarray, labels: np.ndarray, alpha: float) -> np.ndarray:
    """uint8 RGB: each labelled pixel blended with its class colour (``report.colourise``) at
    ``alpha``; background (label 0) pixels stay as in the photo."""
    blended = (1.0 - alpha) * rgb.astype(np.float32) + alpha * colourise(labels).astype(np.float32)
    out = np.where((labels > 0)[..., None], np.rint(blended), rgb)
    return np.clip(out, 0, 255).astype(np.uint8)


def output_path(out_dir: Path, folder: str, key: str, suffix: str) -> Path:
    """``out_dir/folder/<key><suffix>``; a key that is absolute or climbs out (``..``) is refused."""
    parts = PurePosixPath(key).parts
    if not parts or PurePosixPath(key).is_absolute() or ".." in parts:
        raise ValueError(f"image key '{key}' cannot name a file below {out_dir / folder}")
    return Path(out_dir, folder, *parts[:-1], parts[-1] + suffix)


def write_jpeg(path: Path, rgb: np.ndarray) -> None:
    """Write uint8 RGB as a JPEG (atomic)."""
    with atomic_path(path, suffix=".tmp.jpg") as tmp:
        Image.fromarray(rgb, mode="RGB").save(tmp, format="JPEG", quality=JPEG_QUALITY)


def class_pixels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixels of each label 0..num_classes-1 in a label map (int64, length num_classes)."""
    return np.bincount(labels.ravel(), minlength=num_classes)[:num_classes].astype(np.int64)


def area_rows(key: str, pixels: np.ndarray, names: Sequence[str]) -> list[dict[str, Any]]:
    """Rows (key, class, label, pixels, fraction) of one image, one per class present."""
    total = int(pixels.sum())
    return [{"key": key, "class": names[c], "label": c, "pixels": int(n), "fraction": int(n) / total}
            for c, n in enumerate(pixels) if n > 0]


# ---------------------------------------------------------------- tables


def areas_table(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The per-image area rows as a DataFrame, sorted by key then label."""
    frame = pd.DataFrame(list(rows), columns=list(AREA_COLUMNS))
    return frame.sort_values(["key", "label"], kind="stable").reset_index(drop=True)


def areas_summary(areas: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """Total area per class over all images (every class, in label order): class, images containing
    it, pixels, fraction of all pixels."""
    grouped = areas.groupby("label")
    images = grouped["key"].nunique()
    pixels = grouped["pixels"].sum()
    total = int(areas["pixels"].sum())
    rows = [(name, int(images.get(c, 0)), int(pixels.get(c, 0)),
             int(pixels.get(c, 0)) / total if total else 0.0) for c, name in enumerate(names)]
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def areas_markdown(summary: pd.DataFrame, num_images: int, num_skipped: int) -> str:
    """A Markdown page: how many images were segmented (and skipped), and the summary table with
    fractions as percentages."""
    cells = summary.assign(fraction=[f"{100 * f:.2f} %" for f in summary["fraction"]],
                           **{"class": summary["class"].str.replace("|", "/")})
    skipped = f", {num_skipped} skipped (see input_report.md)" if num_skipped else ""
    return "\n".join([
        "# Segmented areas", "",
        f"{num_images} images segmented{skipped}. Area of each class over all of them: the images "
        "containing it, its pixels and its share of all pixels.", "",
        cells.to_markdown(index=False, disable_numparse=True, colalign=("left", "right", "right", "right")),
        ""])


def write_areas(out_dir: Path, areas: pd.DataFrame, summary: pd.DataFrame, num_skipped: int) -> None:
    """``out_dir/areas.csv`` (per image and class) and ``out_dir/areas.md`` (per class), atomically."""
    with atomic_path(Path(out_dir) / "areas.csv") as tmp:
        areas.to_csv(tmp, index=False)
    with atomic_path(Path(out_dir) / "areas.md") as tmp:
        tmp.write_text(areas_markdown(summary, areas["key"].nunique(), num_skipped))


def skipped_entry(bad: Decoded, on_bad_image: str) -> dict[str, str]:
    """The input report's row of an unreadable image; under policy ``fail`` its ImageReadError."""
    if on_bad_image == "fail":
        raise ImageReadError(f"{bad.error} (use on_bad_image 'skip' to leave such images out)")
    log.warning("skipping %s", bad.error)
    reason = (bad.error or "").removeprefix(f"{bad.record.path}: ")
    return {"split": SPLIT, "key": bad.record.key, "path": str(bad.record.path), "reason": reason}


# ---------------------------------------------------------------- the stage


def check_options(records: Sequence[ImageRecord], short_side: int | None, batch_size: int,
                  on_bad_image: str, overlay_alpha: float) -> None:
    """ValueError naming the first bad option of :func:`segment_images`."""
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image {on_bad_image!r} is not one of {list(BAD_IMAGE_POLICIES)}")
    if short_side is not None and short_side < 1:
        raise ValueError(f"short_side must be a positive number of pixels or None, got {short_side}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not 0.0 <= overlay_alpha <= 1.0:
        raise ValueError(f"overlay_alpha must lie in [0, 1], got {overlay_alpha}")
    repeated = sorted(k for k, n in Counter(r.key for r in records).items() if n > 1)
    if repeated:
        raise ValueError(f"image keys must be unique; repeated: {', '.join(repeated)}")


def segment_images(model_path: Path, records: list[ImageRecord], out_dir: Path, device: torch.device, *,
                   short_side: int | None = None, batch_size: int = 4,
                   class_names: Sequence[str] | None = None, on_bad_image: str = "fail",
                   overlay_alpha: float = 0.5, precision: str = "fp32") -> dict[str, Any]:
    """Segment ``records`` with the model at ``model_path`` (in ``precision``); write label maps,
    overlays, the area tables and the input report under ``out_dir`` (see the module docstring).

    ``class_names[i]`` names label i (default ``background``, ``cluster 1`` ..). An unreadable image
    raises :class:`ImageReadError` naming it under ``on_bad_image="fail"``; under ``"skip"`` it is
    left out and listed in the input report. Returns ``{"images": n, "skipped": m, "classes":
    {name: total pixels}}``.
    """
    check_options(records, short_side, batch_size, on_bad_image, overlay_alpha)
    out_dir = Path(out_dir)
    model, num_classes = load_segmentation_model(Path(model_path), device)
    mixed_precision(model, device, precision)
    if num_classes > 256:
        raise ValueError(f"{model_path}: {num_classes} labels do not fit the uint8 label maps (256 at most)")
    names = checked_class_names(class_names, num_classes, Path(model_path))
    for r in records:
        output_path(out_dir, "labels", r.key, ".png")  # refuse unusable keys before any work
    side = getattr(model, "test_side", None)
    batches = plan_batches(records, short_side, batch_size, side)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    done = 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        for batch in progress(decoded_batches(batches, pool), total=len(batches), desc="segmenting",
                              unit="batch"):
            skipped += [skipped_entry(d, on_bad_image) for d in batch if d.rgb is None]
            for run in same_shape_runs([d for d in batch if d.rgb is not None], short_side, side):
                labels = predict_batch(model, [d.rgb for d in run], device, short_side)
                for d, lab in zip(run, labels, strict=True):
                    write_label_png(output_path(out_dir, "labels", d.record.key, ".png"), lab)
                    write_jpeg(output_path(out_dir, "overlays", d.record.key, ".jpg"),
                               overlay(d.rgb, lab, overlay_alpha))
                    rows += area_rows(d.record.key, class_pixels(lab, num_classes), names)
                    done += 1
    areas = areas_table(rows)
    summary = areas_summary(areas, names)
    write_areas(out_dir, areas, summary, len(skipped))
    report = {"on_bad_image": on_bad_image, "splits": {SPLIT: {"mined": done, "skipped": len(skipped)}},
              "skipped": sorted(skipped, key=lambda s: s["key"])}
    write_input_report(report, out_dir / "input_report.json", out_dir / "input_report.md")
    log.info("segmented %d images into %s (%d skipped)", done, out_dir, len(skipped))
    return {"images": done, "skipped": len(skipped),
            "classes": {str(n): int(p) for n, p in zip(summary["class"], summary["pixels"], strict=True)}}
