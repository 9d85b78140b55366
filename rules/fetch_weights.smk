# Hub weights, before any model job: GPU nodes often cannot reach the internet. fetch_weights is a
# local rule (it runs where Snakemake runs, e.g. the login node) that puts every hub weight the
# config names (ViTs with pretrained: true and no checkpoint) into one cache folder
# (weights_cache) and writes the manifest that the model rules take as input; their jobs then
# read the weights from the cache without the network. A weight that is neither cached nor
# reachable stops the run here, once, naming its config key. The demo's shipped ViT, random
# ViTs and local checkpoints need no fetch: then this rule does not exist.

if HUB_WEIGHTS:

    rule fetch_weights:
        output:
            WEIGHTS_MANIFEST,
        params:
            cfg=PLAN.fetch_config(),
        log:
            "logs/fetch_weights.log",
        localrule: True
        priority: 100
        shell:  # the error (which key, how to fix it) is shown on the terminal as well as in the log
            "maskdistill fetch-weights --config {params.cfg:q} --out {output} 2>&1 | tee {log}"
