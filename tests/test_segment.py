"""Segmenting new photos: label maps at the original size, overlays, area tables, batching, bad images."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from maskdistill import segment
from maskdistill.images import ImageReadError, ImageRecord, read_rgb, resized_hw, to_tensor
from maskdistill.report import palette
from maskdistill.segment import matched_class_names, output_path, segment_images
from maskdistill.segmentation import build_deeplabv3, load_segmentation_model, predict_logits
from maskdistill.settings import as_config, section_settings
from maskdistill.storage import read_label_png
from maskdistill.training import save_model

CPU = torch.device("cpu")
NUM_CLASSES = 3
# key -> (file name, PIL mode, height, width); with short_side 32, a, b and e enter the model at
# 32x48 (one batch), c at 32x32 and d at 32x50
IMAGES = {
    "a": ("a.png", "RGB", 40, 60),
    "b": ("b.png", "L", 80, 120),
    "sub/c": ("sub/c.png", "RGBA", 30, 30),
    "d": ("d.jpg", "RGB", 45, 70),
    "e": ("e.png", "RGB", 40, 60),
}


def smooth_image(h: int, w: int, mode: str, seed: int) -> Image.Image:
    """A smooth colour gradient with a bright blob (JPEG keeps it within a few grey levels)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = rng.uniform(0.3, 0.7, 2) * (h, w)
    blob = 120.0 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.1 * h * w))
    rgb = np.stack([60 + 100 * xx / w, 40 + 120 * yy / h, np.full_like(xx, 90.0)], -1) + blob[..., None]
    im = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    if mode == "L":
        return im.convert("L")
    if mode == "RGBA":
        im = im.convert("RGBA")
        im.putalpha(Image.fromarray(np.full((h, w), 255, np.uint8)))
    return im


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[ImageRecord]:
    root = tmp_path_factory.mktemp("photos")
    records = []
    for i, (key, (name, mode, h, w)) in enumerate(IMAGES.items()):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        smooth_image(h, w, mode, i).save(path)
        records.append(ImageRecord(key, path))
    return records


def write_model(path: Path, bias: list[float] | None = None,
                calibration: list[torch.Tensor] | None = None, **settings) -> Path:
    """A tiny DeepLab-v3 model file as segmentation writes it. With ``bias`` its last conv has zero
    weights and that bias (the label of the largest bias wins everywhere). Otherwise its random
    logits, which vary little across pixels, are centred by the bias on their mean over the
    ``calibration`` images (3, h, w), so that several labels win. ``settings``: more segmentation
    settings stored with it (e.g. its transform)."""
    torch.manual_seed(0)
    model = build_deeplabv3("resnet18", NUM_CLASSES, 8, (2, 4, 6), None, 0).eval()
    last = model.classifier[-1]
    with torch.no_grad():
        if bias is not None:
            last.weight.zero_()
            last.bias.copy_(torch.tensor(bias))
        elif calibration:
            means = [model(x[None])["out"].mean((0, 2, 3)) for x in calibration]
            last.bias.sub_(torch.stack(means).mean(0))
    cfg = as_config(section_settings("segmentation", {"arch": "resnet18", "atrous_rates": [2, 4, 6],
                                                      "frozen_stages": 0, **settings}))
    save_model(path, model.state_dict(), cfg=cfg, num_classes=NUM_CLASSES)
    return path


