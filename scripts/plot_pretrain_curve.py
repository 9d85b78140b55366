"""Plot a DINO pretraining curve (the ``<weights>.curve.json`` that ``maskdistill pretrain`` writes),
optionally beside the CLS attention on objects per epoch (``scripts/attention_per_epoch.py``) and,
when that file has them (``--categories``), the category separability of the clustering features.

    uv run python scripts/plot_pretrain_curve.py results/pretrain/backbone.safetensors.curve.json \
        docs/demo-backbone-curve.png [attention.json]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from matplotlib.figure import Figure


def main(curve_json: Path, out_png: Path, attention_json: Path | None = None) -> None:
    data = json.loads(curve_json.read_text())
    curve = data["curve"]
    epochs = [c["epoch"] for c in curve]
    att = json.loads(attention_json.read_text()) if attention_json else None
    semantic = [r for r in att["epochs"] if "categories" in r] if att else []
    panels = 2 + bool(att) + bool(semantic)
    fig = Figure(figsize=(4 * panels, 3.2), dpi=100)
    axes = fig.subplots(1, panels)
    ax_loss, ax_lr = axes[0], axes[1]
    ax_loss.plot(epochs, [c["loss"] for c in curve], color="tab:blue", label="DINO loss")
    out_dim = data.get("out_dim")
    if out_dim:
        ax_loss.axhline(math.log(out_dim), color="grey", ls="--", lw=1, label="log K (uniform)")
    if "koleo" in curve[0]:
        ax_k = ax_loss.twinx()
        ax_k.plot(epochs, [c["koleo"] for c in curve], color="tab:red", lw=1)
        ax_k.set_ylabel("KoLeo term", color="tab:red")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("DINO loss (epoch mean)")
    ax_loss.legend(fontsize=7, loc="lower left")
    ax_loss.set_title(f"{data['arch']} on {data['images']} images, {data['steps']} steps", fontsize=9)
    ax_lr.plot(epochs, [c["lr"] for c in curve], color="tab:orange", label="lr")
    ax_lr.set_xlabel("epoch")
    ax_lr.set_ylabel("learning rate")
    ax_m = ax_lr.twinx()
    ax_m.plot(epochs, [c["teacher_momentum"] for c in curve], color="tab:green", label="teacher momentum")
    ax_m.set_ylabel("teacher EMA momentum")
    if att:
        ax_a = axes[2]
        rows = att["epochs"]
        heads = len(rows[0]["share_per_head"])
        for h in range(heads):
            ax_a.plot([r["epoch"] for r in rows], [r["share_per_head"][h] for r in rows], label=f"head {h}")
        ax_a.axhline(rows[0]["area"], color="grey", ls="--", lw=1, label="object area (chance)")
        ax_a.set_xlabel("epoch")
        ax_a.set_ylabel("CLS attention on objects (%)")
        ax_a.set_title("last block, demo val scenes", fontsize=9)
        ax_a.legend(fontsize=7)
    if semantic:
        ax_s = axes[3]
        xs = [r["epoch"] for r in semantic]
        ax_s.plot(xs, [r["categories"]["kmeans_nmi"] for r in semantic], "o-", label="K-means NMI")
        ax_s.plot(xs, [r["categories"]["linear_accuracy"] for r in semantic], "s-",
                  label="linear probe accuracy")
        ax_s.axhline(semantic[0]["categories"]["chance_accuracy"], color="grey", ls="--", lw=1,
                     label="chance accuracy")
        ax_s.set_ylim(0, 100)
        ax_s.set_xlabel("epoch")
        ax_s.set_ylabel("percent")
        ax_s.set_title(f"categories of {semantic[0]['categories']['objects']} objects' box crops", fontsize=9)
        ax_s.legend(fontsize=7)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) == 4 else None)
