"""Galleries: the masks nearest each cluster centre, the images where each class covers most, and
the matching read back from metrics.json."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from PIL import Image

from maskdistill.gallery import (
    GAP,
    class_gallery,
    cluster_gallery,
    gallery_grid,
    matched_classes,
    square_box,
    tint,
)
from maskdistill.images import ImageRecord
from maskdistill.storage import (
    CorruptFileError,
    MaskShardWriter,
    MinedMask,
    mask_to_box,
    write_json,
    write_label_png,
)

MEAN = np.array([1.0, 2.0, 3.0, 4.0, 5.0], np.float32)
STD = np.array([2.0, 2.0, 0.5, 1.0, 3.0], np.float32)
# image i belongs to cluster i % 3 (directions e0, e1, e2); EPS[i] along e3 is its distance from the centre
EPS = [0.30, 0.05, 0.45, 0.10, 0.60, 0.20, 0.02, 0.50, 0.15, 0.40, 0.25, 0.35]
KEYS = [f"img{i:02d}" for i in range(12)]


def unit(d: int) -> np.ndarray:
    e = np.zeros(5, np.float32)
    e[d] = 1.0
    return e


def write_images_and_masks(root, shards):
    """12 random 24x32 photos under root/photos and their mined masks (a rectangle each), split
    over ``shards`` mask shards."""
    rng = np.random.default_rng(0)
    items = []
    for i, key in enumerate(KEYS):
        (root / "photos").mkdir(exist_ok=True)
        photo = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(photo).save(root / "photos" / f"{key}.png")
        mask = np.zeros((24, 32), bool)
        mask[2 + i % 4:18, 3:20 + i % 5] = True
        items.append(MinedMask(key, f"photos/{key}.png", 24, 32, mask, mask_to_box(mask),
                               np.zeros((2, 2), bool), np.zeros((2, 2), np.float32), 0))
    for s, path in enumerate(shards):
        with MaskShardWriter(path, {"backbone": "test"}) as w:
            for it in items[s::len(shards)]:
                w.append(it)


def write_feature_shard(path, keys, features):
    """A feature shard in clustering.describe_shard's layout."""
    with h5py.File(path, "w") as h5:
        h5.create_dataset("keys", data=np.array(keys, dtype=object), dtype=h5py.string_dtype())
        h5.create_dataset("features", data=np.asarray(features, np.float32))
        h5.attrs["complete"] = True


def features_of(indices):
    """Raw features whose whitened form is e_(i % 3) + EPS[i] e3 (normalised)."""
    return np.stack([MEAN + STD * (unit(i % 3) + EPS[i] * unit(3)) for i in indices])


def write_kmeans(path, directions):
    with open(path, "wb") as f:
        np.savez(f, mean=MEAN, std=STD, centroids=np.stack([unit(d) for d in directions]))


@pytest.fixture
def clusters(tmp_path):
    """Two mask shards (alternating images), two feature shards (first and last six) and a
    K-means model whose 4th centroid (e4) no mask is near."""
    masks = [tmp_path / "m0.h5", tmp_path / "m1.h5"]
    write_images_and_masks(tmp_path, masks)
    feats = [tmp_path / "f0.h5", tmp_path / "f1.h5"]
    write_feature_shard(feats[0], KEYS[:6], features_of(range(6)))
    write_feature_shard(feats[1], KEYS[6:], features_of(range(6, 12)))
    write_kmeans(tmp_path / "kmeans.npz", [0, 1, 2, 4])
    return tmp_path, masks, feats


def expected_nearest(cluster, samples):
    """Keys of cluster ``cluster`` (0-based), nearest first: by construction, smallest EPS first."""
    members = [i for i in range(12) if i % 3 == cluster]
    return [KEYS[i] for i in sorted(members, key=lambda i: EPS[i])][:samples]


