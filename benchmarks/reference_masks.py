"""Does ``mining.preprocess: reference`` give the authors' masks? A check on real photos.

The authors' stage 1, re-stated independently from ``reference-protocol.md`` (facts only, none of
their code): PIL RGB, ``torchvision`` ``Resize(640)``, ``ToTensor``, ImageNet normalisation, zero
padding to x16, DINO's position-embedding interpolation (grid + 0.1, bicubic), q/k of the last block,
the mask rule, nearest x16, crop, a default ``PIL.Image.resize`` of the 0/255 mask, values > 0 kept.
Both that and :func:`maskdistill.mining.mine_shard` (``reference`` and ``ours``) run the same seeded
random ViT-S/16 on the same photos; the script counts identical patch and full-resolution masks.

    uv run python benchmarks/reference_masks.py --images 30   # ~3 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from maskdistill.backbone import create_vit
from maskdistill.images import IMAGENET_MEAN, IMAGENET_STD, ImageRecord
from maskdistill.mining import MiningParams, mask_from_qk, mine_shard
from maskdistill.settings import section_settings
from maskdistill.storage import read_mask_shard

PATCH = 16
COCO128 = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128-seg"
VIT = "vit_small_patch16_224"  # random init seeded by create_vit: the same weights in both pipelines


def authors_qk(vit: torch.nn.Module, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """q, k (heads, tokens, dim) of the last block for a normalised (3, H, W) image, the patch grid."""
    h, w = img.shape[1:]
    x = torch.zeros(1, 3, math.ceil(h / PATCH) * PATCH, math.ceil(w / PATCH) * PATCH)
    x[0, :, :h, :w] = img
    tokens = torch.cat([vit.cls_token, vit.patch_embed.proj(x).flatten(2).transpose(1, 2)], 1)
    n0 = vit.pos_embed.shape[1] - 1
    side, dim = int(math.sqrt(n0)), tokens.shape[-1]
    grid = (x.shape[2] // PATCH, x.shape[3] // PATCH)
    pos = vit.pos_embed
    if tokens.shape[1] - 1 != n0 or x.shape[2] != x.shape[3]:
        patch_pos = vit.pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, scale_factor=((grid[0] + 0.1) / side, (grid[1] + 0.1) / side),
                                  mode="bicubic", align_corners=False)
        pos = torch.cat([vit.pos_embed[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)], 1)
    tokens = tokens + pos
    for blk in vit.blocks[:-1]:
        tokens = blk(tokens)
    last = vit.blocks[-1]
    qkv = last.attn.qkv(last.norm1(tokens)).reshape(1, tokens.shape[1], 3, last.attn.num_heads, -1)
    qkv = qkv.permute(2, 0, 3, 1, 4)
    return qkv[0][0], qkv[1][0], grid


@torch.inference_mode()
def authors_masks(files: list[Path], short_side: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Key -> (patch mask, full-resolution mask) as the authors' stage 1 computes them."""
    vit = create_vit(VIT)
    to_input = transforms.Compose([transforms.Resize(short_side), transforms.ToTensor(),
                                   transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    out = {}
    for f in files:
        pil = Image.open(f).convert("RGB")
        img = to_input(pil)
        q, k, grid = authors_qk(vit, img)
        patch_mask = mask_from_qk(q, k, grid, MiningParams(cls_heads=5)).mask
        up = np.repeat(np.repeat(patch_mask, PATCH, 0), PATCH, 1)[: img.shape[1], : img.shape[2]]
        full = np.asarray(Image.fromarray(up.astype(np.uint8) * 255).resize(pil.size)) > 0
        out[f.stem] = (patch_mask, full)
    return out


def compare(files: list[Path], preprocess: str, reference: dict, short_side: int) -> str:
    """mine_shard with ``preprocess`` against the authors' masks, as one line."""
    s = section_settings("mining", {"backbone": {"name": VIT, "pretrained": False}, "cls_heads": 5,
                                    "short_side": short_side, "preprocess": preprocess, "batch_size": 4})
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "masks.h5"
        start = time.perf_counter()
        mine_shard([ImageRecord(f.stem, f) for f in files], shard, s, torch.device("cpu"))
        seconds = time.perf_counter() - start
        same_patch = same_full = 0
        ious = []
        for item in read_mask_shard(shard):
            patch_mask, full = reference[item.key]
            same_patch += item.patch_mask.shape == patch_mask.shape and np.array_equal(item.patch_mask,
                                                                                         patch_mask)
            same_full += np.array_equal(item.mask, full)
            ious.append((item.mask & full).sum() / max((item.mask | full).sum(), 1))
    n = len(files)
    return (f"| {preprocess} | {same_patch}/{n} | {same_full}/{n} | {sum(i >= 0.99 for i in ious)}/{n} | "
            f"{np.mean(ious):.3f} | {np.min(ious):.3f} | {seconds:.0f} s |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=COCO128, help="a folder of .jpg photos")
    ap.add_argument("--images", type=int, default=30, help="the first N photos (sorted by path)")
    ap.add_argument("--short-side", type=int, default=640)
    args = ap.parse_args()
    torch.set_num_threads(2)
    files = sorted(args.data.rglob("*.jpg"))[: args.images]
    if not files:
        raise SystemExit(f"no .jpg photos under {args.data}")
    reference = authors_masks(files, args.short_side)
    print("| mining.preprocess | identical patch masks | identical full-res masks | IoU >= 0.99 | mean IoU "
          "| worst IoU | mine_shard |")
    print("|---|---|---|---|---|---|---|")
    for preprocess in ("reference", "ours"):
        print(compare(files, preprocess, reference, args.short_side))


if __name__ == "__main__":
    main()
