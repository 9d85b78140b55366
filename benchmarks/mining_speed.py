"""Time the ViT forward alone against the whole mining step on the same images.

    python benchmarks/mining_speed.py --images ../shared/data/coco128-seg/images/train2017 -n 16

Bare forward: ``forward_features`` on images already decoded, resized and normalised.
Whole step: ``mine_shard`` from the files to a finished HDF5 shard (decode, resize, forward up to
the last block's q/k, mask, upsample, write). Prints seconds per image, the overhead in percent,
and a breakdown of the step's parts (the mining forward stops at the last block's q/k, so it is
cheaper than the bare forward), as JSON and as a Markdown table; ``--csv FILE`` appends the row
to a CSV file, so runs on several machines or settings collect in one table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from maskdistill.backbone import create_vit, last_block_qk, patch_size
from maskdistill.datasets import list_image_folder
from maskdistill.images import pad_to_multiple, read_rgb, resized_hw, to_tensor
from maskdistill.mining import mask_from_qk, mine_shard, mining_params, upsample_patch_mask
from maskdistill.settings import section_settings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", required=True)
    p.add_argument("-n", type=int, default=16, help="number of images")
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--short-side", type=int, default=640)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="alternating timed rounds of each")
    p.add_argument("--device", default="cpu")
    p.add_argument("--csv", type=Path, help="append the result as a row of this CSV file")
    a = p.parse_args()
    device = torch.device(a.device)
    records = list_image_folder(a.images)[: a.n]
    model = create_vit(a.model).to(device)
    ps = patch_size(model)
    tensors = []
    for r in records:
        rgb = read_rgb(r.path)
        tensors.append(pad_to_multiple(to_tensor(rgb, resized_hw(*rgb.shape[:2], a.short_side)), ps))
    settings = section_settings("mining", {"backbone": {"name": a.model}, "short_side": a.short_side,
                                           "batch_size": a.batch_size, "log_every": 10**9})

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def bare() -> float:
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            for x in tensors:
                model.forward_features(x[None].to(device))
        sync()
        return time.perf_counter() - t0

    def whole() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            sync()
            t0 = time.perf_counter()
            mine_shard(records, Path(tmp) / "shard.h5", settings, device)
            sync()
            return time.perf_counter() - t0

    def breakdown() -> dict[str, float]:
        """Seconds per image of each part of the step, run one after the other."""
        t = dict.fromkeys(("decode_resize", "forward_to_last_qk", "mask_upsample"), 0.0)
        for r in records:
            t0 = time.perf_counter()
            rgb = read_rgb(r.path)
            size = resized_hw(*rgb.shape[:2], a.short_side)
            x = pad_to_multiple(to_tensor(rgb, size), ps)[None].to(device)
            t1 = time.perf_counter()
            q, k = last_block_qk(model, x)
            sync()
            t2 = time.perf_counter()
            grid = (x.shape[-2] // ps, x.shape[-1] // ps)
            pm = mask_from_qk(q[0], k[0], grid, mining_params(settings))
            upsample_patch_mask(pm.mask, ps, size, rgb.shape[:2])
            t3 = time.perf_counter()
            for name, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                t[name] += dt
        return {name: round(v / len(records), 4) for name, v in t.items()}

    bare()  # warm-up (allocator, kernels)
    bare_times, whole_times = [], []
    for _ in range(a.repeats):
        bare_times.append(bare())
        whole_times.append(whole())
    b, w = min(bare_times) / len(records), min(whole_times) / len(records)
    result = {"model": a.model, "short_side": a.short_side, "images": len(records),
              "torch_threads": torch.get_num_threads(), "device": str(device),
              "bare_forward_s_per_img": round(b, 4), "whole_step_s_per_img": round(w, 4),
              "overhead_percent": round(100 * (w / b - 1), 1), "parts_s_per_img": breakdown()}
    print(json.dumps(result, indent=1))
    row = pd.json_normalize(result, sep=".")  # one row; the parts become parts_s_per_img.<part>
    print(row.to_markdown(index=False))
    if a.csv:
        row.to_csv(a.csv, mode="a", header=not a.csv.is_file(), index=False)


if __name__ == "__main__":
    main()
