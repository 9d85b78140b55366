# Stage 5: Hungarian-matched mIoU of each stage on the evaluated split (val; COCO20k: its own
# images), with a report and a figure, and mask AP of the Mask R-CNN predictions when the split has
# COCO instances. Which stages are scored is the plan's (maskdistill.plan.Plan.eval_stages).


rule evaluate:
    input:
        stages=list(PLAN.eval_stages.values()),
        gt=PLAN.gt_instances or [],
        skipped=INPUT_REPORT,
        mask_ap=f"{RESULTS}/mask_ap.json" if PLAN.mask_ap else [],
        clusters=f"{RESULTS}/clusters/{EVAL_SPLIT}.json",  # the mined-mask mapping (evaluation.mapping)
        probe=f"{RESULTS}/linear_probe/metrics.json" if PLAN.linear_probe else [],
        quality=f"{RESULTS}/mask_quality.json" if PLAN.diagnostics else [],
        stage_figure=f"{RESULTS}/stages.png" if PLAN.diagnostics else [],
    output:
        metrics=f"{RESULTS}/metrics.json",
        report=f"{RESULTS}/report.md",
        figure=report(f"{RESULTS}/report.png", caption="report/examples.rst", category="Metrics"),
        # the report's tables, written beside it
        per_class=report(f"{RESULTS}/report_per_class.csv", caption="report/per_class.rst",
                         category="Metrics"),
        stages=report(f"{RESULTS}/report_stages.csv", caption="report/metrics.rst", category="Metrics"),
        front=REPORT_FRONT,  # the HTML report's front page (Snakefile: report)
    params:
        cfg=cfg("evaluation", "mining", "clustering"),
        split=EVAL_SPLIT,
        gt_semantic=f"--gt-semantic {shlex.quote(PLAN.gt_semantic)}" if PLAN.gt_semantic else "",
        preds=" ".join(f"--pred {shlex.quote(f'{s}={d}')}" for s, d in PLAN.eval_stages.items()),
        extras=lambda wc, input: (f" --mask-ap {input.mask_ap}" if input.mask_ap else "")
        + (f" --linear-probe {input.probe}" if input.probe else "")
        + (f" --mask-quality {input.quality}" if input.quality else ""),
    log:
        "logs/evaluate.log",
    shell:
        "maskdistill evaluate --config {params.cfg:q} --split {params.split} {params.gt_semantic}"
        " {params.preds}{params.extras} --clusters {input.clusters} --skipped {input.skipped}"
        " --out-metrics {output.metrics} --out-report {output.report} --out-figure {output.figure} > {log} 2>&1"


rule mask_ap:  # on evaluation.mask_ap_split (VOC seg_trainval: predicted on, never mined)
    input:
        gt=PLAN.mask_ap_gt or [],
        predictions=f"{RESULTS}/detector/predictions_{PLAN.mask_ap_split}.json",
    output:
        f"{RESULTS}/mask_ap.json",
    params:
        single_object=SETTINGS.evaluation.single_object,
    log:
        "logs/mask_ap.log",
    shell:
        "maskdistill mask-ap --gt {input.gt:q} --predictions {input.predictions}"
        " --setting both --single-object {params.single_object} --out {output} > {log} 2>&1"
