"""Reruns follow the config and the data: a change reruns the rules it touches and what follows them,
nothing upstream; new images rerun only the shards that receive them. Also: every config plans."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
from conftest import (
    REPO,
    TINY,
    planned_jobs,
    planned_rules,
    run_env,
    snakemake,
    wildcard,
    with_change,
    write_config,
)

from maskdistill.datasets import shard_of
from maskdistill.demo import generate_demo
from maskdistill.settings import load_settings


def rule_graph(workdir: Path) -> dict[str, set[str]]:
    """Rule -> the rules that read its outputs, from ``snakemake --rulegraph``."""
    text = snakemake(workdir, "--rulegraph").stdout
    names = dict(re.findall(r'^\s*(\d+)\[label = "(\w+)"', text, re.M))
    graph: dict[str, set[str]] = {name: set() for name in names.values()}
    for src, dst in re.findall(r"^\s*(\d+) -> (\d+)", text, re.M):
        graph[names[src]].add(names[dst])
    return graph


def downstream(graph: dict[str, set[str]], roots: set[str]) -> set[str]:
    """``roots`` and every rule that depends on them, directly or not."""
    seen, todo = set(roots), list(roots)
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


BEFORE_CLUSTER = {"make_demo", "mine", "cluster_features"}
BEFORE_PSEUDO = BEFORE_CLUSTER | {"cluster", "initial_labels", "train_detector", "predict_detector"}
# key, new value, rules that must rerun for their params (Snakemake names params as the reason only
# where no input changed too), rules that must not rerun (all upstream)
CHANGES = [
    ("mining.mass", 0.4, {"mine"}, {"make_demo"}),
    ("clustering.num_clusters", 4, {"cluster"}, BEFORE_CLUSTER),
    ("pseudo_labels.tau", 0.5, {"pseudo_labels"}, BEFORE_PSEUDO),
    ("segmentation.lr", 0.003, {"train_segmentation"}, BEFORE_PSEUDO | {"pseudo_labels"}),
]


@pytest.fixture(scope="module")
def tiny_run(finished_tiny_run):
    workdir = finished_tiny_run
    assert planned_rules(snakemake(workdir, "-n")) == set(), "the finished run is not up to date"
    return workdir, rule_graph(workdir)


@pytest.mark.parametrize("key, value, readers, upstream", CHANGES, ids=[c[0] for c in CHANGES])
def test_config_change_reruns_its_readers_and_what_follows_only(tiny_run, key, value, readers, upstream):
    workdir, graph = tiny_run
    write_config(workdir, with_change(TINY, key, value))
    try:
        jobs = planned_jobs(snakemake(workdir, "-n"))
    finally:
        write_config(workdir, TINY)
    planned = {job["rule"] for job in jobs}
    changed = {job["rule"] for job in jobs if "Params have changed" in job["reason"]}
    assert readers <= changed, f"{key}: {readers - changed} not rerun for their params"
    assert planned == downstream(graph, changed), f"{key}: plan is not the readers plus what follows"
    assert not planned & upstream, f"{key} reruns upstream rules {planned & upstream}"
    if key == "mining.mass":  # every shard of every split
        mined = sorted((wildcard(j, "split"), wildcard(j, "shard")) for j in jobs if j["rule"] == "mine")
        shards = [f"{s:03d}" for s in range(TINY["dataset"]["num_shards"])]
        assert mined == [(split, s) for split in ("train", "val") for s in shards]
    if key == "pseudo_labels.tau":
        assert {wildcard(j, "split") for j in jobs if j["rule"] == "pseudo_labels"} == {"train", "val"}
        assert "train_segmentation" in planned and "evaluate" in planned


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A run on a folder of images (dataset.source: images), finished up to the clustering."""
    root = tmp_path_factory.mktemp("images-run")
    generate_demo(root / "data", load_settings(TINY).dataset.demo)
    cfg = copy.deepcopy(TINY)
    cfg["dataset"] = {"source": "images", "num_shards": 2,
                      "train": {"images": str(root / "data" / "train" / "images")}}
    write_config(root, cfg)
    snakemake(root, "--until", "cluster")
    return root


