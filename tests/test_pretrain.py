"""DINO pretraining: loss, centring, EMA, schedules, multi-crop, resumable training, export."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from maskdistill import pretrain as P
from maskdistill.backbone import create_vit
from maskdistill.images import ImageRecord
from maskdistill.settings import section_settings

TINY = {"arch": "vit_demo_patch8_128", "epochs": 2, "batch_size": 2, "lr": 0.001, "min_lr": 0.0,
        "warmup_epochs": 1, "out_dim": 32, "head_hidden_dim": 16, "head_bottleneck_dim": 8,
        "global_crop_size": 32, "local_crop_size": 16, "local_crops": 2, "num_workers": 0,
        "log_every": 1, "seed": 3}
TINY_SETTINGS = section_settings("pretrain", TINY)


def test_loss_of_uniform_teacher_and_flat_student_is_log_dim():
    dim, batch, crops = 16, 3, 4
    loss_fn = P.DinoLoss(dim, crops, student_temp=0.1, center_momentum=0.9)
    student = torch.zeros(crops * batch, dim)
    teacher = torch.full((2 * batch, dim), 5.0)
    loss = loss_fn(student, teacher, teacher_temp=0.04)
    assert loss.item() == pytest.approx(math.log(dim), rel=1e-6)
    # the centre moved 10% of the way to the teacher's batch mean
    assert torch.allclose(loss_fn.center, torch.full((1, dim), 0.5))


def test_loss_is_lower_when_student_agrees_with_the_sharpened_teacher():
    torch.manual_seed(0)
    dim, batch = 8, 4
    teacher = torch.randn(2 * batch, dim)
    agree = torch.cat([teacher, teacher, teacher[:batch]]) * 10  # 5 crops, same argmax
    disagree = -agree
    low = P.DinoLoss(dim, 5)(agree, teacher, 0.04)
    high = P.DinoLoss(dim, 5)(disagree, teacher, 0.04)
    assert low < high


def test_loss_skips_the_pairs_of_a_view_with_itself():
    dim = 4
    loss_fn = P.DinoLoss(dim, 2, student_temp=1.0, center_momentum=1.0)
    teacher = torch.tensor([[10.0, 0, 0, 0], [0, 10.0, 0, 0]])
    # student crop 0 matches teacher crop 1 and vice versa: only cross pairs count -> near zero
    student = torch.tensor([[0, 50.0, 0, 0], [50.0, 0, 0, 0]])
    assert loss_fn(student, teacher, 0.01).item() < 1e-3


def test_sinkhorn_spreads_a_batch_that_prefers_one_prototype_over_all_prototypes():
    batch, dim = 8, 4
    logits = torch.zeros(batch, dim)
    logits[:, 0] = 3.0  # every sample prefers prototype 0
    logits[torch.arange(batch), torch.arange(batch) % dim] += 0.5  # ... with a per-sample tie-break
    q = P.sinkhorn_knopp(logits / 0.1, iterations=50)
    assert torch.allclose(q.sum(dim=1), torch.ones(batch), atol=1e-5)
    assert torch.allclose(q.sum(dim=0), torch.full((dim,), batch / dim), atol=1e-3)
    # each sample ends on its tie-break prototype, not on the one they all preferred
    assert torch.equal(q.argmax(dim=1), torch.arange(batch) % dim)
    ema = P.DinoLoss(dim, 2).teacher_probs(logits, 0.1)
    assert torch.equal(ema.argmax(dim=1), torch.zeros(batch, dtype=torch.long))


def test_sinkhorn_centring_keeps_the_loss_below_log_dim_on_an_informative_teacher():
    dim = 8  # batch of 8 images, one prototype each
    views = torch.eye(dim)[torch.randperm(dim, generator=torch.Generator().manual_seed(0))]
    teacher = torch.cat([views, views])  # both global crops of an image agree
    student = torch.cat([views] * 4) * 10  # 4 crops: 2 global + 2 local, all agreeing
    loss = P.DinoLoss(dim, 4, centering="sinkhorn")(student, teacher, 0.04)
    assert loss.item() < 0.5 * math.log(dim)
    with pytest.raises(ValueError, match="centering"):
        P.DinoLoss(dim, 4, centering="mean")


def test_koleo_is_lower_for_spread_features_and_pushes_neighbours_apart():
    spread = torch.eye(4)
    clumped = torch.tensor([[1.0, 0, 0, 0], [1.0, 0.05, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]])
    assert P.koleo_loss(spread) < P.koleo_loss(clumped)
    x = clumped.clone().requires_grad_(True)
    P.koleo_loss(x).backward()
    step = F.normalize(x - 0.1 * x.grad, dim=-1)
    assert torch.dist(step[0], step[1]) > torch.dist(F.normalize(clumped[0], dim=0),
                                                     F.normalize(clumped[1], dim=0))


def test_ema_update_is_exact():
    teacher, student = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    t0 = [p.clone() for p in teacher.parameters()]
    P.ema_update(teacher, student, 0.9)
    for before, s, after in zip(t0, student.parameters(), teacher.parameters(), strict=True):
        assert torch.allclose(after, 0.9 * before + 0.1 * s)


def test_cosine_schedule_warms_up_then_decays_to_final():
    values = P.cosine_schedule(1.0, 0.1, total=20, warmup=5, warmup_start=0.0)
    assert len(values) == 20
    assert values[0] == 0.0 and values[5] == pytest.approx(1.0)
    assert np.all(np.diff(values[:6]) > 0) and np.all(np.diff(values[5:]) < 0)
    assert values[-1] == pytest.approx(0.1, abs=0.01)


def test_head_prototypes_keep_unit_norm_after_a_step():
    head = P.DinoHead(8, 10, hidden_dim=16, bottleneck_dim=4)
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
    head(torch.randn(5, 8)).sum().backward()
    opt.step()
    norms = head.prototypes.weight.norm(dim=1)
    assert torch.allclose(norms, torch.ones(10), atol=1e-5)


def test_multicrop_gives_two_global_and_n_local_normalised_views():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    views = P.MultiCrop(32, 16, 3)(img)
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(v.dtype == torch.float32 and v.min() < 0 for v in views)


def _images(tmp_path, n=4):
    rng = np.random.default_rng(1)
    records = []
    for i in range(n):
        arr = np.full((48, 48, 3), 90, np.uint8)
        y, x = rng.integers(4, 28, 2)
        arr[y:y + 16, x:x + 16] = rng.integers(0, 255, 3)
        path = tmp_path / f"im{i}.png"
        Image.fromarray(arr).save(path)
        records.append(ImageRecord(f"im{i}", path))
    return records


def test_pretraining_resumes_to_the_same_weights_as_an_uninterrupted_run(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    records = _images(tmp_path)
    full = P.pretrain_dino(records, tmp_path / "a.safetensors", tmp_path / "ckpt_a", TINY_SETTINGS,
                           torch.device("cpu"))
    assert full["steps"] == 4 and len(full["curve"]) == 2

    calls = {"n": 0}
    real_ema = P.ema_update

    def crash_in_epoch_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # first step of epoch 2 (2 steps per epoch)
            raise KeyboardInterrupt("preempted")
        real_ema(*args, **kwargs)

    monkeypatch.setattr(P, "ema_update", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        P.pretrain_dino(records, tmp_path / "b.safetensors", tmp_path / "ckpt_b", TINY_SETTINGS,
                        torch.device("cpu"))
    assert not (tmp_path / "b.safetensors").exists()
    monkeypatch.setattr(P, "ema_update", real_ema)
    resumed = P.pretrain_dino(records, tmp_path / "b.safetensors", tmp_path / "ckpt_b", TINY_SETTINGS,
                              torch.device("cpu"))
    assert resumed["curve"] == full["curve"]
    a = create_vit(TINY["arch"], checkpoint=str(tmp_path / "a.safetensors")).state_dict()
    b = create_vit(TINY["arch"], checkpoint=str(tmp_path / "b.safetensors")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_exported_teacher_loads_into_the_mining_backbone(tmp_path):
    from safetensors.torch import load_file

    records = _images(tmp_path, 2)
    out = tmp_path / "vit.safetensors"
    P.pretrain_dino(records, out, tmp_path / "ckpt", section_settings("pretrain", dict(TINY, epochs=1)),
                    torch.device("cpu"))
    stored = load_file(str(out))
    model = create_vit(TINY["arch"], checkpoint=str(out))
    assert not any(k.startswith("head") for k in stored)
    assert torch.equal(model.state_dict()["pos_embed"], stored["pos_embed"])
    assert (tmp_path / "vit.safetensors.curve.json").is_file()


def test_empty_image_list_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="at least one readable image"):
        P.pretrain_dino([], tmp_path / "x.safetensors", tmp_path / "c", TINY_SETTINGS, torch.device("cpu"))


def test_demo_scenes_pretrains_on_more_generated_train_scenes_than_the_split(tmp_path, monkeypatch):
    import json

    from maskdistill.cli import main
    from maskdistill.demo import draw_scene

    monkeypatch.chdir(tmp_path)
    demo = {"num_train": 2, "num_val": 1, "image_size": 32, "min_objects": 1, "max_objects": 1, "seed": 5}
    demo_settings = section_settings("dataset", {"source": "demo", "demo": demo}).demo
    cfg = json.dumps({"device": "cpu", "dataset": {"source": "demo", "demo": demo},
                      "pretrain": dict(TINY, epochs=1, batch_size=6, demo_scenes=6)})
    assert main(["make-demo", "--config", cfg, "--out", "results/demo"]) == 0
    assert main(["pretrain", "--config", cfg, "--checkpoint-dir", "ck", "--out", "b.safetensors"]) == 0
    summary = json.loads((tmp_path / "b.safetensors.curve.json").read_text())
    assert summary["images"] == 6
    scenes = sorted((tmp_path / "ck" / "scenes" / "train" / "images").iterdir())
    assert len(scenes) == 6 and not (tmp_path / "ck" / "scenes" / "val").exists()
    # the split's own scenes are the first of them: the same generator, the same pixels
    first = np.asarray(Image.open(scenes[0]))
    split_scene = tmp_path / "results" / "demo" / "train" / "images" / scenes[0].name
    assert np.array_equal(first, np.asarray(Image.open(split_scene)))
    assert np.array_equal(first, draw_scene(demo_settings, "train", 0)[0])
    # the weights record how their scenes were drawn, next to the DINO recipe
    from safetensors import safe_open

    with safe_open(str(tmp_path / "b.safetensors"), "pt") as f:
        recipe = json.loads(f.metadata()["data_recipe"])
    assert recipe["demo_scenes"] == 6 and recipe["demo"]["seed"] == 5
    assert recipe["demo"]["background"] == "plain"  # the schema default, filled in
