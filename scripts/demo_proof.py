"""Run the demo pipeline over several seeds and with a randomly initialised ViT; tabulate the proof.

Usage (from the repository root, ~15 min per run on 2 CPU cores)::

    uv run python scripts/demo_proof.py --out proof --seeds 0 1 2

Seed ``s`` sets ``clustering.seed``, ``detector.seed`` and ``segmentation.seed`` (the unsupervised
stages; mining is deterministic). Runs after the first start from a copy of the first run's
directory, so Snakemake reruns only what the seeds touch. ``--random-vit`` adds the same pipeline
with the mining and clustering ViT randomly initialised (same architecture, no weights). Writes
``proof.json`` and ``proof.md`` under ``--out`` and merges the summary into the first run's
``results/metrics.json`` under ``"proof"``. ``--categories N`` (default 256) also measures how well
each backbone's clustering features separate the categories of the objects of N val-split scenes
(K-means NMI and a linear probe's accuracy; see ``mask_quality.category_separability``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from maskdistill.backbone import create_vit
from maskdistill.demo import draw_scene
from maskdistill.mask_quality import scene_category_separability
from maskdistill.settings import load_settings

REPO = Path(__file__).resolve().parents[1]
STAGES = ("patch_kmeans", "initial_masks", "maskrcnn", "segmentation")
SEEDED_SECTIONS = ("clustering", "detector", "segmentation")


def run_pipeline(workdir: Path, cfg: dict[str, Any], cores: int) -> dict[str, Any]:
    """Write ``cfg`` as the run's config.yaml, run Snakemake there, return its metrics.json."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "--cores", str(cores)]
    with open(workdir / "proof-run.log", "a") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    return json.loads((workdir / "results" / "metrics.json").read_text())


def seeded(cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    out = copy.deepcopy(cfg)
    for section in SEEDED_SECTIONS:
        out.setdefault(section, {})["seed"] = seed
    return out


def random_vit(cfg: dict[str, Any]) -> dict[str, Any]:
    """The same config with the mining/clustering ViT randomly initialised (same architecture)."""
    out = copy.deepcopy(cfg)
    out.setdefault("pretrain", {})["enabled"] = False
    for section in ("mining", "clustering"):
        name = out[section]["backbone"]["name"].split(".")[0]
        out[section]["backbone"] = {"name": name, "pretrained": False, "checkpoint": None}
    return out


def summarise(metrics: dict[str, Any]) -> dict[str, float]:
    """The proof's numbers of one run (percent)."""
    row = {stage: float(metrics[stage]["miou"]) for stage in STAGES if stage in metrics}
    quality = metrics.get("mask_quality", {})
    for key in ("mask_iou", "corloc"):
        if key in quality:
            row[f"mined_{key}"] = float(quality[key])
    bounds = quality.get("label_bounds", {})
    for key, name in (("oracle_miou", "initial_masks_oracle_labels"),
                      ("random_miou", "initial_masks_random_labels")):
        if key in bounds:
            row[name] = float(bounds[key])
    if "mask_ap" in metrics:
        row["maskrcnn_ap50"] = float(metrics["mask_ap"]["multi"]["AP50"])
    for stage in ("segmentation+crf", "segmentation_crf", "linear_probe"):
        if isinstance(metrics.get(stage), dict) and "miou" in metrics[stage]:
            row[stage] = float(metrics[stage]["miou"])
    return row


def mean_std(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = [k for k in rows[0] if all(k in r for r in rows)]
    return {k: {"mean": statistics.fmean(r[k] for r in rows),
                "std": statistics.stdev(r[k] for r in rows) if len(rows) > 1 else 0.0,
                "runs": [r[k] for r in rows]} for k in keys}


def markdown(summary: dict[str, Any]) -> str:
    seeds = summary["seeds"]
    lines = [f"| measure (val) | pretrained ViT, mean ± std over seeds {seeds} | random-init ViT |",
             "|---|---|---|"]
    rand = summary.get("random_vit", {})
    for key, stats in summary["pretrained"].items():
        r = f"{rand[key]:.1f}" if key in rand else "–"
        lines.append(f"| {key} | {stats['mean']:.1f} ± {stats['std']:.1f} | {r} |")
    return "\n".join(lines) + "\n"


def backbone_semantics(cfg: dict[str, Any], scenes: int) -> dict[str, float]:
    """Category separability of the clustering backbone of ``cfg`` on ``scenes`` val-split scenes."""
    s = load_settings(cfg)
    demo = replace(s.dataset.demo, num_val=max(s.dataset.demo.num_val, scenes))
    bb = s.clustering.backbone
    vit = create_vit(bb.name, bb.pretrained, bb.checkpoint)
    out = scene_category_separability(vit, [draw_scene(demo, "val", i) for i in range(scenes)],
                                      s.clustering.crop_size)
    return {"category_kmeans_nmi": out["kmeans_nmi"], "category_linear_accuracy": out["linear_accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "config.yaml"))
    ap.add_argument("--out", default="proof")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--random-vit", action="store_true", help="also run with a random-init ViT")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--categories", type=int, default=256, metavar="N",
                    help="val-split scenes for the category separability of each backbone (0: skip)")
    a = ap.parse_args()
    cfg = yaml.safe_load(Path(a.config).read_text())
    out = Path(a.out)
    first = out / f"seed{a.seeds[0]}"
    rows = []
    for seed in a.seeds:
        workdir = out / f"seed{seed}"
        if seed != a.seeds[0] and not workdir.exists():
            shutil.copytree(first, workdir, symlinks=True)  # reuse mining: only seeded rules rerun
        print(f"seed {seed}: {workdir}", flush=True)
        rows.append(summarise(run_pipeline(workdir, seeded(cfg, seed), a.cores)))
    if a.categories:
        semantics = backbone_semantics(cfg, a.categories)
        rows = [{**row, **semantics} for row in rows]
    summary: dict[str, Any] = {"seeds": a.seeds, "pretrained": mean_std(rows)}
    if a.random_vit:
        print("random-init ViT", flush=True)
        rand_cfg = seeded(random_vit(cfg), a.seeds[0])
        summary["random_vit"] = summarise(run_pipeline(out / "random-vit", rand_cfg, a.cores))
        if a.categories:
            summary["random_vit"].update(backbone_semantics(rand_cfg, a.categories))
    (out / "proof.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "proof.md").write_text(markdown(summary))
    metrics_path = first / "results" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["proof"] = summary
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    print(markdown(summary))


if __name__ == "__main__":
    main()
