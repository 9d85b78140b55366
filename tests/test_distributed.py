"""Several processes per training job: two processes (torchrun, gloo on the CPU) reach the weights
of one process with the same global batch, for the segmentation model, the detector and the linear
probe; the hardest pixels are those of the whole batch; a killed two-process job resumes; batches
the processes cannot share equally are refused naming the config key."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import PY, SMALL, merged, run_env
from distributed_worker import hard_pixel_case, run_jobs

from maskdistill import distributed
from maskdistill.config import ConfigError
from maskdistill.detector import build_model
from maskdistill.distributed import World
from maskdistill.linear_probe import build_probe
from maskdistill.plan import launch_command
from maskdistill.pseudo_labels import write_label_maps
from maskdistill.segmentation import hard_pixel_cross_entropy, model_from_settings
from maskdistill.settings import load_settings
from maskdistill.storage import read_json
from maskdistill.training import load_checkpoint, seed_everything

TORCHRUN = str(Path(PY).parent / "torchrun")
TRAIN_JSON = "results/demo/train/instances.json"
# 8 demo images, global batches of 4: each of two processes takes 2 images of every batch. The
# detector samples 4 proposals per image (1 positive: its own box), so every image weighs the same
# in each loss; the segmentation model's ASPP dropout is off (tests/distributed_worker.py).
CFG = merged(SMALL, {
    "segmentation": {"batch_size": 4, "crop_size": 32, "epochs": 1, "lr": 0.02, "hard_pixel_fraction": 1.0},
    "detector": {"batch_size": 4, "epochs": 2, "rpn_batch_size_per_image": 16, "roi_batch_size_per_image": 4},
    "linear_probe": {"batch_size": 4, "crop_size": 32, "epochs": 1, "num_workers": 0},
})


def _jobs(out: Path, labels: Path, num_classes: int, probe_on: Path) -> list[dict]:
    return [
        {"stage": "segmentation", "labels": str(labels), "num_classes": num_classes,
         "out": str(out / "segmentation.pt"), "checkpoints": str(out / "segmentation")},
        {"stage": "detector", "train_json": TRAIN_JSON, "out": str(out / "detector.pt"),
         "checkpoints": str(out / "detector")},
        {"stage": "linear_probe", "model": str(probe_on), "labels": str(labels), "num_classes": num_classes,
         "out": str(out / "linear_probe.pt"), "checkpoints": str(out / "linear_probe")},
    ]


def _torchrun(*args: str) -> list[str]:
    return [TORCHRUN, "--standalone", "--nproc_per_node", "2", *args]


@pytest.fixture(scope="module")
def runs(small_demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same jobs trained by one process (here) and by two (torchrun)."""
    root = tmp_path_factory.mktemp("distributed")
    instances = read_json(small_demo_dir / TRAIN_JSON)
    write_label_maps(instances, root / "labels", 0.0)
    num_classes = max(int(c["id"]) for c in instances["categories"]) + 1
    one, two = root / "one", root / "two"
    cwd, threads = Path.cwd(), torch.get_num_threads()
    os.chdir(small_demo_dir)  # the demo's images are found from the working directory
    torch.set_num_threads(1)  # as each of the two processes (other thread counts sum in other orders)
    try:
        run_jobs({"config": CFG, "jobs": _jobs(one, root / "labels", num_classes, one / "segmentation.pt")})
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    spec = root / "spec.json"
    jobs = [*_jobs(two, root / "labels", num_classes, one / "segmentation.pt"),
            {"stage": "hard_pixels", "out": str(root / "hard_pixels")}]
    spec.write_text(json.dumps({"config": CFG, "jobs": jobs}))
    proc = subprocess.run(_torchrun(str(Path(__file__).parent / "distributed_worker.py"), str(spec)),
                          cwd=small_demo_dir, env=run_env(OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "distributed: 2 processes (gloo)" in proc.stderr
    return {"one": one, "two": two, "root": root, "log": proc.stderr, "num_classes": num_classes}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in torch.load(path, weights_only=False)["state_dict"].items()
            if v.is_floating_point()}


def _float_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def _largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# One process and two sum the same gradients and BatchNorm statistics of each global batch in other
# orders, so float32 rounding (2^-24 relative, amplified a little by each step) is all that may part
# them: their distance is measured against how far training moved the weights. Any fault in sharing
# moves them apart by a large part of that distance (measured on the segmentation model: a doubled
# learning rate 9.5 %, each process stepping on its own half batch 86 %). 1 % lies two orders above
# rounding on every kernel tried (below 1e-6 of the distance with ATEN_CPU_CAPABILITY default, avx2
# and avx512) and an order below the smallest fault.
APART_OF_MOVED = 1e-2


def _apart_of_moved(one: dict[str, torch.Tensor], two: dict[str, torch.Tensor],
                    start: dict[str, torch.Tensor]) -> float:
    """The largest one-vs-two difference as a share of the largest distance ``one`` moved from
    ``start`` (which must be real movement, not rounding)."""
    moved = _largest_difference(one, start)
    assert moved > 1e-2  # the steps changed the weights (BatchNorm statistics of the global batch too)
    return _largest_difference(one, two) / moved


@pytest.mark.numeric
def test_two_processes_train_the_segmentation_model_one_process_trains(runs):
    one, two = _weights(runs["one"] / "segmentation.pt"), _weights(runs["two"] / "segmentation.pt")
    s = load_settings(CFG)
    seed_everything(s.segmentation.seed)
    start = _float_state(model_from_settings(s.segmentation, runs["num_classes"], False))
    assert _apart_of_moved(one, two, start) < APART_OF_MOVED


@pytest.mark.numeric
def test_two_processes_train_the_detector_one_process_trains(runs):
    one, two = _weights(runs["one"] / "detector.pt"), _weights(runs["two"] / "detector.pt")
    assert torch.load(runs["two"] / "detector.pt", weights_only=False)["steps"] == 4  # 2 epochs of 2 batches
    s = load_settings(CFG)
    seed_everything(s.detector.seed)  # as the detector's training starts
    start = _float_state(build_model(s.detector, runs["num_classes"]))
    assert _apart_of_moved(one, two, start) < APART_OF_MOVED


@pytest.mark.numeric
def test_two_processes_train_the_linear_probe_one_process_trains(runs):
    one, two = _weights(runs["one"] / "linear_probe.pt"), _weights(runs["two"] / "linear_probe.pt")
    s = load_settings(CFG)
    seed_everything(s.linear_probe.seed)  # as the probe's training starts
    probe = build_probe(runs["one"] / "segmentation.pt", runs["num_classes"], torch.device("cpu"),
                        s.linear_probe)
    assert _apart_of_moved(one, two, _float_state(probe.classifier)) < APART_OF_MOVED


def test_only_rank_0_writes_and_every_file_is_complete(runs):
    for name in ("segmentation", "detector", "linear_probe"):
        assert load_checkpoint(runs["two"] / name / "last.pt")["epoch"] >= 1
        assert len(load_checkpoint(runs["two"] / name / "last.pt")["rng_ranks"]) == 2
    assert runs["log"].count("detector: wrote") == 1  # rank 0 logs; the other process warns only


def test_the_hardest_pixels_are_those_of_the_whole_batch(runs):
    logits, target = hard_pixel_case()
    whole = logits.clone().requires_grad_()
    value = hard_pixel_cross_entropy(whole, target, 0.2)
    value.backward()
    shares = [torch.load(runs["root"] / f"hard_pixels.{r}", weights_only=False) for r in range(2)]
    assert sum(v for v, _ in shares) == pytest.approx(value.item(), rel=1e-12)
    assert torch.allclose(torch.cat([g for _, g in shares]), whole.grad, atol=1e-15)
    k = int(0.2 * (target != 255).sum())
    assert (whole.grad != 0).any(dim=1).sum() == k  # exactly the k hardest pixels of the batch count


# ---------------------------------------------------------------- a killed two-process job


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_a_killed_two_process_job_resumes_to_the_uninterrupted_weights(runs, small_demo_dir):
    """The command line under torchrun, killed (every process, as preemption does) after the first
    epoch's checkpoint, then run again: it resumes and ends with the weights of the job that ran
    through (the worker's two-process detector: same settings and steps)."""
    out = runs["root"] / "killed"
    cmd = _torchrun("--no-python", "maskdistill", "--threads", "2", "train-detector",
                    "--config", json.dumps(CFG), "--train-json", TRAIN_JSON,
                    "--checkpoint-dir", str(out / "checkpoints"), "--out", str(out / "model.pt"))
    last = out / "checkpoints" / "last.pt"
    out.mkdir(parents=True)
    with open(out / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=small_demo_dir, env=run_env(OMP_NUM_THREADS="1"), stdout=log,
                                stderr=log)
    end = time.monotonic() + 300
    while not last.is_file():
        assert proc.poll() is None, (out / "killed.log").read_text()[-4000:]
        assert time.monotonic() < end, "no checkpoint in 300 s"
        time.sleep(0.02)
    for pid in [*_descendants(proc.pid), proc.pid]:
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (out / "model.pt").exists() and load_checkpoint(last)["epoch"] == 1

    rerun = subprocess.run(cmd, cwd=small_demo_dir, env=run_env(OMP_NUM_THREADS="1"), capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-6000:]
    assert "resumed from" in rerun.stderr and "at epoch 1/2" in rerun.stderr
    assert _largest_difference(_weights(out / "model.pt"), _weights(runs["two"] / "detector.pt")) < 1e-6


# ---------------------------------------------------------------- shares and settings


def test_a_batch_the_processes_cannot_share_equally_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"'segmentation.batch_size': a batch of 6 .* over 4 processes"):
        distributed.check_batch_size(6, "segmentation.batch_size", World(rank=1, world_size=4))
    distributed.check_batch_size(8, "segmentation.batch_size", World(rank=1, world_size=4))
    with pytest.raises(ConfigError, match=r"'detector.batch_size': 6 does not split .* detector.gpus=4"):
        load_settings({"detector": {"batch_size": 6, "gpus": 4}})


