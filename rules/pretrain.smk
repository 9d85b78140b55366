# Stage 0 (optional, pretrain.enabled): DINO self-distillation of a ViT on the train images.


rule pretrain:
    input:
        demo_outputs(),
        images=image_inputs(SPLITS["train"]),
    output:
        f"{RESULTS}/pretrain/backbone.safetensors",
    params:
        launch=launch_command(SETTINGS.pretrain.gpus),
        **user_images_params("train"),
        cfg=cfg("pretrain"),
        checkpoints=f"{RESULTS}/pretrain/checkpoints",
    log:
        "logs/pretrain.log",
    resources:
        gpu=SETTINGS.pretrain.gpus,  # pretrain.gpus: one process per GPU
    threads: 2
    shell:
        "{params.launch} --threads {threads} pretrain --config {params.cfg:q}"
        " --checkpoint-dir {params.checkpoints} --out {output} > {log} 2>&1"
