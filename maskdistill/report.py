"""What the evaluation shows a reader: colours, the examples figure, the Markdown report and its tables.

The report (``report.md``) sets this run's numbers beside the paper's; its two tables, mIoU per
stage and IoU per class, are also written as CSV files beside it (``<stem>_stages.csv``,
``<stem>_per_class.csv``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from maskdistill.ground_truth import GroundTruth
from maskdistill.paper import (
    PAPER_DATASET_NAMES,
    PAPER_REFERENCE,
    PAPER_VOC_PER_CLASS,
    VOC_CLASSES_WITH_BACKGROUND,
)
from maskdistill.storage import IGNORE_LABEL, atomic_path

# (stage, key, shape of its ground truth) -> the stage's predicted label map of that image
PredictionReader = Callable[[str, str, tuple[int, int]], np.ndarray]


# ---------------------------------------------------------------- colours and panels


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


# ---------------------------------------------------------------- the examples figure


def write_examples_figure(
    out_figure: Path,
    keys: Sequence[str],
    gt: GroundTruth,
    mappings: Mapping[str, np.ndarray],
    read_prediction: PredictionReader,
) -> None:
    """PNG grid: one row per key; columns image, ground truth, then each stage of ``mappings``
    with its predictions recoloured by its matching (so colours mean ground-truth classes)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from maskdistill.images import read_rgb

    names = gt.class_names
    titles = ["image", "ground truth", *mappings]
    ncols, nrows = len(titles), max(1, len(keys))
    fig = Figure(figsize=(2.6 * ncols, 2.3 * nrows + 0.8), dpi=100)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    seen: set[int] = set()
    for r, key in enumerate(keys):
        labels = gt.load(key)
        seen.update(int(v) for v in np.unique(labels) if v != IGNORE_LABEL)
        if key in gt.image_paths:
            image = read_rgb(gt.image_paths[key])
        else:  # no image known for this key: a grey panel
            image = np.full(labels.shape + (3,), 128, dtype=np.uint8)
        panels = [image, colourise(labels)]
        for stage, mapping in mappings.items():
            pred = read_prediction(stage, key, labels.shape)
            panels.append(colourise(pred, mapping))
            seen.update(int(mapping[v]) for v in np.unique(pred))
        draw_panel_row(axes[r], panels, key, titles if r == 0 else None)
    for ax in axes.ravel()[len(keys) * ncols:]:
        ax.axis("off")
    pal = palette() / 255.0
    handles = [Patch(color=pal[c], label=names[c]) for c in sorted(seen) if c < len(names)]
    handles.append(Patch(facecolor="white", edgecolor="black", label="ignore"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=7,
               frameon=False)
    fig.tight_layout(rect=(0, 0.8 / (2.3 * nrows + 0.8), 1, 1))
    with atomic_path(out_figure, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, format="png")


# ---------------------------------------------------------------- tables


MAPPING_COLUMNS = {"pixels": "mIoU (pixel matching)", "masks": "mIoU (mined-mask mapping)"}


def stage_table(metrics: Mapping[str, Any], stages: Sequence[str]) -> pd.DataFrame:
    """mIoU and pixel accuracy (%) of each stage, one row per stage (index ``stage``); when stages
    have both mappings of clusters to classes (``by_mapping``), the mIoU under each as well (NaN for
    a stage with clusters of its own, such as the patch K-means baseline)."""
    columns = ["mIoU", "pixel accuracy"]
    both = any("by_mapping" in metrics[s] for s in stages)
    if both:
        columns += list(MAPPING_COLUMNS.values())

    def by_mapping(stage: str) -> tuple[float, ...]:
        if not both:
            return ()
        by = metrics[stage].get("by_mapping")
        return tuple(by[m]["miou"] if by else float("nan") for m in MAPPING_COLUMNS)

    rows = [(metrics[s]["miou"], metrics[s]["pixel_accuracy"], *by_mapping(s)) for s in stages]
    return pd.DataFrame(rows, index=pd.Index(list(stages), name="stage"), columns=columns, dtype=float)


def paper_class_columns(names: Sequence[str], paper: str | None) -> dict[str, tuple[float, ...]]:
    """The paper's per-class columns when ``paper`` is VOC and the classes are VOC's 21 in id
    order, else none."""
    if paper != "voc" or [n.lower() for n in names] != list(VOC_CLASSES_WITH_BACKGROUND):
        return {}
    return {"paper clustering": PAPER_VOC_PER_CLASS["clustering"],
            "paper clustering+CRF": PAPER_VOC_PER_CLASS["clustering+crf"],
            "paper linear": PAPER_VOC_PER_CLASS["linear"]}


def per_class_table(metrics: Mapping[str, Any], stages: Sequence[str]) -> pd.DataFrame:
    """IoU (%) per ground-truth class (rows, index ``class``, in label-id order): a column per stage,
    the linear probe's when it has per-class results, the paper's when there is a reference.
    Classes absent from both ground truth and prediction are missing (NaN)."""
    meta = metrics["meta"]
    names = list(meta["class_names"])
    columns: dict[str, list[float | None]] = {s: [metrics[s]["per_class"][n] for n in names]
                                              for s in stages}
    lp = metrics.get("linear_probe")
    lp_cls = lp.get("per_class") if isinstance(lp, dict) else None
    if isinstance(lp_cls, dict):
        columns["linear_probe"] = [lp_cls.get(n) for n in names]
    for column, values in paper_class_columns(names, meta.get("paper")).items():
        columns[column] = list(values)
    frame = pd.DataFrame(columns, index=pd.Index(names, name="class"), columns=list(columns))
    return frame.astype(float)


def markdown_table(frame: pd.DataFrame) -> str:
    """A pipe table of ``frame`` (index as first column), values with one decimal, NaN as ``-``."""
    cells = pd.DataFrame({c: ["-" if pd.isna(v) else f"{v:.1f}" for v in frame[c]] for c in frame.columns},
                         index=frame.index, columns=frame.columns)
    return cells.to_markdown(stralign=None, numalign=None, disable_numparse=True)


def table_paths(out_report: Path) -> tuple[Path, Path]:
    """Where the report's tables go as CSV: ``<stem>_per_class.csv`` and ``<stem>_stages.csv``."""
    out_report = Path(out_report)
    return (out_report.with_name(f"{out_report.stem}_per_class.csv"),
            out_report.with_name(f"{out_report.stem}_stages.csv"))


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write ``frame`` (with its index) as CSV atomically; NaN as an empty cell."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp)


# ---------------------------------------------------------------- the paper beside this run


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def run_value(metrics: Mapping[str, Any], sources: Sequence[str]) -> tuple[float | None, str]:
    """This run's value for a paper row and where it came from: the first source present (a stage's
    mIoU, or a dotted path into the metrics); (None, "") when none is."""
    for src in sources:
        if src in metrics and isinstance(metrics[src], dict) and "miou" in metrics[src]:
            return float(metrics[src]["miou"]), src
        node: Any = metrics
        for part in src.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, (int, float)) and node is not None and node >= 0:
            return float(node), src
    return None, ""


