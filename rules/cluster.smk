# Stage 1b: CLS features of each mask's box crop (per shard), then one global K-means.


rule describe:
    input:
        masks=f"{RESULTS}/masks/{{split}}/shard-{{shard}}.h5",
        weights=pretrained_weights(),
    output:
        f"{RESULTS}/features/{{split}}/shard-{{shard}}.h5",
    params:
        cfg=cfg("clustering", only=DESCRIBE_KEYS),
        version=VERSION,
    conda:
        "../envs/maskdistill.yaml"
    log:
        "logs/describe/{split}-{shard}.log",
    threads: 2
    shell:
        "maskdistill --threads {threads} describe --config {params.cfg:q} --split {wildcards.split}"
        " --masks {input.masks} --out {output} > {log} 2>&1"


rule cluster:
    input:
        masks_train=shard_files("masks", "train"),
        features_train=shard_files("features", "train"),
        masks_val=shard_files("masks", "val") if HAS_VAL else [],
        features_val=shard_files("features", "val") if HAS_VAL else [],
    output:
        train=f"{RESULTS}/clusters/train.json",
        val=f"{RESULTS}/clusters/val.json" if HAS_VAL else [],
        model=f"{RESULTS}/clusters/kmeans.npz",
    params:
        cfg=cfg("clustering"),
        out_val=lambda wc, output: f"--out-val {output.val}" if HAS_VAL else "",
        version=VERSION,
    conda:
        "../envs/maskdistill.yaml"
    log:
        "logs/cluster.log",
    shell:
        "maskdistill cluster --config {params.cfg:q} --masks-train {input.masks_train}"
        " --features-train {input.features_train} --masks-val {input.masks_val}"
        " --features-val {input.features_val} --out-train {output.train} {params.out_val}"
        " --out-model {output.model} > {log} 2>&1"
