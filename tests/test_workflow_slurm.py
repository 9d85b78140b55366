"""The SLURM profile for real: a one-node SLURM cluster with two fake GPUs (.ci/slurm/start.sh) runs
the tiny workflow through profiles/slurm and the executor plugin. Every job goes through sbatch, the
GPU rules are scheduled on a GPU, and the results equal a local run's. The cluster needs root (and
apt-get if SLURM is not installed); elsewhere the test skips, unless MASKDISTILL_REQUIRE_SLURM=1
(set by .ci/run on the CI machine) turns the skip into a failure. The profile's dry run needs no
SLURM at all."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY, planned_jobs, tiny, write_config
from conftest import run_env as base_env

SLURM_DIR = REPO / ".ci" / "slurm"
PROFILE = REPO / "profiles" / "slurm"
CI_PROFILE = REPO / "profiles" / "slurm-ci"
# Hard limit of the SLURM run, killed with SIGKILL (the plugin may ignore SIGTERM when stuck).
RUN_LIMIT_S = int(os.environ.get("MASKDISTILL_SLURM_LIMIT_S", "1200"))
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)\.")
PROLOG = re.compile(r"maskdistill-ci job=(\d+) step=(\S+) partition=(\S+) CUDA_VISIBLE_DEVICES=(\S+)")


# The training rules declare their `gpu` resource themselves, from the config (<section>.gpus).
TRAINING_RULES = {"pretrain", "train_detector", "train_segmentation", "train_segmentation_crf",
                  "linear_probe"}


def gpu_rules() -> set[str]:
    """The rules that run on a GPU: those profiles/slurm gives one (its `gpu` resource) and the
    training rules."""
    resources = yaml.safe_load((PROFILE / "config.yaml").read_text())["set-resources"]
    return {rule for rule, res in resources.items() if res.get("gpu")} | TRAINING_RULES


def unavailable(reason: str) -> None:
    if os.environ.get("MASKDISTILL_REQUIRE_SLURM") == "1":
        pytest.fail(f"MASKDISTILL_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


def run_env(**extra: str) -> dict[str, str]:
    env = base_env(**extra)
    env.pop("CUDA_VISIBLE_DEVICES", None)  # --export=ALL would carry it into the jobs
    return env


@pytest.fixture(scope="module")
def slurm_conf(tmp_path_factory):
    """A running one-node SLURM cluster; its daemons are stopped by PID afterwards."""
    if os.geteuid() != 0:
        unavailable("starting SLURM daemons needs root")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        unavailable("SLURM is not installed and apt-get is not available to install it")
    state = tmp_path_factory.mktemp("slurm")
    try:
        proc = subprocess.run(["bash", str(SLURM_DIR / "start.sh"), str(state)], capture_output=True,
                              text=True, timeout=600)
    except subprocess.TimeoutExpired:
        proc = None
    try:
        if proc is None or proc.returncode != 0:
            unavailable(f"SLURM did not start: {proc.stderr.strip() if proc else 'timed out'}")
        yield state / "slurm.conf"
    finally:
        subprocess.run(["bash", str(SLURM_DIR / "stop.sh"), str(state)], capture_output=True, timeout=120)


# The tiny config without the galleries and diagnostics: every stage of the method still runs as a
# SLURM job, and each DAG level costs about 36 s of status polling (profiles/slurm-ci), so the
# three levels these add are left to the local runs.
SLURM_RUN = tiny(gallery={"enabled": False}, evaluation={"diagnostics": False})


@pytest.fixture(scope="module")
def slurm_run(slurm_conf, tmp_path_factory):
    """The tiny config run through profiles/slurm (+ profiles/slurm-ci) on the test cluster."""
    workdir = tmp_path_factory.mktemp("slurm-run")
    write_config(workdir, SLURM_RUN)
    cmd = ["timeout", "-s", "KILL", str(RUN_LIMIT_S), sys.executable, "-m", "snakemake",
           "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--configfile", str(workdir / "config.yaml"),
           "--profile", str(PROFILE), "--profile", str(CI_PROFILE)]
    # A session of its own: if the test is interrupted, its whole process group goes, by its id.
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=run_env(SLURM_CONF=str(slurm_conf)), start_new_session=True)
    try:
        text, _ = proc.communicate()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    limit = " (137: killed at the time limit)" if proc.returncode == 137 else ""
    assert proc.returncode == 0, f"SLURM run failed, exit {proc.returncode}{limit}:\n{text[-5000:]}"
    return workdir, text


def submissions(text: str) -> dict[int, Path]:
    """SLURM job id -> its log file, from the plugin's "has been submitted" lines."""
    return {int(job): Path(log) for job, log in SUBMITTED.findall(text)}


