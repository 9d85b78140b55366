# Stage 5: Hungarian-matched mIoU of each stage on the val split (COCO20k: its own images), with a
# report and a figure; optional protocols: mask AP of the Mask R-CNN predictions (when the split
# has COCO instances), the linear probe (linear_probe.enabled), dense CRF (evaluation.crf) and the
# CRF self-training round (crf.self_training, rules in segment.smk).

CRF_KEYS = ("iterations", "gaussian_sxy", "gaussian_compat", "bilateral_sxy", "bilateral_srgb",
            "bilateral_compat", "label_confidence")
# The segmentation stage evaluated last: round 2 when the CRF self-training round is on.
FINAL_SEG = "segmentation_crf" if config["crf"]["self_training"] else "segmentation"
DO_MASK_AP = bool(config["evaluation"]["mask_ap"]) and HAS_GT
DO_PROBE = bool(config["linear_probe"]["enabled"]) and HAS_GT
# rules/diagnostics.smk: mined-mask quality, the patch K-means baseline, the stage figure.
DO_DIAGNOSTICS = bool(config["evaluation"]["diagnostics"]) and HAS_GT


# Ground-truth label PNG folders of the linear probe: the config's, else the demo's or VOC's.
_SOURCE = config["dataset"]["source"]
_VOC_ROOT = config["dataset"]["voc"]["root"] or ""
PROBE_LABELS = {
    split: config["linear_probe"][f"{split}_labels"]
    or {"demo": f"{RESULTS}/demo/{split}/semantic",
        "voc": GT_SEMANTIC if split == GT_SPLIT else os.path.join(_VOC_ROOT, "SegmentationClassAug")}.get(_SOURCE)
    for split in ("train", GT_SPLIT)
}
if DO_PROBE and not all(PROBE_LABELS.values()):
    raise WorkflowError("config key 'linear_probe.train_labels' / 'linear_probe.val_labels': set the "
                        "folders of ground-truth label PNGs for the linear probe")
# The probe's class names: the demo's categories; VOC's 21 (the CLI default) otherwise.
PROBE_NAMES = f"--class-names {shlex.quote(GT_FILE)}" if _SOURCE == "demo" and GT_FILE else ""

# STAGE=DIR pairs scored by the evaluate rule.
EVAL_STAGES = {"patch_kmeans": f"{RESULTS}/baselines/patch_kmeans/{GT_SPLIT}"} if DO_DIAGNOSTICS else {}
EVAL_STAGES |= {
    "initial_masks": f"{RESULTS}/initial_labels/{GT_SPLIT}",
    "maskrcnn": f"{RESULTS}/pseudo_labels/{GT_SPLIT}",
    "segmentation": f"{RESULTS}/segmentation/predictions/{GT_SPLIT}",
}
if config["crf"]["self_training"]:
    EVAL_STAGES["segmentation_crf"] = f"{RESULTS}/segmentation_crf/predictions/{GT_SPLIT}"
if config["evaluation"]["crf"]:
    EVAL_STAGES[f"{FINAL_SEG}+crf"] = f"{RESULTS}/{FINAL_SEG}/crf/{GT_SPLIT}"


rule evaluate:
    input:
        stages=list(EVAL_STAGES.values()),
        gt=GT_FILE or [],
        mask_ap=f"{RESULTS}/mask_ap.json" if DO_MASK_AP else [],
        probe=f"{RESULTS}/linear_probe/metrics.json" if DO_PROBE else [],
        quality=f"{RESULTS}/mask_quality.json" if DO_DIAGNOSTICS else [],
        stage_figure=f"{RESULTS}/stages.png" if DO_DIAGNOSTICS else [],
    output:
        metrics=f"{RESULTS}/metrics.json",
        report=f"{RESULTS}/report.md",
        figure=f"{RESULTS}/report.png",
    params:
        cfg=cfg("evaluation", "mining", "clustering"),
        num_pred=NUM_LABELS,
        split=GT_SPLIT,
        gt_semantic=f"--gt-semantic {shlex.quote(GT_SEMANTIC)}" if GT_SEMANTIC else "",
        preds=" ".join(f"--pred {shlex.quote(f'{s}={d}')}" for s, d in EVAL_STAGES.items()),
        extras=lambda wc, input: (f" --mask-ap {input.mask_ap}" if input.mask_ap else "")
        + (f" --linear-probe {input.probe}" if input.probe else "")
        + (f" --mask-quality {input.quality}" if input.quality else ""),
        version=VERSION,
    conda:
        "../envs/maskdistill.yaml"
    log:
        "logs/evaluate.log",
    shell:
        "maskdistill evaluate --config {params.cfg:q} --split {params.split} {params.gt_semantic}"
        " {params.preds}{params.extras} --num-pred {params.num_pred} --out-metrics {output.metrics}"
        " --out-report {output.report} --out-figure {output.figure} > {log} 2>&1"


rule mask_ap:
    input:
        gt=GT_FILE or [],
        predictions=f"{RESULTS}/detector/predictions_{GT_SPLIT}.json",
    output:
        f"{RESULTS}/mask_ap.json",
    params:
        version=VERSION,
    conda:
        "../envs/maskdistill.yaml"
    log:
        "logs/mask_ap.log",
    shell:
        "maskdistill mask-ap --gt {input.gt:q} --predictions {input.predictions}"
        " --setting both --out {output} > {log} 2>&1"


rule crf_refine:
    input:
        f"{RESULTS}/{{stage}}/predictions/{{split}}",
    output:
        directory(f"{RESULTS}/{{stage,segmentation|segmentation_crf}}/crf/{{split}}"),
    params:
        cfg=cfg("crf", only=CRF_KEYS),
        version=VERSION,
    conda:
        "../envs/maskdistill.yaml"
    log:
        "logs/crf_refine/{stage}_{split}.log",
    shell:
        "maskdistill crf-refine --config {params.cfg:q} --split {wildcards.split} --labels {input}"
        " --out {output} > {log} 2>&1"


rule linear_probe:
    input:
        model=f"{RESULTS}/segmentation/model.pt",
        demo=demo_outputs(),
    output:
        model=f"{RESULTS}/linear_probe/model.pt",
        metrics=f"{RESULTS}/linear_probe/metrics.json",
    params:
        cfg=cfg("linear_probe", "segmentation"),
        crf=f"--crf-config {shlex.quote(cfg('crf', only=CRF_KEYS))}" if config["evaluation"]["crf"] else "",
        train_labels=PROBE_LABELS["train"] or "",
        val_labels=PROBE_LABELS[GT_SPLIT] or "",
        names=PROBE_NAMES,
        split=GT_SPLIT,
        checkpoints=f"{RESULTS}/linear_probe/checkpoints",
        version=VERSION,
    conda:
        "../envs/maskdistill.yaml"
    log:
        "logs/linear_probe.log",
    threads: 2
    shell:
        "maskdistill --threads {threads} linear-probe --config {params.cfg:q} --model {input.model}"
        " --train-labels {params.train_labels:q} --val-labels {params.val_labels:q}"
        " --split {params.split} {params.names} {params.crf} --checkpoint-dir {params.checkpoints}"
        " --out-model {output.model} --out-metrics {output.metrics} > {log} 2>&1"
