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
        images=lambda wc: [path for _, path in SPLITS[wc.split]],
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
