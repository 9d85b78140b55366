# Per-run input report: which images mining read and which it skipped (dataset.on_bad_image: skip),
# with the reason for each, gathered from the mask shards.


rule input_report:
    input:
        train=shard_files("masks", "train"),
        val=shard_files("masks", "val") if HAS_VAL else [],
    output:
        json=f"{RESULTS}/input_report.json",
        md=f"{RESULTS}/input_report.md",
    params:
        cfg=cfg(),
        version=VERSION,
    conda:
        "../envs/maskdistill.yaml"
    log:
        "logs/input_report.log",
    shell:
        "maskdistill input-report --config {params.cfg:q} --masks-train {input.train}"
        " --masks-val {input.val} --out-json {output.json} --out-md {output.md} > {log} 2>&1"
