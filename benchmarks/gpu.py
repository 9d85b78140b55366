"""Numbers from a GPU: mining images/s (batch 1 against ordered batches), training steps/s (fp32
against bf16 and fp16) and training on 1 GPU against N (when the machine has several).

    python benchmarks/gpu.py --out gpu.json                  # a GPU machine: the paper's models
    python benchmarks/gpu.py --small --device cpu --procs 2  # the same measurements, tiny, on the CPU

Mining runs the stage itself (``mining.mine_shard``: decode, resize, the ViT up to its last q/k,
the mask, the HDF5 shard) over synthetic JPEGs of a few sizes, in their given order with batch 1
and sorted by size with ``--batch`` images per forward pass (a batch holds images of one size), in
each precision. Training times the training engine (``training.fit``: autocast, gradient scaler,
channels-last, DDP) on one synthetic batch repeated, for the segmentation model (DeepLab-v3 R50,
512 px crops) and the detector (Mask R-CNN R50-FPN, 800 px), in each precision; the steps after the
first (warm-up) are timed, the checkpoint is not. With ``--procs N`` (default: every visible GPU)
the training runs again under ``torchrun --nproc_per_node N`` with the same global batch, each
process taking its share: the speed-up of N GPUs for one job. Weights are random (no download):
speed does not depend on them. Prints JSON and a Markdown table; ``--out`` writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from maskdistill import distributed
from maskdistill.datasets import list_image_folder
from maskdistill.images import resized_hw
from maskdistill.settings import section_settings

# (model sizes) for a GPU and for a quick CPU run
SIZES = {
    "paper": {"vit": "vit_small_patch16_224", "short_side": 640, "images": 64,
              "image_sizes": [(375, 500), (500, 375), (333, 500)],
              "seg": {"arch": "resnet50", "crop_size": 512, "batch_size": 16},
              "det": {"backbone": "resnet50", "size": 800, "batch_size": 8}, "steps": 12},
    "small": {"vit": "vit_tiny_patch16_224", "short_side": 64, "images": 12,
              "image_sizes": [(48, 64), (64, 48), (40, 64)],
              "seg": {"arch": "resnet18", "crop_size": 48, "batch_size": 4},
              "det": {"backbone": "resnet18", "size": 96, "batch_size": 4,
                      "settings": {"fpn_channels": 32, "box_head_dim": 64, "mask_head_convs": 1,
                                   "rpn_batch_size_per_image": 64, "roi_batch_size_per_image": 64}},
              "steps": 4},
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- mining


def synthetic_images(folder: Path, n: int, sizes: list[tuple[int, int]]) -> list:
    """``n`` noisy JPEGs with a bright blob, cycling through ``sizes`` (so sizes alternate)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        img = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
        y, x = h // 4 + int(rng.integers(0, h // 4)), w // 4 + int(rng.integers(0, w // 4))
        img[y:y + h // 3, x:x + w // 3] = rng.integers(150, 255, 3, dtype=np.uint8)
        Image.fromarray(img).save(folder / f"img{i:04d}.jpg", quality=90)
    return list_image_folder(folder)


def mining_speed(size: dict[str, Any], batch: int, precisions: list[str],
                 device: torch.device) -> list[dict]:
    """Images per second of ``mine_shard``: batch 1 in the given order, ``batch`` sorted by size."""
    from maskdistill.mining import mine_shard

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        records = synthetic_images(folder, size["images"], size["image_sizes"])
        ordered = sorted(records, key=lambda r: resized_hw(*Image.open(r.path).size[::-1],
                                                           size["short_side"]))
        for precision in precisions:
            for label, recs, bs in (("batch 1", records, 1), (f"ordered batches of {batch}", ordered, batch)):
                s = section_settings("mining", {"backbone": {"name": size["vit"]},
                                                "short_side": size["short_side"], "batch_size": bs,
                                                "decode_threads": 4, "log_every": 10**9})
                mine_shard(recs[:bs], Path(tmp) / "warm.h5", s, device, precision=precision)  # warm-up
                sync(device)
                t0 = time.perf_counter()
                mine_shard(recs, Path(tmp) / "shard.h5", s, device, precision=precision)
                sync(device)
                seconds = time.perf_counter() - t0
                rows.append({"measure": "mining", "model": size["vit"], "precision": precision,
                             "setting": label, "gpus": 1, "images_per_s": round(len(recs) / seconds, 2)})
    return rows


# ---------------------------------------------------------------- training


def _segmentation_job(size: dict, share: int, device: torch.device) -> tuple:
    """DeepLab-v3, its optimiser, one batch share of random crops, the loss and the run options."""
    from maskdistill.segmentation import hard_pixel_cross_entropy, model_from_settings

    s = section_settings("segmentation", {"arch": size["seg"]["arch"]})
    model = model_from_settings(s, 21, load_pretrained=False).to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    crop = size["seg"]["crop_size"]
    images = torch.randn(share, 3, crop, crop, device=device)
    labels = torch.randint(0, 21, (share, crop, crop), device=device)

    def loss(net, batch, _step):
        value = hard_pixel_cross_entropy(net(batch[0])["out"], batch[1], 0.2)
        return value, {"loss": value.item()}

    return model, optimizer, (images, labels), loss, {"channels_last": True}


def _detector_job(size: dict, share: int, device: torch.device) -> tuple:
    """Mask R-CNN, its optimiser, one batch share of random images with two boxes each, the loss
    and the run options."""
    from maskdistill.detector import build_model, mixed_precision_modules, seed_samplers

    s = section_settings("detector", {"backbone": size["det"]["backbone"],
                                      "train_min_size": [size["det"]["size"]] * 2,
                                      **size["det"].get("settings", {})})
    model = build_model(s, 21).to(device)
    model.transform.min_size = (size["det"]["size"],)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    side = size["det"]["size"]
    images, targets = [], []
    g = torch.Generator().manual_seed(0)
    for _ in range(share):
        images.append(torch.rand(3, side, side * 4 // 3, generator=g).to(device))
        boxes = torch.tensor([[0.1, 0.2, 0.6, 0.7], [0.5, 0.1, 0.9, 0.5]]) * side
        masks = torch.zeros(2, side, side * 4 // 3, dtype=torch.uint8)
        for j, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[j, y0:y1, x0:x1] = 1
        targets.append({"boxes": boxes.to(device), "labels": torch.tensor([1, 2], device=device),
                        "masks": masks.to(device)})

    def loss(net, batch, step):
        seed_samplers(model, 0, step, range(len(batch[0])))
        losses = net(*batch)
        total = sum(losses.values())
        return total, {"total": float(total.detach())}

    return model, optimizer, (images, targets), loss, {"channels_last": True,
                                                        "autocast_modules": mixed_precision_modules(model)}


STAGES = {"segmentation": _segmentation_job, "detector": _detector_job}


def training_speed(stage: str, size: dict, precision: str, device: torch.device) -> dict[str, Any]:
    """Steps per second of ``fit`` on one synthetic global batch, repeated (this process's share)."""
    from maskdistill.training import TrainingRun, fit

    world = distributed.world()
    batch = size["seg" if stage == "segmentation" else "det"]["batch_size"]
    distributed.check_batch_size(batch, f"--{stage} batch")
    share = batch // world.world_size
    steps = size["steps"]
    with tempfile.TemporaryDirectory() as tmp:  # rank 0 writes its checkpoint there (not timed)
        model, optimizer, data, loss, options = STAGES[stage](size, share, device)
        marks: list[float] = []

        def mark(_step: int, _epoch: int) -> None:
            sync(device)
            marks.append(time.perf_counter())

        fit(TrainingRun(name=f"bench-{stage}", model=model, optimizer=optimizer, epochs=1,
                        steps_per_epoch=steps, batches=lambda _epoch: [data] * steps, loss=loss,
                        checkpoint_dir=Path(tmp) / "ckpt", log_every=10**9, after_step=mark,
                        precision=precision, **options))
    seconds = (marks[-1] - marks[0]) / (len(marks) - 1)
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    model_name = size["seg"]["arch"] if stage == "segmentation" else f"maskrcnn_{size['det']['backbone']}"
    return {"measure": f"training {stage}", "model": model_name, "precision": precision,
            "setting": f"global batch {batch}", "gpus": world.world_size,
            "steps_per_s": round(1 / seconds, 3), "images_per_s": round(batch / seconds, 2),
            "peak_gib_per_gpu": None if memory is None else round(memory, 2)}


def training_rows(size: dict, precisions: list[str], device: torch.device) -> list[dict]:
    rows = []
    for stage in STAGES:
        for precision in precisions:
            rows.append(training_speed(stage, size, precision, device))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
    return rows


def several_processes(a: argparse.Namespace, procs: int) -> list[dict]:
    """The training measurements again under torchrun with ``procs`` processes (rank 0's rows)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node",
               str(procs), __file__, "--worker", str(out), "--device", a.device,
               "--precisions", *a.precisions]
        if a.small:
            cmd.append("--small")
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // procs)))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"torchrun failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="tiny models and inputs (a quick CPU run)")
    p.add_argument("--precisions", nargs="+", default=None, choices=["fp32", "bf16", "fp16"],
                   help="default: fp32 bf16 fp16 on a GPU, fp32 bf16 on the CPU")
    p.add_argument("--batch", type=int, default=8, help="mining: images per forward pass when ordered")
    p.add_argument("--procs", type=int, default=None,
                   help="processes of the N-GPU training (default: every visible GPU)")
    p.add_argument("--skip", nargs="*", default=[], choices=["mining", "training", "procs"])
    p.add_argument("--out", type=Path, help="write the rows as JSON")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    size = SIZES["small" if a.small else "paper"]
    device = torch.device(a.device)
    a.precisions = a.precisions or (["fp32", "bf16", "fp16"] if device.type == "cuda" else ["fp32", "bf16"])
    if a.worker:  # one of several processes started by several_processes
        with distributed.session(a.device) as world:
            if device.type == "cuda":
                device = torch.device("cuda", world.local_rank)
            rows = training_rows(size, a.precisions, device)
            if world.is_main:
                a.worker.write_text(json.dumps(rows))
        return
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    info = {"device": name, "torch": torch.__version__, "sizes": "small" if a.small else "paper"}
    rows: list[dict] = []
    if "mining" not in a.skip:
        rows += mining_speed(size, a.batch, a.precisions, device)
    if "training" not in a.skip:
        rows += training_rows(size, a.precisions, device)
    procs = a.procs if a.procs is not None else (torch.cuda.device_count() if device.type == "cuda" else 1)
    if procs > 1 and "procs" not in a.skip:
        rows += several_processes(a, procs)
    print(json.dumps({"machine": info, "rows": rows}, indent=1))
    print(pd.DataFrame(rows).to_markdown(index=False))
    if a.out:
        a.out.write_text(json.dumps({"machine": info, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
