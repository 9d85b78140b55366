# MaskDistill: unsupervised semantic segmentation by distilling object masks from a ViT.
# Run `snakemake --cores all` for the embedded demo; see README.md for everything else.
# Each stage has one name, from its rule file to its command, module and config section.


configfile: "config.yaml"


include: "rules/common.smk"


wildcard_constraints:
    split="train|val",
    shard=r"\d{3}",


include: "rules/demo.smk"
include: "rules/datasets.smk"
include: "rules/pretrain.smk"
include: "rules/mining.smk"
include: "rules/input_report.smk"
include: "rules/clustering.smk"
include: "rules/detector.smk"
include: "rules/pseudo_labels.smk"
include: "rules/segmentation.smk"
include: "rules/crf.smk"
include: "rules/linear_probe.smk"
include: "rules/evaluation.smk"
include: "rules/diagnostics.smk"


rule all:
    input:
        PLAN.targets(),
    default_target: True


# One software environment for every rule that runs a command (paths are relative to rules/).
for _rule in workflow.rules:
    if not _rule.norun and not _rule.is_run:
        _rule.conda_env = "../envs/maskdistill.yaml"

# Snakemake deletes the outputs of a failed job and `--delete-all-output` deletes every output:
# no rule may name a file outside results/ and logs/ as an output, whatever the config says.
_outside = workflow_outputs_outside([(r.name, str(f)) for r in workflow.rules for f in [*r.output, *r.log]])
if _outside:
    raise WorkflowError("outputs outside the results and logs folders:\n  " + "\n  ".join(_outside))
