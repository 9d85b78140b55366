# Choosing k without labels (choose_k.enabled, or ask for results/choose_k/choose_k.png): K-means for
# a range of k on the train split's clustering features, inertia and silhouette against k.


rule choose_k:
    input:
        shard_files("features", "train"),
    output:
        json=f"{RESULTS}/choose_k/choose_k.json",
        png=report(f"{RESULTS}/choose_k/choose_k.png", caption="report/choose_k.rst", category="Choosing k"),
        csv=f"{RESULTS}/choose_k/choose_k.csv",
    params:
        cfg=cfg("clustering", "choose_k"),
    log:
        "logs/choose_k.log",
    shell:
        "maskdistill choose-k --config {params.cfg:q} --features {input} --out-json {output.json}"
        " --out-png {output.png} --out-csv {output.csv} > {log} 2>&1"
