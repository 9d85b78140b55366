# Stage 1b: CLS features of each mask's box crop (one job per shard), then one global K-means.
# The clustering.extra_images folders are the splits extra0, extra1, ...: mined and described like
# the train split (rules mine and cluster_features), their features only join the K-means fit.

# The features depend on the clustering keys of plan.FEATURE_KEYS only: a K-means setting does not
# rerun them.


rule cluster_features:
    input:
        masks=f"{RESULTS}/masks/{{split}}/shard-{{shard}}.h5",
        weights=pretrained_weights(),
        hub=weights_manifest(),
    output:
        f"{RESULTS}/features/{{split}}/shard-{{shard}}.h5",
    params:
        # an extra split (clustering.extra_images) finds its folder in the list; train and val
        # do not depend on it
        cfg=lambda wc: cfg("clustering", only=FEATURE_KEYS + (() if wc.split in PLAN.splits
                                                              else ("extra_images",))),
        hub=manifest_option,
    log:
        "logs/cluster_features/{split}-{shard}.log",
    threads: 2
    shell:
        "maskdistill --threads {threads} cluster-features --config {params.cfg:q} --split {wildcards.split}"
        " --masks {input.masks} {params.hub} --out {output} > {log} 2>&1"


rule cluster:
    input:
        masks_train=shard_files("masks", "train"),
        features_train=shard_files("features", "train"),
        masks_val=shard_files("masks", "val") if PLAN.has_val else [],
        features_val=shard_files("features", "val") if PLAN.has_val else [],
        features_extra=extra_shard_files("features"),
    output:
        train=f"{RESULTS}/clusters/train.json",
        val=f"{RESULTS}/clusters/val.json" if PLAN.has_val else [],
        model=f"{RESULTS}/clusters/kmeans.npz",
    params:
        cfg=cfg("clustering"),
        # one param for both options keeps the command of earlier versions when there is no
        # extra folder (a changed command would rerun K-means and everything after it)
        out_val=lambda wc, input, output: (f"--out-val {output.val}" if output.val else "") + (
            f" --features-extra {input.features_extra}" if input.features_extra else ""),
    log:
        "logs/cluster.log",
    shell:
        "maskdistill cluster --config {params.cfg:q} --masks-train {input.masks_train}"
        " --features-train {input.features_train} --masks-val {input.masks_val}"
        " --features-val {input.features_val} --out-train {output.train} {params.out_val}"
        " --out-model {output.model} > {log} 2>&1"
