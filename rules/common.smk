# Shared definitions: the config checked once, the plan (maskdistill.plan) and small helpers that
# rules use for their inputs and params. No planning logic lives here: it is in the package.
import os
import shlex

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

from maskdistill.config import ConfigError
from maskdistill.datasets import write_image_list
from maskdistill.plan import (FEATURE_KEYS, INPUT_REPORT, RESULTS, SEGMENTED, WEIGHTS_MANIFEST, image_inputs,
                              images_fingerprint, launch_command, make_plan, rule_config, shard_digest,
                              workflow_outputs_outside)

min_version("9.0")

try:  # the schema (defaults filled), what the config names exists, every split's images
    PLAN = make_plan(config)
except (ConfigError, ValueError, FileNotFoundError) as err:
    raise WorkflowError(str(err)) from None
config = PLAN.config
SPLITS = PLAN.splits
SETTINGS = PLAN.settings
DEMO = SETTINGS.dataset.source == "demo"
EVAL_SPLIT = PLAN.eval_split
HUB_WEIGHTS = PLAN.hub_weights  # hub weights the model jobs load (rules/fetch_weights.smk)
REPORT_FRONT = f"{RESULTS}/report.rst"


def members(wildcards):
    """The planned (key, path) pairs of the job's shard."""
    return PLAN.shard_members(wildcards.split, wildcards.shard)


def shard_images(wildcards):
    """The shard's image files that are declared inputs: the demo's (workflow outputs) only.

    A user's images are never declared (plan.image_inputs): their sizes and modification times are
    in the rule's params (shard_digest), so a changed image reruns only its shard.
    """
    return image_inputs(members(wildcards))


def split_images(wildcards):
    """The declared image inputs of a whole split (the demo's only, as in shard_images)."""
    return image_inputs(SPLITS[wildcards.split])


def user_images_params(split):
    """``images=`` the fingerprint of a split of user images, for the params of a rule that reads
    them with nothing upstream (pretrain); empty for the demo, whose images are declared inputs."""
    return {} if DEMO else {"images": images_fingerprint(SPLITS[split])}


def demo_outputs():
    """The demo's files that rules reading images wait for (nothing for other sources)."""
    return [f"{RESULTS}/demo/val/instances.json"] if DEMO else []


def pretrained_weights():
    """The pretrain output when the ViTs come from our own DINO run, else nothing."""
    return [PLAN.pretrained] if PLAN.pretrained else []


def weights_manifest():
    """The fetch_weights manifest, for the rules that load a ViT, when the config names hub weights.

    ``ancient``: the manifest orders the jobs after fetch_weights, but a fetch that reran (the cache
    folder moved, say) reruns nothing; a new backbone reruns its jobs through their params.
    """
    return ancient(WEIGHTS_MANIFEST) if HUB_WEIGHTS else []


def manifest_option(wildcards, input):
    """``--weights-manifest FILE`` for a job with the manifest as its ``hub`` input: it then reads the
    hub weights from the cache, offline."""
    return f"--weights-manifest {input.hub}" if input.hub else ""


def shard_files(kind, split):
    """Every shard file of one kind (masks, features) of a split."""
    return expand(f"{RESULTS}/{kind}/{split}/shard-{{shard}}.h5", shard=PLAN.shards)


def extra_shard_files(kind):
    """Every shard file of one kind of the clustering.extra_images splits (none without them)."""
    return [path for split in PLAN.extra_splits for path in shard_files(kind, split)]


def split_shard_files(kind):
    """Input function: the shard files of the job's split."""
    return lambda wc: shard_files(kind, wc.split)


def matched_metrics(wildcards):
    """The evaluation whose matching names a gallery's rows (the evaluated split, with ground truth)."""
    return f"{RESULTS}/metrics.json" if PLAN.has_gt and wildcards.split == EVAL_SPLIT else []


def cfg(*sections, only=()):
    """The config sections a job reads (and the package version), as JSON: Snakemake compares
    params to decide reruns."""
    return rule_config(config, *sections, only=only)


# crf.unary: probabilities: the segmentation predictions also keep their logits, which the CRF
# starts from. At the default (labels) both commands are exactly those of earlier versions, so
# upgrading reruns nothing.
CRF_FROM_PROBABILITIES = SETTINGS.crf.unary == "probabilities"
_PREDICT_OUT = ("--out {output.labels} --logits {output.logits}" if CRF_FROM_PROBABILITIES
                else "--out {output}")
PREDICT_SEGMENTATION = ("maskdistill --threads {threads} predict-segmentation --config {params.cfg:q}"
                        " --model {input.model} --split {wildcards.split} --skipped {input.skipped}"
                        f" {_PREDICT_OUT} > {{log}} 2>&1")
_CRF_LOGITS_OPTION = " --logits {input.logits}" if CRF_FROM_PROBABILITIES else ""
CRF_REFINE = ("maskdistill crf-refine --config {params.cfg:q} --split {wildcards.split} --labels {input.labels}"
              f"{_CRF_LOGITS_OPTION} --skipped {{input.skipped}} --out {{output}} > {{log}} 2>&1")


def prediction_outputs(stage):
    """A prediction rule's outputs: the label PNGs, and the logits the CRF needs when it starts
    from probabilities."""
    outputs = {"labels": directory(f"{RESULTS}/{stage}/predictions/{{split}}")}
    if CRF_FROM_PROBABILITIES:
        outputs["logits"] = directory(f"{RESULTS}/{stage}/logits/{{split}}")
    return outputs
