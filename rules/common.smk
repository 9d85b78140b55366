# Shared definitions: config validation, the image plan, helpers for inputs and params.
import os

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

import maskdistill
from maskdistill.config import SCHEMA_PATH, ConfigError, validate_config
from maskdistill.plan import DESCRIBE_KEYS, RESULTS, rule_config, shard_digest, shard_ids, shard_members, split_keys

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

VERSION = maskdistill.__version__
SPLITS = split_keys(config)
SHARDS = shard_ids(config)
NUM_SHARDS = config["dataset"]["num_shards"]
HAS_VAL = "val" in SPLITS
HAS_GT = HAS_VAL and (config["dataset"]["source"] == "demo" or bool(config["dataset"]["val"]["annotations"]))
NUM_LABELS = config["clustering"]["num_clusters"] * config["clustering"]["overclustering"] + 1
EVAL_SPLITS = [s for s in ("train", "val") if s in SPLITS]


def members(wildcards):
    return shard_members(SPLITS[wildcards.split], wildcards.shard, NUM_SHARDS)


def shard_images(wildcards):
    """The image files of one shard: their change (mtime) reruns only that shard."""
    return [path for _, path in members(wildcards)]


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
    if HAS_GT:
        targets += [f"{RESULTS}/metrics.json", f"{RESULTS}/report.md"]
    return targets

