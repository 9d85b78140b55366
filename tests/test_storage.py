"""HDF5 mask shards and atomic writes: damaged files are refused naming them, a killed writer leaves
only a hidden temporary file that the next write removes."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from maskdistill.storage import (
    CorruptFileError,
    MaskShardWriter,
    MinedMask,
    atomic_path,
    read_mask_shard,
)


def _one_mask(key: str = "a") -> MinedMask:
    mask = np.zeros((4, 6), bool)
    mask[1:3, 2:5] = True
    return MinedMask(key=key, file_name=f"{key}.png", height=4, width=6, mask=mask, box=[2, 1, 5, 3],
                     patch_mask=np.ones((1, 2), bool), cls_affinity=np.ones((1, 2), np.float32), seed=0)


def _shard(path: Path, n: int = 200) -> Path:
    with MaskShardWriter(path, {"backbone": "test"}) as w:
        for i in range(n):
            w.append(_one_mask(f"k{i}"))
    return path


def test_damaged_mask_shards_are_refused_naming_the_file(tmp_path):
    good = _shard(tmp_path / "good.h5")
    assert len(read_mask_shard(good)) == 200
    raw = good.read_bytes()
    cases = {
        "truncated.h5": raw[: len(raw) // 2],
        "header_only.h5": raw[:100],
        "zero.h5": b"",
        "noise.h5": np.random.default_rng(0).integers(0, 255, 4096, dtype=np.uint8).tobytes(),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    # a shard whose writer never finished: the complete flag is missing
    with h5py.File(tmp_path / "no_flag.h5", "w") as h5:
        h5.attrs["format_version"] = 1
        h5.create_dataset("keys", data=np.array([b"a"]))
    with h5py.File(tmp_path / "flag_false.h5", "w") as h5:
        h5.attrs["format_version"] = 1
        h5.attrs["complete"] = False
    for name in [*cases, "no_flag.h5", "flag_false.h5"]:
        with pytest.raises(CorruptFileError, match=name.replace(".", r"\.")):
            read_mask_shard(tmp_path / name)


def test_a_killed_writer_leaves_only_a_temp_file_that_the_next_write_removes(tmp_path):
    target = tmp_path / "shard-000.h5"
    with pytest.raises(RuntimeError), atomic_path(target, suffix=".tmp.h5") as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    stale = tmp_path / ".shard-000.h5.abc123.tmp.h5"  # what SIGKILL leaves (no cleanup runs)
    stale.write_bytes(b"partial")
    _shard(target, n=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000.h5"]


def test_results_written_out_of_order_keep_their_slots_and_gaps_close(tmp_path):
    # Mining writes each image at its place in the shard, in the order batches finish; the images
    # it skipped leave slots that closing the shard removes.
    with MaskShardWriter(tmp_path / "s.h5", {"backbone": "test"}) as w:
        for slot in (4, 0, 2, 5):
            item = _one_mask(f"k{slot}")
            item.seed, item.mask[0, 0] = slot, slot == 4
            w.append(item, slot=slot)
        with pytest.raises(ValueError, match="slot 2"):
            w.append(_one_mask("again"), slot=2)
    items = read_mask_shard(tmp_path / "s.h5")
    assert [(m.key, m.seed, bool(m.mask[0, 0])) for m in items] == [("k0", 0, False), ("k2", 2, False),
                                                                    ("k4", 4, True), ("k5", 5, False)]
    with h5py.File(tmp_path / "s.h5") as h5:
        assert h5.attrs["num_images"] == 4 and len(h5["masks"]) == len(h5["keys"]) == 4


def test_mask_shards_are_read_one_mask_at_a_time(tmp_path, monkeypatch):
    import maskdistill.storage as storage

    shard = _shard(tmp_path / "s.h5", n=5)
    decoded = []
    real = storage._mask_at
    monkeypatch.setattr(storage, "_mask_at", lambda h5, i: decoded.append(i) or real(h5, i))
    items = storage.iter_mask_shard(shard)
    assert decoded == []  # nothing read before the first item is asked for
    assert next(items).key == "k0" and decoded == [0]
    assert [m.key for m in items] == ["k1", "k2", "k3", "k4"]
    assert [m.key for m in storage.iter_mask_shard(shard, rows=[3, 1])] == ["k3", "k1"]
    assert storage.mask_shard_keys(shard) == [f"k{i}" for i in range(5)]
    assert [m.key for m in read_mask_shard(shard)] == [f"k{i}" for i in range(5)]


def test_masks_of_several_shards_merge_in_key_order(tmp_path):
    from maskdistill.storage import iter_masks_by_key

    paths = []
    for name, keys in (("a.h5", ["k3", "k0"]), ("b.h5", ["k2", "k4", "k1"])):
        with MaskShardWriter(tmp_path / name, {"backbone": "test"}) as w:
            for key in keys:
                w.append(_one_mask(key))
        paths.append(tmp_path / name)
    merged = list(iter_masks_by_key(paths))
    assert [m.key for m in merged] == ["k0", "k1", "k2", "k3", "k4"]
    assert all(m.mask.sum() == 6 and m.box == [2, 1, 5, 3] for m in merged)
    with pytest.raises(CorruptFileError, match="missing.h5"):
        list(iter_masks_by_key([*paths, tmp_path / "missing.h5"]))


def test_annotations_stream_grouped_by_image_in_any_order(tmp_path):
    from maskdistill.storage import annotation_groups, iter_json_items, json_top_level, write_json

    anns = [{"id": i, "image_id": image} for i, image in enumerate([7, 7, 3, 9, 3, 7])]
    write_json(tmp_path / "c.json", {"images": [{"id": 3}, {"id": 7}, {"id": 9}], "annotations": anns})
    groups = list(annotation_groups(tmp_path / "c.json"))
    # an image is yielded once its last annotation is read, its annotations in file order
    assert [(image, [a["id"] for a in group]) for image, group in groups] == \
        [(9, [3]), (3, [2, 4]), (7, [0, 1, 5])]
    assert [im["id"] for im in iter_json_items(tmp_path / "c.json", "images.item")] == [3, 7, 9]
    write_json(tmp_path / "r.json", anns)
    assert json_top_level(tmp_path / "r.json") == "list" and json_top_level(tmp_path / "c.json") == "dict"
    assert [image for image, _ in annotation_groups(tmp_path / "r.json", "item")] == [9, 3, 7]
    (tmp_path / "bad.json").write_text('{"annotations": [{"image_id": 1}, ')
    with pytest.raises(CorruptFileError, match="bad.json"):
        list(annotation_groups(tmp_path / "bad.json"))
    write_json(tmp_path / "no_id.json", {"annotations": [{"id": 1}]})
    with pytest.raises(ValueError, match="no_id.json: annotation 0 lacks 'image_id'"):
        list(annotation_groups(tmp_path / "no_id.json"))
