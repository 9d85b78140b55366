# Shared definitions: config validation, the image plan, helpers for inputs and params.
import os
import shlex

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

import maskdistill
from maskdistill.config import SCHEMA_PATH, ConfigError, check_references, validate_config
from maskdistill.datasets import coco20k_gt_path, evaluation_split, semantic_gt_dir, voc_gt_path
from maskdistill.images import resolve_splits, write_image_list
from maskdistill.plan import (DESCRIBE_KEYS, RESULTS, image_inputs, images_fingerprint, rule_config, shard_digest,
                              shard_ids, shard_members, split_keys, workflow_outputs_outside)

min_version("9.0")

try:
    validate(config, schema=str(SCHEMA_PATH), set_default=True)
    config = validate_config(config)
except (WorkflowError, ConfigError) as err:
    try:
        validate_config(config)
    except ConfigError as named:
        raise WorkflowError(str(named)) from None
    raise
try:  # model names, checkpoints and image folders exist (before any job is planned)
    check_references(config)
except ConfigError as err:
    raise WorkflowError(str(err)) from None

VERSION = maskdistill.__version__
# Optional DINO pretraining (rules/pretrain.smk): mining and clustering then load its teacher.
PRETRAINED = f"{RESULTS}/pretrain/backbone.safetensors"
if config["pretrain"]["enabled"]:
    for _section in ("mining", "clustering"):
        config[_section]["backbone"] = {"name": config["pretrain"]["arch"], "pretrained": False,
                                        "checkpoint": PRETRAINED}
try:  # the images of each split; under on_bad_image: fail, unreadable ones stop the plan here
    SPLITS = split_keys(config)
except (ValueError, FileNotFoundError) as err:
    raise WorkflowError(str(err)) from None
SHARDS = shard_ids(config)
NUM_SHARDS = config["dataset"]["num_shards"]
HAS_VAL = "val" in SPLITS
# The split that evaluate scores (val; COCO20k: its own train images) and its ground truth: a COCO
# instances file (user's, the demo's, or one that rules/datasets.smk writes for VOC / COCO20k) and,
# for VOC, the SegmentationClass label PNGs (255 ignored) as semantic ground truth.
GT_SPLIT = evaluation_split(config["dataset"])
GT_FILE = resolve_splits(config["dataset"], RESULTS).get(GT_SPLIT, {}).get("annotations")
GT_SEMANTIC = semantic_gt_dir(config["dataset"])
HAS_GT = GT_SPLIT in SPLITS and bool(GT_FILE)
NUM_LABELS = config["clustering"]["num_clusters"] * config["clustering"]["overclustering"] + 1
EVAL_SPLITS = [s for s in ("train", "val") if s in SPLITS]


def members(wildcards):
    return shard_members(SPLITS[wildcards.split], wildcards.shard, NUM_SHARDS)


def shard_images(wildcards):
    """The image files of one shard that are declared inputs: the demo's (workflow outputs) only.

    A user's images are never declared (see plan.image_inputs): their sizes and modification
    times are in the rule's params (shard_digest), so a changed image reruns only its shard.
    """
    return image_inputs(members(wildcards))


def split_images(wildcards):
    """The declared image inputs of a whole split (the demo's only, as in shard_images)."""
    return image_inputs(SPLITS[wildcards.split])


def image_list():
    """The shard's image list that a mine job reads (user sources; the demo lists its own)."""
    if config["dataset"]["source"] == "demo":
        return []
    return f"{RESULTS}/images/{{split}}/shard-{{shard}}.json"


def user_images_params(split):
    """``images=`` the fingerprint of a split of user images, for the params of a rule that reads
    them with nothing upstream (pretrain); empty for the demo, whose images are declared inputs."""
    if config["dataset"]["source"] == "demo":
        return {}
    return {"images": images_fingerprint(SPLITS[split])}


def pretrained_weights():
    """The pretrain output when the ViTs come from our own DINO run, else nothing."""
    return [PRETRAINED] if config["pretrain"]["enabled"] else []


def demo_outputs():
    if config["dataset"]["source"] != "demo":
        return []
    return [f"{RESULTS}/demo/val/instances.json"]


def shard_files(kind, split):
    return expand(f"{RESULTS}/{kind}/{split}/shard-{{shard}}.h5", shard=SHARDS)


def cfg(*sections, only=()):
    """The config sections a job reads, as JSON (Snakemake compares params to decide reruns)."""
    return rule_config(config, *sections, only=only)


def final_targets():
    targets = expand(f"{RESULTS}/segmentation/predictions/{{split}}", split=EVAL_SPLITS)
    targets += [f"{RESULTS}/input_report.json"]  # images read / skipped (rules/report.smk)
    if HAS_GT:
        targets += [f"{RESULTS}/metrics.json", f"{RESULTS}/report.md"]
    return targets

