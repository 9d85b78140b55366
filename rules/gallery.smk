# What each cluster and each predicted class is (gallery.enabled): a row of sample crops per K-means
# cluster (the masks nearest its centre) and per class of the segmentation model (the images where it
# covers most). On the evaluated split each row names the class it was matched to and its IoU.

rule cluster_gallery:
    input:
        masks=split_shard_files("masks"),
        features=split_shard_files("features"),
        kmeans=f"{RESULTS}/clusters/kmeans.npz",
        metrics=matched_metrics,
    output:
        report(f"{RESULTS}/clusters/gallery_{{split}}.jpg", caption="report/cluster_gallery.rst",
               category="Galleries", subcategory="clusters"),
    params:
        cfg=cfg("gallery"),
        metrics=lambda wc, input: f"--metrics {input.metrics}" if input.metrics else "",
    log:
        "logs/cluster_gallery/{split}.log",
    shell:
        "maskdistill cluster-gallery --config {params.cfg:q} --split {wildcards.split} --masks {input.masks}"
        " --features {input.features} --kmeans {input.kmeans} {params.metrics} --out {output} > {log} 2>&1"


rule class_gallery:
    input:
        predictions=f"{RESULTS}/segmentation/predictions/{{split}}",
        skipped=INPUT_REPORT,
        metrics=matched_metrics,
    output:
        report(f"{RESULTS}/segmentation/gallery_{{split}}.jpg", caption="report/class_gallery.rst",
               category="Galleries", subcategory="segmentation classes"),
    params:
        cfg=cfg("gallery", "clustering"),
        metrics=lambda wc, input: f"--metrics {input.metrics}" if input.metrics else "",
    log:
        "logs/class_gallery/{split}.log",
    shell:
        "maskdistill class-gallery --config {params.cfg:q} --split {wildcards.split}"
        " --predictions {input.predictions} --skipped {input.skipped} {params.metrics} --out {output}"
        " > {log} 2>&1"
