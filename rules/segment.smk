# Segmenting new photos (segment.images): the trained model applied to a folder of photos, with a
# label PNG, a colour overlay and the area of each class per image (results/segment/). The photos
# are the user's: fingerprinted in the params, never declared. With ground truth, the classes are
# named after the classes they were matched to.

if PLAN.segment_images:

    rule segment:
        input:
            model=f"{RESULTS}/{PLAN.final_segmentation}/model.pt",
            metrics=f"{RESULTS}/metrics.json" if PLAN.has_gt else [],
        output:
            report(directory(SEGMENTED), patterns=["{name}.csv"], caption="report/segment.rst",
                   category="New photos"),
        params:
            cfg=cfg("segment", "segmentation"),
            images=images_fingerprint(PLAN.segment_images),
            folder=SETTINGS.segment.images,
            metrics=lambda wc, input: (f"--metrics {input.metrics} --stage {PLAN.final_segmentation}"
                                       if input.metrics else ""),
        log:
            "logs/segment.log",
        threads: 2
        shell:
            "maskdistill --threads {threads} segment --config {params.cfg:q} --model {input.model}"
            " {params.metrics} --out {output} {params.folder:q} > {log} 2>&1"
