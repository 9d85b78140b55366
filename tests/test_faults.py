"""Faults: killed jobs, damaged files, reruns and seeds.

- a training job killed with SIGKILL after its first epoch checkpoint resumes on rerun and ends
  with the same step count (and weights) as an uninterrupted run;
- a mining job killed mid-way leaves no shard file, and Snakemake then reruns only that shard;
- truncated, foreign or incomplete HDF5 shards and checkpoints are refused naming the file;
- two runs of mining -> clustering -> detector -> pseudo-labels give byte-identical label PNGs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from maskdistill.storage import (
    CorruptFileError,
    MaskShardWriter,
    MinedMask,
    atomic_path,
    open_mask_shard,
    read_mask_shard,
)
from maskdistill.training import load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

CFG = {
    "device": "cpu",
    "dataset": {"source": "demo", "num_shards": 2,
                "demo": {"num_train": 8, "num_val": 2, "image_size": 64, "min_objects": 1,
                         "max_objects": 2, "seed": 3}},
    "mining": {"backbone": {"name": "vit_tiny_patch16_224"}, "short_side": 32, "batch_size": 4},
    "clustering": {"backbone": {"name": "vit_tiny_patch16_224"}, "crop_size": 32,
                   "num_clusters": 2, "batch_size": 8},
    "detector": {"backbone": "resnet18", "train_min_size": [64, 64], "test_min_size": 64,
                 "max_size": 96, "fpn_channels": 16, "mask_head_convs": 1, "box_head_dim": 32,
                 "rpn_batch_size_per_image": 16, "roi_batch_size_per_image": 16, "epochs": 1,
                 "batch_size": 2, "warmup_iters": 2, "num_workers": 0, "lr_drop_epochs": [5],
                 "log_every": 1},
}


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(PY).parent}{os.pathsep}{os.environ['PATH']}")


def _cli(*args: str) -> list[str]:
    return [PY, "-m", "maskdistill.cli", "--threads", "1", *args]


def _run(cmd: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """A folder holding the tiny demo under results/demo (stages resolve it from the cwd)."""
    root = tmp_path_factory.mktemp("faults")
    _run(_cli("make-demo", "--config", json.dumps(CFG), "--out", "results/demo"), root)
    return root


# ---------------------------------------------------------------- damaged files


def _one_mask(key: str = "a") -> MinedMask:
    mask = np.zeros((4, 6), bool)
    mask[1:3, 2:5] = True
    return MinedMask(key=key, file_name=f"{key}.png", height=4, width=6, mask=mask, box=[2, 1, 5, 3],
                     patch_mask=np.ones((1, 2), bool), cls_affinity=np.ones((1, 2), np.float32), seed=0)


def _shard(path: Path, n: int = 200) -> Path:
    with MaskShardWriter(path, {"backbone": "test"}) as w:
        for i in range(n):
            w.append(_one_mask(f"k{i}"))
    return path


def test_damaged_mask_shards_are_refused_naming_the_file(tmp_path):
    good = _shard(tmp_path / "good.h5")
    assert len(read_mask_shard(good)) == 200
    raw = good.read_bytes()
    cases = {
        "truncated.h5": raw[: len(raw) // 2],
        "header_only.h5": raw[:100],
        "zero.h5": b"",
        "noise.h5": np.random.default_rng(0).integers(0, 255, 4096, dtype=np.uint8).tobytes(),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    # a shard whose writer never finished: the complete flag is missing
    with h5py.File(tmp_path / "no_flag.h5", "w") as h5:
        h5.attrs["format_version"] = 1
        h5.create_dataset("keys", data=np.array([b"a"]))
    with h5py.File(tmp_path / "flag_false.h5", "w") as h5:
        h5.attrs["format_version"] = 1
        h5.attrs["complete"] = False
    for name in [*cases, "no_flag.h5", "flag_false.h5"]:
        with pytest.raises(CorruptFileError, match=name.replace(".", r"\.")):
            read_mask_shard(tmp_path / name)


def test_damaged_checkpoints_are_refused_naming_the_file(tmp_path):
    state = {"model": {"w": torch.arange(100_000, dtype=torch.float32)}, "epoch": 1, "step": 4}
    save_checkpoint(tmp_path / "last.pt", state)
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 4
    raw = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "zero.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save(state, tmp_path / "no_flag.pt")  # written without save_checkpoint: no complete flag
    for name in ("truncated.pt", "zero.pt", "text.pt", "no_flag.pt"):
        with pytest.raises(CorruptFileError, match=name.replace(".", r"\.")):
            load_checkpoint(tmp_path / name)


def test_a_killed_writer_leaves_only_a_temp_file_that_the_next_write_removes(tmp_path):
    target = tmp_path / "shard-000.h5"
    with pytest.raises(RuntimeError), atomic_path(target, suffix=".tmp.h5") as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    stale = tmp_path / ".shard-000.h5.abc123.tmp.h5"  # what SIGKILL leaves (no cleanup runs)
    stale.write_bytes(b"partial")
    _shard(target, n=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000.h5"]


# ---------------------------------------------------------------- killed jobs


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds (as preemption would)."""
    end = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"job ended before it could be killed:\n{proc.stderr.read()[-4000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("job never reached the point to kill it")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_killed_training_resumes_and_ends_with_the_uninterrupted_step_count(demo_dir):
    cfg = json.loads(json.dumps(CFG))
    cfg["detector"].update(epochs=2, checkpoint_every_epochs=1)
    train_json = "results/demo/train/instances.json"

    def train(tag: str) -> list[str]:
        return _cli("train-detector", "--config", json.dumps(cfg), "--train-json", train_json,
                    "--checkpoint-dir", f"{tag}/checkpoints", "--out", f"{tag}/model.pt")

    _run(train("straight"), demo_dir)
    reference = torch.load(demo_dir / "straight" / "model.pt", weights_only=False)
    assert reference["steps"] == 2 * 4  # 8 images, batch 2, 2 epochs

    last = demo_dir / "killed" / "checkpoints" / "last.pt"
    proc = subprocess.Popen(train("killed"), cwd=demo_dir, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _kill_when(proc, last.is_file)
    assert not (demo_dir / "killed" / "model.pt").exists()
    killed_at = load_checkpoint(last)["epoch"]
    assert killed_at == 1

    rerun = _run(train("killed"), demo_dir)
    assert f"resumed from {last.relative_to(demo_dir)} at epoch {killed_at}" in rerun.stderr
    resumed = torch.load(demo_dir / "killed" / "model.pt", weights_only=False)
    assert resumed["steps"] == reference["steps"]
    assert load_checkpoint(last)["step"] == reference["steps"]
    for name, value in reference["state_dict"].items():
        assert torch.allclose(resumed["state_dict"][name].float(), value.float(), atol=1e-5), name


def _snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [PY, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--configfile",
           str(workdir / "config.yaml"), "--cores", "2", *args]
    return _run(cmd, workdir)


def _job_counts(proc: subprocess.CompletedProcess) -> dict[str, int]:
    counts, table = {}, False
    for line in (proc.stdout + proc.stderr).splitlines():
        parts = line.split()
        if parts[:2] == ["job", "count"]:
            table = True
        elif table and parts and parts[0] == "total":
            break
        elif table and len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    return counts


def test_killed_mining_shard_leaves_no_output_and_only_it_reruns(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(CFG))
    shards = [f"results/masks/train/shard-{i:03d}.h5" for i in (0, 1)]
    _snakemake(tmp_path, *shards)
    before = {s: (tmp_path / s).stat().st_mtime_ns for s in shards}
    victim = tmp_path / shards[1]
    victim.unlink()
    # the same mining command, slowed down so that SIGKILL lands while the shard is being written
    slow = ("import sys, time\nimport maskdistill.storage as s\nappend = s.MaskShardWriter.append\n"
            "s.MaskShardWriter.append = lambda self, item: (append(self, item), time.sleep(1.0))\n"
            "from maskdistill.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    cmd = [PY, "-c", slow, "mine", "--config", json.dumps(CFG), "--split", "train", "--shard", "1",
           "--out", str(victim)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    temps = lambda: list(victim.parent.glob(".shard-001.h5.*.tmp.h5"))  # noqa: E731
    _kill_when(proc, lambda: bool(temps()) and time.sleep(0.5) is None)
    assert not victim.exists()
    (temp,) = temps()
    with pytest.raises(CorruptFileError, match=temp.name.replace(".", r"\.")):
        open_mask_shard(temp)

    assert _job_counts(_snakemake(tmp_path, "-n", *shards)) == {"mine": 1}
    _snakemake(tmp_path, *shards)
    assert len(read_mask_shard(victim)) > 0 and not temps()
    assert all((tmp_path / s).stat().st_mtime_ns == t for s, t in before.items() if s != shards[1])


# ---------------------------------------------------------------- seeds


CHAIN = """
import sys
from maskdistill.cli import main
cfg, out = sys.argv[1], sys.argv[2]
steps = [
    ["mine", "--config", cfg, "--split", "train", "--shard", "0", "--out", f"{out}/m0.h5"],
    ["mine", "--config", cfg, "--split", "train", "--shard", "1", "--out", f"{out}/m1.h5"],
    ["describe", "--config", cfg, "--split", "train", "--masks", f"{out}/m0.h5", "--out", f"{out}/f0.h5"],
    ["describe", "--config", cfg, "--split", "train", "--masks", f"{out}/m1.h5", "--out", f"{out}/f1.h5"],
    ["cluster", "--config", cfg, "--masks-train", f"{out}/m0.h5", f"{out}/m1.h5", "--features-train",
     f"{out}/f0.h5", f"{out}/f1.h5", "--out-train", f"{out}/train.json", "--out-model", f"{out}/km.npz"],
    ["train-detector", "--config", cfg, "--train-json", f"{out}/train.json", "--checkpoint-dir",
     f"{out}/ckpt", "--out", f"{out}/det.pt"],
    ["predict-detector", "--config", cfg, "--model", f"{out}/det.pt", "--split", "train", "--out",
     f"{out}/pred.json"],
    ["paste", "--instances", f"{out}/pred.json", "--tau", "0.9", "--out", f"{out}/pseudo_labels"],
]
for step in steps:
    if main(["--threads", "1", *step]) != 0:
        sys.exit(f"step failed: {step[0]}")
"""


def test_two_runs_give_byte_identical_pseudo_labels(demo_dir):
    outs = []
    for run, hash_seed in (("run_a", "1"), ("run_b", "2")):
        env = dict(_env(), PYTHONHASHSEED=hash_seed)
        proc = subprocess.run([PY, "-c", CHAIN, json.dumps(CFG), run], cwd=demo_dir, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-5000:]
        outs.append(demo_dir / run / "pseudo_labels")
    a = {p.relative_to(outs[0]): p.read_bytes() for p in sorted(outs[0].rglob("*.png"))}
    b = {p.relative_to(outs[1]): p.read_bytes() for p in sorted(outs[1].rglob("*.png"))}
    assert len(a) == 8 and a == b
    clusters = [(demo_dir / run / "train.json").read_bytes() for run in ("run_a", "run_b")]
    assert clusters[0] == clusters[1]
