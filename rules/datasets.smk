# Ground truth of the benchmark datasets as COCO instances files (for evaluation and mask AP).
# Only used when dataset.source is voc or coco20k; no stage of the method reads these files.

VOC = SETTINGS.dataset.voc
COCO20K = SETTINGS.dataset.coco20k


rule voc_instances:  # the evaluated split's, and the mask-AP split's (evaluation.mask_ap_split)
    input:
        lambda wc: f"{VOC.root}/ImageSets/Segmentation/{wc.voc_split}.txt" if VOC.root else [],
    output:
        f"{RESULTS}/gt/voc_{{voc_split}}.json",
    wildcard_constraints:
        voc_split="train|val|trainval",  # the lists with SegmentationObject ground truth
    params:
        root=VOC.root,
        split=lambda wc: wc.voc_split,
    log:
        "logs/voc_instances/{voc_split}.log",
    shell:
        "maskdistill voc-instances --root {params.root:q} --split {params.split} --out {output} > {log} 2>&1"


rule coco20k_instances:
    input:
        annotations=COCO20K.annotations or [],
        filenames=COCO20K.filenames or [],
    output:
        f"{RESULTS}/gt/coco20k.json",
    log:
        "logs/coco20k_instances.log",
    shell:
        "maskdistill coco20k-instances --annotations {input.annotations:q}"
        " --filenames {input.filenames:q} --out {output} > {log} 2>&1"
