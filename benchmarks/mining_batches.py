"""How full mining's forward passes are: images per pass in the shard's order against the order of
``mining.shape_order`` (what ``mine_shard`` does), from the image headers alone (no model).

    python benchmarks/mining_batches.py --images ../shared/data/coco128-seg/images/train2017 \\
        --batch-size 8 --num-shards 2

A pass holds images of one ViT input size (resized to ``--short-side``, padded to ``--patch``) and
at most ``--batch-size`` of them. Prints, per shard and in total, the passes and the mean images per
pass of both orders, as a Markdown table (``--csv FILE`` appends the rows). The size order's
passes are the fewest that keep every mask identical to batch size 1: one partial pass per input
size at most.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from maskdistill.datasets import list_image_folder, shard_records
from maskdistill.images import decoded_hw
from maskdistill.mining import padded_hw, shape_order


def passes(shapes: list[tuple[int, int] | None], batch_size: int) -> int:
    """Forward passes over ``shapes`` taken in order: a new pass at each change of shape or when
    the pass is full (an unreadable image, None, is a pass of its own, as mining skips it alone)."""
    count, current, filled = 0, object(), 0
    for shape in shapes:
        if shape is None or shape != current or filled == batch_size:
            count, current, filled = count + 1, shape, 0
        filled += 1
    return count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--short-side", type=int, default=640)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--preprocess", choices=["reference", "ours"], default="ours",
                   help="mining.preprocess: its size rule decides the input sizes")
    p.add_argument("--num-shards", type=int, default=2)
    p.add_argument("--csv", type=Path, help="append the rows to this CSV file")
    a = p.parse_args()
    records = list_image_folder(a.images)
    rows = []
    for shard in range(a.num_shards):
        members = shard_records(records, shard, a.num_shards)
        sizes = [decoded_hw(r.path) for r in members]
        shapes = [None if hw is None else padded_hw(hw, a.short_side, a.patch, a.preprocess) for hw in sizes]
        ordered = [shapes[i] for i in shape_order(sizes, a.short_side, a.patch, a.preprocess)]
        before, after = passes(shapes, a.batch_size), passes(ordered, a.batch_size)
        rows.append({"shard": shard, "images": len(members), "input_sizes": len(set(shapes)),
                     "passes_shard_order": before, "passes_size_order": after,
                     "images_per_pass_shard_order": round(len(members) / max(before, 1), 2),
                     "images_per_pass_size_order": round(len(members) / max(after, 1), 2)})
    images = sum(r["images"] for r in rows)
    before, after = (sum(r[f"passes_{order}"] for r in rows) for order in ("shard_order", "size_order"))
    rows.append({"shard": "all", "images": images, "input_sizes": None, "passes_shard_order": before,
                 "passes_size_order": after, "images_per_pass_shard_order": round(images / max(before, 1), 2),
                 "images_per_pass_size_order": round(images / max(after, 1), 2)})
    table = pd.DataFrame(rows)
    table.insert(0, "batch_size", a.batch_size)
    print(table.to_markdown(index=False))
    if a.csv:
        table.to_csv(a.csv, mode="a", header=not a.csv.is_file(), index=False)


if __name__ == "__main__":
    main()
