# Per-run input report: which images mining read and which it skipped (dataset.on_bad_image: skip),
# with the reason for each, gathered from the mask shards. Later rules that leave the skipped
# images out read it as a declared input (--skipped).


# the clustering.extra_images folders' shards; without any, the command of earlier versions
EXTRA_MASKS_OPTION = " --masks-extra {input.extra}" if PLAN.extra_splits else ""


rule input_report:
    input:
        train=shard_files("masks", "train"),
        val=shard_files("masks", "val") if PLAN.has_val else [],
        extra=extra_shard_files("masks"),
    output:
        json=INPUT_REPORT,
        md=f"{RESULTS}/input_report.md",
        csv=report(f"{RESULTS}/input_report.csv", caption="report/input_report.rst", category="Input"),
    params:
        cfg=cfg(),
    log:
        "logs/input_report.log",
    shell:
        "maskdistill input-report --config {params.cfg:q} --masks-train {input.train}"
        f" --masks-val {{input.val}}{EXTRA_MASKS_OPTION} --out-json {{output.json}} --out-md {{output.md}}"
        " > {log} 2>&1"
