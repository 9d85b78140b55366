"""Plot a DINO pretraining curve (the ``<weights>.curve.json`` that ``maskdistill pretrain`` writes).

    uv run python scripts/plot_pretrain_curve.py results/pretrain/backbone.safetensors.curve.json \
        docs/demo-backbone-curve.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from matplotlib.figure import Figure


def main(curve_json: Path, out_png: Path) -> None:
    data = json.loads(curve_json.read_text())
    curve = data["curve"]
    epochs = [c["epoch"] for c in curve]
    fig = Figure(figsize=(8, 3), dpi=100)
    ax_loss, ax_lr = fig.subplots(1, 2)
    ax_loss.plot(epochs, [c["loss"] for c in curve], color="tab:blue")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("DINO loss (epoch mean)")
    ax_loss.set_title(f"{data['arch']} on {data['images']} images, {data['steps']} steps", fontsize=9)
    ax_lr.plot(epochs, [c["lr"] for c in curve], color="tab:orange", label="lr")
    ax_lr.set_xlabel("epoch")
    ax_lr.set_ylabel("learning rate")
    ax_m = ax_lr.twinx()
    ax_m.plot(epochs, [c["teacher_momentum"] for c in curve], color="tab:green", label="teacher momentum")
    ax_m.set_ylabel("teacher EMA momentum")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
