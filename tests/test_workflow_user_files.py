"""Nothing a user owns is ever changed or deleted: user files are inputs, never outputs.

Each workflow test hashes every file and folder of the user's trees (images, annotations, the
checkpoint named in the config, VOC / COCO trees) before and after, and fails on any change:
dangling links in train and val folders, an image deleted after planning and before its job, a
job that fails mid-way (a corrupt checkpoint, a killed mine job), ``snakemake --delete-all-output``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, TINY, merged, run_env, snakemake, write_config
from test_datasets import make_coco, make_voc

from maskdistill.backbone import create_vit
from maskdistill.config import ConfigError, check_references, validate_config
from maskdistill.datasets import shard_of
from maskdistill.demo import generate_demo
from maskdistill.plan import image_inputs, images_fingerprint, make_plan, workflow_outputs_outside
from maskdistill.settings import load_settings
from maskdistill.storage import read_json
from maskdistill.training import prepare_checkpoint_dir

SOURCES = ("images", "voc", "coco20k")
VIT = "vit_tiny_patch16_224"


# ---------------------------------------------------------------- what the user owns


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every folder (mode, mtime, entries), file (mode, size, mtime, sha256) and link below ``roots``."""
    out: dict[str, tuple] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            folder = Path(dirpath)
            st = folder.lstat()
            out[str(folder)] = ("dir", st.st_mode, st.st_mtime_ns, tuple(sorted(dirnames + filenames)))
            for name in filenames + [d for d in dirnames if (folder / d).is_symlink()]:
                path = folder / name
                st = path.lstat()
                if path.is_symlink():
                    out[str(path)] = ("link", os.readlink(path), st.st_mtime_ns)
                else:
                    digest = hashlib.sha256(path.read_bytes()).hexdigest()
                    out[str(path)] = ("file", st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


@dataclass
class UserTree:
    """A user's data for one ``dataset.source``: the dataset config, the folders they own, and one
    listed image per split (the ones the tests turn into dangling links or delete)."""

    root: Path
    dataset: dict
    images: dict[str, Path] = field(default_factory=dict)  # split -> a listed image

    @property
    def owned(self) -> Path:
        return self.root / "user"

    def config(self, policy: str, **overrides) -> dict:
        cfg = copy.deepcopy(TINY)
        cfg["dataset"] = dict(copy.deepcopy(self.dataset), on_bad_image=policy)
        checkpoint = str(self.owned / "weights" / "vit_tiny.pth")
        for stage in ("mining", "clustering"):
            cfg[stage]["backbone"] = {"name": VIT, "pretrained": False, "checkpoint": checkpoint}
        for key, value in overrides.items():
            section, name = key.split(".")
            cfg[section][name] = value
        return cfg

    def dangle(self, split: str) -> Path:
        """Replace a listed image of ``split`` by a link whose target has moved away."""
        image = self.images[split]
        moved = self.owned / "moved" / image.name
        moved.parent.mkdir(exist_ok=True)
        image.unlink()
        os.symlink(moved, image)
        return image


def _weights(owned: Path) -> None:
    """The mining/clustering checkpoint a user names in the config (random ViT-Tiny weights)."""
    (owned / "weights").mkdir(parents=True)
    torch.save(create_vit(VIT).state_dict(), owned / "weights" / "vit_tiny.pth")


def make_tree(root: Path, source: str) -> UserTree:
    """A tiny tree of ``source`` under ``root/user`` (the user's) with a run folder ``root/work``."""
    owned = root / "user"
    _weights(owned)
    (root / "work").mkdir()
    if source == "images":
        generate_demo(root / "drawn", load_settings(TINY).dataset.demo)
        shutil.move(root / "drawn" / "train" / "images", owned / "photos" / "train")
        shutil.move(root / "drawn" / "val" / "images", owned / "photos" / "val")
        (owned / "annotations").mkdir()
        shutil.move(root / "drawn" / "val" / "instances.json", owned / "annotations" / "val.json")
        shutil.rmtree(root / "drawn")
        dataset = {"source": "images", "num_shards": 1,
                   "train": {"images": str(owned / "photos" / "train")},
                   "val": {"images": str(owned / "photos" / "val"),
                           "annotations": str(owned / "annotations" / "val.json")}}
        first_val = read_json(owned / "annotations" / "val.json")["images"][0]["file_name"]
        images = {"train": owned / "photos" / "train" / "scene_0000.png",
                  "val": owned / "photos" / "val" / first_val}
    elif source == "voc":
        voc = make_voc(owned)
        dataset = {"source": "voc", "num_shards": 1, "voc": {"root": str(voc), "train_split": "train"}}
        jpegs = voc / "JPEGImages"
        images = {"train": jpegs / "2007_000039.jpg", "val": jpegs / "2008_000002.jpg"}
    else:
        paths = make_coco(owned)
        dataset = {"source": "coco20k", "num_shards": 2, "coco20k": {k: str(v) for k, v in paths.items()}}
        images = {"train": paths["images"] / "COCO_train2014_000000000009.jpg"}
    return UserTree(root, dataset, images)


@pytest.fixture(params=SOURCES)
def tree(request, tmp_path) -> UserTree:
    return make_tree(tmp_path, request.param)


def _run(tree: UserTree, cfg: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    write_config(tree.root / "work", cfg)
    return snakemake(tree.root / "work", *args, check=check)


# ---------------------------------------------------------------- the planner, unit by unit


def test_every_declared_output_must_lie_in_the_results_or_logs_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = [("mine", "results/masks/{split}/shard-{shard}.h5"), ("mine", "logs/mine/{split}.log"),
             ("make_demo", str(tmp_path / "results" / "demo" / "val" / "images" / "a.png")),
             ("make_demo", str(tmp_path / "photos" / "a.png")), ("x", "results/../photos/a.png"),
             ("y", "{folder}/a.png"), ("z", "resultsX/a.png"), ("w", "/data/voc/JPEGImages/a.jpg")]
    assert workflow_outputs_outside(files) == [
        f"rule make_demo: {tmp_path / 'photos' / 'a.png'}", "rule x: results/../photos/a.png",
        "rule y: {folder}/a.png", "rule z: resultsX/a.png", "rule w: /data/voc/JPEGImages/a.jpg"]


def test_a_users_images_are_fingerprinted_not_declared_and_the_demos_are_declared(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    demo = [("a", "results/demo/train/images/a.png")]
    photo = tmp_path / "photos" / "a.png"
    photo.parent.mkdir()
    photo.write_bytes(b"12345")
    user = [("a", str(photo))]
    assert image_inputs(demo) == ["results/demo/train/images/a.png"]
    assert image_inputs(user) == []
    first = images_fingerprint(user)
    assert images_fingerprint(user) == first
    os.utime(photo, ns=(1, 1))  # a touched image reruns what read it
    touched = images_fingerprint(user)
    assert touched != first
    photo.unlink()  # a vanished one too (and mining then says why)
    assert images_fingerprint(user) not in (first, touched)
    assert images_fingerprint(demo) == images_fingerprint([("a", "results/demo/val/images/a.png")])


@pytest.mark.parametrize("source", SOURCES)
def test_dangling_links_stop_the_plan_under_fail_and_stay_listed_under_skip(tmp_path, source):
    tree = make_tree(tmp_path, source)
    links = [tree.dangle(split) for split in tree.images]
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        make_plan(tree.config("fail"))
    assert str(links[0]) in str(err.value)
    if source == "images":
        assert "dangling symlink" in str(err.value) and "dataset.on_bad_image: skip" in str(err.value)
    listed = make_plan(tree.config("skip")).splits
    for split, link in zip(tree.images, links, strict=True):
        assert str(link) in [path for _, path in listed[split]]


def test_config_paths_inside_the_workflows_folders_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results" / "photos").mkdir(parents=True)
    (tmp_path / "results" / "photos" / "a.png").write_bytes(b"x")
    (tmp_path / "mine").symlink_to(tmp_path / "results" / "photos")  # a link into results/ counts
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "w.pth").write_bytes(b"x")
    cfg = validate_config({"dataset": {"source": "images", "train": {"images": "mine"}},
                           "mining": {"backbone": {"name": VIT, "checkpoint": "logs/w.pth"}}})
    with pytest.raises(ConfigError) as err:
        check_references(cfg)
    text = str(err.value)
    assert "'dataset.train.images': mine lies inside the workflow's results/ folder" in text
    assert "'mining.backbone.checkpoint': logs/w.pth lies inside the workflow's logs/ folder" in text


def test_a_checkpoint_folder_without_our_marker_is_never_emptied(tmp_path):
    theirs = tmp_path / "my_models"
    theirs.mkdir()
    (theirs / "keep.pt").write_bytes(b"precious")
    before = snapshot(theirs)
    with pytest.raises(FileExistsError, match="no RUN_ID marker"):
        prepare_checkpoint_dir(theirs, {"a": 1})
    assert snapshot(theirs) == before
    ours = prepare_checkpoint_dir(tmp_path / "ckpt", {"a": 1})
    (ours / "last.pt").write_bytes(b"x")
    prepare_checkpoint_dir(ours, {"a": 2})  # other settings: our own folder starts fresh
    assert not (ours / "last.pt").exists()


# ---------------------------------------------------------------- every rule, every source


_RULE_FILES = """
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings
snakefile, workdir, *configs = sys.argv[1:]
with SnakemakeApi(OutputSettings()) as api:
    settings = ConfigSettings(configfiles=[Path(c) for c in configs])
    wf = api.workflow(ResourceSettings(cores=1), settings, snakefile=Path(snakefile), workdir=Path(workdir))
    files = {r.name: [str(f) for f in [*r.output, *r.log]] for r in wf._workflow.rules}
print("RULE_FILES " + json.dumps(files))
"""


def rule_files(snakefile: Path, workdir: Path, *configs: Path) -> dict[str, list[str]]:
    """Every rule's output and log patterns, read from Snakemake's own parse of the workflow."""
    cmd = [sys.executable, "-c", _RULE_FILES, str(snakefile), str(workdir), *map(str, configs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RULE_FILES "))
    return json.loads(line.removeprefix("RULE_FILES "))


@pytest.mark.parametrize("source", ("demo", *SOURCES))
def test_every_rule_of_every_source_writes_only_below_results_and_logs(tmp_path, source):
    work = tmp_path / "work"
    if source == "demo":
        work.mkdir()
        cfg = copy.deepcopy(TINY)
    else:
        cfg = make_tree(tmp_path, source).config("skip")
    # every optional rule on: pretraining, the CRF round, the probe, diagnostics, mask AP
    cfg["pretrain"] = {"enabled": True, "arch": VIT}
    cfg["crf"] = {"self_training": True}
    cfg["evaluation"] = {"crf": True, "mask_ap": True, "diagnostics": True}
    if source in ("demo", "voc"):
        cfg["linear_probe"] = {"enabled": True}
    write_config(work, cfg)
    files = rule_files(REPO / "Snakefile", work, work / "config.yaml")
    assert "make_demo" in files if source == "demo" else "make_demo" not in files
    assert {"mine", "pretrain", "train_segmentation_crf", "evaluate"} <= set(files)
    for rule, paths in files.items():
        for path in paths:
            resolved = Path(os.path.abspath(work / path))
            assert resolved.is_relative_to(work / "results") or resolved.is_relative_to(work / "logs"), (
                f"{source}: rule {rule} declares {path} outside results/ and logs/")


def test_a_rule_that_names_a_users_file_as_output_stops_the_parse(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    write_config(work, TINY)
    photo = tmp_path / "photos" / "a.png"
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text(f'rule overwrite_photo:\n    output: "{photo}"\n    shell: "touch {{output}}"\n\n'
                         f'include: "{REPO / "Snakefile"}"\n')
    env = run_env()
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(snakefile), "-d", str(work), "-n",
                           "--cores", "1", "--configfile", str(work / "config.yaml")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert f"rule overwrite_photo: {photo}" in proc.stdout + proc.stderr


# ---------------------------------------------------------------- runs that must not touch user files


def test_dangling_links_fail_the_dry_run_naming_them_and_touch_nothing(tree):
    links = [tree.dangle(split) for split in tree.images]
    before = snapshot(tree.owned)
    proc = _run(tree, tree.config("fail"), "-n", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and str(links[0]) in text
    assert not (tree.root / "work" / "results").exists()
    assert snapshot(tree.owned) == before


@pytest.mark.parametrize("source", ("voc", "coco20k"))  # images: the full run below
def test_dangling_links_are_skipped_reported_and_delete_all_output_keeps_user_files(tmp_path, source):
    tree = make_tree(tmp_path, source)
    links = {split: tree.dangle(split) for split in tree.images}
    before = snapshot(tree.owned)
    work = tree.root / "work"
    _run(tree, tree.config("skip"), "results/input_report.json")
    report = read_json(work / "results" / "input_report.json")
    assert sorted((s["split"], s["path"]) for s in report["skipped"]) == sorted(
        (split, str(link)) for split, link in links.items())
    assert all("dangling symlink" in s["reason"] for s in report["skipped"])
    assert snapshot(tree.owned) == before
    _run(tree, tree.config("skip"), "--delete-all-output")
    assert not (work / "results" / "input_report.json").exists()
    assert not list((work / "results" / "masks").rglob("*.h5"))
    assert snapshot(tree.owned) == before


def _when_first_mine_job_runs(proc: subprocess.Popen, work: Path, timeout: float = 300) -> Path:
    """Wait until the first mine job has started (its log exists); return that log."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        logs = list((work / "logs" / "mine").glob("*.log")) if (work / "logs" / "mine").is_dir() else []
        if logs:
            return logs[0]
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before mining:\n{proc.stderr.read()[-4000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("no mine job started")


def _start(tree: UserTree, cfg: dict, *args: str) -> subprocess.Popen:
    work = tree.root / "work"
    write_config(work, cfg)
    env = run_env()
    # one core: jobs run one after the other, so a job that has not started has not read its images
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(work),
           "--configfile", str(work / "config.yaml"), "--cores", "1", *args]
    return subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _split_shard(log: Path) -> tuple[str, int]:
    split, shard = log.stem.split("-")
    return split, int(shard)


@pytest.mark.parametrize("policy", ("skip", "fail"))
def test_an_image_deleted_after_planning_and_before_its_job(tree, policy):
    work = tree.root / "work"
    cfg = tree.config(policy)
    num_shards = cfg["dataset"]["num_shards"]
    proc = _start(tree, cfg, "results/input_report.json")
    running = _split_shard(_when_first_mine_job_runs(proc, work))
    # an image of a shard whose job has not started yet (one core: jobs run one at a time)
    victim = next(Path(path) for split, pairs in make_plan(cfg).splits.items()
                  for key, path in pairs if (split, shard_of(key, num_shards)) != running)
    victim.unlink()
    before = snapshot(tree.owned)
    out, err = proc.communicate(timeout=600)
    assert snapshot(tree.owned) == before
    if policy == "skip":
        assert proc.returncode == 0, err[-4000:]
        report = read_json(work / "results" / "input_report.json")
        assert [(s["path"], s["reason"]) for s in report["skipped"]] == [(str(victim), "file not found")]
    else:
        assert proc.returncode != 0
        mine_logs = "".join(p.read_text() for p in (work / "logs" / "mine").glob("*.log"))
        assert str(victim) in mine_logs and ("file not found" in mine_logs or "missing" in mine_logs)


def test_a_corrupt_checkpoint_fails_the_job_and_touches_nothing(tree):
    weights = tree.owned / "weights" / "vit_tiny.pth"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated, as by an interrupted copy
    before = snapshot(tree.owned)
    proc = _run(tree, tree.config("fail"), check=False)
    assert proc.returncode != 0
    logs = "".join(p.read_text() for p in (tree.root / "work" / "logs").rglob("*.log"))
    assert f"{weights}: cannot read checkpoint" in logs  # the first job that loads it (mine or patch_kmeans)
    assert snapshot(tree.owned) == before


def _mine_processes(work: Path) -> list[int]:
    """PIDs of ``maskdistill ... mine`` processes running in ``work``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            if b"mine" in cmd and any(c.endswith(b"maskdistill") for c in cmd[:2]) and (
                    os.readlink(proc / "cwd") == str(work)):
                pids.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return pids


def test_a_killed_mine_job_fails_the_run_and_touches_nothing(tree):
    work = tree.root / "work"
    before = snapshot(tree.owned)
    proc = _start(tree, tree.config("fail"))
    split, shard = _split_shard(_when_first_mine_job_runs(proc, work))
    end = time.monotonic() + 120
    while not (pids := _mine_processes(work)) and time.monotonic() < end:
        time.sleep(0.02)
    assert pids, "no mine process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)  # as an out-of-memory kill or a node failure would
    out, err = proc.communicate(timeout=600)
    assert proc.returncode != 0
    assert snapshot(tree.owned) == before
    assert not (work / "results" / "masks" / split / f"shard-{shard:03d}.h5").exists()


# ---------------------------------------------------------------- the whole run, as the issue met it


# Every key of the authors' protocol that a tiny run can take (README "Paper settings").
AUTHORS_PROTOCOL = {
    "mining": {"preprocess": "reference"},
    "clustering": {"crop": "native", "center": False, "fit_on": ["train", "val"]},
    "detector": {"architecture": "c4", "batchnorm": "train", "detections_per_image": 100},
    "segmentation": {"transform": "reference", "hard_pixel_count": "batch"},
    "crf": {"unary": "probabilities", "channel_order": "bgr"},
    "evaluation": {"crf": True, "mapping": "masks", "single_object": "reference"},
}


def test_a_full_run_on_photos_with_dangling_links_keeps_every_user_file(tmp_path):
    """A folder of photos with a moved link in train and in val (listed by the annotations), run to
    the end under ``on_bad_image: skip`` with the authors' protocol and an extra folder of the user's
    for K-means, then ``--delete-all-output``: not one user byte changes."""
    tree = make_tree(tmp_path, "images")
    lost = tree.dangle("train")
    gone = tree.owned / "photos" / "val" / "gone.png"  # listed by the val annotations, target moved
    os.symlink(tree.owned / "moved" / "gone.png", gone)
    annotations = Path(tree.dataset["val"]["annotations"])
    coco = read_json(annotations)
    coco["images"].append({"id": 999, "file_name": "gone.png", "height": 64, "width": 64})
    annotations.write_text(json.dumps(coco))
    support = tree.owned / "support"  # clustering.extra_images: mined and described for K-means only
    support.mkdir()
    for name in ("scene_0001.png", "scene_0002.png"):
        shutil.copy(tree.owned / "photos" / "train" / name, support / f"more_{name}")
    moved_away = support / "moved_away.png"  # a dangling link there too: skipped and reported
    os.symlink(tree.owned / "moved" / "moved_away.png", moved_away)
    before = snapshot(tree.owned)
    work = tmp_path / "work"
    cfg = merged(tree.config("skip"), AUTHORS_PROTOCOL)
    cfg["clustering"]["extra_images"] = [str(support)]

    _run(tree, cfg)
    report = read_json(work / "results" / "input_report.json")
    assert sorted((s["split"], s["path"]) for s in report["skipped"]) == sorted(
        [("train", str(lost)), ("val", str(gone)), ("extra0", str(moved_away))])
    metrics = read_json(work / "results" / "metrics.json")
    assert metrics["meta"]["num_images"] == len(coco["images"]) - 1  # the skipped one is not scored
    results = work / "results"
    assert (results / "features" / "extra0" / "shard-000.h5").is_file()  # K-means saw the folder ...
    assert not (results / "pseudo_labels" / "extra0").exists()  # ... and nothing else did
    val_keys = {p.stem for p in (results / "segmentation" / "predictions" / "val").glob("*.png")}
    logits = {p.stem for p in (results / "segmentation" / "logits" / "val").glob("*.npz")}
    assert val_keys and logits == val_keys
    assert "segmentation+crf" in metrics  # refined from the stored logits' probabilities
    assert set(metrics["segmentation"]["by_mapping"]) == {"pixels", "masks"}
    assert read_json(results / "mask_ap.json")["single"]["single_object"] == "reference"
    assert snapshot(tree.owned) == before

    _run(tree, cfg, "--delete-all-output")
    assert not (work / "results" / "metrics.json").exists()
    assert snapshot(tree.owned) == before
    assert yaml.safe_load((work / "config.yaml").read_text())["dataset"]["on_bad_image"] == "skip"
