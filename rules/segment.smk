# Stage 4: DeepLab-v3 trained on the pseudo-label PNGs (hard pixel mining), then predictions.


rule train_segmentation:
    input:
        f"{RESULTS}/pseudo_labels/train",
    output:
        f"{RESULTS}/segmentation/model.pt",
    params:
        cfg=cfg("segmentation"),
        checkpoints=f"{RESULTS}/segmentation/checkpoints",
        num_classes=NUM_LABELS,
        version=VERSION,
    conda:
        "../envs/maskdistill.yaml"
    log:
        "logs/train_segmentation.log",
    threads: 2
    shell:
        "maskdistill --threads {threads} train-segmentation --config {params.cfg:q} --labels {input}"
        " --num-classes {params.num_classes} --checkpoint-dir {params.checkpoints} --out {output}"
        " > {log} 2>&1"


rule predict_segmentation:
    input:
        model=f"{RESULTS}/segmentation/model.pt",
        images=split_images,
    output:
        directory(f"{RESULTS}/segmentation/predictions/{{split}}"),
    params:
        cfg=cfg("segmentation"),
        version=VERSION,
    conda:
        "../envs/maskdistill.yaml"
    log:
        "logs/predict_segmentation/{split}.log",
    threads: 2
    shell:
        "maskdistill --threads {threads} predict-segmentation --config {params.cfg:q}"
        " --model {input.model} --split {wildcards.split} --out {output} > {log} 2>&1"


# Optional CRF self-training round (crf.self_training): DeepLab-v3 trained again, on the dense-CRF
# refined train predictions of the first model (rule crf_refine); its predictions are evaluated as
# stage segmentation_crf. Nothing here runs unless that flag is on.


rule train_segmentation_crf:
    input:
        f"{RESULTS}/segmentation/crf/train",
    output:
        f"{RESULTS}/segmentation_crf/model.pt",
    params:
        cfg=cfg("segmentation"),
        checkpoints=f"{RESULTS}/segmentation_crf/checkpoints",
        num_classes=NUM_LABELS,
        version=VERSION,
    conda:
        "../envs/maskdistill.yaml"
    log:
        "logs/train_segmentation_crf.log",
    threads: 2
    shell:
        "maskdistill --threads {threads} train-segmentation --config {params.cfg:q} --labels {input}"
        " --num-classes {params.num_classes} --checkpoint-dir {params.checkpoints} --out {output}"
        " > {log} 2>&1"


rule predict_segmentation_crf:
    input:
        model=f"{RESULTS}/segmentation_crf/model.pt",
        images=split_images,
    output:
        directory(f"{RESULTS}/segmentation_crf/predictions/{{split}}"),
    params:
        cfg=cfg("segmentation"),
        version=VERSION,
    conda:
        "../envs/maskdistill.yaml"
    log:
        "logs/predict_segmentation_crf/{split}.log",
    threads: 2
    shell:
        "maskdistill --threads {threads} predict-segmentation --config {params.cfg:q}"
        " --model {input.model} --split {wildcards.split} --out {output} > {log} 2>&1"
