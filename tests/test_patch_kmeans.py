"""The patch K-means baseline (no masks)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from maskdistill.images import ImageRecord
from maskdistill.patch_kmeans import labels_from_patches, patch_kmeans_baseline
from maskdistill.settings import VitSettings
from maskdistill.storage import read_label_png


def test_patch_labels_upsample_to_the_original_size():
    grid = np.array([[0, 1], [2, 3]])
    out = labels_from_patches(grid, patch=4, resized=(8, 8), original=(16, 16))
    assert out.shape == (16, 16)
    assert (out[:8, :8] == 0).all() and (out[:8, 8:] == 1).all() and (out[8:, 8:] == 3).all()


def test_patch_kmeans_baseline_writes_one_label_map_per_image(tmp_path):
    records = []
    for i in range(3):
        arr = np.zeros((40, 30, 3), np.uint8)
        arr[:, 15:] = (255, 40, 40)
        Image.fromarray(arr).save(tmp_path / f"i{i}.png")
        records.append(ImageRecord(f"i{i}", tmp_path / f"i{i}.png"))
    out = tmp_path / "pred"
    summary = patch_kmeans_baseline(records, records[:2], out, VitSettings("vit_demo_patch8_128"), 32, 2,
                                    0, torch.device("cpu"))
    assert summary["images"] == 2
    labels = read_label_png(out / "i0.png")
    assert labels.shape == (40, 30) and set(np.unique(labels)) <= {0, 1}
    # the two halves differ in colour, so their patches fall in different clusters
    assert labels[20, 2] != labels[20, 27]
