"""Faults of workflow runs: a mining job killed mid-way leaves no shard file and only that shard
reruns; two runs of mining -> clustering -> detector -> pseudo-labels give byte-identical label PNGs."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import yaml
from conftest import PY, SMALL, job_counts, kill_when, run_env, snakemake

from maskdistill.storage import CorruptFileError, open_mask_shard, read_mask_shard


def test_killed_mining_shard_leaves_no_output_and_only_it_reruns(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(SMALL))
    shards = [f"results/masks/train/shard-{i:03d}.h5" for i in (0, 1)]
    snakemake(tmp_path, *shards)
    before = {s: (tmp_path / s).stat().st_mtime_ns for s in shards}
    victim = tmp_path / shards[1]
    victim.unlink()
    # the same mining command, slowed down so that SIGKILL lands while the shard is being written
    slow = ("import sys, time\nimport maskdistill.storage as s\nappend = s.MaskShardWriter.append\n"
            "s.MaskShardWriter.append = lambda self, item, **k: (append(self, item, **k), time.sleep(1))\n"
            "from maskdistill.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    cmd = [PY, "-c", slow, "mine", "--config", json.dumps(SMALL), "--split", "train", "--shard", "1",
           "--out", str(victim)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=run_env(OMP_NUM_THREADS="1"), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    temps = lambda: list(victim.parent.glob(".shard-001.h5.*.tmp.h5"))  # noqa: E731
    kill_when(proc, lambda: bool(temps()) and time.sleep(0.5) is None)
    assert not victim.exists()
    (temp,) = temps()
    with pytest.raises(CorruptFileError, match=temp.name.replace(".", r"\.")):
        open_mask_shard(temp)

    assert job_counts(snakemake(tmp_path, "-n", *shards)) == {"mine": 1}
    snakemake(tmp_path, *shards)
    assert len(read_mask_shard(victim)) > 0 and not temps()
    assert all((tmp_path / s).stat().st_mtime_ns == t for s, t in before.items() if s != shards[1])


CHAIN = """
import sys
from maskdistill.cli import main
cfg, out = sys.argv[1], sys.argv[2]
steps = [
    ["mine", "--config", cfg, "--split", "train", "--shard", "0", "--out", f"{out}/m0.h5"],
    ["mine", "--config", cfg, "--split", "train", "--shard", "1", "--out", f"{out}/m1.h5"],
    ["cluster-features", "--config", cfg, "--split", "train", "--masks", f"{out}/m0.h5", "--out",
     f"{out}/f0.h5"],
    ["cluster-features", "--config", cfg, "--split", "train", "--masks", f"{out}/m1.h5", "--out",
     f"{out}/f1.h5"],
    ["cluster", "--config", cfg, "--masks-train", f"{out}/m0.h5", f"{out}/m1.h5", "--features-train",
     f"{out}/f0.h5", f"{out}/f1.h5", "--out-train", f"{out}/train.json", "--out-model", f"{out}/km.npz"],
    ["train-detector", "--config", cfg, "--train-json", f"{out}/train.json", "--checkpoint-dir",
     f"{out}/ckpt", "--out", f"{out}/det.pt"],
    ["predict-detector", "--config", cfg, "--model", f"{out}/det.pt", "--split", "train", "--out",
     f"{out}/pred.json"],
    ["pseudo-labels", "--config", cfg, "--instances", f"{out}/pred.json", "--out", f"{out}/pseudo_labels"],
]
for step in steps:
    if main(["--threads", "1", *step]) != 0:
        sys.exit(f"step failed: {step[0]}")
"""


def test_two_runs_give_byte_identical_pseudo_labels(small_demo_dir):
    outs = []
    for run, hash_seed in (("run_a", "1"), ("run_b", "2")):
        env = dict(run_env(OMP_NUM_THREADS="1"), PYTHONHASHSEED=hash_seed)
        proc = subprocess.run([PY, "-c", CHAIN, json.dumps(SMALL), run], cwd=small_demo_dir, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-5000:]
        outs.append(small_demo_dir / run / "pseudo_labels")
    a = {p.relative_to(outs[0]): p.read_bytes() for p in sorted(outs[0].rglob("*.png"))}
    b = {p.relative_to(outs[1]): p.read_bytes() for p in sorted(outs[1].rglob("*.png"))}
    assert len(a) == 8 and a == b
    clusters = [(small_demo_dir / run / "train.json").read_bytes() for run in ("run_a", "run_b")]
    assert clusters[0] == clusters[1]