def test_every_job_went_through_sbatch(slurm_run):
    workdir, text = slurm_run
    jobs = planned_jobs(subprocess.CompletedProcess([], 0, text, ""))
    remote = [j["rule"] for j in jobs if not j["local"] and j["rule"] != "all"]  # `all` runs nothing
    submitted = submissions(text)
    assert len(submitted) == len(remote) > 0
    for job_id, log in submitted.items():
        content = log.read_text()
        rule = log.relative_to(workdir / ".snakemake" / "slurm_logs").parts[0].removeprefix("rule_")
        assert rule in remote, log
        # the task prolog of the test cluster wrote this line: the job ran under SLURM
        assert (f"maskdistill-ci job={job_id} step=batch" in content), log
        assert "1 of 1 steps (100%) done" in content, log
    rules_submitted = sorted(log.relative_to(workdir / ".snakemake" / "slurm_logs").parts[0] for log in
                             submitted.values())
    assert rules_submitted == sorted(f"rule_{rule}" for rule in remote)


def test_gpu_rules_get_a_gpu_on_the_gpu_partition(slurm_run):
    workdir, text = slurm_run
    assert {"mine", "cluster_features", "train_detector", "predict_detector", "train_segmentation",
            "predict_segmentation"} <= gpu_rules()
    seen = set()
    for job_id, log in submissions(text).items():
        rule = log.relative_to(workdir / ".snakemake" / "slurm_logs").parts[0].removeprefix("rule_")
        steps = {step: (part, gpus) for j, step, part, gpus in PROLOG.findall(log.read_text())
                 if int(j) == job_id}
        assert "batch" in steps and len(steps) == 2, f"{log}: {steps}"  # the batch script and its srun
        for step, (partition, gpus) in steps.items():
            if rule in gpu_rules():
                assert partition == "gpu" and gpus in ("0", "1"), f"{rule} {step}: {partition} {gpus}"
            else:
                assert partition == "cpu" and gpus == "none", f"{rule} {step}: {partition} {gpus}"
        seen.add(rule)
    assert gpu_rules() & seen and seen - gpu_rules()


def test_results_equal_a_local_run(slurm_run, finished_tiny_run):
    workdir, _ = slurm_run
    local = finished_tiny_run
    ours, theirs = workdir / "results", local / "results"
    def same_json(rel: str) -> bool:
        return json.loads((ours / rel).read_text()) == json.loads((theirs / rel).read_text())

    # the local run also scored the diagnostics' baseline: every stage of the SLURM run is equal
    metrics = json.loads((ours / "metrics.json").read_text())
    local = json.loads((theirs / "metrics.json").read_text())
    stages = {"initial_masks", "maskrcnn", "segmentation", "mask_ap"}
    assert stages <= set(metrics) and all(metrics[s] == local[s] for s in stages)
    compared = 0
    for folder in ("pseudo_labels", "initial_labels", "segmentation/predictions"):
        files = sorted(p.relative_to(theirs) for p in (theirs / folder).rglob("*.png"))
        assert files and files == sorted(p.relative_to(ours) for p in (ours / folder).rglob("*.png"))
        for rel in files:
            assert (ours / rel).read_bytes() == (theirs / rel).read_bytes(), rel
        compared += len(files)
    for rel in ("clusters/train.json", "clusters/val.json", "detector/predictions_val.json"):
        assert same_json(rel), rel
    assert compared > 10


