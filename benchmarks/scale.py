"""Time and peak memory of each CPU rule on synthetic data of COCO20k's size.

    python benchmarks/scale.py                              # a quick smoke run (200 images)
    python benchmarks/scale.py --sizes 1000 5000 20000      # COCO20k: 20 000 images, 400 000 predictions

For each size the script writes, in a work folder, what the CPU rules read in a real run, in the
formats the workflow writes them: HDF5 mask shards (``storage.MaskShardWriter``, full-resolution
masks of 640x480 images) and feature shards (``clustering.write_feature_shard``, 384-d), detector
predictions (COCO RLE, ``--preds-per-image`` per image, scores spread over [0.05, 1]) and COCO ground
truth (polygons, ``--objects-per-image`` per image, 80 categories). The images themselves are
hard links to one 640x480 JPEG (only the report's figure decodes a few). Then it runs each rule's
command as the rule runs it (``maskdistill cluster``; ``pseudo-labels --all``, as
``initial_labels`` does; ``pseudo-labels``; ``mask-ap``; ``mask-quality``; ``evaluate``, which
writes the report), one process each, and measures the wall time and the peak resident memory of
that process (``os.wait4``'s ``ru_maxrss``). It prints one table: rule, images, seconds, peak MB, the SLURM
profile's ``mem_mb`` for that rule (``profiles/slurm/config.yaml``) and the input's size on disk;
``--json FILE`` writes the rows too. ``--workdir`` keeps the data (default: a temporary folder,
deleted afterwards).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from maskdistill.clustering import write_feature_shard
from maskdistill.datasets import shard_of
from maskdistill.storage import MaskShardWriter, MinedMask, encode_rle, mask_to_box, write_json

REPO = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 480, 640
GRID = (40, 54)  # the ViT-S/16 patch grid of a 640x480 image mined at short side 640
FEATURE_DIM = 384  # ViT-S CLS features
POOL = 96  # distinct object shapes, reused (their sizes on disk stay realistic)
RULES = ("cluster", "initial_labels", "pseudo_labels", "mask_ap", "mask_quality", "evaluate")


@dataclass(frozen=True)
class Shape:
    """One synthetic object: its mask, box, COCO RLE and polygon."""

    mask: np.ndarray
    box: list[float]
    rle: dict
    polygon: list[float]
    area: int


def make_shapes(rng: np.random.Generator, n: int) -> list[Shape]:
    """``n`` random ellipses of 2 % to 40 % of a 640x480 image."""
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    shapes = []
    for _ in range(n):
        ry, rx = rng.uniform(30, 200), rng.uniform(30, 260)
        cy, cx = rng.uniform(ry * 0.5, HEIGHT - ry * 0.5), rng.uniform(rx * 0.5, WIDTH - rx * 0.5)
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        angles = np.linspace(0, 2 * np.pi, 33)[:-1]
        poly = np.stack([np.clip(cx + rx * np.cos(angles), 0, WIDTH - 1),
                         np.clip(cy + ry * np.sin(angles), 0, HEIGHT - 1)], 1).ravel()
        shapes.append(Shape(mask, mask_to_box(mask), encode_rle(mask), [round(float(v), 2) for v in poly],
                            int(mask.sum())))
    return shapes


@dataclass(frozen=True)
class Layout:
    """Where a generated dataset lies."""

    images: Path
    gt: Path
    masks: list[Path]
    features: list[Path]
    predictions: Path


def write_dataset(root: Path, n: int, a: argparse.Namespace) -> Layout:
    """Images (hard links), mask and feature shards, predictions and ground truth of ``n`` images."""
    rng = np.random.default_rng(a.seed)
    shapes = make_shapes(rng, POOL)
    keys = [f"im_{i:06d}" for i in range(n)]
    images = root / "images"
    images.mkdir(parents=True)
    jpeg = root / "one.jpg"
    Image.fromarray(rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(jpeg, quality=85)
    for key in keys:
        os.link(jpeg, images / f"{key}.jpg")
    entries = [{"id": i + 1, "file_name": f"{k}.jpg", "height": HEIGHT, "width": WIDTH}
               for i, k in enumerate(keys)]
    # ground truth: polygons, 80 categories (COCO's ids are sparse: use 1..90 skipping some)
    cat_ids = [c for c in range(1, 91) if c % 9 != 0][:a.classes]
    gt_anns = []
    for im in entries:
        for _ in range(a.objects_per_image):
            s = shapes[rng.integers(POOL)]
            x0, y0, x1, y1 = s.box
            gt_anns.append({"id": len(gt_anns) + 1, "image_id": im["id"],
                            "category_id": int(rng.choice(cat_ids)), "segmentation": [s.polygon],
                            "area": float(s.area), "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0})
    gt = root / "gt.json"
    write_json(gt, {"images": entries, "annotations": gt_anns,
                    "categories": [{"id": c, "name": f"class_{c}"} for c in cat_ids]})
    del gt_anns
    # mined masks and their CLS features, one shard per hash of the key, as the workflow shards them
    centres = rng.normal(0, 1, (a.clusters, FEATURE_DIM)).astype(np.float32)
    mask_paths, feature_paths = [], []
    for shard in range(a.shards):
        mine = [k for k in keys if shard_of(k, a.shards) == shard]
        path = root / "masks" / f"shard-{shard:03d}.h5"
        with MaskShardWriter(path, {"backbone": "vit_small_patch16_224.dino", "skipped": ""}) as writer:
            for key in mine:
                s = shapes[rng.integers(POOL)]
                writer.append(MinedMask(key, f"{key}.jpg", HEIGHT, WIDTH, s.mask, s.box,
                                        s.mask[::12, ::12][:GRID[0], :GRID[1]],
                                        rng.random(GRID, dtype=np.float32), 0))
        feats = centres[rng.integers(a.clusters, size=len(mine))] + \
            rng.normal(0, 0.6, (len(mine), FEATURE_DIM)).astype(np.float32)
        fpath = root / "features" / f"shard-{shard:03d}.h5"
        write_feature_shard(fpath, mine, feats, "vit_small_patch8_224.dino")
        mask_paths.append(path)
        feature_paths.append(fpath)
    # detector predictions: the layout of detector.predict (cluster ids 1..K, scores, RLE masks)
    preds = []
    for im in entries:
        for _ in range(a.preds_per_image):
            s = shapes[rng.integers(POOL)]
            x0, y0, x1, y1 = s.box
            preds.append({"id": len(preds) + 1, "image_id": im["id"],
                          "category_id": int(rng.integers(1, a.clusters + 1)),
                          "score": float(rng.uniform(0.05, 1.0)), "bbox": [x0, y0, x1 - x0, y1 - y0],
                          "segmentation": s.rle, "area": s.area})
    predictions = root / "predictions_train.json"
    clusters = [{"id": c, "name": f"cluster_{c - 1}"} for c in range(1, a.clusters + 1)]
    write_json(predictions, {"images": [dict(im, key=im["file_name"][:-4]) for im in entries],
                             "annotations": preds, "categories": clusters})
    return Layout(images, gt, mask_paths, feature_paths, predictions)


# Runs a command as its child and writes the child's peak resident memory (KB) to a file. Measuring
# through this small process matters: Linux hands a child the high-water mark of the process it
# was forked from, so a child of this (large) script would report this script's memory.
_PEAK_OF_CHILD = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_rule(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run one rule's command; its wall seconds and the peak resident memory (MB) of its process."""
    peak_file = log.with_suffix(".maxrss")
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-c", _PEAK_OF_CHILD, str(peak_file), *cmd], stdout=out,
                              stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:3])} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    return seconds, int(peak_file.read_text()) / 1024.0  # Linux: kilobytes


