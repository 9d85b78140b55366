# Linear probe (linear_probe.enabled, with ground truth): a new 1x1 classifier on the frozen
# segmentation model, trained on ground-truth label maps; val mIoU (and with CRF: evaluation.crf).


rule linear_probe:
    input:
        model=f"{RESULTS}/segmentation/model.pt",
        demo=demo_outputs(),
        skipped=INPUT_REPORT,
    output:
        model=f"{RESULTS}/linear_probe/model.pt",
        metrics=f"{RESULTS}/linear_probe/metrics.json",
    params:
        launch=launch_command(SETTINGS.linear_probe.gpus),
        cfg=cfg("linear_probe", "segmentation", "evaluation", "crf"),
        train_labels=PLAN.probe_labels.get("train") or "",
        val_labels=PLAN.probe_labels.get(EVAL_SPLIT) or "",
        # the probe's class names: the demo's categories; VOC's 21 (the command's default) otherwise
        names=f"--class-names {shlex.quote(PLAN.gt_instances)}" if DEMO and PLAN.gt_instances else "",
        split=EVAL_SPLIT,
        checkpoints=f"{RESULTS}/linear_probe/checkpoints",
    log:
        "logs/linear_probe.log",
    resources:
        gpu=SETTINGS.linear_probe.gpus,  # linear_probe.gpus: one process per GPU
    threads: 2
    shell:
        "{params.launch} --threads {threads} linear-probe --config {params.cfg:q} --model {input.model}"
        " --train-labels {params.train_labels:q} --val-labels {params.val_labels:q} --split {params.split}"
        " {params.names} --skipped {input.skipped} --checkpoint-dir {params.checkpoints}"
        " --out-model {output.model} --out-metrics {output.metrics} > {log} 2>&1"