def profile_dry_run(workdir: Path, cfg: dict) -> subprocess.CompletedProcess:
    """Dry run of ``cfg`` in ``workdir`` through the user's SLURM profile, with no reachable SLURM."""
    write_config(workdir, cfg)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "--profile", str(PROFILE), "-n"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=run_env(SLURM_CONF=str(workdir / "no-such-slurm.conf")))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_slurm_profile_dry_run_needs_no_slurm_and_shards_are_jobs(tmp_path):
    """Dry run of the user's profile with no reachable SLURM: shards are separate GPU jobs."""
    cfg = json.loads(json.dumps(TINY))
    cfg["dataset"]["num_shards"] = 5
    proc = profile_dry_run(tmp_path, cfg)
    text = proc.stdout + proc.stderr
    assert "Using profile" in text and "profiles/slurm" in text
    jobs = planned_jobs(proc)
    for split in ("train", "val"):
        shards = [j for j in jobs if j["rule"] == "mine" and f"split={split}" in j["wildcards"]]
        assert sorted(j["wildcards"] for j in shards) == [f"split={split}, shard={s:03d}" for s in range(5)]
    blocks = re.split(r"\n(?=(?:local)?rule \w+:)", text)
    for block in blocks:
        head = re.match(r"(?:local)?rule (\w+):", block)
        if not head or head.group(1) == "all":
            continue
        resources = re.search(r"resources: (.*)", block).group(1)
        if head.group(1) in gpu_rules():
            assert "gpu=1" in resources and "slurm_partition=gpu" in resources, block
        else:
            assert "gpu=" not in resources and "slurm_partition=cpu" in resources, block
        assert re.search(r"runtime=\d+", resources) and re.search(r"mem_mb=\d+", resources), block


def test_a_training_job_on_several_gpus_asks_for_them_and_starts_torchrun(tmp_path):
    """segmentation.gpus: 2 -> one job with gpu=2 whose command starts two processes."""
    cfg = json.loads(json.dumps(TINY))
    cfg["segmentation"].update(gpus=2, batch_size=2)
    proc = profile_dry_run(tmp_path, cfg)
    blocks = {re.match(r"(?:local)?rule (\w+):", b).group(1): b
              for b in re.split(r"\n(?=(?:local)?rule \w+:)", proc.stdout + proc.stderr)
              if re.match(r"(?:local)?rule (\w+):", b)}
    segmentation, detector = blocks["train_segmentation"], blocks["train_detector"]
    assert "gpu=2" in segmentation and "torchrun --standalone --nproc_per_node 2 --no-python maskdistill" \
        in segmentation, segmentation
    assert "gpu=1" in detector and "torchrun" not in detector and "maskdistill --threads" in detector


def test_slurm_profiles_name_real_rules_and_agree_on_threads():
    text = "\n".join(p.read_text() for p in (REPO / "rules").glob("*.smk"))
    rules = {a or b for a, b in re.findall(r"^\s*(?:rule (\w+):|use rule \w+ as (\w+) with:)", text, re.M)}
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    ci = yaml.safe_load((CI_PROFILE / "config.yaml").read_text())
    assert set(profile["set-resources"]) <= rules, set(profile["set-resources"]) - rules
    assert set(profile["set-threads"]) == gpu_rules() == set(ci["set-threads"])
    for rule in gpu_rules():
        assert profile["set-threads"][rule] == profile["set-resources"][rule]["cpus_per_task"], rule
        assert profile["set-resources"][rule]["slurm_partition"] == "gpu", rule
    for rule in TRAINING_RULES:  # the config's <section>.gpus decides, not the profile
        assert "gpu" not in profile["set-resources"][rule], rule
    assert profile["default-resources"]["slurm_partition"] == "cpu"
    assert profile["retries"] >= 1 and ci["slurm-status-command"] == "squeue"
