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


def _records(cfg: dict[str, Any], split: str):
    splits = resolve_splits(cfg["dataset"])
    if split not in splits:
        raise ConfigError(f"config key 'dataset.{split}': split '{split}' is not configured")
    return list_split(splits[split]), Path(splits[split]["images"])


def cmd_make_demo(a: argparse.Namespace) -> None:
    from maskdistill.demo import generate_demo

    cfg = _config(a.config)
    generate_demo(Path(a.out), cfg["dataset"]["demo"])


def cmd_mine(a: argparse.Namespace) -> None:
    from maskdistill.mining import mine_shard

    cfg = _config(a.config)
    records, _ = _records(cfg, a.split)
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
    from maskdistill.evaluation import evaluate

    cfg = _config(a.config)
    split = resolve_splits(cfg["dataset"])["val"]
    stages = dict(item.split("=", 1) for item in a.pred)
    notes = weight_notes(cfg) + list(a.note or [])
    evaluate({k: Path(v) for k, v in stages.items()}, Path(split["annotations"]),
             Path(split["images"]), a.num_pred, Path(a.out_metrics), Path(a.out_report),
             Path(a.out_figure), notes, mode=cfg["evaluation"]["matching"],
             max_figure_rows=cfg["evaluation"]["figure_rows"])


def cmd_yolo_to_coco(a: argparse.Namespace) -> None:
    from maskdistill.yolo import COCO80_NAMES, write_coco, yolo_to_coco

    names = Path(a.names).read_text().split("\n") if a.names else COCO80_NAMES
    write_coco(Path(a.out), yolo_to_coco(Path(a.images), Path(a.labels), [n for n in names if n]))


def cmd_check_config(a: argparse.Namespace) -> None:
    cfg = _config(a.config)
    print(json.dumps(cfg, indent=1))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    p = argparse.ArgumentParser(prog="maskdistill", description=__doc__)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.set_defaults(func=func)
        if name != "paste" and name != "yolo-to-coco":
            sp.add_argument("--config", required=True, help="inline JSON or a YAML file")
        return sp

    s = add("make-demo", cmd_make_demo, "draw the synthetic demo scenes")
    s.add_argument("--out", required=True)
    s = add("mine", cmd_mine, "mine one object mask per image of a shard -> HDF5")
    s.add_argument("--split", required=True)
    s.add_argument("--shard", type=int, required=True)
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
    s.add_argument("--note", action="append")
    s.add_argument("--out-metrics", required=True)
    s.add_argument("--out-report", required=True)
    s.add_argument("--out-figure", required=True)
    s = add("yolo-to-coco", cmd_yolo_to_coco, "convert YOLO polygon labels to COCO instances")
    s.add_argument("--images", required=True)
    s.add_argument("--labels", required=True)
    s.add_argument("--names", help="file with one class name per line (default: COCO's 80)")
    s.add_argument("--out", required=True)
    add("check-config", cmd_check_config, "validate a config and print it with defaults")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; errors become one clear line and exit status 1."""
    args = build_parser().parse_args(argv)
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        args.func(args)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as err:
        log.error("%s", err)
        print(f"maskdistill {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
