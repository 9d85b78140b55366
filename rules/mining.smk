# Stage 1: one object mask per image from the ViT's last attention block, one job per shard.
# For a user's images (every source but the demo), list_images writes down the images that the
# planner listed for each shard (in the Snakemake process, from the plan itself); the shard's mine
# job reads them from that list, so an image that vanishes before its job is met as unreadable
# (skipped or failed per dataset.on_bad_image), never silently dropped. A changed image changes
# its shard's params, so only that shard is listed and mined again.

if not DEMO:

    rule list_images:
        output:
            f"{RESULTS}/images/{{split}}/shard-{{shard}}.json",
        params:
            images=lambda wc: shard_digest(members(wc)),
        log:
            "logs/list_images/{split}-{shard}.log",
        localrule: True
        priority: 100  # all lists first, before any job can read an image
        run:
            write_image_list(output[0], members(wildcards))  # the list the planner made


rule mine:
    input:
        demo_outputs(),
        images=shard_images,
        image_list=[] if DEMO else f"{RESULTS}/images/{{split}}/shard-{{shard}}.json",
        weights=pretrained_weights(),
        hub=weights_manifest(),
    output:
        f"{RESULTS}/masks/{{split}}/shard-{{shard}}.h5",
    params:
        cfg=cfg("mining"),
        images=lambda wc: shard_digest(members(wc)),
        image_list=lambda wc, input: f"--image-list {input.image_list}" if input.image_list else "",
        hub=manifest_option,
    log:
        "logs/mine/{split}-{shard}.log",
    threads: 2
    shell:
        "maskdistill --threads {threads} mine --config {params.cfg:q} --split {wildcards.split}"
        " --shard {wildcards.shard} {params.image_list} {params.hub} --out {output} > {log} 2>&1"
