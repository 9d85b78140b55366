# Stage 3: confident Mask R-CNN masks (score >= tau, at least the best) pasted into label PNGs.
# The initial mined masks of the val split are pasted the same way, for evaluation.


rule pseudo_labels:
    input:
        f"{RESULTS}/detector/predictions_{{split}}.json",
    output:
        directory(f"{RESULTS}/pseudo_labels/{{split}}"),
    params:
        tau=config["pseudo_labels"]["tau"],
        version=VERSION,
    conda:
        "../envs/maskdistill.yaml"
    log:
        "logs/pseudo_labels/{split}.log",
    shell:
        "maskdistill paste --instances {input} --tau {params.tau} --out {output} > {log} 2>&1"


rule initial_labels:
    input:
        f"{RESULTS}/clusters/{{split}}.json",
    output:
        directory(f"{RESULTS}/initial_labels/{{split}}"),
    params:
        version=VERSION,
    conda:
        "../envs/maskdistill.yaml"
    log:
        "logs/initial_labels/{split}.log",
    shell:
        "maskdistill paste --instances {input} --tau 0 --out {output} > {log} 2>&1"
