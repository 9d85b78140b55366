"""The Snakemake workflow on a tiny demo config: completes, reruns only what a change touches."""

from __future__ import annotations

import json
import subprocess

import pytest
import timm
from conftest import TINY, copy_run, planned_rules, run_env, snakemake, snakemake_command, tiny, write_config
from PIL import Image


@pytest.fixture(scope="module")
def finished_run(finished_tiny_run):
    return finished_tiny_run


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


def test_kmeans_change_reruns_clustering_and_after_but_no_mining(finished_run, tmp_path):
    finished_run = copy_run(finished_run, tmp_path / "run")
    shards = sorted((finished_run / "results" / "masks").rglob("*.h5"))
    feats = sorted((finished_run / "results" / "features").rglob("*.h5"))
    before = {p: p.stat().st_mtime_ns for p in shards + feats}
    cfg = json.loads(json.dumps(TINY))
    cfg["clustering"]["seed"] = 7
    write_config(finished_run, cfg)
    planned = planned_rules(snakemake(finished_run, "-n"))
    # patch_kmeans reads clustering.seed too (its K-means); mask_ap and stage_figure follow the detector,
    # the galleries the clusters and the segmentation
    assert planned == {"cluster", "train_detector", "predict_detector", "pseudo_labels",
                       "initial_labels", "train_segmentation", "predict_segmentation", "evaluate",
                       "patch_kmeans", "mask_ap", "stage_figure", "cluster_gallery", "class_gallery", "all"}
    # rerunning the clustering is enough to show that nothing before it is recomputed (the rest of
    # the chain is the planned set above)
    clusters = "results/clusters/kmeans.npz"
    snakemake(finished_run, clusters)
    assert {p: p.stat().st_mtime_ns for p in shards + feats} == before
    assert planned_rules(snakemake(finished_run, "-n", clusters)) == set()
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


# The SLURM profile's dry run (GPU rules on GPUs, shards as jobs) is in tests/test_workflow_slurm.py.


def test_the_galleries_of_clusters_and_classes_are_drawn(finished_run):
    for figure in ("clusters/gallery_train.jpg", "clusters/gallery_val.jpg", "segmentation/gallery_train.jpg",
                   "segmentation/gallery_val.jpg"):
        with Image.open(finished_run / "results" / figure) as im:
            assert im.width > 300 and im.height > 100, figure


def test_segment_images_segments_a_folder_of_new_photos_after_training(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    photos = tmp_path / "new_photos"
    (photos / "sub").mkdir(parents=True)
    sizes = {"a": (50, 40), "sub/b": (33, 61)}
    for key, (w, h) in sizes.items():
        Image.new("RGB", (w, h), (200, 30, 30)).save(photos / f"{key}.png")
    write_config(run, {**TINY, "segment": {"images": str(photos)}})
    planned = planned_rules(snakemake(run, "-n"))
    assert planned == {"segment", "all"}  # nothing else reruns
    snakemake(run)
    out = run / "results" / "segment"
    for key, (w, h) in sizes.items():
        with Image.open(out / "labels" / f"{key}.png") as labels:
            assert labels.size == (w, h)
        with Image.open(out / "overlays" / f"{key}.jpg") as overlay:
            assert overlay.size == (w, h)
    areas = (out / "areas.csv").read_text()
    assert "sub/b" in areas and (out / "areas.md").is_file() and (out / "input_report.json").is_file()
    assert "background" in (out / "areas.md").read_text()  # classes named by the evaluation's matching


def test_hub_weights_are_fetched_up_front_then_the_jobs_load_them_offline(tmp_path):
    # The hub unreachable for the whole run, as on a cluster without internet. An empty cache stops
    # the run in fetch_weights, before any model job, naming the key; once the weights are in the
    # cache, fetch_weights finds them there and the model jobs load them from it.
    from test_weights_cache import CLOSED_PORT, TINY_HUB, put_in_hub_cache

    workdir, cache = tmp_path / "run", tmp_path / "cache"
    workdir.mkdir()
    write_config(workdir, tiny(weights_cache=str(cache),
                               mining={"backbone": {"name": TINY_HUB, "pretrained": True}}))
    target = "results/masks/train/shard-000.h5"

    def run() -> subprocess.CompletedProcess:
        return subprocess.run(snakemake_command(workdir, target), capture_output=True, text=True, timeout=900,
                              env=run_env(HF_ENDPOINT=CLOSED_PORT))

    failed = run()
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0 and "Error in rule fetch_weights" in output
    assert f"config key 'mining.backbone.name': '{TINY_HUB}'" in output and "checkpoint:" in output
    assert "Retrying" not in output and not (workdir / "logs" / "mine").exists()
    state = timm.create_model(TINY_HUB).state_dict()
    file = put_in_hub_cache(cache, f"timm/{TINY_HUB}", "model.safetensors", state)
    done = run()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    manifest = json.loads((workdir / "results" / "weights.json").read_text())
    assert [(w["key"], w["file"]) for w in manifest["weights"]] == [("mining.backbone.name", str(file))]
    log = (workdir / "logs" / "mine" / "train-000.log").read_text()
    assert f"loaded the hub weights of '{TINY_HUB}' from {file}" in log
    (workdir / "results" / "weights.json").touch()  # fetched again (the cache moved, say)
    assert planned_rules(snakemake(workdir, target, "-n")) == set()  # reruns nothing
