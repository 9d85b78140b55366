"""The workflow's plan, as tested code: which stages run, on which images, with which files.

:func:`make_plan` turns a validated config into a :class:`Plan` that the Snakefile reads (the rules
hold no logic of their own): the splits and each one's planned images, the shards, the evaluated
split and its ground truth, the label count, which optional stages run, the stages that
``evaluate`` scores and the final targets. ``tests/test_plan.py`` checks it for every source.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import maskdistill
from maskdistill.config import LOGS, RESULTS, check_references, fingerprint, validate_config
from maskdistill.datasets import (
    EXTRA_IMAGES_KEY,
    DatasetSource,
    dataset_source,
    extra_records,
    extra_splits,
    records_from_paths,
    shard_of,
)
from maskdistill.images import file_problem
from maskdistill.settings import Settings, build
from maskdistill.weights_cache import HubWeight, config_hub_weights

# RESULTS and LOGS are the only folders the workflow writes, relative to its working directory.
# Every rule's outputs and logs lie below them (checked when the Snakefile is parsed:
# workflow_outputs_outside); the user's images, annotations, checkpoints and dataset trees are
# read, never declared as outputs, and may not lie below them (config.check_references).
_MAX_NAMED = 5  # unreadable images named in a planning error before "... and N more"
PRETRAINED = f"{RESULTS}/pretrain/backbone.safetensors"
INPUT_REPORT = f"{RESULTS}/input_report.json"
SEGMENTED = f"{RESULTS}/segment"
WEIGHTS_MANIFEST = f"{RESULTS}/weights.json"  # what fetch_weights put into the weights cache


@dataclass(frozen=True)
class Plan:
    """Everything the rules need to know, computed once when the Snakefile is parsed."""

    config: dict[str, Any]  # validated, defaults filled, the pretrained ViT swapped in
    settings: Settings
    source: DatasetSource
    splits: dict[str, list[tuple[str, str]]]  # split -> planned (key, image path)
    shards: tuple[str, ...]
    probe_labels: dict[str, str | None] = field(default_factory=dict)
    segment_images: list[tuple[str, str]] = field(default_factory=list)  # segment.images, planned
    # clustering.extra_images: extra0, ... -> planned (key, path); mined and described for K-means only
    extra_splits: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    @property
    def has_val(self) -> bool:
        return "val" in self.splits

    @property
    def eval_split(self) -> str:
        """The split that ``evaluate`` scores (val; COCO20k: its own train images)."""
        return self.source.evaluation_split

    @property
    def gt_instances(self) -> str | None:
        """The COCO instances file of the evaluated split (user's, the demo's, or one written for
        VOC / COCO20k by rules/datasets.smk)."""
        return self.source.gt_instances(self.eval_split)

    @property
    def gt_semantic(self) -> str | None:
        """Ground-truth label PNGs of the evaluated split (VOC's SegmentationClass), else None."""
        return self.source.gt_semantic(self.eval_split)

    @property
    def has_gt(self) -> bool:
        return self.eval_split in self.splits and bool(self.gt_instances)

    @property
    def num_labels(self) -> int:
        """Labels of every predicted label map: background plus the K-means centroids."""
        return self.settings.num_labels

    @property
    def pretrained(self) -> str | None:
        """The ViT weights the pretrain rule writes, when mining and clustering use them."""
        return PRETRAINED if self.settings.pretrain.enabled else None

    @property
    def hub_weights(self) -> list[HubWeight]:
        """The hub weights that model jobs load: the local rule fetch_weights puts them into the
        weights cache before any model job (none for the demo's shipped ViT, random or local ones)."""
        return config_hub_weights(self.settings)

    def fetch_config(self) -> str:
        """The params of fetch_weights, as JSON: the ViT settings and the weights cache, nothing
        else (a K-means or mining setting does not fetch again)."""
        picked: dict[str, Any] = {section: {"backbone": self.config[section]["backbone"]}
                                  for section in ("mining", "clustering")}
        picked |= {"weights_cache": self.config["weights_cache"], "version": maskdistill.__version__}
        return json.dumps(picked, sort_keys=True)

    @property
    def mask_ap_split(self) -> str:
        """The split whose detector predictions mask AP scores (``evaluation.mask_ap_split``)."""
        return mask_ap_split(self.settings, self.source)

    @property
    def mask_ap_gt(self) -> str | None:
        """The COCO instances file mask AP scores against (VOC's are written by rules/datasets.smk)."""
        return self.source.gt_instances(self.mask_ap_split)

    @property
    def mask_ap(self) -> bool:
        return self.settings.evaluation.mask_ap and self.has_gt and bool(self.mask_ap_gt)

    @property
    def linear_probe(self) -> bool:
        return self.settings.linear_probe.enabled and self.has_gt

    @property
    def diagnostics(self) -> bool:
        return self.settings.evaluation.diagnostics and self.has_gt

    @property
    def crf_round(self) -> bool:
        """The CRF self-training round (a second segmentation model on CRF-refined labels)."""
        return self.settings.crf.self_training

    @property
    def final_segmentation(self) -> str:
        """The segmentation stage evaluated last: the CRF round's when it runs."""
        return "segmentation_crf" if self.crf_round else "segmentation"

    @property
    def eval_stages(self) -> dict[str, str]:
        """Stage name -> folder of label PNGs of the evaluated split that ``evaluate`` scores."""
        split = self.eval_split
        stages = {"patch_kmeans": f"{RESULTS}/baselines/patch_kmeans/{split}"} if self.diagnostics else {}
        stages |= {"initial_masks": f"{RESULTS}/initial_labels/{split}",
                   "maskrcnn": f"{RESULTS}/pseudo_labels/{split}",
                   "segmentation": f"{RESULTS}/segmentation/predictions/{split}"}
        if self.crf_round:
            stages["segmentation_crf"] = f"{RESULTS}/segmentation_crf/predictions/{split}"
        if self.settings.evaluation.crf:
            stages[f"{self.final_segmentation}+crf"] = f"{RESULTS}/{self.final_segmentation}/crf/{split}"
        return stages

    @property
    def kmeans_splits(self) -> tuple[str, ...]:
        """The splits whose mask features K-means is fitted on: ``clustering.fit_on``, then the
        extra folders (which nothing else reads)."""
        return (*self.settings.clustering.fit_on, *self.extra_splits)

    def shard_members(self, split: str, shard: str) -> list[tuple[str, str]]:
        """The planned (key, path) pairs of one shard of ``split`` (a dataset split or an extra one)."""
        pairs = self.splits[split] if split in self.splits else self.extra_splits[split]
        return shard_members(pairs, shard, self.settings.dataset.num_shards)

    def targets(self) -> list[str]:
        """What ``snakemake`` makes by default: every split segmented, the input report and, with
        ground truth, the metrics and the report."""
        splits = [split for split in ("train", "val") if split in self.splits]
        targets = [f"{RESULTS}/segmentation/predictions/{split}" for split in splits]
        targets.append(INPUT_REPORT)
        if self.settings.gallery.enabled:
            targets += [f"{RESULTS}/{stage}/gallery_{split}.jpg" for stage in ("clusters", "segmentation")
                        for split in splits]
        if self.segment_images:
            targets.append(SEGMENTED)
        if self.settings.choose_k.enabled:
            targets.append(f"{RESULTS}/choose_k/choose_k.png")
        if self.has_gt:
            targets += [f"{RESULTS}/metrics.json", f"{RESULTS}/report.md", f"{RESULTS}/report.rst"]
        return targets


def make_plan(raw: dict[str, Any]) -> Plan:
    """The plan of a config: validates it (defaults filled), checks that every file, folder and
    model it names exists, lists every split's images and, with ``pretrain.enabled``, points mining
    and clustering at the pretrained ViT. This is the one place the workflow checks its config.

    Raises ``ConfigError`` naming every bad key, and ``ValueError`` / ``FileNotFoundError`` naming
    missing data (see :func:`split_keys`).
    """
    config = validate_config(raw)
    check_references(config)
    if config["pretrain"]["enabled"]:
        for section in ("mining", "clustering"):
            config[section]["backbone"] = {"name": config["pretrain"]["arch"], "pretrained": False,
                                           "checkpoint": PRETRAINED}
    settings = build(Settings, config)
    source = dataset_source(settings.dataset)
    splits = split_keys(source)
    ap_split = mask_ap_split(settings, source)  # checked even when mask AP is off
    if settings.evaluation.mask_ap and ap_split in source.mask_ap_splits:
        splits |= split_keys(source, (ap_split,))  # predicted on by the detector, never mined
    shards = tuple(f"{i:03d}" for i in range(settings.dataset.num_shards))
    plan = Plan(config, settings, source, splits, shards)
    labels = {split: getattr(settings.linear_probe, f"{split}_labels") or source.probe_labels(split)
              for split in ("train", plan.eval_split)}
    if plan.linear_probe and not all(labels.values()):
        raise ValueError("config key 'linear_probe.train_labels' / 'linear_probe.val_labels': set the "
                         "folders of ground-truth label PNGs for the linear probe")
    segment = []
    if settings.segment.images:  # new photos to segment: planned like a split's images
        segment = [(r.key, str(r.path)) for r in records_from_paths([settings.segment.images])]
        if settings.dataset.on_bad_image == "fail":
            _refuse_unreadable(segment, "segment.images")
    return Plan(config, settings, source, splits, shards, labels, segment,
                extra_splits=_kmeans_extras(settings, splits))


def split_keys(source: DatasetSource, names: tuple[str, ...] | None = None
               ) -> dict[str, list[tuple[str, str]]]:
    """Split -> sorted (key, image path) pairs, known before any rule runs.

    Under ``dataset.on_bad_image: fail`` a listed image that the planner can already see is
    unreadable (a dangling link, a vanished or empty file) stops planning with an error naming it;
    under ``skip`` it stays listed, and mining skips it and names it in the input report.
    """
    out = {}
    for split in source.splits if names is None else names:
        out[split] = source.planned(split)
        if source.dataset.source != "demo" and source.dataset.on_bad_image == "fail":
            _refuse_unreadable(out[split], source.images_key(split))
    return out


def _kmeans_extras(settings: Settings, splits: dict[str, list[tuple[str, str]]]
                   ) -> dict[str, list[tuple[str, str]]]:
    """The ``clustering.extra_images`` folders planned as splits (``extra0``, ...), after checking
    that every ``clustering.fit_on`` split exists; errors name the key.

    An image already planned (in a dataset split or an earlier folder, by its absolute path) is left
    out, so that naming all of COCO's train2014 beside COCO20k, or VOC2012/JPEGImages beside VOC,
    adds only the other images and no mask is fitted on twice.
    """
    missing = [split for split in settings.clustering.fit_on if split not in splits]
    if missing:
        raise ValueError(f"config key 'clustering.fit_on': split(s) {', '.join(missing)} not configured "
                         f"(dataset.source {settings.dataset.source} has {', '.join(splits)})")
    seen = {_absolute(path) for pairs in splits.values() for _, path in pairs}
    out = {}
    for split, folder in extra_splits(settings.clustering.extra_images).items():
        if owned_by_workflow(folder):
            raise ValueError(f"config key '{EXTRA_IMAGES_KEY}': {folder} lies inside the workflow's results "
                             "or logs folder; keep your data elsewhere")
        pairs = [(r.key, str(r.path)) for r in extra_records(folder)]
        out[split] = [(key, path) for key, path in pairs if _absolute(path) not in seen]
        if not out[split]:
            raise ValueError(f"config key '{EXTRA_IMAGES_KEY}': every image in {folder} is already planned "
                             "(in a dataset split or an earlier folder); nothing to add")
        seen.update(_absolute(path) for _, path in out[split])
        if settings.dataset.on_bad_image == "fail":
            _refuse_unreadable(out[split], EXTRA_IMAGES_KEY)
    return out


def _absolute(path: str) -> str:
    return os.path.normpath(os.path.abspath(os.path.expanduser(path)))


def mask_ap_split(settings: Settings, source: DatasetSource) -> str:
    """The split ``evaluation.mask_ap_split`` names (``eval``: the evaluated split), checked to be a
    split of the source with ground-truth instances, or one it offers for mask AP alone."""
    name = settings.evaluation.mask_ap_split
    if name == "eval":
        return source.evaluation_split
    if name in source.mask_ap_splits or (name in source.splits and source.gt_instances(name)):
        return name
    offered = ["eval", *source.mask_ap_splits,
               *(s for s in source.splits if s != source.evaluation_split and source.gt_instances(s))]
    raise ValueError(f"config key 'evaluation.mask_ap_split': dataset.source {source.dataset.source} has no "
                     f"split '{name}' with ground-truth instances (use one of {', '.join(offered)})")


def _refuse_unreadable(pairs: list[tuple[str, str]], key: str) -> None:
    """Raise naming the listed images whose directory entry already shows they cannot be read."""
    bad = [f"{path}: {problem}" for _, path in pairs if (problem := file_problem(path))]
    if bad:
        more = f"\n    ... and {len(bad) - _MAX_NAMED} more" if len(bad) > _MAX_NAMED else ""
        raise ValueError(
            f"config key '{key}': {len(bad)} image(s) cannot be read and dataset.on_bad_image is "
            "'fail':\n    " + "\n    ".join(bad[:_MAX_NAMED]) + more + "\n  Fix or remove them, or "
            "set dataset.on_bad_image: skip to leave them out (they are then listed with their "
            "reason in results/input_report.md).")


def owned_by_workflow(path: str | Path) -> bool:
    """Whether ``path`` (relative to the working directory) lies in the results or logs folder."""
    return _inside(Path(path), Path(RESULTS)) or _inside(Path(path), Path(LOGS))


def _inside(path: Path, folder: Path) -> bool:
    base = Path(os.path.abspath(folder))
    return Path(os.path.abspath(path)).is_relative_to(base)


def image_inputs(pairs: list[tuple[str, str]]) -> list[str]:
    """The image files a rule may declare as inputs: only those the workflow wrote (the demo's).

    A user's image is never a declared input or output: Snakemake would plan a job to "make" one
    that vanished, or stop a job whose image vanished after planning. Its state goes into the
    rule's params instead (:func:`images_fingerprint`).
    """
    return [path for _, path in pairs if owned_by_workflow(path)]


def images_fingerprint(pairs: list[tuple[str, str]]) -> str:
    """Fingerprint of a list of images: their keys, and for files the user owns, each file's size
    and modification time (or why it cannot be read). A changed, added, removed or vanished image
    changes it, so the rules that read the images rerun; the demo's images (workflow outputs) are
    fingerprinted by key alone, as before, since Snakemake tracks them as inputs."""
    if all(owned_by_workflow(path) for _, path in pairs):
        return fingerprint([k for k, _ in pairs])
    return fingerprint([[k, _file_state(path)] for k, path in pairs])


def _file_state(path: str) -> str:
    problem = file_problem(path)
    if problem:
        return problem
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


def workflow_outputs_outside(files: list[tuple[str, str]]) -> list[str]:
    """The (rule, file) pairs whose file lies outside the results and logs folders, as messages.

    ``files`` are the output and log patterns of every rule; wildcards are placeholders inside a
    path and cannot move it out of its folder, so the patterns themselves are checked.
    """
    return [f"rule {rule}: {path}" for rule, path in files if not owned_by_workflow(path)]


def shard_members(keys: list[tuple[str, str]], shard: str, num_shards: int) -> list[tuple[str, str]]:
    """The (key, path) pairs that fall into ``shard``."""
    return [kp for kp in keys if shard_of(kp[0], num_shards) == int(shard)]


def shard_digest(members: list[tuple[str, str]]) -> str:
    """Fingerprint of a shard's images (a changed image or list reruns only that shard)."""
    return images_fingerprint(members)


FEATURE_KEYS = ("backbone", "crop", "crop_size", "batch_size", "decode_threads")


# Keys added after results may already exist, with the value that behaves as before the key did.
# At that value a key is left out of every rule's params, so upgrading reruns nothing.
LATER_KEYS: dict[tuple[str, ...], Any] = {("dataset", "demo", "background"): "plain",
                                          ("mining", "seed_from"): "affinity",
                                          ("mining", "preprocess"): "ours",
                                          ("clustering", "decode_threads"): 1,
                                          ("clustering", "crop"): "resize",
                                          ("clustering", "center"): True,
                                          ("clustering", "fit_on"): ["train"],
                                          ("clustering", "extra_images"): [],
                                          ("precision",): "fp32",
                                          ("evaluation", "mapping"): "pixels",
                                          ("evaluation", "mask_ap_split"): "eval",
                                          ("evaluation", "single_object"): "ours",
                                          ("evaluation", "majority"): "pixels",
                                          ("evaluation", "absent_classes"): "skip",
                                          ("segmentation", "hard_pixel_count"): "valid",
                                          ("segmentation", "transform"): "crop",
                                          ("crf", "unary"): "labels",
                                          ("crf", "channel_order"): "rgb",
                                          ("linear_probe", "rotation_degrees"): 0,
                                          ("linear_probe", "transform"): "crop",
                                          ("linear_probe", "head_init"): "default",
                                          ("detector", "architecture"): "fpn",
                                          ("detector", "batchnorm"): "auto",
                                          **{(section, "gpus"): 1 for section in
                                             ("pretrain", "detector", "segmentation", "linear_probe")}}


def _without_later_keys(picked: dict[str, Any]) -> dict[str, Any]:
    for path, neutral in LATER_KEYS.items():
        parent: Any = picked
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if isinstance(parent, dict) and parent.get(path[-1], neutral) == neutral:
            parent.pop(path[-1], None)
    return picked


def launch_command(gpus: int) -> str:
    """How a training rule starts the command line: ``maskdistill`` on one GPU; on several, one
    process per GPU with torchrun on this node (``--threads`` is then shared among them)."""
    if gpus <= 1:
        return "maskdistill"
    return f"torchrun --standalone --nproc_per_node {gpus} --no-python maskdistill"


def rule_config(config: dict[str, Any], *sections: str, only: tuple[str, ...] = ()) -> str:
    """The config sections a rule depends on, as compact JSON (its params, compared on reruns),
    with the package version (the command line checks it against its own).

    ``only`` narrows every named section to those keys, so that, for example, a K-means setting
    does not rerun the feature extraction that shares the ``clustering`` section. Keys of
    :data:`LATER_KEYS` at their neutral value are left out.
    """
    keep = {"device", "precision", "dataset", *sections}
    picked = copy.deepcopy({k: v for k, v in config.items() if k in keep})
    for name in sections:
        if only:
            picked[name] = {k: v for k, v in picked[name].items() if k in only}
    picked["version"] = maskdistill.__version__  # a new version reruns what it touches
    return json.dumps(_without_later_keys(picked), sort_keys=True)
