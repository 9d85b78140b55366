"""CLS attention on objects and category separability of ViT weights, on demo val-split scenes.

    uv run python scripts/attention_per_epoch.py --out attention.json ckpt/e001.safetensors ...

Each file's epoch is the number that ends its name (``e012`` -> 12), else its position in the list.
Writes, per file, the share of the last block's CLS attention (each head) on object patches and the
objects' area; a random ViT sits at the area. ``--categories N`` also clusters the clustering
stage's features (CLS of box crops) of the ground-truth objects of N val-split scenes (drawn, never
trained on) and reports their NMI with the categories and a linear probe's accuracy
(``mask_quality.category_separability``). ``--random`` adds the randomly initialised ViT as epoch 0.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import replace
from pathlib import Path

import yaml

from maskdistill.backbone import DEMO_VIT, create_vit
from maskdistill.demo import draw_scene
from maskdistill.mask_quality import cls_attention_on_objects, scene_category_separability
from maskdistill.settings import section_settings

REPO = Path(__file__).resolve().parents[1]


def epoch_of(weights: Path, position: int) -> int:
    """The number that ends the file's stem (``e012`` -> 12), else ``position``."""
    m = re.search(r"(\d+)$", weights.stem)
    return int(m.group(1)) if m else position


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights", nargs="*", type=Path)
    ap.add_argument("--config", type=Path, default=REPO / "config.yaml", help="demo settings of the scenes")
    ap.add_argument("--arch", default=DEMO_VIT)
    ap.add_argument("--random", action="store_true")
    ap.add_argument("--categories", type=int, default=0, metavar="N",
                    help="scenes whose objects measure category separability (0: skip)")
    ap.add_argument("--crop-size", type=int, default=128, help="clustering crop size")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    missing = [str(w) for w in a.weights if not w.is_file()]
    if missing:
        ap.error(f"weights not found: {', '.join(missing)}")
    demo = section_settings("dataset", {"demo": yaml.safe_load(a.config.read_text())["dataset"]["demo"]}).demo
    num_val = demo.num_val
    demo = replace(demo, num_val=max(num_val, a.categories))  # val-split scenes past num_val: not trained on
    scenes = [draw_scene(demo, "val", i) for i in range(demo.num_val)]
    images, fgs = [s[0] for s in scenes[:num_val]], [s[1] > 0 for s in scenes[:num_val]]
    cat_scenes = scenes[:a.categories]
    rows = []
    runs = ([(0, None)] if a.random else []) + [
        (epoch_of(w, i), w) for i, w in enumerate(a.weights, start=1)]
    for epoch, weights in sorted(runs, key=lambda r: r[0]):
        vit = create_vit(a.arch, checkpoint=str(weights) if weights else None)
        rows.append({"epoch": epoch, **cls_attention_on_objects(vit, images, fgs)})
        if cat_scenes:
            rows[-1]["categories"] = scene_category_separability(vit, cat_scenes, a.crop_size)
        print(rows[-1], flush=True)
    a.out.write_text(json.dumps({"arch": a.arch, "images": len(images), "epochs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
