"""What the Snakefile needs at parse time: splits, stable shard contents, per-rule config."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from maskdistill.config import LOGS, RESULTS, fingerprint
from maskdistill.images import file_problem, list_split, resolve_splits, shard_of

# RESULTS and LOGS are the only folders the workflow writes, relative to its working directory.
# Every rule's outputs and logs lie below them (checked when the Snakefile is parsed:
# workflow_outputs_outside); the user's images, annotations, checkpoints and dataset trees are
# read, never declared as outputs, and may not lie below them (config.check_references).
_MAX_NAMED = 5  # unreadable images named in a planning error before "... and N more"


def split_keys(config: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
    """Split -> sorted (key, image path) pairs, known before any rule runs.

    Under ``dataset.on_bad_image: fail`` a listed image that the planner can already see is
    unreadable (a dangling link, a vanished or empty file) stops planning with an error naming it;
    under ``skip`` it stays listed, and mining skips it and names it in the input report.
    """
    ds = config["dataset"]
    splits = resolve_splits(ds, RESULTS)
    if ds["source"] == "demo":
        from maskdistill.demo import demo_image_keys

        return {s: [(k, str(Path(splits[s]["images"]) / f"{k}.png"))
                    for k in demo_image_keys(ds["demo"], s)] for s in splits}
    out = {}
    for split, spec in splits.items():
        records = list_split(spec)
        if not records:
            raise ValueError(f"config key 'dataset.{split}.images': no images found in {spec['images']}")
        out[split] = [(r.key, str(r.path)) for r in records]
        if ds["on_bad_image"] == "fail":
            _refuse_unreadable(out[split], _images_key(ds["source"], split))
    return out


def _images_key(source: str, split: str) -> str:
    """The config key that names where a split's images are."""
    return {"voc": "dataset.voc.root", "coco20k": "dataset.coco20k.images"}.get(
        source, f"dataset.{split}.images")


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


def shard_ids(config: dict[str, Any]) -> list[str]:
    """Shard names: stable zero-padded indices."""
    return [f"{i:03d}" for i in range(config["dataset"]["num_shards"])]


def shard_members(keys: list[tuple[str, str]], shard: str, num_shards: int) -> list[tuple[str, str]]:
    """The (key, path) pairs that fall into ``shard``."""
    return [kp for kp in keys if shard_of(kp[0], num_shards) == int(shard)]


def shard_digest(members: list[tuple[str, str]]) -> str:
    """Fingerprint of a shard's images (a changed image or list reruns only that shard)."""
    return images_fingerprint(members)


DESCRIBE_KEYS = ("backbone", "crop_size", "batch_size")


# Keys added after results may already exist, with the value that behaves as before the key did.
# At that value a key is left out of every rule's params, so upgrading reruns nothing.
LATER_KEYS: dict[tuple[str, ...], Any] = {("dataset", "demo", "background"): "plain",
                                          ("mining", "seed_from"): "affinity"}


def _without_later_keys(picked: dict[str, Any]) -> dict[str, Any]:
    for path, neutral in LATER_KEYS.items():
        parent: Any = picked
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if isinstance(parent, dict) and parent.get(path[-1], neutral) == neutral:
            parent.pop(path[-1], None)
    return picked


def rule_config(config: dict[str, Any], *sections: str, only: tuple[str, ...] = ()) -> str:
    """The config sections a rule depends on, as compact JSON (its params, compared on reruns).

    ``only`` narrows every named section to those keys, so that, for example, a K-means setting
    does not rerun the feature extraction that shares the ``clustering`` section. Keys of
    :data:`LATER_KEYS` at their neutral value are left out.
    """
    keep = {"device", "dataset", *sections}
    picked = copy.deepcopy({k: v for k, v in config.items() if k in keep})
    for name in sections:
        if only:
            picked[name] = {k: v for k, v in picked[name].items() if k in only}
    return json.dumps(_without_later_keys(picked), sort_keys=True)
