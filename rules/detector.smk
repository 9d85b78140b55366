# Stage 2: Mask R-CNN trained on the clustered masks, then predictions for every split.


rule train_detector:
    input:
        f"{RESULTS}/clusters/train.json",
    output:
        f"{RESULTS}/detector/model.pt",
    params:
        launch=launch_command(SETTINGS.detector.gpus),
        cfg=cfg("detector"),
        checkpoints=f"{RESULTS}/detector/checkpoints",
    log:
        "logs/train_detector.log",
    resources:
        gpu=SETTINGS.detector.gpus,  # detector.gpus: one process per GPU
    threads: 2
    shell:
        "{params.launch} --threads {threads} train-detector --config {params.cfg:q} --train-json {input}"
        " --checkpoint-dir {params.checkpoints} --out {output} > {log} 2>&1"


rule predict_detector:
    input:
        model=f"{RESULTS}/detector/model.pt",
        images=split_images,
        skipped=INPUT_REPORT,
    output:
        f"{RESULTS}/detector/predictions_{{split}}.json",
    wildcard_constraints:
        split="|".join(PLAN.splits),  # the mined splits, and the mask-AP split (never mined)
    params:
        cfg=cfg("detector"),
    log:
        "logs/predict_detector/{split}.log",
    threads: 2
    shell:
        "maskdistill --threads {threads} predict-detector --config {params.cfg:q} --model {input.model}"
        " --split {wildcards.split} --skipped {input.skipped} --out {output} > {log} 2>&1"
