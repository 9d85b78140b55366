# Dense CRF (settings: crf): refined predictions for evaluation.crf, and the optional CRF
# self-training round (crf.self_training): DeepLab-v3 trained again on the CRF-refined train
# predictions of the first model, evaluated as stage segmentation_crf. The round's two rules are
# the segmentation rules with other files.

CRF_KEYS = ("iterations", "gaussian_sxy", "gaussian_compat", "bilateral_sxy", "bilateral_srgb",
            "bilateral_compat", "label_confidence", "unary", "channel_order")
# crf.unary: probabilities: the CRF starts from the softmax of the predictions' logits
CRF_LOGITS = ({"logits": f"{RESULTS}/{{stage}}/logits/{{split}}"} if CRF_FROM_PROBABILITIES else {})


rule crf_refine:
    input:
        labels=f"{RESULTS}/{{stage}}/predictions/{{split}}",
        skipped=INPUT_REPORT,
        **CRF_LOGITS,
    output:
        directory(f"{RESULTS}/{{stage,segmentation|segmentation_crf}}/crf/{{split}}"),
    params:
        cfg=cfg("crf", only=CRF_KEYS),
    log:
        "logs/crf_refine/{stage}_{split}.log",
    shell:
        CRF_REFINE


use rule train_segmentation as train_segmentation_crf with:
    input:
        labels=f"{RESULTS}/segmentation/crf/train",
        skipped=INPUT_REPORT,
    output:
        f"{RESULTS}/segmentation_crf/model.pt",
    log:
        "logs/train_segmentation_crf.log",


use rule predict_segmentation as predict_segmentation_crf with:
    input:
        model=f"{RESULTS}/segmentation_crf/model.pt",
        images=split_images,
        skipped=INPUT_REPORT,
    output:
        **prediction_outputs("segmentation_crf"),
    log:
        "logs/predict_segmentation_crf/{split}.log",