def paper_comparison(metrics: Mapping[str, Any], paper: str | None) -> list[str]:
    """Markdown lines: this run beside the published numbers, or a line saying there are none."""
    lines = ["## Compared with the paper", ""]
    if paper not in PAPER_REFERENCE:
        return lines + ["No paper reference for this dataset (the paper reports PASCAL VOC 2012 val "
                        "and COCO20k); the numbers below stand alone.", ""]
    lines += [f"MaskDistill's published numbers on {PAPER_DATASET_NAMES[paper]}"
              " (DINO ViT-S, MoCo-initialised ResNet-50) beside this run's. `-`: not computed in this "
              "run (enable it in the config).", "",
              "| metric | this run | paper | difference | from |", "|---|---:|---:|---:|---|"]
    for label, ref, sources in PAPER_REFERENCE[paper]:
        value, src = run_value(metrics, sources)
        diff = "-" if value is None else f"{value - ref:+.1f}"
        lines.append(f"| {label} | {_fmt(value)} | {ref:.1f} | {diff} | {src or '-'} |")
    return lines + [""]


# ---------------------------------------------------------------- the Markdown report


def _linear_probe_lines(lp: Any) -> list[str]:
    if not (isinstance(lp, dict) and "miou" in lp):
        return []
    return ["## Linear probe", "",
            f"A 1x1 classifier trained on ground-truth labels over the frozen segmentation model "
            f"({lp.get('epochs', '?')} epochs, {lp.get('num_train_images', '?')} training images): "
            f"mIoU {lp['miou']:.1f}"
            + (f", with CRF {lp['miou_crf']:.1f}" if lp.get("miou_crf") is not None else "")
            + " (no matching: the classifier predicts ground-truth classes).", ""]


def _mask_ap_lines(ap: Any) -> list[str]:
    if not isinstance(ap, dict):
        return []
    single = ap.get("single")
    rule = single.get("single_object", "ours") if isinstance(single, dict) else "ours"
    skipped = ("images without a prediction skipped (the authors' rule)" if rule == "reference"
               else "images without a prediction count as misses")
    lines = ["## Mask AP", "",
             "COCO mask AP (pycocotools `segm`, class-aware after Hungarian matching of clusters "
             f"to classes) on {ap.get('ground_truth', 'the evaluated split')}; single object: {skipped}.",
             "", "| setting | AP | AP50 | AP75 | matched classes |", "|---|---:|---:|---:|---:|"]
    for setting in ("multi", "single"):
        r = ap.get(setting)
        if isinstance(r, dict):
            lines.append(f"| {setting} object | {_fmt(r.get('AP'))} | {_fmt(r.get('AP50'))} | "
                         f"{_fmt(r.get('AP75'))} | {r.get('num_matched', '-')} |")
    return lines + [""]