def test_cluster_rows_hold_the_masks_nearest_each_centroid_in_cluster_order(clusters):
    root, masks, feats = clusters
    out = root / "gallery" / "clusters.jpg"
    result = cluster_gallery(masks, feats, root / "kmeans.npz", root, out, samples=2, crop_size=16)
    assert result["clusters"] == 4
    assert [r["cluster"] for r in result["rows"]] == [1, 2, 3, 4]
    assert [r["size"] for r in result["rows"]] == [4, 4, 4, 0]
    assert [r["keys"] for r in result["rows"][:3]] == [expected_nearest(c, 2) for c in range(3)]
    assert [r["keys"] for r in result["rows"][:3]] == [["img06", "img03"], ["img01", "img10"],
                                                       ["img08", "img05"]]
    assert result["rows"][3]["keys"] == [] and result["rows"][3]["label"] == "cluster 4 · 0 masks"
    with Image.open(out) as im:
        assert im.format == "JPEG"
    assert sorted(p.name for p in out.parent.iterdir()) == ["clusters.jpg"]


def test_cluster_membership_is_decided_on_whitened_features(clusters):
    """Unwhitened, every raw feature points nearest the 4th centroid (e4, the largest mean);
    whitened with the model's mean and std, image i joins cluster i % 3 + 1."""
    root, masks, feats = clusters
    raw = features_of(range(12))
    naive = (raw / np.linalg.norm(raw, axis=1, keepdims=True)) @ np.stack([unit(d) for d in (0, 1, 2, 4)]).T
    assert (naive.argmax(1) == 3).all()
    result = cluster_gallery(masks, feats, root / "kmeans.npz", root, root / "g.jpg", samples=8,
                             crop_size=16)
    assert [sorted(r["keys"]) for r in result["rows"]] == [sorted(KEYS[c::3]) for c in range(3)] + [[]]


def test_cluster_image_grows_with_the_rows_and_labels_name_the_matched_class(clusters):
    root, masks, feats = clusters
    write_kmeans(root / "k3.npz", [0, 1, 2])
    matched = {1: ("cat", 52.34), 2: ("dog", None)}
    small = cluster_gallery(masks, feats, root / "k3.npz", root, root / "g3.jpg", samples=2,
                            crop_size=16, matched=matched)
    cluster_gallery(masks, feats, root / "kmeans.npz", root, root / "g4.jpg", samples=2, crop_size=16)
    labels = [r["label"] for r in small["rows"]]
    assert labels == ["cluster 1 · 4 masks\n= cat (IoU 52.3)", "cluster 2 · 4 masks\n= dog (IoU n/a)",
                      "cluster 3 · 4 masks"]
    with Image.open(root / "g3.jpg") as g3, Image.open(root / "g4.jpg") as g4:
        assert g4.size[1] - g3.size[1] == 16 + GAP


def test_cluster_gallery_names_a_feature_key_without_a_mask(clusters):
    root, masks, feats = clusters
    write_feature_shard(feats[1], ["stranger"] + KEYS[7:], features_of(range(6, 12)))
    with pytest.raises(ValueError, match="'stranger'.*m0.h5"):
        cluster_gallery(masks, feats, root / "kmeans.npz", root, root / "g.jpg", samples=12)


def test_cluster_gallery_refuses_a_model_without_centroids_or_of_another_width(clusters):
    root, masks, feats = clusters
    with open(root / "bad.npz", "wb") as f:
        np.savez(f, mean=MEAN, std=STD)
    with pytest.raises(CorruptFileError, match="bad.npz.*centroids"):
        cluster_gallery(masks, feats, root / "bad.npz", root, root / "g.jpg")
    with open(root / "wide.npz", "wb") as f:
        np.savez(f, mean=np.zeros(7), std=np.ones(7), centroids=np.eye(3, 7))
    with pytest.raises(ValueError, match="f0.h5.*7 dimensions"):
        cluster_gallery(masks, feats, root / "wide.npz", root, root / "g.jpg")
    assert not (root / "g.jpg").exists()


def test_tint_blends_the_mask_and_outlines_it():
    rgb = np.full((8, 8, 3), 100, np.uint8)
    mask = np.zeros((8, 8), bool)
    mask[1:7, 1:7] = True
    out = tint(rgb, mask, np.array([200, 0, 0]), alpha=0.5)
    assert out[0, 0].tolist() == [100, 100, 100]  # outside: unchanged
    assert out[1, 3].tolist() == [200, 0, 0]  # border: the colour
    assert out[3, 3].tolist() == [150, 50, 50]  # inside: blended


