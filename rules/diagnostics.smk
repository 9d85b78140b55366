# Diagnostics (evaluation.diagnostics, inputs of evaluate): class-agnostic quality of the mined
# masks, a baseline that clusters the ViT's patch features without any mask, the stage figure.


rule mask_quality:
    input:
        masks=shard_files("masks", EVAL_SPLIT),
        gt=PLAN.gt_instances or [],
    output:
        f"{RESULTS}/mask_quality.json",
    params:
        clusters=SETTINGS.clustering.num_centroids,
    log:
        "logs/mask_quality.log",
    shell:
        "maskdistill mask-quality --masks {input.masks} --gt {input.gt:q}"
        " --num-clusters {params.clusters} --out {output} > {log} 2>&1"


rule patch_kmeans:
    input:
        demo_outputs(),
        weights=pretrained_weights(),
        hub=weights_manifest(),
        skipped=INPUT_REPORT,
    output:
        directory(f"{RESULTS}/baselines/patch_kmeans/{{split}}"),
    params:
        cfg=cfg("mining", "clustering"),
        hub=manifest_option,
    log:
        "logs/patch_kmeans/{split}.log",
    threads: 2
    shell:
        "maskdistill --threads {threads} patch-kmeans --config {params.cfg:q} --split {wildcards.split}"
        " --skipped {input.skipped} {params.hub} --out {output} > {log} 2>&1"


rule stage_figure:
    input:
        masks=shard_files("masks", EVAL_SPLIT),
        predictions=f"{RESULTS}/detector/predictions_{EVAL_SPLIT}.json",
        segmentation=f"{RESULTS}/segmentation/predictions/{EVAL_SPLIT}",
        skipped=INPUT_REPORT,
    output:
        report(f"{RESULTS}/stages.png", caption="report/stages.rst", category="Figures"),
    params:
        cfg=cfg("pseudo_labels", "evaluation"),
        gt=f"--ground-truth {RESULTS}/demo/{EVAL_SPLIT}/semantic" if DEMO else "",
        split=EVAL_SPLIT,
    log:
        "logs/stage_figure.log",
    shell:
        "maskdistill stage-figure --config {params.cfg:q} --split {params.split} --masks {input.masks}"
        " --predictions {input.predictions} --segmentation {input.segmentation} {params.gt}"
        " --skipped {input.skipped} --out {output} > {log} 2>&1"
