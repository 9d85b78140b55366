"""Command line of the package: one sub-command per workflow step (the Snakemake rules call these)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from maskdistill.config import ConfigError, validate_config, weight_notes
from maskdistill.images import list_split, resolve_splits, shard_records
from maskdistill.storage import digest_path
from maskdistill.training import resolve_device, setup_logging

log = logging.getLogger("maskdistill")


def _config(text: str) -> dict[str, Any]:
    """A config given inline as JSON or as a path to a YAML/JSON file, validated with defaults."""
    if text.lstrip().startswith("{"):
        raw = json.loads(text)
    else:
        import yaml

        raw = yaml.safe_load(Path(text).read_text()) or {}
    return validate_config(raw)


def _records(cfg: dict[str, Any], split: str, mined_only: bool = True):
    splits = resolve_splits(cfg["dataset"])
    if split not in splits:
        raise ConfigError(f"config key 'dataset.{split}': split '{split}' is not configured")
    records = list_split(splits[split])
    if mined_only and cfg["dataset"]["on_bad_image"] == "skip":
        records = _drop_skipped(records, cfg, split)
    return records, Path(splits[split]["images"])


def _mask_shards(cfg: dict[str, Any], split: str) -> list[Path]:
    from maskdistill.plan import RESULTS

    return [Path(RESULTS) / "masks" / split / f"shard-{i:03d}.h5"
            for i in range(cfg["dataset"]["num_shards"])]


def _skipped_keys(cfg: dict[str, Any], split: str) -> set[str]:
    """Keys of the images mining skipped in ``split`` (policy ``skip``; empty otherwise)."""
    from maskdistill.storage import skipped_keys

    if cfg["dataset"]["on_bad_image"] != "skip":
        return set()
    return skipped_keys(_mask_shards(cfg, split))


def _drop_skipped(records: list, cfg: dict[str, Any], split: str) -> list:
    """Policy ``skip``: the stages after mining leave out the images that mining skipped."""
    from maskdistill.images import without_skipped

    keys = _skipped_keys(cfg, split)
    if keys:
        log.info("%s: leaving out %d images that mining skipped (see results/input_report.md)",
                 split, len(keys))
    return without_skipped(records, keys)


def cmd_make_demo(a: argparse.Namespace) -> None:
    from maskdistill.demo import generate_demo

    cfg = _config(a.config)
    generate_demo(Path(a.out), cfg["dataset"]["demo"])


def cmd_pretrain(a: argparse.Namespace) -> None:
    from maskdistill.pretraining import pretrain_dino
    from maskdistill.training import prepare_checkpoint_dir

    cfg = _config(a.config)
    records, root = _records(cfg, "train", mined_only=False)
    ckpt = prepare_checkpoint_dir(Path(a.checkpoint_dir), [cfg["pretrain"], digest_path(root)])
    scenes = cfg["pretrain"].get("demo_scenes")
    demo = cfg["dataset"]["source"] == "demo"
    recipe = {"demo": cfg["dataset"]["demo"], "demo_scenes": scenes} if demo else {}
    if demo and scenes:
        from maskdistill.demo import generate_demo
        from maskdistill.images import list_image_folder

        root = ckpt / "scenes"
        log.info("drawing %d demo train scenes for pretraining into %s", scenes, root)
        generate_demo(root, {**cfg["dataset"]["demo"], "num_train": int(scenes)}, splits=("train",))
        records = list_image_folder(root / "train" / "images")
    summary = pretrain_dino(records, Path(a.out), ckpt, cfg["pretrain"], resolve_device(cfg["device"]),
                            cfg["dataset"]["on_bad_image"], recipe)
    log.info("pretrained %s on %d images, %d steps", summary["arch"], summary["images"], summary["steps"])


def cmd_mask_quality(a: argparse.Namespace) -> None:
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


def cmd_patch_kmeans(a: argparse.Namespace) -> None:
    from maskdistill.baselines import patch_kmeans_baseline

    cfg = _config(a.config)
    train, _ = _records(cfg, "train")
    target, _ = _records(cfg, a.split)
    k = cfg["clustering"]["num_clusters"] * cfg["clustering"]["overclustering"] + 1
    summary = patch_kmeans_baseline(train, target, Path(a.out), cfg["mining"]["backbone"],
                                    cfg["mining"]["short_side"], k, cfg["clustering"]["seed"],
                                    device=resolve_device(cfg["device"]))
    log.info("patch K-means baseline: %s", summary)


def cmd_stage_figure(a: argparse.Namespace) -> None:
    from maskdistill.figures import stage_figure

    cfg = _config(a.config)
    records, root = _records(cfg, a.split)
    keys = [r.key for r in records][: a.rows]
    stage_figure(keys, root, [Path(p) for p in a.masks], Path(a.predictions), Path(a.segmentation),
                 Path(a.out), cfg["pseudo_labels"]["tau"],
                 Path(a.ground_truth) if a.ground_truth else None)


def cmd_mine(a: argparse.Namespace) -> None:
    from maskdistill.images import read_image_list
    from maskdistill.mining import mine_shard

    cfg = _config(a.config)
    if a.image_list:  # the images planned for the run, whatever the folder holds now
        records = read_image_list(a.image_list)
    else:
        records, _ = _records(cfg, a.split, mined_only=False)
    shard = shard_records(records, a.shard, cfg["dataset"]["num_shards"])
    log.info("split %s shard %d: %d of %d images", a.split, a.shard, len(shard), len(records))
    stats = mine_shard(shard, Path(a.out), cfg["mining"], resolve_device(cfg["device"]),
                       cfg["dataset"]["on_bad_image"])
    log.info("done: %s", stats)


def cmd_describe(a: argparse.Namespace) -> None:
    from maskdistill.clustering import describe_shard

    cfg = _config(a.config)
    _, root = _records(cfg, a.split)
    describe_shard(Path(a.masks), root, Path(a.out), cfg["clustering"], resolve_device(cfg["device"]))


def cmd_cluster(a: argparse.Namespace) -> None:
    from maskdistill.clustering import cluster_splits

    cfg = _config(a.config)
    masks = {"train": [Path(p) for p in a.masks_train], "val": [Path(p) for p in a.masks_val]}
    feats = {"train": [Path(p) for p in a.features_train], "val": [Path(p) for p in a.features_val]}
    outs = {"train": Path(a.out_train)}
    if a.out_val:
        outs["val"] = Path(a.out_val)
    ids = {s: {r.key: r.image_id for r in _records(cfg, s)[0] if r.image_id is not None}
           for s in outs}
    summary = cluster_splits({s: masks[s] for s in outs}, {s: feats[s] for s in outs}, outs,
                             Path(a.out_model), cfg["clustering"], ids)
    log.info("clusters: %s", json.dumps(summary))


def cmd_train_detector(a: argparse.Namespace) -> None:
    from maskdistill.detection import get_backend
    from maskdistill.training import prepare_checkpoint_dir

    cfg = _config(a.config)
    _, root = _records(cfg, "train")
    ckpt = prepare_checkpoint_dir(Path(a.checkpoint_dir), [cfg["detector"], digest_path(a.train_json)])
    get_backend(cfg["detector"], resolve_device(cfg["device"])).train(
        Path(a.train_json), root, ckpt, Path(a.out))


def cmd_predict_detector(a: argparse.Namespace) -> None:
    from maskdistill.detection import get_backend

    cfg = _config(a.config)
    records, _ = _records(cfg, a.split)
    get_backend(cfg["detector"], resolve_device(cfg["device"])).predict(
        Path(a.model), records, Path(a.out))


def cmd_paste(a: argparse.Namespace) -> None:
    from maskdistill.pseudolabels import write_label_maps
    from maskdistill.storage import read_json

    stats = write_label_maps(read_json(a.instances), Path(a.out), a.tau)
    log.info("label maps: %s", stats)


def cmd_train_segmentation(a: argparse.Namespace) -> None:
    from maskdistill.segmentation import train_segmentation
    from maskdistill.training import prepare_checkpoint_dir

    cfg = _config(a.config)
    records, _ = _records(cfg, "train")
    seg = dict(cfg["segmentation"], num_classes=a.num_classes)
    ckpt = prepare_checkpoint_dir(Path(a.checkpoint_dir), [seg, digest_path(a.labels)])
    train_segmentation(records, Path(a.labels), ckpt, Path(a.out), seg, resolve_device(cfg["device"]))


def cmd_predict_segmentation(a: argparse.Namespace) -> None:
    from maskdistill.segmentation import predict_segmentation
    from maskdistill.training import load_checkpoint

    cfg = _config(a.config)
    records, _ = _records(cfg, a.split)
    seg = dict(cfg["segmentation"], num_classes=load_checkpoint(a.model)["num_classes"])
    predict_segmentation(Path(a.model), records, Path(a.out), seg, resolve_device(cfg["device"]))


def cmd_evaluate(a: argparse.Namespace) -> None:
    from maskdistill.evaluation import VOC_CLASSES, evaluate, folder_ground_truth, read_class_names

    cfg = _config(a.config)
    splits = resolve_splits(cfg["dataset"])
    if a.split not in splits:
        raise ConfigError(f"config key 'dataset.{a.split}': evaluation needs a {a.split} split")
    split = splits[a.split]
    stages = dict(item.split("=", 1) for item in a.pred)
    notes = weight_notes(cfg) + list(a.note or [])
    if a.gt_semantic:  # label PNGs <key>.png (0 background, class ids, 255 ignore)
        names = read_class_names(a.gt_class_names) if a.gt_class_names else list(VOC_CLASSES)
        images = {r.key: r.path for r in list_split(split)}
        gt: Any = folder_ground_truth(Path(a.gt_semantic), names, images)
    elif split.get("annotations"):
        gt = Path(split["annotations"])
    else:
        raise ConfigError("config key 'dataset.val.annotations': no ground truth for evaluation "
                          "(set it to a COCO instances file or pass --gt-semantic DIR)")
    skipped = _skipped_keys(cfg, a.split)
    if skipped:  # images mining could not read have no predictions: score the others, say so
        from dataclasses import replace

        from maskdistill.evaluation import coco_ground_truth

        gt = coco_ground_truth(gt, Path(split["images"])) if isinstance(gt, Path) else gt
        gt = replace(gt, keys=tuple(k for k in gt.keys if k not in skipped))
        notes.append(f"{len(skipped)} unreadable {a.split} images were skipped and are not scored "
                     "(listed in input_report.md)")
    extras = {k: Path(v) for k, v in (("mask_ap", a.mask_ap), ("linear_probe", a.linear_probe),
                                      ("mask_quality", a.mask_quality)) if v}
    evaluate({k: Path(v) for k, v in stages.items()}, gt,
             Path(split["images"]), a.num_pred, Path(a.out_metrics), Path(a.out_report),
             Path(a.out_figure), notes, mode=cfg["evaluation"]["matching"],
             max_figure_rows=cfg["evaluation"]["figure_rows"], extras=extras,
             paper=a.paper if a.paper != "auto" else cfg["dataset"]["source"])


def cmd_crf_refine(a: argparse.Namespace) -> None:
    from maskdistill.crf import refine_folder

    cfg = _config(a.config)
    records, _ = _records(cfg, a.split)
    n = refine_folder(records, Path(a.labels), Path(a.out), cfg["crf"])
    log.info("CRF-refined %d label maps of %s into %s", n, a.labels, a.out)


def cmd_linear_probe(a: argparse.Namespace) -> None:
    from maskdistill.evaluation import VOC_CLASSES, read_class_names
    from maskdistill.linear_probe import evaluate_probe, load_probe, train_linear_probe
    from maskdistill.storage import write_json
    from maskdistill.training import prepare_checkpoint_dir

    cfg = _config(a.config)
    names = read_class_names(a.class_names) if a.class_names else list(VOC_CLASSES)
    device = resolve_device(cfg["device"])
    train_records, _ = _records(cfg, "train")
    train_records = [r for r in train_records if (Path(a.train_labels) / f"{r.key}.png").is_file()]
    val_records, _ = _records(cfg, a.split)
    val_records = [r for r in val_records if (Path(a.val_labels) / f"{r.key}.png").is_file()]
    probe_cfg = dict(cfg["linear_probe"], num_classes=len(names))
    ckpt = prepare_checkpoint_dir(Path(a.checkpoint_dir), [probe_cfg, digest_path(a.model),
                                                           digest_path(a.train_labels)])
    train_linear_probe(Path(a.model), train_records, Path(a.train_labels), ckpt, Path(a.out_model),
                       probe_cfg, device)
    probe = load_probe(Path(a.out_model), Path(a.model), device)
    metrics = evaluate_probe(probe, val_records, Path(a.val_labels), names, device,
                             cfg["segmentation"]["test_short_side"],
                             _config(a.crf_config)["crf"] if a.crf_config else None)
    metrics.update(epochs=probe_cfg["epochs"], num_train_images=len(train_records),
                   class_names=names, train_labels=a.train_labels, val_labels=a.val_labels)
    write_json(Path(a.out_metrics), metrics)
    log.info("linear probe: val mIoU %.2f%s", metrics["miou"],
             "" if metrics["miou_crf"] is None else f", with CRF {metrics['miou_crf']:.2f}")


def cmd_mask_ap(a: argparse.Namespace) -> None:
    from maskdistill.mask_ap import mask_ap, mask_ap_report
    from maskdistill.storage import write_json

    if a.setting == "both":
        result = mask_ap_report(Path(a.gt), Path(a.predictions))
    else:
        result = mask_ap(Path(a.gt), Path(a.predictions), a.setting)
    write_json(Path(a.out), result)
    print(json.dumps({s: {k: result[s][k] for k in ("AP", "AP50")} for s in ("multi", "single")}
                     if a.setting == "both" else {k: result[k] for k in ("AP", "AP50")}))


def cmd_voc_instances(a: argparse.Namespace) -> None:
    from maskdistill.datasets import write_voc_instances

    log.info("VOC %s instances: %s", a.split, write_voc_instances(Path(a.root), a.split, Path(a.out)))


def cmd_coco20k_instances(a: argparse.Namespace) -> None:
    from maskdistill.datasets import write_coco20k_instances

    log.info("COCO20k instances: %s", write_coco20k_instances(a.annotations, a.filenames, Path(a.out)))


def cmd_yolo_to_coco(a: argparse.Namespace) -> None:
    from maskdistill.yolo import COCO80_NAMES, write_coco, yolo_to_coco

    names = Path(a.names).read_text().split("\n") if a.names else COCO80_NAMES
    write_coco(Path(a.out), yolo_to_coco(Path(a.images), Path(a.labels), [n for n in names if n]))


def cmd_check_config(a: argparse.Namespace) -> None:
    from maskdistill.config import check_references

    cfg = _config(a.config)
    check_references(cfg)
    print(json.dumps(cfg, indent=1))


def cmd_input_report(a: argparse.Namespace) -> None:
    from maskdistill.storage import input_report, write_input_report

    cfg = _config(a.config)
    shards = {"train": [Path(p) for p in a.masks_train], "val": [Path(p) for p in a.masks_val]}
    report = input_report({s: p for s, p in shards.items() if p}, cfg["dataset"]["on_bad_image"])
    write_input_report(report, Path(a.out_json), Path(a.out_md))
    log.info("input report: %s", json.dumps(report["splits"]))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    p = argparse.ArgumentParser(prog="maskdistill", description=__doc__)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.set_defaults(func=func)
        if name not in ("paste", "yolo-to-coco", "mask-ap", "mask-quality", "voc-instances",
                        "coco20k-instances"):
            sp.add_argument("--config", required=True, help="inline JSON or a YAML file")
        return sp

    s = add("make-demo", cmd_make_demo, "draw the synthetic demo scenes")
    s.add_argument("--out", required=True)
    s = add("pretrain", cmd_pretrain, "DINO self-distillation of a ViT on the train images")
    s.add_argument("--checkpoint-dir", required=True)
    s.add_argument("--out", required=True, help="teacher backbone weights (.safetensors)")
    s = add("mask-quality", cmd_mask_quality, "class-agnostic mined-mask IoU and CorLoc vs ground truth")
    s.add_argument("--masks", nargs="+", required=True, help="mask shards (HDF5) of the split")
    s.add_argument("--gt", required=True, help="COCO instances file of the split")
    s.add_argument("--num-clusters", type=int, default=0,
                   help="also score the masks with oracle and with random labels among this many "
                        "clusters (0: skip)")
    s.add_argument("--out", required=True)
    s = add("patch-kmeans", cmd_patch_kmeans, "baseline: K-means on ViT patch features -> label PNGs")
    s.add_argument("--split", required=True)
    s.add_argument("--out", required=True)
    s = add("stage-figure", cmd_stage_figure, "figure: CLS attention, mined mask, Mask R-CNN, segmentation")
    s.add_argument("--split", required=True)
    s.add_argument("--masks", nargs="+", required=True)
    s.add_argument("--predictions", required=True, help="Mask R-CNN predictions (COCO JSON)")
    s.add_argument("--segmentation", required=True, help="folder of predicted label PNGs")
    s.add_argument("--ground-truth", help="folder of ground-truth label PNGs")
    s.add_argument("--rows", type=int, default=6)
    s.add_argument("--out", required=True)
    s = add("mine", cmd_mine, "mine one object mask per image of a shard -> HDF5")
    s.add_argument("--split", required=True)
    s.add_argument("--shard", type=int, required=True)
    s.add_argument("--image-list", help="the shard's planned images (JSON, rule list_images) instead "
                   "of listing the split anew")
    s.add_argument("--out", required=True)
    s = add("describe", cmd_describe, "CLS features of each mined mask's box crop -> HDF5")
    s.add_argument("--split", required=True)
    s.add_argument("--masks", required=True)
    s.add_argument("--out", required=True)
    s = add("cluster", cmd_cluster, "K-means over all shards -> COCO pseudo-labels per split")
    for name in ("masks-train", "features-train", "masks-val", "features-val"):
        s.add_argument(f"--{name}", nargs="*", default=[])
    s.add_argument("--out-train", required=True)
    s.add_argument("--out-val")
    s.add_argument("--out-model", required=True)
    s = add("train-detector", cmd_train_detector, "train Mask R-CNN on COCO pseudo-labels")
    s.add_argument("--train-json", required=True)
    s.add_argument("--checkpoint-dir", required=True)
    s.add_argument("--out", required=True)
    s = add("predict-detector", cmd_predict_detector, "Mask R-CNN predictions for a split")
    s.add_argument("--model", required=True)
    s.add_argument("--split", required=True)
    s.add_argument("--out", required=True)
    s = add("paste", cmd_paste, "COCO instances/predictions -> label PNGs (score >= tau)")
    s.add_argument("--instances", required=True)
    s.add_argument("--tau", type=float, required=True)
    s.add_argument("--out", required=True)
    s = add("train-segmentation", cmd_train_segmentation, "train DeepLab-v3 on label PNGs")
    s.add_argument("--labels", required=True)
    s.add_argument("--num-classes", type=int, required=True)
    s.add_argument("--checkpoint-dir", required=True)
    s.add_argument("--out", required=True)
    s = add("predict-segmentation", cmd_predict_segmentation, "segment a split -> label PNGs")
    s.add_argument("--model", required=True)
    s.add_argument("--split", required=True)
    s.add_argument("--out", required=True)
    s = add("evaluate", cmd_evaluate, "Hungarian mIoU of each stage on the val split + report")
    s.add_argument("--pred", action="append", required=True, help="STAGE=DIR of label PNGs")
    s.add_argument("--num-pred", type=int, required=True, help="predicted labels incl. background")
    s.add_argument("--split", default="val", help="split to score (default val; COCO20k: train)")
    s.add_argument("--note", action="append")
    s.add_argument("--gt-semantic", help="folder of GT label PNGs <key>.png (255 ignore) instead of "
                   "the val split's COCO instances")
    s.add_argument("--gt-class-names", help="class names for --gt-semantic (file, one per line, or "
                   "comma list; background first); default: the 21 VOC classes")
    s.add_argument("--mask-ap", help="mask_ap.json to include in the report")
    s.add_argument("--linear-probe", help="linear-probe metrics JSON to include in the report")
    s.add_argument("--mask-quality", help="mined-mask quality JSON (mask-quality) to include")
    s.add_argument("--paper", default="auto", help="paper numbers to compare with: voc, coco20k, "
                   "none, or auto (from dataset.source)")
    s.add_argument("--out-metrics", required=True)
    s.add_argument("--out-report", required=True)
    s.add_argument("--out-figure", required=True)
    s = add("crf-refine", cmd_crf_refine, "dense-CRF-refine a split's label PNGs (settings: crf)")
    s.add_argument("--split", required=True)
    s.add_argument("--labels", required=True, help="folder of label PNGs <key>.png")
    s.add_argument("--out", required=True)
    s = add("linear-probe", cmd_linear_probe, "train a 1x1 classifier on the frozen segmentation "
            "model with GT labels; val mIoU")
    s.add_argument("--model", required=True, help="trained segmentation model.pt")
    s.add_argument("--train-labels", required=True, help="folder of train GT label PNGs")
    s.add_argument("--val-labels", required=True, help="folder of val GT label PNGs")
    s.add_argument("--split", default="val", help="split evaluated (default val)")
    s.add_argument("--class-names", help="COCO instances file, names file or comma list "
                   "(background first); default: the 21 VOC classes")
    s.add_argument("--crf-config", help="also score after dense CRF with this config's crf section")
    s.add_argument("--checkpoint-dir", required=True)
    s.add_argument("--out-model", required=True)
    s.add_argument("--out-metrics", required=True)
    s = add("mask-ap", cmd_mask_ap, "class-aware mask AP/AP50 of cluster predictions (Hungarian)")
    s.add_argument("--gt", required=True, help="COCO instances file (ground truth)")
    s.add_argument("--predictions", required=True, help="COCO results (cluster ids 1..K, scores)")
    s.add_argument("--setting", choices=("multi", "single", "both"), default="both")
    s.add_argument("--out", required=True, help="JSON with AP, AP50, AP75, the matching")
    s = add("yolo-to-coco", cmd_yolo_to_coco, "convert YOLO polygon labels to COCO instances")
    s.add_argument("--images", required=True)
    s.add_argument("--labels", required=True)
    s.add_argument("--names", help="file with one class name per line (default: COCO's 80)")
    s.add_argument("--out", required=True)
    s = add("voc-instances", cmd_voc_instances, "COCO instances of a VOC 2012 split (SegmentationObject)")
    s.add_argument("--root", required=True, help="the VOCdevkit/VOC2012 folder")
    s.add_argument("--split", default="val", help="train, val or trainval (default: val)")
    s.add_argument("--out", required=True)
    s = add("coco20k-instances", cmd_coco20k_instances, "instances_train2014.json reduced to COCO20k")
    s.add_argument("--annotations", required=True, help="COCO instances_train2014.json")
    s.add_argument("--filenames", required=True, help="coco_20k_filenames.txt (one file name per line)")
    s.add_argument("--out", required=True)
    add("check-config", cmd_check_config, "validate a config and print it with defaults")
    s = add("input-report", cmd_input_report, "list the images mining skipped, with reasons")
    s.add_argument("--masks-train", nargs="*", default=[])
    s.add_argument("--masks-val", nargs="*", default=[])
    s.add_argument("--out-json", required=True)
    s.add_argument("--out-md", required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; errors become one clear line and exit status 1."""
    args = build_parser().parse_args(argv)
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        args.func(args)
    except (ConfigError, OSError, ValueError, RuntimeError) as err:
        log.error("%s", err)
        print(f"maskdistill {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
