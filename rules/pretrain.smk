# Stage 0 (optional, pretrain.enabled): DINO self-distillation of a ViT on the train images.


rule pretrain:
    input:
        demo_outputs(),
        images=lambda wc: [path for _, path in SPLITS["train"]],
    output:
        PRETRAINED,
    params:
        cfg=cfg("pretrain"),
        checkpoints=f"{RESULTS}/pretrain/checkpoints",
        version=VERSION,
    conda:
        "../envs/maskdistill.yaml"
    log:
        "logs/pretrain.log",
    threads: 2
    shell:
        "maskdistill --threads {threads} pretrain --config {params.cfg:q}"
        " --checkpoint-dir {params.checkpoints} --out {output} > {log} 2>&1"
