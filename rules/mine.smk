# Stage 1: one object mask per image from the ViT's last attention block, one job per shard.


rule mine:
    input:
        demo_outputs(),
        images=shard_images,
        weights=pretrained_weights(),
    output:
        f"{RESULTS}/masks/{{split}}/shard-{{shard}}.h5",
    params:
        cfg=cfg("mining"),
        images=lambda wc: shard_digest(members(wc)),
        version=VERSION,
    conda:
        "../envs/maskdistill.yaml"
    log:
        "logs/mine/{split}-{shard}.log",
    threads: 2
    shell:
        "maskdistill --threads {threads} mine --config {params.cfg:q} --split {wildcards.split}"
        " --shard {wildcards.shard} --out {output} > {log} 2>&1"
