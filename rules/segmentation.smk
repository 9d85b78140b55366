# Stage 4: DeepLab-v3 trained on the pseudo-label PNGs (hard pixel mining), then predictions.
# With crf.unary: probabilities the prediction rules also keep each image's low-resolution logits
# ({stage}/logits/{split}/<key>.npz) for the CRF (rules/common.smk: prediction_outputs); otherwise
# their outputs and command are as before.


rule train_segmentation:
    input:
        labels=f"{RESULTS}/pseudo_labels/train",
        skipped=INPUT_REPORT,
    output:
        f"{RESULTS}/segmentation/model.pt",
    params:
        launch=launch_command(SETTINGS.segmentation.gpus),
        cfg=cfg("segmentation", "clustering"),
        checkpoints=lambda wc, output: os.path.join(os.path.dirname(output[0]), "checkpoints"),
    log:
        "logs/train_segmentation.log",
    resources:
        gpu=SETTINGS.segmentation.gpus,  # segmentation.gpus: one process per GPU
    threads: 2
    shell:
        "{params.launch} --threads {threads} train-segmentation --config {params.cfg:q} --labels {input.labels}"
        " --skipped {input.skipped} --checkpoint-dir {params.checkpoints} --out {output} > {log} 2>&1"


rule predict_segmentation:
    input:
        model=f"{RESULTS}/segmentation/model.pt",
        images=split_images,
        skipped=INPUT_REPORT,
    output:
        **prediction_outputs("segmentation"),
    params:
        cfg=cfg("segmentation"),
    log:
        "logs/predict_segmentation/{split}.log",
    threads: 2
    shell:
        PREDICT_SEGMENTATION
