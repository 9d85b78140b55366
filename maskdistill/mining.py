"""Stage 1: one object mask per image from the last self-attention block of a ViT.

CLS affinity over the first heads -> 50%-mass threshold -> top-40% proposals -> seed -> LOST-style
expansion over the summed key affinity -> the seed's connected component -> upsampling to the image.

``mining.preprocess`` picks how images enter the ViT and how masks leave it: ``reference`` as the
authors' ``gen_masks.py`` (torchvision ``Resize``, DINO positional-embedding interpolation, Pillow
bicubic upsampling of the mask with every value above 0 kept), ``ours`` (Pillow bicubic resize with a
rounded longer side, timm's exact-grid resampling, nearest upsampling).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from maskdistill.backbone import create_vit, last_block_qk, patch_size
from maskdistill.images import (
    BAD_IMAGE_POLICIES,
    ImageReadError,
    ImageRecord,
    decoded_hw,
    pad_to_multiple,
    read_ahead,
    read_rgb,
    resize_bilinear,
    resized_hw,
    to_tensor,
    torchvision_resized_hw,
)
from maskdistill.settings import MiningSettings
from maskdistill.storage import MaskShardWriter, MinedMask, SkippedImage, mask_to_box
from maskdistill.training import autocast, check_precision

log = logging.getLogger("maskdistill")

PREPROCESS = ("reference", "ours")


@dataclass(frozen=True)
class MiningParams:
    """The rules of the mask construction (defaults are the paper's)."""

    cls_heads: int | None = None  # first heads for the CLS affinity; None = all but the last
    mass: float = 0.5  # share of the CLS affinity "mass" kept, DINO-style
    proposal_ratio: float = 0.4  # top share of patches used as proposals
    center_keys: bool = False  # subtract the image's mean key before G (not in the paper; see config)
    seed_from: str = "affinity"  # "affinity" (paper: raw q.k) or "attention" (softmax CLS attention)


@dataclass
class PatchMask:
    """Result on the patch grid."""

    mask: np.ndarray  # bool (gh, gw)
    cls_affinity: np.ndarray  # float32 (gh, gw), head-averaged CLS affinity
    seed: int  # flat index of the seed patch


def mass_threshold(values: torch.Tensor, mass: float) -> torch.Tensor:
    """0/1 mask keeping the entries that hold the top ``mass`` share, as DINO thresholds attention.

    Sort ascending, divide by the sum, cumulative sum, keep where it exceeds ``1 - mass``.
    """
    sorted_vals, order = torch.sort(values)
    cum = torch.cumsum(sorted_vals / sorted_vals.sum(), dim=0)
    keep_sorted = (cum > 1 - mass).to(values.dtype)
    keep = torch.empty_like(keep_sorted)
    keep[order] = keep_sorted
    return keep


def mask_from_qk(q: torch.Tensor, k: torch.Tensor, grid_hw: tuple[int, int],
                 params: MiningParams = MiningParams(), num_prefix: int = 1) -> PatchMask:
    """Object mask on the patch grid from one image's last-block q, k (heads, tokens, dim)."""
    heads, _, _ = q.shape
    gh, gw = grid_hw
    n = gh * gw
    if q.shape[1] != n + num_prefix:
        raise ValueError(f"q has {q.shape[1]} tokens, expected {n} patches + {num_prefix} prefix")
    h_cls = params.cls_heads if params.cls_heads is not None else max(1, heads - 1)
    if not 1 <= h_cls <= heads:
        raise ValueError(f"mining.cls_heads={h_cls} outside 1..{heads} (the ViT has {heads} heads)")
    q = q.float()
    k_patch = k[:, num_prefix:].float()  # (heads, n, d)
    # CLS -> patch affinity per head, averaged over the first h_cls heads.
    cls_aff = torch.einsum("hd,hnd->hn", q[:h_cls, 0], k_patch[:h_cls]).mean(0)
    masked = cls_aff * mass_threshold(cls_aff, params.mass)
    n_prop = max(1, int(params.proposal_ratio * n))
    proposals = torch.topk(masked, n_prop).indices
    if params.seed_from == "attention":
        seed = _attention_seed(q, k, proposals, h_cls, num_prefix)
    else:
        seed = int(proposals[0])
    # G = sum_h K_h K_h^T = K K^T with heads concatenated; only the rows we need are formed.
    keys = k_patch.permute(1, 0, 2).reshape(n, -1)  # (n, heads*d)
    if params.center_keys:  # a key component shared by every patch makes all of G positive
        keys = keys - keys.mean(0, keepdim=True)
    g_seed = keys[proposals] @ keys[seed]
    similar = proposals[g_seed > 0]
    potential = keys @ keys[similar].sum(0)  # sum over kept proposals of their rows of G
    grid = (potential > 0).reshape(gh, gw).cpu().numpy()
    labels, _ = ndimage.label(grid)  # default structure = 4-connectivity
    component = labels == labels.flat[seed]
    return PatchMask(mask=component, cls_affinity=cls_aff.reshape(gh, gw).cpu().numpy(), seed=seed)


def _attention_seed(q: torch.Tensor, k: torch.Tensor, proposals: torch.Tensor, h_cls: int,
                    num_prefix: int) -> int:
    """The proposal with the highest softmax CLS attention, averaged over the first ``h_cls`` heads.

    Unlike the raw affinity, each head's attention sums to 1, so no head outweighs the others by
    the scale of its queries and keys; it is the map that DINO's attention figures show.
    """
    logits = torch.einsum("hd,hnd->hn", q[:h_cls, 0], k[:h_cls].float()) * q.shape[-1] ** -0.5
    attention = torch.softmax(logits, dim=-1)[:, num_prefix:].mean(0)
    return int(proposals[torch.argmax(attention[proposals])])


def patch_mask_in_resized_frame(patch_mask: np.ndarray, patch: int, resized: tuple[int, int]) -> np.ndarray:
    """Patch grid (h, w) -> nearest x ``patch``, cropped to the resized, unpadded image (H', W')."""
    return np.repeat(np.repeat(patch_mask, patch, axis=0), patch, axis=1)[: resized[0], : resized[1]]


def upsample_patch_mask(patch_mask: np.ndarray, patch: int, resized: tuple[int, int],
                        original: tuple[int, int]) -> np.ndarray:
    """Patch grid -> image size with nearest neighbours (through the resized, unpadded frame;
    ``mining.preprocess: ours``)."""
    full = patch_mask_in_resized_frame(patch_mask, patch, resized)
    if full.shape == tuple(original):
        return full
    rows = np.minimum((np.arange(original[0]) + 0.5) * resized[0] / original[0], resized[0] - 1)
    cols = np.minimum((np.arange(original[1]) + 0.5) * resized[1] / original[1], resized[1] - 1)
    return full[rows.astype(np.int64)][:, cols.astype(np.int64)]


def upsample_patch_mask_reference(patch_mask: np.ndarray, patch: int, resized: tuple[int, int],
                                  original: tuple[int, int]) -> np.ndarray:
    """Patch grid -> image size as the authors' code does: nearest x ``patch``, cropped to the
    resized (unpadded) frame, then a Pillow bicubic resize of the 0/255 uint8 mask to the original
    size (Pillow's default filter for ``Image.resize`` of a mode L image) with every value above 0
    kept, which grows the mask by about one pixel wherever it is enlarged. No resize when the
    sizes agree."""
    full = patch_mask_in_resized_frame(patch_mask, patch, resized)
    image = Image.fromarray(full.astype(np.uint8) * 255)
    return np.asarray(image.resize((original[1], original[0]), Image.Resampling.BICUBIC)) > 0


def resized_input_hw(hw: tuple[int, int], short_side: int, preprocess: str) -> tuple[int, int]:
    """The size an image of size ``hw`` is resized to before the ViT under ``mining.preprocess``:
    torchvision's ``Resize`` rule (longer side truncated) for ``reference``, the rounded longer side
    of :func:`maskdistill.images.resized_hw` for ``ours``."""
    check_preprocess(preprocess)
    rule = torchvision_resized_hw if preprocess == "reference" else resized_hw
    return rule(hw[0], hw[1], short_side)


def check_preprocess(preprocess: str) -> None:
    """A ValueError naming the config key when ``preprocess`` is not one of :data:`PREPROCESS`."""
    if preprocess not in PREPROCESS:
        raise ValueError(f"config key 'mining.preprocess': {preprocess!r} is not one of {list(PREPROCESS)}")


def image_tensor(rgb: np.ndarray, short_side: int, patch: int, preprocess: str) -> torch.Tensor:
    """uint8 RGB -> the ViT's normalised input (3, H', W'): resized under ``preprocess``
    (``reference``: torchvision ``Resize``, bilinear with antialiasing; ``ours``: Pillow bicubic),
    ImageNet-normalised, then zero-padded at the bottom and right to a multiple of ``patch``."""
    size = resized_input_hw(rgb.shape[:2], short_side, preprocess)
    x = to_tensor(resize_bilinear(rgb, size)) if preprocess == "reference" else to_tensor(rgb, size)
    return pad_to_multiple(x, patch)


@dataclass
class _Decoded:
    record: ImageRecord
    tensor: torch.Tensor | None  # normalised, padded (3, H', W')
    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    error: str | None = None
    slot: int = -1  # position of the image in its shard (and in the shard file)


def _decode(record: ImageRecord, short_side: int, patch: int, preprocess: str = "ours") -> _Decoded:
    try:
        rgb = read_rgb(record.path)
    except ImageReadError as err:
        return _Decoded(record, None, (0, 0), (0, 0), str(err))
    size = resized_input_hw(rgb.shape[:2], short_side, preprocess)
    return _Decoded(record, image_tensor(rgb, short_side, patch, preprocess), rgb.shape[:2], size)


def _prefetch(pool: ThreadPoolExecutor, records: list[ImageRecord], short_side: int, patch: int,
              ahead: int, preprocess: str = "ours") -> Iterator[_Decoded]:
    """Decode in background threads, at most ``ahead`` images in advance (bounded memory)."""
    return read_ahead(pool, lambda record: _decode(record, short_side, patch, preprocess), records, ahead)


def padded_hw(hw: tuple[int, int], short_side: int, patch: int, preprocess: str = "ours") -> tuple[int, int]:
    """The ViT's input size for an image of size ``hw``: resized (the size rule of ``preprocess``),
    then padded to the patch grid."""
    h, w = resized_input_hw(hw, short_side, preprocess)
    return -(-h // patch) * patch, -(-w // patch) * patch


def shape_order(sizes: list[tuple[int, int] | None], short_side: int, patch: int,
                preprocess: str = "ours") -> list[int]:
    """The order to mine a shard's images in, given their sizes (None: header unreadable).

    Unreadable images come first (they fail or are skipped at once), then the images grouped by
    the ViT's input size, so that batches are full; ties keep the shard's order. Padding changes
    no image's result (a ViT mixes no images of a batch), so the masks are those of batch size 1.
    """
    def key(i: int) -> tuple[int, tuple[int, int], int]:
        hw = sizes[i]
        return (0, (0, 0), i) if hw is None else (1, padded_hw(hw, short_side, patch, preprocess), i)

    return sorted(range(len(sizes)), key=key)


def _with_slots(decoded: Iterator[_Decoded], slots: list[int]) -> Iterator[_Decoded]:
    for slot, item in zip(slots, decoded, strict=True):
        item.slot = slot
        yield item


def _batches(decoded: Iterator[_Decoded], batch_size: int) -> Iterator[list[_Decoded]]:
    """Group consecutive images of equal padded size (a batch is one forward pass)."""
    batch: list[_Decoded] = []
    for item in decoded:
        if item.tensor is None:
            yield [item]
            continue
        if batch and (len(batch) == batch_size or batch[0].tensor.shape != item.tensor.shape):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def mining_params(s: MiningSettings) -> MiningParams:
    """The mask-construction rules of the ``mining`` settings."""
    return MiningParams(s.cls_heads, s.mass, s.proposal_ratio, s.center_keys, s.seed_from)


def mine_shard(records: list[ImageRecord], out_path: Path, s: MiningSettings, device: torch.device,
               on_bad_image: str = "fail", weights_file: Path | None = None,
               precision: str = "fp32") -> dict[str, Any]:
    """Mine every image of a shard into one HDF5 file; returns counts and timings. The ViT runs in
    ``precision`` (autocast); the mask is built from its queries and keys in float32.

    Images are read ahead in ``s.decode_threads`` threads, in the order of :func:`shape_order`
    (their sizes come from the headers), so that each forward pass holds ``s.batch_size`` images
    of one input size; the shard file keeps the order of ``records``. An image that cannot be
    decoded raises :class:`ImageReadError` naming it (``on_bad_image`` ``fail``) or is left out
    and listed in the shard's ``skipped`` attribute with the reason (``skip``); later stages leave
    skipped images out too. ``weights_file``: the local file of the backbone's hub weights
    (:mod:`maskdistill.weights_cache`).
    """
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"config key 'dataset.on_bad_image': {on_bad_image!r} is not one of "
                         f"{list(BAD_IMAGE_POLICIES)}")
    check_precision(precision, device)
    check_preprocess(s.preprocess)
    reference = s.preprocess == "reference"
    upsample = upsample_patch_mask_reference if reference else upsample_patch_mask
    bb = s.backbone
    model = create_vit(bb.name, bb.pretrained, bb.checkpoint, weights_file,
                       pos_embed="dino" if reference else "timm").to(device)
    patch = patch_size(model)
    params = mining_params(s)
    num_prefix = int(getattr(model, "num_prefix_tokens", 1))
    attrs = {"backbone": bb.name, "checkpoint": str(bb.checkpoint or ""),
             "patch_size": patch, "short_side": s.short_side, "preprocess": s.preprocess,
             "num_records": len(records)}
    skipped: list[tuple[int, SkippedImage]] = []
    start = time.perf_counter()
    done = batches = 0
    with ThreadPoolExecutor(max_workers=s.decode_threads) as pool, \
            MaskShardWriter(out_path, attrs) as writer:
        sizes = list(pool.map(decoded_hw, [r.path for r in records]))
        order = shape_order(sizes, s.short_side, patch, s.preprocess)
        ahead = 2 * max(s.batch_size, s.decode_threads)
        todo = [records[i] for i in order]
        decoded = _with_slots(_prefetch(pool, todo, s.short_side, patch, ahead, s.preprocess), order)
        for batch in _batches(decoded, s.batch_size):
            if batch[0].tensor is None:
                skipped.append((batch[0].slot, _skipped(batch[0], on_bad_image)))
                continue
            x = torch.stack([d.tensor for d in batch]).to(device)
            with autocast(device, precision):
                q, k = last_block_qk(model, x)
            grid = (x.shape[-2] // patch, x.shape[-1] // patch)
            for i, d in enumerate(batch):
                pm = mask_from_qk(q[i], k[i], grid, params, num_prefix)
                mask = upsample(pm.mask, patch, d.resized_hw, d.original_hw)
                writer.append(MinedMask(key=d.record.key, file_name=_file_name(d.record),
                                        height=d.original_hw[0], width=d.original_hw[1], mask=mask,
                                        box=mask_to_box(mask), patch_mask=pm.mask,
                                        cls_affinity=pm.cls_affinity, seed=pm.seed), slot=d.slot)
            done += len(batch)
            batches += 1
            if done % s.log_every < len(batch) or done + len(skipped) == len(records):
                _log_progress(done, len(skipped), len(records), time.perf_counter() - start)
        writer.set_skipped([item for _, item in sorted(skipped, key=lambda pair: pair[0])])
    log.info("%d images in %d forward passes (batch_size %d)", done, batches, s.batch_size)
    return {"images": done, "skipped": len(skipped), "batches": batches,
            "seconds": time.perf_counter() - start}


def _skipped(bad: _Decoded, on_bad_image: str) -> SkippedImage:
    """The skipped entry of an image that failed to decode; raises under policy ``fail``."""
    if on_bad_image == "fail":
        raise ImageReadError(f"{bad.error} (set dataset.on_bad_image: skip to leave such images out)")
    log.warning("skipping %s", bad.error)
    reason = (bad.error or "").removeprefix(f"{bad.record.path}: ")
    return SkippedImage(bad.record.key, str(bad.record.path), reason)


def _log_progress(done: int, skipped: int, total: int, seconds: float) -> None:
    """One log line: images mined so far, seconds per image and the time left."""
    per_image = seconds / done
    left = per_image * (total - done - skipped)
    log.info("mined %d/%d images, %.3f s/img, ETA %s", done, total, per_image, _duration(left))


def _duration(seconds: float) -> str:
    """``seconds`` as ``H:MM:SS``."""
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def _file_name(record: ImageRecord) -> str:
    suffix = record.path.suffix
    return record.key + suffix
