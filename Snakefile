# MaskDistill: unsupervised semantic segmentation by distilling object masks from a ViT.
# Run `snakemake --cores all` for the embedded demo; see README.md for everything else.
# Each stage has one name, from its rule file to its command, module and config section.


# The embedded demo's settings (config.yaml beside this file) apply only when no --configfile is
# given, whatever the working directory: a user's config starts from the schema defaults, which are
# the paper's settings (README, "Your own images").
if not workflow.config_settings.configfiles:

    configfile: os.path.join(workflow.basedir, "config.yaml")


include: "rules/common.smk"


# The HTML report's front page (snakemake --report FILE.html): this run's metrics once evaluate has
# written them, else a description of the workflow.
report: os.path.abspath(REPORT_FRONT) if os.path.exists(REPORT_FRONT) else "rules/report/workflow.rst"


wildcard_constraints:
    split=r"train|val|extra\d+",  # extra0, ...: the clustering.extra_images folders (K-means only)
    shard=r"\d{3}",


include: "rules/demo.smk"
include: "rules/datasets.smk"
include: "rules/fetch_weights.smk"
include: "rules/pretrain.smk"
include: "rules/mining.smk"
include: "rules/input_report.smk"
include: "rules/clustering.smk"
include: "rules/choose_k.smk"
include: "rules/detector.smk"
include: "rules/pseudo_labels.smk"
include: "rules/segmentation.smk"
include: "rules/segment.smk"
include: "rules/crf.smk"
include: "rules/linear_probe.smk"
include: "rules/evaluation.smk"
include: "rules/diagnostics.smk"
include: "rules/gallery.smk"


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
