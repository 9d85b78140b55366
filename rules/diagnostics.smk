# Diagnostics (evaluation.diagnostics, inputs of evaluate): class-agnostic quality of the mined masks, a baseline that
# clusters the ViT's patch features without any mask, and the stage-by-stage figure.

rule mask_quality:
    input:
        masks=shard_files("masks", GT_SPLIT),
        gt=GT_FILE or [],
    output:
        f"{RESULTS}/mask_quality.json",
    params:
        clusters=config["clustering"]["num_clusters"] * config["clustering"]["overclustering"],
        version=VERSION,
    conda:
        "../envs/maskdistill.yaml"
    log:
        "logs/mask_quality.log",
    shell:
        "maskdistill mask-quality --masks {input.masks} --gt {input.gt:q}"
        " --num-clusters {params.clusters} --out {output} > {log} 2>&1"


rule patch_kmeans:
    input:
        demo_outputs(),
        weights=pretrained_weights(),
        # on_bad_image: skip: the images mining skipped are left out here too (read from the shards)
        skipped=lambda wc: (shard_files("masks", "train") + shard_files("masks", wc.split)
                            if config["dataset"]["on_bad_image"] == "skip" else []),
    output:
        directory(f"{RESULTS}/baselines/patch_kmeans/{{split}}"),
    params:
        cfg=cfg("mining", "clustering"),
        version=VERSION,
    conda:
        "../envs/maskdistill.yaml"
    log:
        "logs/patch_kmeans/{split}.log",
    threads: 2
    shell:
        "maskdistill --threads {threads} patch-kmeans --config {params.cfg:q} --split {wildcards.split}"
        " --out {output} > {log} 2>&1"


rule stage_figure:
    input:
        masks=shard_files("masks", GT_SPLIT),
        predictions=f"{RESULTS}/detector/predictions_{GT_SPLIT}.json",
        segmentation=f"{RESULTS}/segmentation/predictions/{GT_SPLIT}",
    output:
        f"{RESULTS}/stages.png",
    params:
        cfg=cfg("pseudo_labels", "evaluation"),
        gt=(f"--ground-truth {RESULTS}/demo/{GT_SPLIT}/semantic" if config["dataset"]["source"] == "demo"
            else ""),
        rows=config["evaluation"]["figure_rows"],
        split=GT_SPLIT,
        version=VERSION,
    conda:
        "../envs/maskdistill.yaml"
    log:
        "logs/stage_figure.log",
    shell:
        "maskdistill stage-figure --config {params.cfg:q} --split {params.split} --masks {input.masks}"
        " --predictions {input.predictions} --segmentation {input.segmentation} {params.gt}"
        " --rows {params.rows} --out {output} > {log} 2>&1"
