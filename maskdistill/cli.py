"""Command line of the package: one sub-command per workflow step (the Snakemake rules call these).

Each command is a function registered with :func:`command`, which declares the command's arguments
beside it. Commands that read settings take ``--config`` (inline JSON, as the rules pass it, or a
YAML/JSON file), checked once here into typed :class:`~maskdistill.settings.Settings`; the stage
functions they call receive typed values only.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import maskdistill
from maskdistill.config import ConfigError
from maskdistill.settings import Settings, load_settings

log = logging.getLogger("maskdistill")
Handler = Callable[[argparse.Namespace, Settings], None]


@dataclass(frozen=True)
class Command:
    """A sub-command: its handler, help line, arguments and whether it reads ``--config``."""

    name: str
    handler: Handler
    help: str
    args: tuple[tuple[tuple[str, ...], dict[str, Any]], ...]
    settings: bool | str  # True: --config required; "optional"; False: none


COMMANDS: dict[str, Command] = {}


def arg(*flags: str, **kwargs: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """One argument of a command, as ``argparse.add_argument`` takes it."""
    return flags, kwargs


def command(name: str, help: str, *args: tuple[tuple[str, ...], dict[str, Any]],
            settings: bool | str = True) -> Callable[[Handler], Handler]:
    """Register the decorated handler as sub-command ``name`` with its arguments; ``settings`` says
    whether it reads ``--config`` (True), may read it (``"optional"``: the schema defaults
    otherwise) or takes none (False)."""

    def register(handler: Handler) -> Handler:
        COMMANDS[name] = Command(name, handler, help, args, settings)
        return handler

    return register


# ---------------------------------------------------------------- settings and records


def read_settings(text: str) -> Settings:
    """Settings from inline JSON or a YAML/JSON file; the ``version`` the workflow adds is checked."""
    if text.lstrip().startswith("{"):
        raw = json.loads(text)
    else:
        import yaml

        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        raw = yaml.safe_load(path.read_text()) or {}
    planned = raw.pop("version", None)
    if planned not in (None, maskdistill.__version__):
        log.warning("the workflow was planned with maskdistill %s but this is %s", planned,
                    maskdistill.__version__)
    return load_settings(raw)


def _records(s: Settings, split: str, skipped: str | None = None):
    """The split's images (``extra0``, ...: a ``clustering.extra_images`` folder's); those mining
    skipped (listed in ``skipped``, the input report) left out."""
    from maskdistill.datasets import dataset_source, extra_records, extra_splits, without_skipped

    extra = extra_splits(s.clustering.extra_images)
    records = extra_records(extra[split]) if split in extra else dataset_source(s.dataset).records(split)
    if skipped and s.dataset.on_bad_image == "skip":
        from maskdistill.input_report import skipped_keys

        keys = skipped_keys(Path(skipped), split)
        if keys:
            log.info("%s: leaving out %d images that mining skipped (see input_report.md)", split, len(keys))
        records = without_skipped(records, keys)
    return records


def _images_root(s: Settings, split: str) -> Path:
    from maskdistill.datasets import dataset_source, extra_splits

    extra = extra_splits(s.clustering.extra_images)
    return Path(extra[split]).expanduser() if split in extra else dataset_source(s.dataset).images_root(split)


def _device(s: Settings):
    from maskdistill.training import resolve_device

    return resolve_device(s.device)


def _checkpoints(path: str, *identity: Any) -> Path:
    from maskdistill.training import prepare_checkpoint_dir

    return prepare_checkpoint_dir(Path(path), list(identity))


def _digest(path: str) -> str:
    from maskdistill.storage import digest_path

    return digest_path(path)


SPLIT = arg("--split", required=True, help="train or val (mining and clustering features: also extra0, ...)")
OUT = arg("--out", required=True)
SKIPPED = arg("--skipped", help="input_report.json: the images mining skipped are left out")
CHECKPOINTS = arg("--checkpoint-dir", required=True, help="resumable checkpoints of this run")
WEIGHTS_MANIFEST = arg("--weights-manifest", help="the fetch-weights manifest: hub weights are read from the "
                                                  "files it lists, without the network")


def _vit_weights(s: Settings, key: str, manifest: str | None) -> Path | None:
    """The local file of the hub weights the ViT at ``key`` (e.g. ``mining.backbone``) loads, or None.

    From the manifest when given (the workflow's jobs, offline); else from ``weights_cache``,
    downloaded there first if needed. A job given a manifest does not touch the hub at all.
    """
    import os

    if manifest:  # read when huggingface_hub is first imported (by timm, below)
        os.environ["HF_HUB_OFFLINE"] = "1"
    from maskdistill.weights_cache import weights_for

    section, field = key.split(".")
    return weights_for(getattr(getattr(s, section), field), key, manifest, s.weights_cache)


# ---------------------------------------------------------------- data


@command("make-demo", "draw the synthetic demo scenes", OUT)
def cmd_make_demo(a: argparse.Namespace, s: Settings) -> None:
    from maskdistill.demo import generate_demo

    generate_demo(Path(a.out), s.dataset.demo)


@command("voc-instances", "COCO instances of a VOC 2012 split (SegmentationObject)",
         arg("--root", required=True, help="the VOCdevkit/VOC2012 folder"),
         arg("--split", default="val", help="train, val or trainval (default: val)"), OUT, settings=False)
def cmd_voc_instances(a: argparse.Namespace, s: Settings) -> None:
    from maskdistill.datasets import write_voc_instances

    log.info("VOC %s instances: %s", a.split, write_voc_instances(Path(a.root), a.split, Path(a.out)))


@command("coco20k-instances", "instances_train2014.json reduced to COCO20k",
         arg("--annotations", required=True, help="COCO instances_train2014.json"),
         arg("--filenames", required=True, help="coco_20k_filenames.txt (one file name per line)"), OUT,
         settings=False)
def cmd_coco20k_instances(a: argparse.Namespace, s: Settings) -> None:
    from maskdistill.datasets import write_coco20k_instances

    log.info("COCO20k instances: %s", write_coco20k_instances(a.annotations, a.filenames, Path(a.out)))


@command("yolo-to-coco", "convert YOLO polygon labels to COCO instances",
         arg("--images", required=True), arg("--labels", required=True),
         arg("--names", help="file with one class name per line (default: COCO's 80)"), OUT, settings=False)
def cmd_yolo_to_coco(a: argparse.Namespace, s: Settings) -> None:
    from maskdistill.yolo import COCO80_NAMES, write_coco, yolo_to_coco

    names = Path(a.names).read_text().split("\n") if a.names else COCO80_NAMES
    write_coco(Path(a.out), yolo_to_coco(Path(a.images), Path(a.labels), [n for n in names if n]))


@command("config-reference", "print the Markdown reference of every config key (docs/configuration.md)",
         settings=False)
def cmd_config_reference(a: argparse.Namespace, s: Settings) -> None:
    from maskdistill.config import config_reference

    print(config_reference(), end="")


@command("check-config", "validate a config, check what it names exists, print it with defaults")
def cmd_check_config(a: argparse.Namespace, s: Settings) -> None:
    from maskdistill.config import check_references
    from maskdistill.settings import as_config

    config = as_config(s)
    check_references(config)
    print(json.dumps(config, indent=1))


@command("fetch-weights", "put every hub weight the config names into the weights cache; write the "
         "manifest that model jobs read them from (offline)", OUT)
def cmd_fetch_weights(a: argparse.Namespace, s: Settings) -> None:
    from maskdistill.storage import write_json
    from maskdistill.weights_cache import cache_folder, config_hub_weights, fetch_weights

    weights = config_hub_weights(s)
    folder = cache_folder(s.weights_cache)
    log.info("weights cache %s: %s", folder, ", ".join(f"{w.name} ({w.key})" for w in weights) or "nothing")
    manifest = fetch_weights(weights, folder)
    for entry in manifest["weights"]:
        log.info("%s: %s (%.1f MB)", entry["key"], entry["file"], entry["bytes"] / 1e6)
    write_json(Path(a.out), manifest)


# ---------------------------------------------------------------- stage 0-1: pretraining, mining


@command("pretrain", "DINO self-distillation of a ViT on the train images", CHECKPOINTS,
         arg("--out", required=True, help="teacher backbone weights (.safetensors)"))
def cmd_pretrain(a: argparse.Namespace, s: Settings) -> None:
    from maskdistill.pretrain import pretrain_dino
    from maskdistill.settings import as_config

    records = _records(s, "train")
    ckpt = _checkpoints(a.checkpoint_dir, as_config(s.pretrain), _digest(str(_images_root(s, "train"))))
    demo = s.dataset.source == "demo"
    scenes = s.pretrain.demo_scenes
    recipe = {"demo": as_config(s.dataset.demo), "demo_scenes": scenes} if demo else {}
    if demo and scenes:
        from dataclasses import replace

        from maskdistill.datasets import list_image_folder
        from maskdistill.demo import generate_demo
        from maskdistill.distributed import barrier, world

        root = ckpt / "scenes"
        if world().is_main:  # drawn once; the other processes wait for the scenes
            log.info("drawing %d demo train scenes for pretraining into %s", scenes, root)
            generate_demo(root, replace(s.dataset.demo, num_train=scenes), splits=("train",))
        barrier()
        records = list_image_folder(root / "train" / "images")
    summary = pretrain_dino(records, Path(a.out), ckpt, s.pretrain, _device(s), s.dataset.on_bad_image,
                            recipe, s.precision)
    log.info("pretrained %s on %d images, %d steps", summary["arch"], summary["images"], summary["steps"])


@command("mine", "mine one object mask per image of a shard -> HDF5", SPLIT,
         arg("--shard", type=int, required=True),
         arg("--image-list", help="the shard's planned images (JSON, rule list_images) instead of "
                                  "listing the split anew"), WEIGHTS_MANIFEST, OUT)
def cmd_mine(a: argparse.Namespace, s: Settings) -> None:
    from maskdistill.datasets import read_image_list, shard_records
    from maskdistill.mining import mine_shard

    weights = _vit_weights(s, "mining.backbone", a.weights_manifest)
    records = read_image_list(a.image_list) if a.image_list else _records(s, a.split)
    shard = shard_records(records, a.shard, s.dataset.num_shards)
    log.info("split %s shard %d: %d of %d images", a.split, a.shard, len(shard), len(records))
    stats = mine_shard(shard, Path(a.out), s.mining, _device(s), s.dataset.on_bad_image, weights,
                       s.precision)
    log.info("done: %s", stats)


@command("input-report", "list the images mining skipped, with reasons",
         arg("--masks-train", nargs="*", default=[]), arg("--masks-val", nargs="*", default=[]),
         arg("--masks-extra", nargs="*", default=[],
             help="shards of the clustering.extra_images splits (results/masks/<split>/shard-NNN.h5)"),
         arg("--out-json", required=True), arg("--out-md", required=True))
def cmd_input_report(a: argparse.Namespace, s: Settings) -> None:
    from maskdistill.input_report import input_report, write_input_report

    shards = {"train": [Path(p) for p in a.masks_train], "val": [Path(p) for p in a.masks_val]}
    for path in map(Path, a.masks_extra):  # the split is the shard's folder: extra0, extra1, ...
        shards.setdefault(path.parent.name, []).append(path)
    report = input_report({split: paths for split, paths in shards.items() if paths}, s.dataset.on_bad_image)
    write_input_report(report, Path(a.out_json), Path(a.out_md))
    log.info("input report: %s", json.dumps(report["splits"]))


# ---------------------------------------------------------------- stage 1b: clustering


@command("cluster-features", "CLS features of each mined mask's box crop -> HDF5", SPLIT,
         arg("--masks", required=True, help="the mask shard"), WEIGHTS_MANIFEST, OUT)
def cmd_cluster_features(a: argparse.Namespace, s: Settings) -> None:
    from maskdistill.clustering import describe_shard

    weights = _vit_weights(s, "clustering.backbone", a.weights_manifest)
    describe_shard(Path(a.masks), _images_root(s, a.split), Path(a.out), s.clustering, _device(s), weights,
                   s.precision)


@command("cluster", "K-means over all shards -> COCO pseudo-labels per split",
         *(arg(f"--{name}", nargs="*", default=[]) for name in
           ("masks-train", "features-train", "masks-val", "features-val")),
         arg("--features-extra", nargs="*", default=[], help="feature shards of the clustering.extra_images "
                                                             "folders (fitted on, not assigned)"),
         arg("--out-train", required=True), arg("--out-val"), arg("--out-model", required=True))
def cmd_cluster(a: argparse.Namespace, s: Settings) -> None:
    from maskdistill.clustering import cluster_splits

    outs = {"train": Path(a.out_train)} | ({"val": Path(a.out_val)} if a.out_val else {})
    masks = {"train": a.masks_train, "val": a.masks_val}
    features = {"train": a.features_train, "val": a.features_val}
    ids = {split: {r.key: r.image_id for r in _records(s, split) if r.image_id is not None}
           for split in outs}
    extra = {"extra_images": [Path(p) for p in a.features_extra]} if a.features_extra else {}
    summary = cluster_splits({split: [Path(p) for p in masks[split]] for split in outs},
                             {split: [Path(p) for p in features[split]] for split in outs},
                             outs, Path(a.out_model), s.clustering, ids, extra)
    log.info("clusters: %s", json.dumps(summary))


@command("choose-k", "K-means for a range of k on the train split's clustering features: inertia, "
         "silhouette and a suggested k (settings: choose_k, clustering)",
         arg("--features", nargs="+", required=True, help="feature shards (HDF5) of the train split"),
         arg("--out-json", required=True), arg("--out-png", required=True), arg("--out-csv", required=True))
def cmd_choose_k(a: argparse.Namespace, s: Settings) -> None:
    from maskdistill.choose_k import choose_k

    summary = choose_k([Path(p) for p in a.features], s.choose_k.ks, s.clustering,
                       sample_size=s.choose_k.sample_size, out_json=Path(a.out_json), out_png=Path(a.out_png),
                       out_csv=Path(a.out_csv))
    log.info("choose_k: suggested k = %s (%s), elbow at k = %s", summary["suggested_k"],
             summary["rule"]["suggested_k"], summary["elbow_k"])


# ---------------------------------------------------------------- stage 2-3: detector, pseudo-labels


@command("train-detector", "train Mask R-CNN on COCO pseudo-labels",
         arg("--train-json", required=True), CHECKPOINTS, OUT)
def cmd_train_detector(a: argparse.Namespace, s: Settings) -> None:
    from maskdistill.detector import get_backend
    from maskdistill.settings import as_config

    ckpt = _checkpoints(a.checkpoint_dir, as_config(s.detector), _digest(a.train_json))
    backend = get_backend(s.detector, _device(s), s.precision)
    backend.train(Path(a.train_json), _images_root(s, "train"), ckpt, Path(a.out))


@command("predict-detector", "Mask R-CNN predictions for a split",
         arg("--model", required=True), SPLIT, SKIPPED, OUT)
def cmd_predict_detector(a: argparse.Namespace, s: Settings) -> None:
    from maskdistill.detector import get_backend

    backend = get_backend(s.detector, _device(s), s.precision)
    backend.predict(Path(a.model), _records(s, a.split, a.skipped), Path(a.out))


@command("pseudo-labels", "COCO instances/predictions -> label PNGs (score >= pseudo_labels.tau)",
         arg("--instances", required=True),
         arg("--all", action="store_true", help="paste every mask whatever its score (initial labels)"),
         OUT)
def cmd_pseudo_labels(a: argparse.Namespace, s: Settings) -> None:
    from maskdistill.pseudo_labels import write_label_maps_file

    stats = write_label_maps_file(Path(a.instances), Path(a.out), 0.0 if a.all else s.pseudo_labels.tau)
    log.info("label maps: %s", stats)


# ---------------------------------------------------------------- stage 4: segmentation, CRF


@command("train-segmentation", "train DeepLab-v3 on label PNGs",
         arg("--labels", required=True, help="folder of label PNGs <key>.png"), SKIPPED, CHECKPOINTS, OUT)
def cmd_train_segmentation(a: argparse.Namespace, s: Settings) -> None:
    from maskdistill.segmentation import train_segmentation
    from maskdistill.settings import as_config

    ckpt = _checkpoints(a.checkpoint_dir, dict(as_config(s.segmentation), num_classes=s.num_labels),
                        _digest(a.labels))
    train_segmentation(_records(s, "train", a.skipped), Path(a.labels), ckpt, Path(a.out), s.segmentation,
                       s.num_labels, _device(s), s.precision)


@command("predict-segmentation", "segment a split -> label PNGs",
         arg("--model", required=True), SPLIT, SKIPPED, OUT,
         arg("--logits", help="also write each image's low-resolution logits <key>.npz here (crf.unary: "
                              "probabilities)"))
def cmd_predict_segmentation(a: argparse.Namespace, s: Settings) -> None:
    from maskdistill.segmentation import predict_segmentation

    predict_segmentation(Path(a.model), _records(s, a.split, a.skipped), Path(a.out), _device(s),
                         s.segmentation.test_short_side, precision=s.precision,
                         logits_dir=Path(a.logits) if a.logits else None)


@command("crf-refine", "dense-CRF-refine a split's label PNGs (settings: crf)", SPLIT,
         arg("--labels", required=True, help="folder of label PNGs <key>.png"), SKIPPED, OUT,
         arg("--logits", help="folder of the predictions' logits <key>.npz (crf.unary: probabilities)"))
def cmd_crf_refine(a: argparse.Namespace, s: Settings) -> None:
    from maskdistill.crf import refine_folder

    n = refine_folder(_records(s, a.split, a.skipped), Path(a.labels), Path(a.out), s.crf,
                      Path(a.logits) if a.logits else None)
    log.info("CRF-refined %d label maps of %s into %s", n, a.labels, a.out)


# ---------------------------------------------------------------- segmenting new photos


@command("segment", "segment new photos with a trained model: label PNGs, colour overlays, class areas "
         "(settings: segment, segmentation.test_short_side, dataset.on_bad_image, device)",
         arg("images", nargs="+", help="image files or folders (searched recursively)"),
         arg("--model", required=True, help="a trained segmentation model.pt"),
         arg("--metrics", help="an evaluation's metrics.json: name the classes after the ground-truth "
                               "classes they were matched to"),
         arg("--stage", default="segmentation", help="the stage of --metrics whose matching names them"),
         OUT, settings="optional")
def cmd_segment(a: argparse.Namespace, s: Settings) -> None:
    from maskdistill.datasets import records_from_paths
    from maskdistill.segment import matched_class_names, segment_images
    from maskdistill.segmentation import load_segmentation_model

    names = None
    if a.metrics:
        _, num_labels = load_segmentation_model(Path(a.model), _device(s))
        names = matched_class_names(Path(a.metrics), a.stage, num_labels)
    summary = segment_images(Path(a.model), records_from_paths(a.images), Path(a.out), _device(s),
                             short_side=s.segmentation.test_short_side, batch_size=s.segment.batch_size,
                             class_names=names, on_bad_image=s.dataset.on_bad_image,
                             overlay_alpha=s.segment.overlay_alpha, precision=s.precision)
    log.info("segmented %d images (%d skipped) into %s", summary["images"], summary["skipped"], a.out)


# ---------------------------------------------------------------- galleries


def _matched(metrics: str | None, stage: str) -> dict:
    from maskdistill.gallery import matched_classes

    return matched_classes(Path(metrics), stage) if metrics else {}


METRICS = arg("--metrics", help="an evaluation's metrics.json: rows name their matched class and IoU")


@command("cluster-gallery", "figure: a row of the masks nearest each cluster's centre (settings: gallery)",
         SPLIT, arg("--masks", nargs="+", required=True, help="the split's mask shards"),
         arg("--features", nargs="+", required=True, help="the split's feature shards"),
         arg("--kmeans", required=True, help="the K-means model (kmeans.npz)"), METRICS, OUT)
def cmd_cluster_gallery(a: argparse.Namespace, s: Settings) -> None:
    from maskdistill.gallery import cluster_gallery

    summary = cluster_gallery([Path(p) for p in a.masks], [Path(p) for p in a.features], Path(a.kmeans),
                              _images_root(s, a.split), Path(a.out), samples=s.gallery.samples,
                              crop_size=s.gallery.crop_size, matched=_matched(a.metrics, "initial_masks"))
    log.info("cluster gallery of %d clusters: %s", summary["clusters"], a.out)


@command("class-gallery", "figure: a row of the images where each predicted class covers most "
         "(settings: gallery)", SPLIT,
         arg("--predictions", required=True, help="folder of predicted label PNGs <key>.png"), SKIPPED,
         METRICS, OUT)
def cmd_class_gallery(a: argparse.Namespace, s: Settings) -> None:
    from maskdistill.gallery import class_gallery

    summary = class_gallery(_records(s, a.split, a.skipped), Path(a.predictions), s.num_labels, Path(a.out),
                            samples=s.gallery.samples, crop_size=s.gallery.crop_size,
                            matched=_matched(a.metrics, "segmentation"))
    log.info("class gallery of %d classes: %s", summary["classes"], a.out)


# ---------------------------------------------------------------- stage 5: evaluation


def _class_names(text: str | None) -> list[str]:
    from maskdistill.ground_truth import read_class_names
    from maskdistill.paper import VOC_CLASSES_WITH_BACKGROUND

    return read_class_names(text) if text else list(VOC_CLASSES_WITH_BACKGROUND)


@command("evaluate", "Hungarian mIoU of each stage on the evaluated split + report",
         arg("--split", default="val", help="split to score (default val; COCO20k: train)"),
         arg("--pred", action="append", required=True, help="STAGE=DIR of label PNGs"),
         arg("--gt-semantic", help="folder of GT label PNGs <key>.png (255 ignore) instead of the "
                                   "split's COCO instances"),
         arg("--gt-class-names", help="class names for --gt-semantic (file, one per line, or comma list; "
                                      "background first); default: the 21 VOC classes"),
         arg("--mask-ap", help="mask_ap.json to include in the report"),
         arg("--linear-probe", help="linear-probe metrics JSON to include in the report"),
         arg("--mask-quality", help="mined-mask quality JSON (mask-quality) to include"),
         arg("--clusters", help="the split's clusters file (results/clusters/<split>.json): also score "
                                "the mined-mask mapping (evaluation.mapping)"),
         arg("--note", action="append"),
         arg("--paper", default="auto", help="paper numbers to compare with: voc, coco20k, none, or auto "
                                             "(from dataset.source)"),
         SKIPPED, arg("--out-metrics", required=True), arg("--out-report", required=True),
         arg("--out-figure", required=True))
def cmd_evaluate(a: argparse.Namespace, s: Settings) -> None:
    from dataclasses import replace

    from maskdistill.config import weight_notes
    from maskdistill.datasets import dataset_source
    from maskdistill.evaluation import evaluate
    from maskdistill.ground_truth import coco_ground_truth, folder_ground_truth
    from maskdistill.settings import as_config

    source = dataset_source(s.dataset)
    source.check_split(a.split)
    root = source.images_root(a.split)
    notes = weight_notes(as_config(s)) + list(a.note or [])
    if a.gt_semantic:  # label PNGs <key>.png (0 background, class ids, 255 ignore)
        images = {r.key: r.path for r in source.records(a.split)}
        gt: Any = folder_ground_truth(Path(a.gt_semantic), _class_names(a.gt_class_names), images)
    elif source.gt_instances(a.split):
        gt = Path(source.gt_instances(a.split))
    else:
        raise ConfigError(f"config key 'dataset.{a.split}.annotations': no ground truth for evaluation "
                          "(set it to a COCO instances file or pass --gt-semantic DIR)")
    if a.skipped and s.dataset.on_bad_image == "skip":
        from maskdistill.input_report import skipped_keys

        skipped = skipped_keys(Path(a.skipped), a.split)
        if skipped:  # images mining could not read have no predictions: score the others, say so
            gt = coco_ground_truth(gt, root) if isinstance(gt, Path) else gt
            gt = replace(gt, keys=tuple(k for k in gt.keys if k not in skipped))
            notes.append(f"{len(skipped)} unreadable {a.split} images were skipped and are not scored "
                         "(listed in input_report.md)")
    extras = {k: Path(v) for k, v in (("mask_ap", a.mask_ap), ("linear_probe", a.linear_probe),
                                      ("mask_quality", a.mask_quality)) if v}
    stages = dict(item.split("=", 1) for item in a.pred)
    evaluate({k: Path(v) for k, v in stages.items()}, gt, root, s.num_labels, Path(a.out_metrics),
             Path(a.out_report), Path(a.out_figure), notes, mode=s.evaluation.matching,
             max_figure_rows=s.evaluation.figure_rows, extras=extras,
             paper=a.paper if a.paper != "auto" else s.dataset.source, mapping=s.evaluation.mapping,
             majority=s.evaluation.majority, absent=s.evaluation.absent_classes,
             mined=(Path(a.clusters), Path(source.gt_instances(a.split)))
             if a.clusters and source.gt_instances(a.split) else None)


@command("mask-ap", "class-aware mask AP/AP50 of cluster predictions (Hungarian)",
         arg("--gt", required=True, help="COCO instances file (ground truth)"),
         arg("--predictions", required=True, help="COCO results (cluster ids 1..K, scores)"),
         arg("--setting", choices=("multi", "single", "both"), default="both"),
         arg("--single-object", choices=("reference", "ours"), default="ours",
             help="single-object rule (evaluation.single_object)"),
         arg("--out", required=True, help="JSON with AP, AP50, AP75, the matching"), settings=False)
def cmd_mask_ap(a: argparse.Namespace, s: Settings) -> None:
    from maskdistill.mask_ap import mask_ap, mask_ap_report
    from maskdistill.storage import write_json

    if a.setting == "both":
        result = mask_ap_report(Path(a.gt), Path(a.predictions), a.single_object)
        shown = {setting: {k: result[setting][k] for k in ("AP", "AP50")} for setting in ("multi", "single")}
    else:
        result = mask_ap(Path(a.gt), Path(a.predictions), a.setting, single_rule=a.single_object)
        shown = {k: result[k] for k in ("AP", "AP50")}
    write_json(Path(a.out), result)
    print(json.dumps(shown))


@command("linear-probe", "train a 1x1 classifier on the frozen segmentation model with GT labels; val mIoU",
         arg("--model", required=True, help="trained segmentation model.pt"),
         arg("--train-labels", required=True, help="folder of train GT label PNGs"),
         arg("--val-labels", required=True, help="folder of val GT label PNGs"),
         arg("--split", default="val", help="split evaluated (default val)"),
         arg("--class-names", help="COCO instances file, names file or comma list (background first); "
                                   "default: the 21 VOC classes"),
         SKIPPED, CHECKPOINTS, arg("--out-model", required=True), arg("--out-metrics", required=True))
def cmd_linear_probe(a: argparse.Namespace, s: Settings) -> None:
    from maskdistill.distributed import world
    from maskdistill.linear_probe import evaluate_probe, load_probe, train_linear_probe
    from maskdistill.settings import as_config
    from maskdistill.storage import write_json

    names = _class_names(a.class_names)
    device = _device(s)
    train = [r for r in _records(s, "train", a.skipped) if (Path(a.train_labels) / f"{r.key}.png").is_file()]
    val = [r for r in _records(s, a.split, a.skipped) if (Path(a.val_labels) / f"{r.key}.png").is_file()]
    ckpt = _checkpoints(a.checkpoint_dir, dict(as_config(s.linear_probe), num_classes=len(names)),
                        _digest(a.model), _digest(a.train_labels))
    train_linear_probe(Path(a.model), train, Path(a.train_labels), ckpt, Path(a.out_model), s.linear_probe,
                       len(names), device, s.precision)
    if not world().is_main:  # one process evaluates and writes the metrics
        return
    probe = load_probe(Path(a.out_model), Path(a.model), device, s.precision)
    metrics = evaluate_probe(probe, val, Path(a.val_labels), names, device, s.segmentation.test_short_side,
                             s.crf if s.evaluation.crf else None)
    metrics.update(epochs=s.linear_probe.epochs, num_train_images=len(train), class_names=names,
                   train_labels=a.train_labels, val_labels=a.val_labels)
    write_json(Path(a.out_metrics), metrics)
    log.info("linear probe: val mIoU %.2f%s", metrics["miou"],
             "" if metrics["miou_crf"] is None else f", with CRF {metrics['miou_crf']:.2f}")


# ---------------------------------------------------------------- diagnostics


@command("mask-quality", "class-agnostic mined-mask IoU and CorLoc vs ground truth",
         arg("--masks", nargs="+", required=True, help="mask shards (HDF5) of the split"),
         arg("--gt", required=True, help="COCO instances file of the split"),
         arg("--num-clusters", type=int, default=0, help="also score the masks with oracle and with random "
                                                         "labels among this many clusters (0: skip)"),
         OUT, settings=False)
def cmd_mask_quality(a: argparse.Namespace, s: Settings) -> None:
    from maskdistill.mask_quality import mined_label_bounds, mined_mask_quality
    from maskdistill.storage import write_json

    masks = [Path(p) for p in a.masks]
    result = mined_mask_quality(masks, Path(a.gt))
    log.info("mined masks: mean best IoU %.1f, CorLoc %.1f over %d images", result["mask_iou"],
             result["corloc"], result["images"])
    if a.num_clusters:
        result["label_bounds"] = bounds = mined_label_bounds(masks, Path(a.gt), a.num_clusters)
        log.info("mined masks as initial_masks: mIoU %.1f with oracle labels, %.1f with random ones",
                 bounds["oracle_miou"], bounds["random_miou"])
    write_json(Path(a.out), result)


@command("patch-kmeans", "baseline: K-means on ViT patch features -> label PNGs", SPLIT, SKIPPED,
         WEIGHTS_MANIFEST, OUT)
def cmd_patch_kmeans(a: argparse.Namespace, s: Settings) -> None:
    from maskdistill.patch_kmeans import patch_kmeans_baseline

    weights = _vit_weights(s, "mining.backbone", a.weights_manifest)
    summary = patch_kmeans_baseline(_records(s, "train", a.skipped), _records(s, a.split, a.skipped),
                                    Path(a.out), s.mining.backbone, s.mining.short_side, s.num_labels,
                                    s.clustering.seed, _device(s), weights)
    log.info("patch K-means baseline: %s", summary)


@command("stage-figure", "figure: CLS attention, mined mask, Mask R-CNN, segmentation", SPLIT,
         arg("--masks", nargs="+", required=True),
         arg("--predictions", required=True, help="Mask R-CNN predictions (COCO JSON)"),
         arg("--segmentation", required=True, help="folder of predicted label PNGs"),
         arg("--ground-truth", help="folder of ground-truth label PNGs"), SKIPPED, OUT)
def cmd_stage_figure(a: argparse.Namespace, s: Settings) -> None:
    from maskdistill.stage_figure import stage_figure

    keys = [r.key for r in _records(s, a.split, a.skipped)][: s.evaluation.figure_rows]
    stage_figure(keys, _images_root(s, a.split), [Path(p) for p in a.masks], Path(a.predictions),
                 Path(a.segmentation), Path(a.out), s.pseudo_labels.tau,
                 Path(a.ground_truth) if a.ground_truth else None)


# ---------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered sub-command."""
    parser = argparse.ArgumentParser(prog="maskdistill", description=__doc__)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default); "
                        "under torchrun, those of the whole job, shared among its processes")
    sub = parser.add_subparsers(dest="command", required=True)
    for cmd in COMMANDS.values():
        sp = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        if cmd.settings:
            sp.add_argument("--config", required=cmd.settings is True, help="inline JSON or a YAML/JSON file"
                            + ("" if cmd.settings is True else " (default: the schema defaults)"))
        for flags, kwargs in cmd.args:
            sp.add_argument(*flags, **kwargs)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; errors become one clear line and exit status 1."""
    from maskdistill.distributed import session, world_from_env
    from maskdistill.training import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging()
    cmd = COMMANDS[args.command]
    try:
        if args.threads:
            import torch

            torch.set_num_threads(max(1, args.threads // world_from_env().world_size))
        config = getattr(args, "config", None)
        settings = read_settings(config) if config else load_settings()
        with session(settings.device):  # one process per GPU under torchrun; else a no-op
            cmd.handler(args, settings)
    except (ConfigError, OSError, ValueError, RuntimeError) as err:
        log.error("%s", err)
        print(f"maskdistill {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
