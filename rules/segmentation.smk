# Stage 4: DeepLab-v3 trained on the pseudo-label PNGs (hard pixel mining), then predictions.
# With crf.unary: probabilities the prediction rules also keep each image's low-resolution logits
# ({stage}/logits/{split}/<key>.npz) for the CRF; otherwise their outputs and command are as before.

CRF_FROM_PROBABILITIES = SETTINGS.crf.unary == "probabilities"
PREDICT_OUT = (" --out {output.labels} --logits {output.logits}" if CRF_FROM_PROBABILITIES
               else " --out {output}")


def prediction_outputs(stage):
    """A prediction rule's outputs: the label PNGs, and the logits the CRF needs when it starts
    from probabilities."""
    outputs = {"labels": directory(f"{RESULTS}/{stage}/predictions/{{split}}")}
    if CRF_FROM_PROBABILITIES:
        outputs["logits"] = directory(f"{RESULTS}/{stage}/logits/{{split}}")
    return outputs


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
        "maskdistill --threads {threads} predict-segmentation --config {params.cfg:q}"
        " --model {input.model} --split {wildcards.split} --skipped {input.skipped}" + PREDICT_OUT +
        " > {log} 2>&1"