@pytest.fixture(scope="module")
def random_model(photos, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random model whose labels vary over the photos (entered with their short side at 32)."""
    rgbs = [read_rgb(r.path) for r in photos]
    calibration = [to_tensor(rgb, resized_hw(*rgb.shape[:2], 32)) for rgb in rgbs]
    return write_model(tmp_path_factory.mktemp("model") / "model.pt", calibration=calibration)


def forward_batch_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the batch size of every forward pass of the model segment_images loads."""
    sizes: list[int] = []

    def loading(path: Path, device: torch.device):
        model, n = load_segmentation_model(path, device)
        model.register_forward_pre_hook(lambda _m, args: sizes.append(int(args[0].shape[0])))
        return model, n

    monkeypatch.setattr(segment, "load_segmentation_model", loading)
    return sizes


def assert_labels_of_one_image_prediction(labels: np.ndarray, model: torch.nn.Module, rgb: np.ndarray,
                                          short_side: int | None = None) -> None:
    """``labels`` are segmentation's one-image prediction of ``rgb`` wherever float32 rounding cannot
    decide the label. A batched forward sums in other orders than a one-image forward, on some kernels,
    so two logits within rounding of each other may swap. This random model's logits vary little
    (about 0.02), so such near-ties exist: pixels whose two best logits lie within 1e-3 of the
    largest logit are not compared (rounding is about 1e-7 of the activations). They must stay
    rare (at most 5 % of the pixels; 1.1 % on the 24 x 24 reference model, where one input pixel
    covers several output pixels), or the comparison would mean nothing."""
    expected, logits, _ = predict_logits(model, rgb, CPU, short_side)
    hw = rgb.shape[:2]
    if getattr(model, "test_side", None):  # reference transform: labels at the test side, nearest resize
        best_two = logits[0].topk(2, dim=0).values
        gap = F.interpolate((best_two[0] - best_two[1])[None, None], size=hw, mode="nearest")[0, 0]
    else:  # logits upsampled bilinearly, then argmax
        upsampled = F.interpolate(logits, size=hw, mode="bilinear", align_corners=False)[0]
        best_two = upsampled.topk(2, dim=0).values
        gap = best_two[0] - best_two[1]
    decided = (gap > 1e-3 * logits.abs().max()).numpy()
    assert decided.mean() > 0.95
    np.testing.assert_array_equal(labels[decided], expected[decided])


def test_the_model_file_loads_as_segmentation_reads_it(random_model):
    model, n = load_segmentation_model(random_model, CPU)
    assert n == NUM_CLASSES
    assert model(torch.zeros(1, 3, 32, 32))["out"].shape == (1, NUM_CLASSES, 32, 32)


@pytest.mark.numeric
def test_one_label_map_and_overlay_per_image_at_its_original_size(photos, random_model, tmp_path):
    result = segment_images(random_model, photos, tmp_path, CPU, short_side=32)
    assert result["images"] == len(IMAGES) and result["skipped"] == 0
    model, _ = load_segmentation_model(random_model, CPU)
    seen = set()
    for rec in photos:
        h, w = IMAGES[rec.key][2:]
        labels = read_label_png(tmp_path / "labels" / f"{rec.key}.png")
        assert labels.shape == (h, w)
        assert_labels_of_one_image_prediction(labels, model, read_rgb(rec.path), 32)
        seen.update(np.unique(labels).tolist())
        with Image.open(tmp_path / "overlays" / f"{rec.key}.jpg") as im:
            assert (im.size, im.mode) == ((w, h), "RGB")
    assert len(seen) > 1  # the random model gives several labels, so the checks above mean something
    areas = pd.read_csv(tmp_path / "areas.csv", keep_default_na=False)
    assert list(areas.columns) == ["key", "class", "label", "pixels", "fraction"]
    assert sorted(set(areas["key"])) == sorted(IMAGES)
    per_image = areas.groupby("key")
    np.testing.assert_allclose(per_image["fraction"].sum(), 1.0, rtol=1e-12)
    assert per_image["pixels"].sum().to_dict() == {k: h * w for k, (_, _, h, w) in IMAGES.items()}
    assert (areas["class"] == ["background" if v == 0 else f"cluster {v}" for v in areas["label"]]).all()
    total = sum(h * w for _, _, h, w in IMAGES.values())
    assert sum(result["classes"].values()) == total
    assert set(result["classes"]) == {"background", "cluster 1", "cluster 2"}


@pytest.mark.numeric
def test_labels_do_not_depend_on_the_batch(photos, random_model, tmp_path, monkeypatch):
    sizes = forward_batch_sizes(monkeypatch)
    segment_images(random_model, photos, tmp_path / "one", CPU, short_side=32, batch_size=1)
    assert sizes == [1] * len(IMAGES)
    sizes.clear()
    segment_images(random_model, photos, tmp_path / "four", CPU, short_side=32, batch_size=4)
    assert sizes == [1, 3, 1]  # c (32x32); a, b, e (32x48); d (32x50)
    sizes.clear()
    same_size = [r for r in photos if r.key in ("a", "e", "sub/c")]
    segment_images(random_model, same_size, tmp_path / "orig", CPU, short_side=None, batch_size=4)
    assert sizes == [1, 2]  # at their original sizes only a and e (40x60) share a batch
    model, _ = load_segmentation_model(random_model, CPU)
    for rec in photos:
        for batch in ("one", "four"):
            labels = read_label_png(tmp_path / batch / "labels" / f"{rec.key}.png")
            assert_labels_of_one_image_prediction(labels, model, read_rgb(rec.path), 32)
    assert (tmp_path / "four" / "labels" / "sub" / "c.png").is_file()


def test_a_model_that_always_says_one_class_gives_that_class_everywhere(photos, tmp_path):
    model = write_model(tmp_path / "grass.pt", bias=[0.0, 0.0, 5.0])
    out = tmp_path / "out"
    result = segment_images(model, photos, out, CPU, short_side=32, class_names=["sky", "road", "grass"],
                            overlay_alpha=0.5)
    total = sum(h * w for _, _, h, w in IMAGES.values())
    assert result == {"images": 5, "skipped": 0, "classes": {"sky": 0, "road": 0, "grass": total}}
    for rec in photos:
        assert (read_label_png(out / "labels" / f"{rec.key}.png") == 2).all()
        expected = 0.5 * read_rgb(rec.path) + 0.5 * palette()[2].astype(np.float64)
        overlay = np.asarray(Image.open(out / "overlays" / f"{rec.key}.jpg"), dtype=np.float64)
        assert np.abs(overlay - expected).mean() < 3.0
    areas = pd.read_csv(out / "areas.csv")
    assert areas[["class", "label", "fraction"]].drop_duplicates().values.tolist() == [["grass", 2, 1.0]]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in (out / "areas.md").read_text().splitlines() if line.startswith("| ")}
    assert rows["grass"] == ["5", str(total), "100.00 %"]
    assert rows["sky"] == ["0", "0", "0.00 %"]


