# Stage 5: Hungarian-matched mIoU of each stage on the val split, with a report and a figure.


rule evaluate:
    input:
        initial=f"{RESULTS}/initial_labels/val",
        maskrcnn=f"{RESULTS}/pseudo_labels/val",
        segmentation=f"{RESULTS}/segmentation/predictions/val",
    output:
        metrics=f"{RESULTS}/metrics.json",
        report=f"{RESULTS}/report.md",
        figure=f"{RESULTS}/report.png",
    params:
        cfg=cfg("evaluation", "mining", "clustering"),
        num_pred=NUM_LABELS,
        version=VERSION,
    conda:
        "../envs/maskdistill.yaml"
    log:
        "logs/evaluate.log",
    shell:
        "maskdistill evaluate --config {params.cfg:q} --pred initial_masks={input.initial}"
        " --pred maskrcnn={input.maskrcnn} --pred segmentation={input.segmentation}"
        " --num-pred {params.num_pred} --out-metrics {output.metrics}"
        " --out-report {output.report} --out-figure {output.figure} > {log} 2>&1"