def test_each_process_takes_its_share_and_partial_batches_too_small_to_share_are_left_out():
    batches = [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    ranks = [distributed.shared_batches(batches, World(r, 2)) for r in range(2)]
    assert [share for _, share, _ in ranks[0]] == [[0, 1], [4, 5]]
    assert [share for _, share, _ in ranks[1]] == [[2, 3], [6, 7]]
    assert [(i, f) for i, _, f in ranks[1]] == [(0, 0.5), (1, 0.5)]
    uneven = distributed.shared_batches([[0, 1, 2]], World(1, 2))
    assert uneven == [(0, [1, 2], 2 / 3)]
    alone = distributed.shared_batches(batches)
    assert alone == [(0, [0, 1, 2, 3], 1.0), (1, [4, 5, 6, 7], 1.0), (2, [8], 1.0)]


def test_torchrun_variables_make_the_world_and_their_absence_one_process():
    assert distributed.world_from_env({}) == World()
    assert distributed.world_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == World(3, 4, 1)
    with pytest.raises(RuntimeError, match="RANK=4 outside 0..3"):
        distributed.world_from_env({"WORLD_SIZE": "4", "RANK": "4"})


def test_a_rule_starts_one_process_per_gpu_with_torchrun():
    assert launch_command(1) == "maskdistill"
    assert launch_command(4) == "torchrun --standalone --nproc_per_node 4 --no-python maskdistill"


def test_the_gpu_count_of_each_training_job_is_a_setting():
    s = load_settings({"detector": {"gpus": 2, "batch_size": 8}, "pretrain": {"gpus": 8, "batch_size": 64}})
    assert (s.detector.gpus, s.pretrain.gpus, s.segmentation.gpus, s.linear_probe.gpus) == (2, 8, 1, 1)
    with pytest.raises(ConfigError, match="segmentation.gpus"):
        load_settings({"segmentation": {"gpus": 0}})