def test_background_is_left_as_the_photo(photos, tmp_path):
    model = write_model(tmp_path / "bg.pt", bias=[5.0, 0.0, 0.0])
    segment_images(model, photos, tmp_path / "out", CPU, short_side=32, overlay_alpha=1.0)
    for rec in photos:
        overlay = np.asarray(Image.open(tmp_path / "out" / "overlays" / f"{rec.key}.jpg"), dtype=np.float64)
        assert np.abs(overlay - read_rgb(rec.path)).mean() < 3.0


def test_a_corrupt_file_fails_naming_it_or_is_listed_when_skipped(photos, random_model, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a PNG file")
    records = [*photos, ImageRecord("broken", broken)]
    with pytest.raises(ImageReadError, match=re.escape(str(broken))):
        segment_images(random_model, records, tmp_path / "fail", CPU, short_side=32)
    assert not (tmp_path / "fail" / "labels").exists()  # unreadable headers come first: nothing is done
    result = segment_images(random_model, records, tmp_path / "skip", CPU, short_side=32, on_bad_image="skip")
    assert (result["images"], result["skipped"]) == (len(IMAGES), 1)
    report = json.loads((tmp_path / "skip" / "input_report.json").read_text())
    assert report["on_bad_image"] == "skip"
    assert report["splits"] == {"segment": {"mined": len(IMAGES), "skipped": 1}}
    [row] = report["skipped"]
    assert (row["split"], row["key"], row["path"]) == ("segment", "broken", str(broken))
    assert "not an image" in row["reason"]
    assert "broken.png" in (tmp_path / "skip" / "input_report.csv").read_text()
    assert not (tmp_path / "skip" / "labels" / "broken.png").exists()
    assert "broken" not in set(pd.read_csv(tmp_path / "skip" / "areas.csv")["key"])


def test_class_names_of_the_wrong_length_are_an_error(photos, random_model, tmp_path):
    with pytest.raises(ValueError, match=r"2 class names given, but the model .*model\.pt has 3 labels"):
        segment_images(random_model, photos, tmp_path, CPU, class_names=["background", "cat"])
    with pytest.raises(ValueError, match="repeated: cat"):
        segment_images(random_model, photos, tmp_path, CPU, class_names=["background", "cat", "cat"])
    assert not (tmp_path / "labels").exists()


def test_a_key_that_climbs_out_of_the_output_folder_is_refused(tmp_path):
    assert output_path(tmp_path, "labels", "a/b", ".png") == tmp_path / "labels" / "a" / "b.png"
    with pytest.raises(ValueError, match=r"\.\./x"):
        output_path(tmp_path, "labels", "../x", ".png")


def test_matched_class_names_follow_the_evaluation_mapping(tmp_path):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({
        "segmentation": {"miou": 10.0, "mapping": [0, 2, 2, 1]},
        "maskrcnn": {"miou": 5.0, "mapping": [1, 0, 2, 2]},
        "meta": {"class_names": ["background", "cat", "dog"]},
    }))
    assert matched_class_names(metrics, "segmentation", 4) == [
        "background", "dog (cluster 1)", "dog (cluster 2)", "cat (cluster 3)"]
    assert matched_class_names(metrics, "maskrcnn", 4) == [
        "cat", "background (cluster 1)", "dog (cluster 2)", "dog (cluster 3)"]
    assert matched_class_names(metrics, "crf", 4) is None
    assert matched_class_names(tmp_path / "missing.json", "segmentation", 4) is None
    with pytest.raises(ValueError, match=r"metrics\.json.*maps 4 labels, but the model has 3"):
        matched_class_names(metrics, "segmentation", 3)


@pytest.mark.numeric
def test_a_reference_model_segments_every_photo_at_its_test_side(photos, tmp_path, monkeypatch):
    rgbs = [read_rgb(r.path) for r in photos]
    calibration = [to_tensor(rgb, (24, 24)) for rgb in rgbs]
    model_path = write_model(tmp_path / "ref.pt", calibration=calibration, transform="reference",
                             crop_size=24)
    sizes = forward_batch_sizes(monkeypatch)
    segment_images(model_path, photos, tmp_path / "out", CPU, short_side=32, batch_size=4)
    assert sizes == [4, 1]  # every photo enters at 24x24, whatever its size (short_side not used)
    model, _ = load_segmentation_model(model_path, CPU)
    for record, rgb in zip(photos, rgbs, strict=True):  # the same labels as the prediction rule's
        got = read_label_png(tmp_path / "out" / "labels" / f"{record.key}.png")
        assert_labels_of_one_image_prediction(got, model, rgb)