def test_gallery_grid_places_crops_left_to_right_and_leaves_empty_rows_white():
    a, b = np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 7, np.uint8)
    grid = gallery_grid([[a, b], []], samples=3, crop_size=4)
    cell = 4 + GAP
    assert grid.shape == (2 * cell + GAP, 3 * cell + GAP, 3)
    assert (grid[GAP:GAP + 4, GAP:GAP + 4] == 0).all()
    assert (grid[GAP:GAP + 4, GAP + cell:GAP + cell + 4] == 7).all()
    assert (grid[GAP + cell:] == 255).all() and (grid[:, GAP + 2 * cell:] == 255).all()


def test_square_box_adds_a_margin_and_stays_inside_the_image():
    m = np.zeros((40, 40), bool)
    m[5:10, 10:20] = True
    assert square_box(m, 0.15) == pytest.approx([8.5, 1.0, 21.5, 14.0])
    corner = np.zeros((40, 40), bool)
    corner[0:10, 0:10] = True
    assert square_box(corner, 0.15) == pytest.approx([0, 0, 13, 13])
    wide = np.zeros((20, 40), bool)
    wide[5:10, :] = True
    assert square_box(wide, 0.15) == pytest.approx([0, 0, 40, 20])


def write_predictions(root, areas):
    """One 16x16 photo and label PNG per key; ``areas`` key -> {label: pixel count} (rows filled)."""
    records = []
    for key, per_label in areas.items():
        labels = np.zeros(256, np.uint8)
        start = 0
        for label, n in per_label.items():
            labels[start:start + n] = label
            start += n
        write_label_png(root / "pred" / f"{key}.png", labels.reshape(16, 16))
        Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(root / f"{key}.png")
        records.append(ImageRecord(key, root / f"{key}.png"))
    return records


def test_class_rows_hold_the_images_where_the_class_covers_most(tmp_path):
    records = write_predictions(tmp_path, {"a": {1: 30}, "b": {1: 50}, "c": {2: 20}, "d": {1: 10},
                                           "e": {1: 50, 2: 5}})
    result = class_gallery(records, tmp_path / "pred", 4, tmp_path / "classes.jpg", samples=2, crop_size=16,
                           matched={2: ("dog", 12.5)})
    assert result["classes"] == 3
    assert [(r["class"], r["size"], r["keys"]) for r in result["rows"]] == [
        (1, 4, ["b", "e"]), (2, 2, ["c", "e"]), (3, 0, [])]
    assert result["rows"][1]["label"] == "class 2 · 2 images\n= dog (IoU 12.5)"
    assert result["rows"][2]["label"] == "class 3 · 0 images"
    with Image.open(tmp_path / "classes.jpg") as im:
        assert im.format == "JPEG"


def test_class_gallery_names_a_bad_or_missing_prediction(tmp_path):
    records = write_predictions(tmp_path, {"a": {1: 30}, "b": {5: 3}})
    with pytest.raises(ValueError, match=r"pred/b\.png: label 5 .* 3 labels"):
        class_gallery(records, tmp_path / "pred", 3, tmp_path / "g.jpg")
    with pytest.raises(FileNotFoundError, match=r"pred/z\.png"):
        class_gallery([ImageRecord("z", tmp_path / "a.png")], tmp_path / "pred", 3, tmp_path / "g.jpg")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"pred/a\.png is 16x16 but its image .*a\.png is 8x8"):
        class_gallery(records[:1], tmp_path / "pred", 3, tmp_path / "g.jpg")
    assert not (tmp_path / "g.jpg").exists()


def test_matched_classes_reads_the_stage_matching(tmp_path):
    metrics = {"meta": {"class_names": ["background", "cat", "dog"]},
               "segmentation": {"miou": 40.0, "per_class": {"background": 90.0, "cat": 30.5, "dog": None},
                                "pixel_accuracy": 80.0, "mapping": [0, 2, 1, 0]}}
    write_json(tmp_path / "metrics.json", metrics)
    assert matched_classes(tmp_path / "metrics.json", "segmentation") == {
        1: ("dog", None), 2: ("cat", 30.5), 3: ("background", 90.0)}
    assert matched_classes(tmp_path / "metrics.json", "maskrcnn") == {}
    assert matched_classes(tmp_path / "absent.json", "segmentation") == {}
    metrics["segmentation"]["mapping"] = [0, 3]
    write_json(tmp_path / "bad.json", metrics)
    with pytest.raises(CorruptFileError, match="bad.json.*label 1 to class 3"):
        matched_classes(tmp_path / "bad.json", "segmentation")
