"""Stage 1b: describe each mined mask by the CLS token of its box crop, then K-means them globally.

Crops (``clustering.crop``): ``resize`` squeezes each box to ``crop_size`` x ``crop_size``;
``native`` (the authors' code) cuts the box from the full-resolution normalised image and zero-pads
it bottom/right to a multiple of the patch size, so crops differ in size and only crops of equal
padded size share a batch (:func:`equal_size_batches`): each gets the features it gets alone.
K-means is fitted on the features of the ``clustering.fit_on`` splits and the extra image folders,
whitened per dimension (centred or not, ``clustering.center``) and L2-normalised.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from PIL import Image
from sklearn.cluster import MiniBatchKMeans

from maskdistill.backbone import cls_features, create_vit, patch_size
from maskdistill.images import pad_to_multiple, read_ahead, read_rgb, to_tensor
from maskdistill.settings import ClusteringSettings
from maskdistill.storage import (
    CorruptFileError,
    MinedMask,
    atomic_path,
    encode_rle,
    iter_masks_by_key,
    mask_shard_keys,
    read_mask_shard,
    write_json,
)
from maskdistill.training import autocast, check_precision, progress

log = logging.getLogger("maskdistill")


def crop_box(rgb: np.ndarray, box: list[float], size: int) -> np.ndarray:
    """The box [x0, y0, x1, y1] cut from ``rgb`` and resized to ``size`` x ``size`` (bicubic)."""
    h, w = rgb.shape[:2]
    x0, y0 = int(np.clip(np.floor(box[0]), 0, w - 1)), int(np.clip(np.floor(box[1]), 0, h - 1))
    x1, y1 = int(np.clip(np.ceil(box[2]), x0 + 1, w)), int(np.clip(np.ceil(box[3]), y0 + 1, h))
    crop = Image.fromarray(rgb[y0:y1, x0:x1])
    return np.asarray(crop.resize((size, size), Image.BICUBIC))


def rounded_box(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """The box [x0, y0, x1, y1] rounded to whole pixels (as the authors' code does), clipped to the
    ``height`` x ``width`` image and at least one pixel wide and high."""
    x0 = int(np.clip(round(box[0]), 0, width - 1))
    y0 = int(np.clip(round(box[1]), 0, height - 1))
    x1 = int(np.clip(round(box[2]), x0 + 1, width))
    y1 = int(np.clip(round(box[3]), y0 + 1, height))
    return x0, y0, x1, y1


def native_crop_size(box: Sequence[float], height: int, width: int, patch: int) -> tuple[int, int]:
    """(height, width) of :func:`native_crop` of ``box``, known without decoding the image."""
    x0, y0, x1, y1 = rounded_box(box, height, width)
    return -(-(y1 - y0) // patch) * patch, -(-(x1 - x0) // patch) * patch


def native_crop(rgb: np.ndarray, box: Sequence[float], patch: int) -> torch.Tensor:
    """The box cut from the full-resolution uint8 image, ImageNet-normalised, then zero-padded at the
    bottom and right to a multiple of ``patch``: (3, H, W), no resizing."""
    x0, y0, x1, y1 = rounded_box(box, *rgb.shape[:2])
    return pad_to_multiple(to_tensor(rgb[y0:y1, x0:x1]), patch)


def equal_size_batches(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices of ``sizes`` grouped into batches of at most ``batch_size`` crops of one size.

    Sizes are taken in order of first appearance and indices keep their order within a size; when
    every size is equal the batches are consecutive runs of ``batch_size``.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(tuple(size), []).append(i)
    return [idx[lo:lo + batch_size] for idx in groups.values() for lo in range(0, len(idx), batch_size)]


def describe_shard(mask_shard: Path, images_root: Path, out_path: Path, s: ClusteringSettings,
                   device: torch.device, weights_file: Path | None = None, precision: str = "fp32") -> int:
    """CLS feature of every mask's box crop in a shard -> HDF5 (keys, features, float32); returns the count.

    Images are decoded and cropped (``s.crop``) in ``s.decode_threads`` threads ahead of the ViT,
    which embeds up to ``s.batch_size`` crops of one size per forward pass in ``precision``
    (autocast). ``weights_file``: the local file of the backbone's hub weights
    (:mod:`maskdistill.weights_cache`). Features are written in the shard's mask order.
    """
    check_precision(precision, device)
    bb = s.backbone
    model = create_vit(bb.name, bb.pretrained, bb.checkpoint, weights_file,
                       pos_embed="dino" if s.crop == "native" else "timm")
    model = model.to(device)
    patch = patch_size(model)
    items = read_mask_shard(mask_shard)
    if s.crop == "native":
        sizes = [native_crop_size(it.box, it.height, it.width, patch) for it in items]
    else:
        sizes = [(s.crop_size, s.crop_size)] * len(items)
    batches = equal_size_batches(sizes, s.batch_size)
    features = np.zeros((len(items), int(model.num_features)), np.float32)
    with ThreadPoolExecutor(max_workers=s.decode_threads) as pool:
        order = [items[i] for idx in batches for i in idx]
        crops = read_ahead(pool, lambda it: box_crop_tensor(images_root / it.file_name, it.box, s, patch),
                           order, ahead=2 * max(s.batch_size, s.decode_threads))
        for idx in progress(batches, total=len(batches), desc=f"describing {Path(mask_shard).name}",
                            unit="batch"):
            batch = torch.stack([next(crops) for _ in idx]).to(device)
            with autocast(device, precision):
                features[idx] = cls_features(model, batch).float().cpu().numpy()
    log.info("described %d masks of %s in %d batches", len(items), mask_shard, len(batches))
    write_feature_shard(out_path, [it.key for it in items], features, bb.name)
    return len(items)


def box_crop_tensor(image: Path, box: list[float], s: ClusteringSettings, patch: int) -> torch.Tensor:
    """The normalised crop of ``box`` from the image file as ``s.crop`` says: (3, crop_size,
    crop_size) resized, or native (3, H, W) padded to a multiple of ``patch``."""
    rgb = read_rgb(image)
    return native_crop(rgb, box, patch) if s.crop == "native" else to_tensor(crop_box(rgb, box, s.crop_size))


def write_feature_shard(path: Path, keys: Sequence[str], features: np.ndarray, backbone: str) -> None:
    """Write a feature shard (HDF5: ``keys``, ``features`` (N, D); attrs ``backbone``, ``complete``)."""
    with atomic_path(path, suffix=".tmp.h5") as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("keys", data=np.array(list(keys), dtype=object), dtype=h5py.string_dtype())
        h5.create_dataset("features", data=features)
        h5.attrs["backbone"] = backbone
        h5.attrs["complete"] = True


def read_features(path: Path) -> tuple[list[str], np.ndarray]:
    """Keys and features of a feature shard, refusing incomplete files."""
    try:
        with h5py.File(path, "r") as h5:
            if not h5.attrs.get("complete"):
                raise CorruptFileError(f"{path}: incomplete feature shard; delete it and rerun")
            keys = [k.decode() if isinstance(k, bytes) else k for k in h5["keys"][:]]
            return keys, h5["features"][:]
    except OSError as err:
        raise CorruptFileError(f"{path}: unreadable feature shard ({err})") from err


def whitening_stats(features: np.ndarray, center: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The (mean, std) that :func:`whiten` applies, per dimension of ``features`` (N, D).

    ``center=False`` is ``scipy.cluster.vq.whiten``: the mean is zero (no centring) and a dimension
    of zero standard deviation is divided by 1 (left as it is) rather than by a tiny number.
    """
    std = features.std(0)
    if center:
        return features.mean(0), std
    return np.zeros_like(std), np.where(std == 0, np.ones_like(std), std)


def whiten(features: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Per-dimension standardisation, then L2 normalisation of each row."""
    z = (features - mean) / np.maximum(std, 1e-6)
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def fit_kmeans(features: np.ndarray, s: ClusteringSettings) -> dict[str, np.ndarray]:
    """Whitening statistics (centred or not, ``s.center``) and MiniBatchKMeans centroids
    (``s.num_centroids``) fitted on ``features``."""
    k = s.num_centroids
    if len(features) < k:
        raise ValueError(f"config key 'clustering.num_clusters': {k} clusters requested but only "
                         f"{len(features)} masks were mined")
    mean, std = whitening_stats(features, s.center)
    km = MiniBatchKMeans(n_clusters=k, batch_size=s.kmeans_batch_size, n_init=s.n_init,
                         random_state=s.seed)
    log.info("K-means: %d centroids on %d features of %d dimensions, %d restarts", k, len(features),
             features.shape[1], s.n_init)
    start = time.perf_counter()
    km.fit(whiten(features, mean, std))
    log.info("K-means fitted in %.1f s (%d iterations)", time.perf_counter() - start, km.n_iter_)
    return {"mean": mean, "std": std, "centroids": km.cluster_centers_.astype(np.float32)}


ASSIGN_BYTES = 64 * 2**20  # the rows x centroids x dim block of one assign_clusters step


def assign_clusters(features: np.ndarray, model: dict[str, np.ndarray], chunk_rows: int | None = None
                    ) -> np.ndarray:
    """Nearest centroid (squared Euclidean on whitened features) for each row (int64, (N,)).

    Rows are assigned ``chunk_rows`` at a time (default: as many as fit in :data:`ASSIGN_BYTES`), so
    memory does not grow with N; each row's distances are computed exactly as in one block.
    """
    centroids = model["centroids"]
    if chunk_rows is None:
        per_row = max(1, centroids.size * np.result_type(features, centroids).itemsize)
        chunk_rows = max(1, ASSIGN_BYTES // per_row)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    out = np.empty(len(features), dtype=np.int64)
    for lo in range(0, len(features), chunk_rows):
        z = whiten(features[lo:lo + chunk_rows], model["mean"], model["std"])
        out[lo:lo + chunk_rows] = ((z[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    return out


def coco_from_masks(items: Iterable[MinedMask], clusters: np.ndarray, num_clusters: int,
                    image_ids: dict[str, int] | None = None) -> dict[str, Any]:
    """COCO instances dict: one annotation per mined mask, category = cluster id + 1."""
    images, anns = [], []
    for idx, (it, c) in enumerate(zip(items, clusters, strict=True)):
        image_id = image_ids.get(it.key, idx) if image_ids else idx
        images.append({"id": image_id, "file_name": it.file_name, "height": it.height,
                       "width": it.width, "key": it.key})
        if not it.mask.any():
            continue
        x0, y0, x1, y1 = it.box
        anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(c) + 1,
                     "segmentation": encode_rle(it.mask), "area": int(it.mask.sum()),
                     "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0, "score": 1.0})
    cats = [{"id": c + 1, "name": f"cluster_{c}"} for c in range(num_clusters)]
    return {"images": images, "annotations": anns, "categories": cats}


def read_split_features(split: str, paths: Sequence[Path]) -> tuple[list[str], np.ndarray]:
    """Keys and features of all feature shards of one split, in shard order."""
    parts = [read_features(p) for p in progress(paths, total=len(paths), desc=f"{split} features",
                                                 unit="shard")]
    return [k for ks, _ in parts for k in ks], np.concatenate([f for _, f in parts])


def fit_features(feats: dict[str, tuple[list[str], np.ndarray]], fit_on: Sequence[str],
                 extra: Sequence[np.ndarray] = ()) -> np.ndarray:
    """The rows K-means is fitted on: the features of the ``fit_on`` splits, then the ``extra`` ones."""
    missing = [split for split in fit_on if split not in feats]
    if missing:
        raise ValueError(f"config key 'clustering.fit_on': no features of split(s) {', '.join(missing)} "
                         f"(given: {', '.join(feats)})")
    return np.concatenate([feats[split][1] for split in fit_on] + list(extra))


def cluster_splits(mask_shards: dict[str, list[Path]], feature_shards: dict[str, list[Path]],
                   out_jsons: dict[str, Path], out_model: Path, s: ClusteringSettings,
                   image_ids: dict[str, dict[str, int]] | None = None,
                   extra_features: dict[str, list[Path]] | None = None) -> dict[str, Any]:
    """Fit K-means on the features of the ``s.fit_on`` splits and of ``extra_features`` (split ->
    feature shards of the ``clustering.extra_images`` folders, read for the fit only), assign every
    split of ``out_jsons``, write its COCO pseudo-labels (``out_jsons[split]``) and the model
    (``out_model``, npz); returns the rows fitted on and the cluster sizes per split."""
    feats = {split: read_split_features(split, paths) for split, paths in feature_shards.items()}
    extra = {split: read_split_features(split, paths)[1] for split, paths in (extra_features or {}).items()}
    fitted = {split: len(feats[split][1]) for split in s.fit_on if split in feats}
    fitted |= {split: len(f) for split, f in extra.items()}
    log.info("K-means fitted on the masks of %s", ", ".join(f"{n} {split}" for split, n in fitted.items()))
    model = fit_kmeans(fit_features(feats, s.fit_on, list(extra.values())), s)
    k = len(model["centroids"])
    with atomic_path(out_model, suffix=".tmp.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **model)
    summary: dict[str, Any] = {"num_clusters": k, "fitted_on": fitted}
    for split, out in out_jsons.items():
        keys, f = feats[split]
        clusters = dict(zip(keys, assign_clusters(f, model), strict=True))
        mask_keys = sorted(key for p in mask_shards[split] for key in mask_shard_keys(p))
        labels = np.array([clusters[key] for key in mask_keys], dtype=np.int64)
        items = progress(iter_masks_by_key(mask_shards[split]), total=len(mask_keys), desc=f"{split} masks")
        write_json(out, coco_from_masks(items, labels, k, (image_ids or {}).get(split)))
        sizes = np.bincount(labels, minlength=k).tolist()
        summary[split] = {"masks": len(mask_keys), "cluster_sizes": sizes}
        log.info("%s: %d masks, cluster sizes %s", split, len(mask_keys), sizes)
    return summary
