# Stage 3: confident Mask R-CNN masks (score >= tau, at least the best) pasted into label PNGs.
# The initial mined masks are pasted the same way (every mask), for evaluation.


rule pseudo_labels:
    input:
        f"{RESULTS}/detector/predictions_{{split}}.json",
    output:
        directory(f"{RESULTS}/pseudo_labels/{{split}}"),
    params:
        cfg=cfg("pseudo_labels"),
    log:
        "logs/pseudo_labels/{split}.log",
    shell:
        "maskdistill pseudo-labels --config {params.cfg:q} --instances {input} --out {output} > {log} 2>&1"


rule initial_labels:
    input:
        f"{RESULTS}/clusters/{{split}}.json",
    output:
        directory(f"{RESULTS}/initial_labels/{{split}}"),
    params:
        cfg=cfg(),
    log:
        "logs/initial_labels/{split}.log",
    shell:
        "maskdistill pseudo-labels --config {params.cfg:q} --all --instances {input} --out {output}"
        " > {log} 2>&1"
