"""Stage 1b: box crops, whitening, seeded K-means over all shards, COCO export."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from maskdistill.clustering import (
    assign_clusters,
    coco_from_masks,
    crop_box,
    describe_shard,
    fit_kmeans,
    read_features,
    whiten,
)
from maskdistill.settings import section_settings
from maskdistill.storage import MaskShardWriter, MinedMask, decode_segmentation

CFG = section_settings("clustering", {"num_clusters": 3, "overclustering": 1, "kmeans_batch_size": 1000,
                                      "n_init": 3, "seed": 0})


def test_crop_box_cuts_the_box_region():
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[5:10, 10:20] = 200
    crop = crop_box(rgb, [10, 5, 20, 10], 8)
    assert crop.shape == (8, 8, 3)
    assert crop.min() > 150  # only the bright box inside


def test_crops_embedded_in_batches_from_decoding_threads_match_one_at_a_time(tmp_path, monkeypatch):
    from maskdistill import clustering

    rng = np.random.default_rng(0)
    with MaskShardWriter(tmp_path / "masks.h5", {"backbone": "test"}) as writer:
        for i in range(7):
            h, w = 24 + 4 * i, 40 - 2 * i
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
            mask = np.zeros((h, w), bool)
            mask[i: h // 2 + i, 2: w - i] = True
            box = [2.0, float(i), float(w - i), float(h // 2 + i)]
            writer.append(MinedMask(f"im{i}", f"im{i}.png", h, w, mask, box, np.ones((1, 1), bool),
                                    np.ones((1, 1), np.float32), 0))
    passes: list[int] = []
    embed = clustering.cls_features
    monkeypatch.setattr(clustering, "cls_features", lambda model, x: passes.append(len(x)) or embed(model, x))
    features = {}
    for batch_size, threads in ((1, 1), (3, 2)):
        passes.clear()
        s = section_settings("clustering", {"backbone": {"name": "test_vit"}, "crop_size": 32,
                                            "batch_size": batch_size, "decode_threads": threads})
        assert describe_shard(tmp_path / "masks.h5", tmp_path, tmp_path / f"f{batch_size}.h5", s,
                              torch.device("cpu")) == 7
        features[batch_size] = read_features(tmp_path / f"f{batch_size}.h5")
        assert passes == ([1] * 7 if batch_size == 1 else [3, 3, 1])
    (keys1, one), (keys3, three) = features[1], features[3]
    assert keys1 == keys3 == [f"im{i}" for i in range(7)]
    assert one.shape == (7, 64) and np.abs(one).max() > 0.1
    np.testing.assert_allclose(three, one, rtol=1e-4, atol=1e-5)


def test_whiten_standardises_then_normalises_rows():
    x = np.array([[1.0, 10.0], [3.0, 30.0], [5.0, 50.0]])
    z = whiten(x, x.mean(0), x.std(0))
    assert np.allclose(np.linalg.norm(z, axis=1), [1, 0, 1], atol=1e-6)  # middle row is the mean
    assert np.allclose(z[0], [-np.sqrt(0.5), -np.sqrt(0.5)])


def _blobs(seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 5, (3, 16))
    labels = np.repeat(np.arange(3), 20)
    return centres[labels] + rng.normal(0, 0.5, (60, 16)), labels


def test_kmeans_recovers_separated_groups_and_is_seeded():
    x, truth = _blobs()
    model = fit_kmeans(x, CFG)
    pred = assign_clusters(x, model)
    # a perfect clustering up to relabelling: each true group maps to exactly one cluster
    pairs = {(t, p) for t, p in zip(truth, pred, strict=True)}
    assert len(pairs) == 3 and len({p for _, p in pairs}) == 3
    again = assign_clusters(x, fit_kmeans(x, CFG))
    assert (again == pred).all()


def test_overclustering_multiplies_the_centroids():
    x, _ = _blobs()
    assert len(fit_kmeans(x, replace(CFG, overclustering=2))["centroids"]) == 6


def test_too_few_masks_names_the_key():
    with pytest.raises(ValueError, match="clustering.num_clusters"):
        fit_kmeans(np.zeros((2, 4)), CFG)


def test_coco_export_round_trips_masks_and_categories(tmp_path):
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:9] = True
    items = [MinedMask(key=f"im{i}", file_name=f"im{i}.png", height=10, width=12, mask=mask,
                       box=[3.0, 2.0, 9.0, 5.0], patch_mask=np.ones((1, 1), bool),
                       cls_affinity=np.zeros((1, 1), np.float32), seed=0) for i in range(2)]
    coco = coco_from_masks(items, np.array([2, 0]), 3, image_ids={"im1": 42})
    assert [im["id"] for im in coco["images"]] == [0, 42]
    assert [a["category_id"] for a in coco["annotations"]] == [3, 1]
    assert coco["annotations"][0]["bbox"] == [3.0, 2.0, 6.0, 3.0]
    assert (decode_segmentation(coco["annotations"][1]["segmentation"], 10, 12) == mask).all()
    import json

    path = tmp_path / "c.json"
    path.write_text(json.dumps(coco))
    api = COCO(str(path))
    assert sorted(api.getCatIds()) == [1, 2, 3]


def test_assignment_in_chunks_equals_the_full_distance_array():
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (53, 16)).astype(np.float32)
    model = {"mean": x.mean(0), "std": x.std(0), "centroids": rng.normal(0, 0.3, (6, 16)).astype(np.float32)}
    z = whiten(x, model["mean"], model["std"])
    reference = ((z[:, None, :] - model["centroids"][None]) ** 2).sum(-1).argmin(1)  # N x k x D at once
    for chunk_rows in (1, 7, 53, 1000, None):
        assert (assign_clusters(x, model, chunk_rows) == reference).all()
    assert len(set(reference.tolist())) > 1
    with pytest.raises(ValueError, match="chunk_rows"):
        assign_clusters(x, model, 0)