def profile_mem_mb(profile: Path) -> dict[str, int]:
    """``mem_mb`` of each rule in a Snakemake profile (``default`` for the rest)."""
    cfg = yaml.safe_load(profile.read_text())
    out = {"default": int(cfg["default-resources"]["mem_mb"])}
    for rule, res in (cfg.get("set-resources") or {}).items():
        if "mem_mb" in res:
            out[rule] = int(res["mem_mb"])
    return out


def _size_mb(*paths: Path) -> float:
    files = [f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
    return sum(f.stat().st_size for f in files) / 2**20


def measure(root: Path, n: int, a: argparse.Namespace) -> list[dict]:
    """Generate ``n`` images' data under ``root`` and run every CPU rule on it; one row per rule."""
    t0 = time.perf_counter()
    lay = write_dataset(root, n, a)
    print(f"{n} images: data written in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    config = json.dumps({"dataset": {"source": "images", "num_shards": a.shards,
                                     "train": {"images": str(lay.images), "annotations": str(lay.gt)}},
                         "clustering": {"num_clusters": a.clusters, "overclustering": a.overclustering},
                         "evaluation": {"figure_rows": 6}})
    exe = [str(Path(sys.executable).parent / "maskdistill")]
    out = root / "results"
    rules = [
        ("cluster", [*exe, "cluster", "--config", config, "--masks-train", *map(str, lay.masks),
                     "--features-train", *map(str, lay.features),
                     "--out-train", str(out / "clusters/train.json"),
                     "--out-model", str(out / "clusters/kmeans.npz")], [*lay.masks, *lay.features]),
        ("initial_labels", [*exe, "pseudo-labels", "--config", config, "--all", "--instances",
                            str(out / "clusters/train.json"), "--out", str(out / "initial_labels")],
         [out / "clusters/train.json"]),
        ("pseudo_labels", [*exe, "pseudo-labels", "--config", config, "--instances", str(lay.predictions),
                           "--out", str(out / "pseudo_labels")], [lay.predictions]),
        ("mask_ap", [*exe, "mask-ap", "--gt", str(lay.gt), "--predictions", str(lay.predictions),
                     "--setting", "both", "--out", str(out / "mask_ap.json")], [lay.gt, lay.predictions]),
        ("mask_quality", [*exe, "mask-quality", "--masks", *map(str, lay.masks), "--gt", str(lay.gt),
                          "--num-clusters", str(a.clusters * a.overclustering),
                          "--out", str(out / "mask_quality.json")], [*lay.masks, lay.gt]),
        ("evaluate", [*exe, "evaluate", "--config", config, "--split", "train",
                      "--pred", f"initial_masks={out / 'initial_labels'}",
                      "--pred", f"maskrcnn={out / 'pseudo_labels'}",
                      "--pred", f"segmentation={out / 'pseudo_labels'}",
                      "--mask-ap", str(out / "mask_ap.json"),
                      "--mask-quality", str(out / "mask_quality.json"),
                      "--out-metrics", str(out / "metrics.json"), "--out-report", str(out / "report.md"),
                      "--out-figure", str(out / "report.png")],
         [lay.gt, out / "initial_labels", out / "pseudo_labels", out / "pseudo_labels"]),
    ]
    mem = profile_mem_mb(a.profile)
    rows = []
    (root / "logs").mkdir(exist_ok=True)
    for rule, cmd, inputs in (r for r in rules if r[0] in a.rules):
        seconds, peak = run_rule(cmd, root / "logs" / f"{rule}.log")
        rows.append({"rule": rule, "images": n, "seconds": round(seconds, 1), "peak_mb": round(peak),
                     "profile_mem_mb": mem.get(rule, mem["default"]), "input_mb": round(_size_mb(*inputs))})
        print(f"  {rule}: {seconds:.1f} s, {peak:.0f} MB", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[200], help="numbers of images (COCO20k: 20000)")
    p.add_argument("--preds-per-image", type=int, default=20, help="detector predictions per image")
    p.add_argument("--objects-per-image", type=int, default=3, help="ground-truth objects per image")
    p.add_argument("--clusters", type=int, default=80, help="clustering.num_clusters (COCO: 80)")
    p.add_argument("--overclustering", type=int, default=1)
    p.add_argument("--classes", type=int, default=80, help="ground-truth categories")
    p.add_argument("--shards", type=int, default=32, help="dataset.num_shards (configs/coco20k.yaml: 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES),
                   help="rules to run (evaluate reads what all the others write)")
    p.add_argument("--profile", type=Path, default=REPO / "profiles" / "slurm" / "config.yaml")
    p.add_argument("--workdir", type=Path, help="keep the data here (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="also write the rows as JSON")
    a = p.parse_args(argv)
    rows = []
    for n in a.sizes:
        if a.workdir:
            root = a.workdir / f"n{n}"
            if root.exists():
                shutil.rmtree(root)
            rows += measure(root, n, a)
        else:
            with tempfile.TemporaryDirectory(prefix=f"scale-{n}-") as tmp:
                rows += measure(Path(tmp), n, a)
    table = pd.DataFrame(rows)
    print(table.to_markdown(index=False))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return table


if __name__ == "__main__":
    main()
