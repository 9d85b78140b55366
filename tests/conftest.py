"""What the tests share: the tiny workflow config, the Snakemake runner and readers of its output.

``TINY`` is a demo config small enough for a full run in about a minute on two CPU cores (random
ViT-Tiny, ResNet-18 detector and DeepLab-v3, one epoch each); :func:`tiny` derives variants of it.
The session fixture ``finished_tiny_run`` runs it once; tests that change its files work on a
copy (:func:`copy_run`).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

TINY: dict[str, Any] = {
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


def tiny(**sections: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``TINY`` with ``sections`` merged in key by key (nested dicts merge too)."""
    return merged(TINY, sections)


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base`` key by key, as Snakemake merges ``--configfile``s."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out


def with_change(cfg: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of ``cfg`` with the dotted key set to ``value``."""
    out = copy.deepcopy(cfg)
    *path, last = dotted.split(".")
    node = out
    for key in path:
        node = node.setdefault(key, {})
    node[last] = value
    return out


def write_config(workdir: Path, cfg: dict[str, Any]) -> None:
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg))


def run_env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess: this interpreter's bin folder first (for ``maskdistill``)."""
    return dict(os.environ, PATH=f"{Path(PY).parent}{os.pathsep}{os.environ['PATH']}", **extra)


def snakemake_command(workdir: Path, *args: str, cores: int = 2) -> list[str]:
    return [PY, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--configfile",
            str(workdir / "config.yaml"), "--cores", str(cores), *args]


def snakemake(workdir: Path, *args: str, check: bool = True, cores: int = 2) -> subprocess.CompletedProcess:
    """Run the workflow in ``workdir`` (its config.yaml); fail the test with the logs unless ``check``
    is off."""
    proc = subprocess.run(snakemake_command(workdir, *args, cores=cores), capture_output=True, text=True,
                          env=run_env(), timeout=1200)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def planned_rules(proc: subprocess.CompletedProcess) -> set[str]:
    """Rule names of the jobs a dry run would execute (from its job-stats table)."""
    return set(job_counts(proc))


def job_counts(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """Rule -> number of jobs, from a dry run's job-stats table (empty when nothing is to be done)."""
    counts: dict[str, int] = {}
    table = False
    for line in (proc.stdout + proc.stderr).splitlines():
        parts = line.split()
        if parts[:2] == ["job", "count"]:
            table = True
        elif table and (not parts or parts[0] == "total"):
            break
        elif table and len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    return counts


def planned_jobs(proc: subprocess.CompletedProcess) -> list[dict[str, str]]:
    """Jobs of a dry run (or of a run's log): rule, wildcards (as text), reason, local or not."""
    jobs: list[dict[str, str]] = []
    for line in (proc.stdout + proc.stderr).splitlines():
        head = re.match(r"^(local)?rule (\w+):$", line)
        if head:
            jobs.append({"rule": head.group(2), "wildcards": "", "reason": "", "local": head.group(1) or ""})
        elif jobs and line.startswith("    ") and ": " in line:
            field, _, value = line.strip().partition(": ")
            if field in ("wildcards", "reason"):
                jobs[-1][field] = value
    return jobs


def wildcard(job: dict[str, str], name: str) -> str:
    return dict(w.split("=", 1) for w in job["wildcards"].split(", ") if w)[name]


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a finished run's working directory (times kept, so it is as up to date)."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.fixture(autouse=True)
def torch_threads_restored():
    """Every test starts at the session's torch thread count, whatever the test before it set:
    float32 results follow the thread count (sums split in other orders), so a test's numbers must
    not depend on which tests ran before it."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def finished_tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished local run of ``TINY`` for the whole session. Tests read it and may dry-run other
    configs in it (restoring config.yaml); a test that reruns a job works on a :func:`copy_run`."""
    workdir = tmp_path_factory.mktemp("tiny-run")
    write_config(workdir, TINY)
    snakemake(workdir)
    return workdir


# ---------------------------------------------------------------- the command line, and killing it

# The 8-image demo that the fault tests drive through the command line.
SMALL = tiny(dataset={"demo": {"num_train": 8, "num_val": 2, "seed": 3}}, mining={"short_side": 32},
             clustering={"num_clusters": 2},
             detector={"fpn_channels": 16, "box_head_dim": 32, "rpn_batch_size_per_image": 16,
                       "roi_batch_size_per_image": 16, "log_every": 1})


def cli_command(*args: str) -> list[str]:
    """``maskdistill --threads 1 ARGS`` as a command for subprocess."""
    return [PY, "-m", "maskdistill.cli", "--threads", "1", *args]


def run_checked(cmd: list[str], cwd: Path, **kw: Any) -> subprocess.CompletedProcess:
    """Run ``cmd`` (one thread) in ``cwd``; fail the test with its output when it fails."""
    proc = subprocess.run(cmd, cwd=cwd, env=run_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600, **kw)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
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


@pytest.fixture(scope="session")
def small_demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the ``SMALL`` demo under results/demo (commands resolve it from the cwd)."""
    root = tmp_path_factory.mktemp("small-demo")
    run_checked(cli_command("make-demo", "--config", json.dumps(SMALL), "--out", "results/demo"), root)
    return root
