"""Baseline without masks: K-means on the ViT's last-layer patch features, pixels labelled by
the cluster of their patch (background is one of the clusters, found by Hungarian matching)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import MiniBatchKMeans

from maskdistill.backbone import create_vit, patch_size
from maskdistill.images import ImageRecord, pad_to_multiple, read_rgb, resized_hw, to_tensor
from maskdistill.settings import VitSettings
from maskdistill.storage import write_label_png
from maskdistill.training import progress

log = logging.getLogger("maskdistill")

PATCHES_PER_IMAGE = 64  # patch features sampled from each train image to fit K-means


@torch.inference_mode()
def patch_features(model: torch.nn.Module, rgb: np.ndarray, short_side: int) -> np.ndarray:
    """L2-normalised last-layer patch tokens of one image, (gh, gw, dim), for the resized image."""
    patch = patch_size(model)
    size = resized_hw(rgb.shape[0], rgb.shape[1], short_side)
    x = pad_to_multiple(to_tensor(rgb, size), patch)[None]
    tokens = model.forward_features(x.to(next(model.parameters()).device))
    grid = tokens[:, model.num_prefix_tokens:].reshape(x.shape[-2] // patch, x.shape[-1] // patch, -1)
    return F.normalize(grid.float(), dim=-1).cpu().numpy()


def labels_from_patches(patch_labels: np.ndarray, patch: int, resized: tuple[int, int],
                        original: tuple[int, int]) -> np.ndarray:
    """Nearest-upsample a patch-grid label map to the resized image, crop padding, resize back."""
    up = np.repeat(np.repeat(patch_labels, patch, 0), patch, 1)[: resized[0], : resized[1]]
    rows = (np.arange(original[0]) * resized[0] / original[0]).astype(int)
    cols = (np.arange(original[1]) * resized[1] / original[1]).astype(int)
    return up[rows][:, cols].astype(np.uint8)


def sample_patch_features(model: torch.nn.Module, train: list[ImageRecord], short_side: int,
                          rng: np.random.Generator) -> np.ndarray:
    """(N, dim) patch features: up to :data:`PATCHES_PER_IMAGE` drawn by ``rng`` from each image."""
    sample = []
    for rec in progress(train, total=len(train), desc="patch K-means features"):
        feats = patch_features(model, read_rgb(rec.path), short_side).reshape(-1, model.num_features)
        take = rng.choice(len(feats), min(PATCHES_PER_IMAGE, len(feats)), replace=False)
        sample.append(feats[take])
    return np.concatenate(sample)


def patch_kmeans_baseline(train: list[ImageRecord], target: list[ImageRecord], out_dir: Path,
                          backbone: VitSettings, short_side: int, num_labels: int, seed: int,
                          device: torch.device, weights_file: Path | None = None) -> dict[str, Any]:
    """Fit K-means (``num_labels`` clusters, background included) on patch features sampled from
    the ``train`` images; write each ``target`` image's label map ``out_dir/<key>.png``
    (0..num_labels-1). ``weights_file``: the local file of the backbone's hub weights. Returns
    {"clusters", "patches", "images"}."""
    if num_labels > 255:
        raise ValueError("patch K-means baseline: at most 255 clusters fit a label PNG")
    model = create_vit(backbone.name, backbone.pretrained, backbone.checkpoint, weights_file)
    model.to(device)
    data = sample_patch_features(model, train, short_side, np.random.default_rng(seed))
    if len(data) < num_labels:
        raise ValueError(f"patch K-means baseline: {len(data)} patches for {num_labels} clusters")
    kmeans = MiniBatchKMeans(num_labels, random_state=seed, n_init=3, batch_size=1024).fit(data)
    log.info("patch K-means: %d clusters on %d patches of %d images", num_labels, len(data), len(train))
    patch = patch_size(model)
    for rec in progress(target, total=len(target), desc="patch K-means labels"):
        rgb = read_rgb(rec.path)
        grid = patch_features(model, rgb, short_side)
        labels = kmeans.predict(grid.reshape(-1, grid.shape[-1])).reshape(grid.shape[:2])
        resized = resized_hw(rgb.shape[0], rgb.shape[1], short_side)
        label_map = labels_from_patches(labels, patch, resized, rgb.shape[:2])
        write_label_png(Path(out_dir) / f"{rec.key}.png", label_map)
    return {"clusters": num_labels, "patches": int(len(data)), "images": len(target)}
