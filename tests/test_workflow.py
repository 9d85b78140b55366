"""The Snakemake workflow on a tiny demo config: completes, reruns only what a change touches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "device": "cpu",
    "dataset": {"source": "demo", "num_shards": 2,
                "demo": {"num_train": 10, "num_val": 4, "image_size": 64, "min_objects": 1,
                         "max_objects": 2, "seed": 1}},
    "mining": {"backbone": {"name": "vit_tiny_patch16_224"}, "short_side": 64, "batch_size": 4},
    "clustering": {"backbone": {"name": "vit_tiny_patch16_224"}, "crop_size": 32,
                   "num_clusters": 3, "batch_size": 8},
    "detector": {"backbone": "resnet18", "train_min_size": [64, 64], "test_min_size": 64,
                 "max_size": 96, "fpn_channels": 32, "mask_head_convs": 1,
                 "box_head_dim": 64, "rpn_batch_size_per_image": 32,
                 "roi_batch_size_per_image": 32, "epochs": 1, "batch_size": 2, "warmup_iters": 2,
                 "num_workers": 0, "lr_drop_epochs": [5], "log_every": 2},
    "segmentation": {"arch": "resnet18", "frozen_stages": 0, "epochs": 1, "batch_size": 2,
                     "crop_size": 48, "lr_drop_epochs": [5], "num_workers": 0, "log_every": 2},
}


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def planned_rules(proc: subprocess.CompletedProcess) -> set[str]:
    """Rule names of the jobs a dry run would execute (from its job-stats table)."""
    text = proc.stdout + proc.stderr
    if "Nothing to be done" in text:
        return set()
    rules, table = set(), False
    for line in text.splitlines():
        parts = line.split()
        if parts[:2] == ["job", "count"]:
            table = True
            continue
        if table:
            if not parts or parts[0] == "total":
                break
            if len(parts) == 2 and parts[1].isdigit():
                rules.add(parts[0])
    return rules


def write_config(workdir: Path, cfg: dict) -> None:
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("wf")
    write_config(workdir, TINY)
    snakemake(workdir)
    return workdir


def test_workflow_completes_with_all_stage_metrics(finished_run):
    metrics = json.loads((finished_run / "results" / "metrics.json").read_text())
    for stage in ("initial_masks", "maskrcnn", "segmentation"):
        assert 0.0 <= metrics[stage]["miou"] <= 100.0
        assert metrics[stage]["per_class"]
    report = (finished_run / "results" / "report.md").read_text()
    assert "RANDOMLY INITIALISED" in report
    assert (finished_run / "results" / "report.png").stat().st_size > 1000
    logs = list((finished_run / "logs").rglob("*.log"))
    assert any("train_detector" in str(p) for p in logs)
    assert "step" in (finished_run / "logs" / "train_segmentation.log").read_text()


def test_second_dry_run_has_nothing_to_do(finished_run):
    assert planned_rules(snakemake(finished_run, "-n")) == set()


def test_kmeans_change_reruns_clustering_and_after_but_no_mining(finished_run):
    shards = sorted((finished_run / "results" / "masks").rglob("*.h5"))
    feats = sorted((finished_run / "results" / "features").rglob("*.h5"))
    before = {p: p.stat().st_mtime_ns for p in shards + feats}
    cfg = json.loads(json.dumps(TINY))
    cfg["clustering"]["seed"] = 7
    write_config(finished_run, cfg)
    planned = planned_rules(snakemake(finished_run, "-n"))
    # patch_kmeans reads clustering.seed too (its K-means); mask_ap and stage_figure follow the detector
    assert planned == {"cluster", "train_detector", "predict_detector", "pseudo_labels",
                       "initial_labels", "train_segmentation", "predict_segmentation", "evaluate",
                       "patch_kmeans", "mask_ap", "stage_figure", "all"}
    snakemake(finished_run)
    assert {p: p.stat().st_mtime_ns for p in shards + feats} == before
    assert planned_rules(snakemake(finished_run, "-n")) == set()
    write_config(finished_run, TINY)


def test_invalid_config_value_names_the_key(tmp_path):
    cfg = json.loads(json.dumps(TINY))
    cfg["pseudo_labels"] = {"tau": 1.5}
    write_config(tmp_path, cfg)
    proc = snakemake(tmp_path, "-n", check=False)
    assert proc.returncode != 0
    assert "pseudo_labels.tau" in proc.stdout + proc.stderr


def test_unknown_config_key_names_the_key(tmp_path):
    cfg = json.loads(json.dumps(TINY))
    cfg["mining"]["proposal_ratoi"] = 0.3
    write_config(tmp_path, cfg)
    proc = snakemake(tmp_path, "-n", check=False)
    assert proc.returncode != 0
    assert "mining.proposal_ratoi" in proc.stdout + proc.stderr


def test_workflow_is_lint_clean(tmp_path):
    write_config(tmp_path, TINY)
    proc = snakemake(tmp_path, "--lint", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# The SLURM profile's dry run (GPU rules on GPUs, shards as jobs) is in tests/test_slurm.py.