def _mask_quality_lines(quality: Any) -> list[str]:
    if not (isinstance(quality, dict) and "mask_iou" in quality):
        return []
    lines = ["## Mined masks (class-agnostic)", "",
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


def report_markdown(metrics: Mapping[str, Any], stages: Sequence[str], notes: Sequence[str],
                    figure: str) -> str:
    """The Markdown report of ``metrics`` (as :func:`maskdistill.evaluation.evaluate` writes them);
    ``figure`` is the examples figure's path relative to the report."""
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
    if "mask_mapping" in meta:
        mm = meta["mask_mapping"]
        lines += [f"Primary mapping: **{meta.get('mapping', 'pixels')}**. The mined-mask mapping (the "
                  f"authors'): {mm['num_voting']} of {mm['num_masks']} mined masks voted for the class "
                  "of the ground-truth box they overlap most; one mapping for every stage, never used "
                  "to train.", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += paper_comparison(metrics, meta.get("paper"))
    lines += ["## mIoU per stage", "", markdown_table(stage_table(metrics, stages)), ""]
    lines += _linear_probe_lines(metrics.get("linear_probe"))
    lines += _mask_ap_lines(metrics.get("mask_ap"))
    lines += _mask_quality_lines(metrics.get("mask_quality"))
    lines += ["## IoU per class", "", markdown_table(per_class_table(metrics, stages))]
    lines += ["", "## Examples", "",
              "Columns: image, ground truth, then each stage with its predicted labels recoloured "
              "by its matching, so colours mean ground-truth classes (white = ignore).", "",
              f"![examples]({figure})", ""]
    return "\n".join(lines)


def front_page_rst(metrics: Mapping[str, Any], stages: Sequence[str], notes: Sequence[str]) -> str:
    """The front page of the workflow's HTML report (reStructuredText): what the run is, the mIoU
    and pixel accuracy of every stage, mask AP and the linear probe when they were measured."""
    meta = metrics["meta"]
    lines = ["MaskDistill: unsupervised semantic segmentation by distilling object masks from a "
             "self-supervised vision transformer. No stage reads a label; ground truth only scores them.",
             "", f"**This run**: {meta['num_images']} evaluated images, {meta['num_pred']} predicted labels "
             f"matched to {meta['num_gt']} ground-truth classes. Values in %.", "",
             ".. list-table:: mIoU per stage", "   :header-rows: 1", "",
             "   * - stage", "     - mIoU", "     - pixel accuracy"]
    for stage in stages:
        lines += [f"   * - {stage}", f"     - {metrics[stage]['miou']:.1f}",
                  f"     - {metrics[stage]['pixel_accuracy']:.1f}"]
    ap = metrics.get("mask_ap")
    if isinstance(ap, dict):
        parts = [f"{setting}-object AP50 {_fmt(ap[setting].get('AP50'))}" for setting in ("multi", "single")
                 if isinstance(ap.get(setting), dict)]
        lines += ["", f"Mask AP of the Mask R-CNN predictions: {', '.join(parts)}."]
    probe = metrics.get("linear_probe")
    if isinstance(probe, dict) and "miou" in probe:
        crf = f", with CRF {probe['miou_crf']:.1f}" if probe.get("miou_crf") is not None else ""
        lines += ["", f"Linear probe (ground-truth labels, frozen model): mIoU {probe['miou']:.1f}{crf}."]
    lines += ["", *[f"- {note}" for note in notes]]
    lines += ["", "The **Metrics** category holds these tables per class and the examples; the other "
              "categories show each stage on a few images, what each cluster and class is, and the "
              "images that could not be read."]
    return "\n".join(lines).replace("{", "(").replace("}", ")") + "\n"  # the report renders it with Jinja


def front_page_path(out_report: Path) -> Path:
    """Where the HTML report's front page goes: ``<stem>.rst`` beside the Markdown report."""
    return Path(out_report).with_suffix(".rst")


def write_report(out_report: Path, out_figure: Path, metrics: Mapping[str, Any], stages: Sequence[str],
                 notes: Sequence[str]) -> None:
    """Write ``out_report`` (Markdown), its tables as CSV beside it (see :func:`table_paths`) and the
    HTML report's front page (:func:`front_page_path`)."""
    with atomic_path(front_page_path(out_report)) as tmp:
        tmp.write_text(front_page_rst(metrics, stages, notes))
    per_class_csv, stages_csv = table_paths(out_report)
    write_csv(per_class_table(metrics, stages), per_class_csv)
    write_csv(stage_table(metrics, stages), stages_csv)
    rel = Path(os.path.relpath(Path(out_figure).resolve(), Path(out_report).resolve().parent))
    with atomic_path(out_report) as tmp:
        tmp.write_text(report_markdown(metrics, stages, notes, rel.as_posix()))
