"""What the Snakefile needs at parse time: splits, stable shard contents, per-rule config."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from maskdistill.config import fingerprint
from maskdistill.images import list_split, resolve_splits, shard_of

RESULTS = "results"


def split_keys(config: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
    """Split -> sorted (key, image path) pairs, known before any rule runs."""
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
    return out


def shard_ids(config: dict[str, Any]) -> list[str]:
    """Shard names: stable zero-padded indices."""
    return [f"{i:03d}" for i in range(config["dataset"]["num_shards"])]


def shard_members(keys: list[tuple[str, str]], shard: str, num_shards: int) -> list[tuple[str, str]]:
    """The (key, path) pairs that fall into ``shard``."""
    return [kp for kp in keys if shard_of(kp[0], num_shards) == int(shard)]


def shard_digest(members: list[tuple[str, str]]) -> str:
    """Fingerprint of a shard's image list (a changed list reruns only that shard)."""
    return fingerprint([k for k, _ in members])


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
