"""The linear probe: a new 1x1 classifier on the frozen segmentation model, trained on ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskdistill.settings import section_settings
from maskdistill.storage import write_label_png


def _tiny_segmentation_model(path: Path, images: list[Path] | None = None) -> None:
    """A random DeepLab-v3 saved like train_segmentation does; BatchNorm statistics calibrated on
    ``images`` (as training would), so that its features are not vanishingly small."""
    from maskdistill.images import read_rgb, to_tensor
    from maskdistill.segmentation import build_deeplabv3
    from maskdistill.training import save_checkpoint

    torch.manual_seed(0)
    cfg = {"arch": "resnet18", "output_stride": 8, "atrous_rates": [2, 4, 6], "frozen_stages": 0,
           "pretrained_backbone": None}
    model = build_deeplabv3("resnet18", 4, 8, (2, 4, 6), None, 0)
    if images:
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None  # cumulative average
        model.train()
        with torch.no_grad():
            model(torch.stack([to_tensor(read_rgb(p)) for p in images]))
    save_checkpoint(path, {"state_dict": model.state_dict(), "cfg": cfg, "num_classes": 4})


def _probe_data(tmp_path: Path, n: int = 6) -> tuple[list, Path]:
    from maskdistill.images import ImageRecord

    records, labels = [], tmp_path / "labels"
    for i in range(n):  # a reddish object (class 1) or a bluish one (class 2) on grey background
        img = np.full((32, 32, 3), 128, np.uint8)
        lab = np.zeros((32, 32), np.uint8)
        img[4:28, 4:28] = (220, 20, 20) if i % 2 == 0 else (20, 20, 220)
        lab[4:28, 4:28] = 1 if i % 2 == 0 else 2
        lab[:2] = 255
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        write_label_png(labels / f"{i}.png", lab)
        records.append(ImageRecord(str(i), tmp_path / f"{i}.png"))
    return records, labels


@pytest.mark.numeric
def test_linear_probe_learns_with_the_model_frozen(tmp_path):
    from maskdistill.linear_probe import build_probe, evaluate_probe, load_probe, train_linear_probe
    from maskdistill.training import load_checkpoint

    torch.set_num_threads(1)
    seg = tmp_path / "seg.pt"
    records, labels = _probe_data(tmp_path)
    _tiny_segmentation_model(seg, [r.path for r in records])
    names = ["background", "red", "blue"]
    cpu = torch.device("cpu")
    torch.manual_seed(1)
    untrained = evaluate_probe(build_probe(seg, 3, cpu), records, labels, names, cpu)
    cfg = section_settings("linear_probe", {"epochs": 12, "batch_size": 3, "lr": 0.1, "lr_drop_epochs": [10],
                                            "crop_size": 32, "scale_range": [1.0, 1.0], "num_workers": 0,
                                            "log_every": 100})
    train_linear_probe(seg, records, labels, tmp_path / "ckpt", tmp_path / "probe.pt", cfg, 3, cpu)
    probe = load_probe(tmp_path / "probe.pt", seg, cpu)
    trained = evaluate_probe(probe, records, labels, names, cpu)
    # a linear classifier on fixed features of two pure colours is a convex problem: 80.6-81.2 mIoU
    # from 16.5 (per class above 81) under ATEN_CPU_CAPABILITY default, avx2 and avx512, seeds 0-2
    assert trained["miou"] > untrained["miou"] + 20, (untrained["miou"], trained["miou"])
    assert trained["per_class"]["red"] > 50 and trained["per_class"]["blue"] > 50
    # everything but the new classifier is exactly the saved segmentation model (BN stats too)
    saved = load_checkpoint(seg)["state_dict"]
    now = probe.model.state_dict()
    last = "classifier.4."
    for k, v in saved.items():
        if not k.startswith(last):
            assert torch.equal(now[k], v), k
    assert now[last + "weight"].shape == (3, 256, 1, 1)
    # resuming: a finished run's checkpoint carries the epoch count
    assert load_checkpoint(tmp_path / "ckpt" / "last.pt")["epoch"] == 12


def test_linear_probe_missing_labels_is_a_clear_error(tmp_path):
    from maskdistill.linear_probe import train_linear_probe

    seg = tmp_path / "seg.pt"
    _tiny_segmentation_model(seg)
    records, labels = _probe_data(tmp_path, n=2)
    (labels / "1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1\.png"):
        train_linear_probe(seg, records, labels, tmp_path / "ck", tmp_path / "p.pt",
                           section_settings("linear_probe", {"epochs": 1}), 3, torch.device("cpu"))


def _plain_head_model() -> torch.nn.Module:
    from maskdistill.segmentation import build_deeplabv3

    return build_deeplabv3("resnet18", 4, 8, (2, 4, 6), None, 0)


def test_probe_head_init_normal_is_n0_001_with_zero_bias():
    from maskdistill.linear_probe import LinearProbe

    torch.manual_seed(0)
    model = _plain_head_model()  # each probe replaces the same last 1x1 conv
    head = LinearProbe(model, 21, "normal").classifier  # 21 x 256 weights
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert abs(head.weight.mean().item()) < 0.001 and torch.count_nonzero(head.bias) == 0
    default = LinearProbe(model, 21).classifier  # PyTorch: U(+-1/16), std 0.036
    assert default.weight.std().item() > 0.03 and torch.count_nonzero(default.bias) > 0
    with pytest.raises(ValueError, match="linear_probe.head_init"):
        LinearProbe(model, 21, "xavier")


def test_probe_transform_rotates_and_predicts_at_crop_size(tmp_path):
    from maskdistill.linear_probe import build_probe, load_probe, probe_dataset
    from maskdistill.settings import as_config
    from maskdistill.training import save_model

    records, labels = _probe_data(tmp_path, n=1)
    s = section_settings("linear_probe", {"crop_size": 24, "transform": "reference",
                                          "rotation_degrees": 5, "head_init": "normal"})
    ds = probe_dataset(records, labels, s)
    assert ds.rotation == 5 and ds.transform == "reference" and ds.crop == 24
    # the rotation reaches the images: the grey border (label 0) turns, so some epoch's top-left
    # corner is uncovered (label 0) where the unrotated label is 255
    corners = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        lab = ds[0][1]
        assert lab.shape == (24, 24)
        corners.add(int(lab[0, 0]))
    assert 0 in corners
    today = probe_dataset(records, labels, section_settings("linear_probe"))
    assert today.rotation == 0 and today.transform == "crop"  # the defaults: as before
    seg = tmp_path / "seg.pt"
    _tiny_segmentation_model(seg)
    probe = build_probe(seg, 3, torch.device("cpu"), s)
    assert probe.test_side == 24
    save_model(tmp_path / "p.pt", probe.classifier.state_dict(), num_classes=3, cfg=as_config(s))
    assert load_probe(tmp_path / "p.pt", seg, torch.device("cpu")).test_side == 24
    assert build_probe(seg, 3, torch.device("cpu")).test_side is None