def test_adding_an_image_reruns_only_its_shard_and_the_global_steps(image_run):
    images = image_run / "data" / "train" / "images"
    results = image_run / "results"
    num_shards = 2
    key = "added_0000"
    target = f"{shard_of(key, num_shards):03d}"
    others = [f"{s:03d}" for s in range(num_shards) if f"{s:03d}" != target]
    kept = [results / kind / "train" / f"shard-{s}.h5" for kind in ("masks", "features") for s in others]
    before = {p: p.stat().st_mtime_ns for p in kept}
    with h5py.File(results / "masks" / "train" / f"shard-{others[0]}.h5") as f:
        assert len(f["keys"]) > 0  # the untouched shard is not trivially empty

    shutil.copy(image_run / "data" / "val" / "images" / "scene_0000.png", images / f"{key}.png")
    jobs = planned_jobs(snakemake(image_run, "-n"))
    for rule in ("mine", "cluster_features"):
        assert [wildcard(j, "shard") for j in jobs if j["rule"] == rule] == [target], rule
    assert {"cluster", "train_detector", "predict_detector", "pseudo_labels"} <= {j["rule"] for j in jobs}

    snakemake(image_run, "--until", "cluster")
    assert {p: p.stat().st_mtime_ns for p in kept} == before, "an untouched shard was rewritten"
    with h5py.File(results / "masks" / "train" / f"shard-{target}.h5") as f:
        assert key in [k.decode() if isinstance(k, bytes) else k for k in f["keys"][()]]
    assert planned_rules(snakemake(image_run, "-n", "--until", "cluster")) == set()


def every_config() -> list[Path]:
    return [REPO / "config.yaml", *sorted((REPO / "configs").glob("*.yaml"))]


def missing_data(config: Path) -> list[str]:
    """Dataset paths of a config that do not exist (configs for real datasets need the data)."""
    import yaml

    from maskdistill.settings import as_config

    ds = as_config(load_settings(yaml.safe_load(config.read_text())).dataset)
    if ds["source"] == "demo":
        return []
    section = ds["train"] if ds["source"] == "images" else ds[ds["source"]]
    paths = [v for k, v in section.items() if isinstance(v, str) and k in ("images", "root", "filenames",
                                                                              "annotations", "train_list")]
    return [p for p in paths if not (REPO / p).exists()]


@pytest.mark.parametrize("config", every_config(), ids=lambda p: p.name)
def test_dry_run_rulegraph_and_dag_work_on_every_config(config, tmp_path):
    absent = missing_data(config)
    if absent:
        pytest.skip(f"{config.name}: dataset not present here ({', '.join(absent)})")
    # Dataset paths in configs/*.yaml are relative to the repository, where users run them.
    workdir = tmp_path if config.name == "config.yaml" else REPO
    for args in (["-n"], ["--rulegraph"], ["--dag"]):
        proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d",
                               str(workdir), "--configfile", str(config), "--cores", "1", "--nolock", *args],
                              capture_output=True, text=True, env=run_env(), timeout=600)
        assert proc.returncode == 0, f"{config.name} {args}: {proc.stderr[-3000:]}"
        if args != ["-n"]:
            assert proc.stdout.lstrip().startswith("digraph"), args
            assert '"all"' in proc.stdout
        if args == ["--rulegraph"] and config.name == "config.yaml":
            shown = set(re.findall(r"<text[^>]*>(\w+)</text>", (REPO / "docs" / "rulegraph.svg").read_text()))
            rules = set(re.findall(r'label = "(\w+)"', proc.stdout))
            assert shown == rules, ("docs/rulegraph.svg is out of date; regenerate it with: uv run snakemake"
                                    " --rulegraph | dot -Tsvg > docs/rulegraph.svg")
