"""Stage 1b: box crops, whitening, seeded K-means over all shards, COCO export."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from maskdistill.clustering import (
    assign_clusters,
    cluster_splits,
    coco_from_masks,
    crop_box,
    describe_shard,
    equal_size_batches,
    fit_features,
    fit_kmeans,
    native_crop,
    native_crop_size,
    read_features,
    whiten,
    whitening_stats,
    write_feature_shard,
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


@pytest.mark.numeric
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


# ---------------------------------------------------------------- native crops (clustering.crop: native)


def test_a_native_crop_is_the_normalised_box_zero_padded_to_the_patch_size():
    from maskdistill.images import IMAGENET_MEAN, IMAGENET_STD

    rgb = np.arange(10 * 13 * 3, dtype=np.int64).reshape(10, 13, 3).astype(np.uint8)
    box = [1.6, 2.4, 8.7, 7.2]  # rounded: x 2..9, y 2..7 -> 5 rows x 7 columns
    crop = native_crop(rgb, box, 4)
    assert crop.shape == (3, 8, 8) and native_crop_size(box, 10, 13, 4) == (8, 8)
    expected = (rgb[2:7, 2:9].astype(np.float64) / 255 - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(crop[:, :5, :7].numpy(), expected.transpose(2, 0, 1), atol=1e-6)
    assert (crop[:, 5:, :] == 0).all() and (crop[:, :, 7:] == 0).all()  # zeros after normalisation
    assert native_crop(rgb, [0, 0, 8, 4], 4).shape == (3, 4, 8)  # already a multiple: no padding
    assert native_crop_size([12.9, 9.8, 13.0, 10.0], 10, 13, 4) == (4, 4)  # clipped, at least 1 px


def test_crops_are_batched_by_equal_size_in_order_of_first_appearance():
    sizes = [(8, 8), (16, 8), (8, 8), (8, 8), (16, 8)]
    assert equal_size_batches(sizes, 2) == [[0, 2], [3], [1, 4]]
    assert equal_size_batches([(4, 4)] * 7, 3) == [[0, 1, 2], [3, 4, 5], [6]]


def _native_shard(tmp_path):
    """Seven masks on images of different sizes; their padded crops (patch 16) share three sizes."""
    rng = np.random.default_rng(1)
    boxes = [[0, 0, 20, 30], [3, 1, 33, 17], [5, 5, 25, 25], [1, 0, 40, 33], [2, 2, 30, 30],
             [0, 4, 24, 31], [7, 0, 38, 16]]
    with MaskShardWriter(tmp_path / "masks.h5", {"backbone": "test"}) as writer:
        for i, box in enumerate(boxes):
            h, w = 34 + i, 41 + 2 * i
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
            mask = np.zeros((h, w), bool)
            mask[box[1]:box[3], box[0]:box[2]] = True
            writer.append(MinedMask(f"im{i}", f"im{i}.png", h, w, mask, [float(v) for v in box],
                                    np.ones((1, 1), bool), np.ones((1, 1), np.float32), 0))
    return boxes


@pytest.mark.numeric
def test_native_crops_batched_by_size_get_the_features_they_get_one_at_a_time(tmp_path, monkeypatch):
    from maskdistill import clustering
    from maskdistill.backbone import cls_features, create_vit
    from maskdistill.images import read_rgb

    boxes = _native_shard(tmp_path)
    passes: list[tuple[int, ...]] = []
    embed = clustering.cls_features
    monkeypatch.setattr(clustering, "cls_features",
                        lambda model, x: passes.append(tuple(x.shape)) or embed(model, x))
    features = {}
    for batch_size in (1, 3):
        passes.clear()
        s = section_settings("clustering", {"backbone": {"name": "test_vit"}, "crop": "native",
                                            "batch_size": batch_size})
        assert describe_shard(tmp_path / "masks.h5", tmp_path, tmp_path / f"f{batch_size}.h5", s,
                              torch.device("cpu")) == 7
        features[batch_size] = read_features(tmp_path / f"f{batch_size}.h5")
    # padded sizes: 32x32 (masks 0, 2, 4, 5), 16x32 (1, 6), 48x48 (3)
    assert passes == [(3, 3, 32, 32), (1, 3, 32, 32), (2, 3, 16, 32), (1, 3, 48, 48)]
    (keys1, one), (keys3, three) = features[1], features[3]
    assert keys1 == keys3 == [f"im{i}" for i in range(7)]  # the shard's order, not the batches'
    np.testing.assert_allclose(three, one, rtol=1e-4, atol=1e-5)
    crop = native_crop(read_rgb(tmp_path / "im3.png"), boxes[3], 16)[None]
    alone = cls_features(create_vit("test_vit", pos_embed="dino"), crop)  # DINO's embedding rule
    np.testing.assert_allclose(one[3], alone[0].numpy(), rtol=1e-4, atol=1e-5)
    timm_grid = cls_features(create_vit("test_vit"), crop)
    assert np.abs(timm_grid[0].numpy() - one[3]).max() > 1e-4  # timm's exact-grid resampling differs
    assert np.abs(one[3] - one[0]).max() > 1e-3  # different crops, different features


# ---------------------------------------------------------------- whitening and what K-means is fitted on


def test_whitening_without_centring_divides_by_the_std_as_scipy_does():
    x = np.array([[1.0, 2.0, 5.0], [3.0, 4.0, 5.0], [8.0, 0.0, 5.0]])  # last column constant
    mean, std = whitening_stats(x, center=False)
    assert (mean == 0).all()
    np.testing.assert_allclose(std, [np.sqrt(26 / 3), np.sqrt(8 / 3), 1.0])  # a zero std divides by 1
    hand = x / std
    hand /= np.linalg.norm(hand, axis=1, keepdims=True)
    np.testing.assert_allclose(whiten(x, mean, std), hand)
    vq = pytest.importorskip("scipy.cluster.vq")
    with pytest.warns(RuntimeWarning):  # scipy warns about the constant column, then divides it by 1
        reference = vq.whiten(x)
    np.testing.assert_allclose(whiten(x, mean, std), reference / np.linalg.norm(reference, axis=1,
                                                                                 keepdims=True))
    centred_mean, centred_std = whitening_stats(x, center=True)  # today's: centred, raw std
    np.testing.assert_allclose(centred_mean, [4.0, 2.0, 5.0])
    assert centred_std[2] == 0
    assert (fit_kmeans(np.abs(_blobs()[0]), replace(CFG, center=False))["mean"] == 0).all()


def test_kmeans_is_fitted_on_the_fit_on_splits_then_the_extra_rows():
    feats = {"train": (["a"], np.array([[1.0, 0.0]])), "val": (["b"], np.array([[0.0, 1.0]]))}
    extra = [np.array([[2.0, 2.0], [3.0, 3.0]])]
    np.testing.assert_array_equal(fit_features(feats, ["train"]), [[1, 0]])
    np.testing.assert_array_equal(fit_features(feats, ["val", "train"], extra),
                                  [[0, 1], [1, 0], [2, 2], [3, 3]])
    with pytest.raises(ValueError, match="clustering.fit_on"):
        fit_features({"train": feats["train"]}, ["train", "val"])


def _axis_points(axis: int, n: int, rng) -> np.ndarray:
    x = rng.normal(0, 0.02, (n, 3)).astype(np.float32)
    x[:, axis] += 1
    return x


@pytest.mark.parametrize(("fit_on", "val_axis", "extra", "sizes"), [
    (["train"], 2, False, [10, 10]),  # train alone: its two groups, one centroid each
    (["train", "val"], 2, False, [0, 20]),  # val's 30 masks take a centroid: train's groups share one
    (["train"], 0, True, [0, 20]),  # the same through an extra folder's 30 masks
])
def test_the_masks_kmeans_is_fitted_on_decide_the_centroids(tmp_path, fit_on, val_axis, extra, sizes):
    rng = np.random.default_rng(0)
    groups = {"train": np.concatenate([_axis_points(0, 10, rng), _axis_points(1, 10, rng)]),
              "val": _axis_points(val_axis, 30, rng), "extra0": _axis_points(2, 30, rng)}
    masks, features = {}, {}
    for split, x in groups.items():
        keys = [f"{split}{i}" for i in range(len(x))]
        features[split] = [tmp_path / f"{split}-features.h5"]
        write_feature_shard(features[split][0], keys, x, "test")
        masks[split] = [tmp_path / f"{split}-masks.h5"]
        with MaskShardWriter(masks[split][0], {"backbone": "test"}) as writer:
            for key in keys:
                writer.append(MinedMask(key, f"{key}.png", 4, 4, np.ones((4, 4), bool), [0.0, 0.0, 4.0, 4.0],
                                        np.ones((1, 1), bool), np.ones((1, 1), np.float32), 0))
    s = replace(CFG, num_clusters=2, center=False, fit_on=tuple(fit_on))
    outs = {"train": tmp_path / "train.json", "val": tmp_path / "val.json"}
    summary = cluster_splits({k: masks[k] for k in outs}, {k: features[k] for k in outs}, outs,
                             tmp_path / "kmeans.npz", s, extra_features={"extra0": features["extra0"]}
                             if extra else None)
    assert sorted(summary["train"]["cluster_sizes"]) == sizes
    assert summary["fitted_on"] == {"train": 20} | ({"val": 30} if "val" in fit_on else {}) | (
        {"extra0": 30} if extra else {})
