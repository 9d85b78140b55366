# MaskDistill: unsupervised semantic segmentation by distilling object masks from a ViT.
# Run `snakemake --cores all` for the embedded demo; see README.md for everything else.

configfile: "config.yaml"


include: "rules/common.smk"


wildcard_constraints:
    split="train|val",
    shard=r"\d{3}",


include: "rules/demo.smk"
include: "rules/datasets.smk"
include: "rules/pretrain.smk"
include: "rules/mine.smk"
include: "rules/cluster.smk"
include: "rules/detect.smk"
include: "rules/pseudo_labels.smk"
include: "rules/segment.smk"
include: "rules/evaluate.smk"
include: "rules/diagnostics.smk"
include: "rules/report.smk"


rule all:
    input:
        final_targets(),
    default_target: True


# Snakemake deletes the outputs of a failed job and `--delete-all-output` deletes every output:
# no rule may name a file outside results/ and logs/ as an output, whatever the config says.
_outside = workflow_outputs_outside([(r.name, str(f)) for r in workflow.rules for f in [*r.output, *r.log]])
if _outside:
    raise WorkflowError("outputs outside the results and logs folders:\n  " + "\n  ".join(_outside))
