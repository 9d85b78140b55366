# The embedded demo: deterministic synthetic scenes with ground truth (no download needed). The
# rule exists only for dataset.source: demo, and writes only below results/demo.

if DEMO:

    rule make_demo:
        output:
            images=[path for split in SPLITS for _, path in SPLITS[split]],
            train_gt=f"{RESULTS}/demo/train/instances.json",
            val_gt=f"{RESULTS}/demo/val/instances.json",
        params:
            cfg=cfg(),
            out=lambda wc, output: os.path.dirname(os.path.dirname(output.val_gt)),
        log:
            "logs/make_demo.log",
        shell:
            "maskdistill make-demo --config {params.cfg:q} --out {params.out} > {log} 2>&1"
