"""Bad input: every kind of awkward or broken image file is read correctly or refused with a reason.

Files are made here (PIL/numpy). Mining runs on a tiny randomly initialised ViT at 32 px, so the
policy (`skip` lists the file with its reason, `fail` names it) is checked end to end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import maskdistill.images as images_mod
from maskdistill.cli import main as cli_main
from maskdistill.images import (
    ImageReadError,
    list_image_folder,
    list_split,
    read_rgb,
    without_skipped,
)
from maskdistill.mining import mine_shard
from maskdistill.storage import input_report, read_mask_shard, shard_skipped, skipped_keys

ORIENTATION = 0x0112
RNG = np.random.default_rng(0)


def _blocks(rows: int = 2, cols: int = 3, size: int = 16) -> np.ndarray:
    """An image of distinct flat colour blocks (survives JPEG compression at block centres)."""
    colours = np.array([[250, 10, 10], [10, 250, 10], [10, 10, 250], [250, 250, 10], [10, 250, 250],
                        [250, 10, 250], [128, 128, 128], [250, 250, 250], [10, 10, 10]], np.uint8)
    grid = colours[: rows * cols].reshape(rows, cols, 3)
    return np.repeat(np.repeat(grid, size, axis=0), size, axis=1)


def _centres(rgb: np.ndarray, size: int = 16) -> np.ndarray:
    return rgb[size // 2 :: size, size // 2 :: size].astype(int)


# What each EXIF orientation asks the viewer to do to the stored pixels (independent of PIL).
EXPECTED = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),  # rotate 90 degrees clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, k=1),  # rotate 90 degrees counter-clockwise
}


@pytest.mark.parametrize("orientation", sorted(EXPECTED))
def test_exif_orientation_moves_pixels_where_the_tag_says(tmp_path, orientation):
    stored = _blocks()
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[ORIENTATION] = orientation
    im.save(tmp_path / "o.jpg", exif=exif, quality=95)
    got = read_rgb(tmp_path / "o.jpg")
    want = EXPECTED[orientation](stored)
    assert got.shape == want.shape
    assert np.abs(_centres(got) - _centres(want)).max() < 12


def _write(path: Path, im: Image.Image, **kw) -> Path:
    im.save(path, **kw)
    return path


def test_colour_modes_become_the_right_rgb(tmp_path):
    # CMYK JPEG: pure magenta ink -> (255, 0, 255)
    cmyk = read_rgb(_write(tmp_path / "c.jpg", Image.new("CMYK", (16, 16), (0, 255, 0, 0)), quality=95))
    assert np.abs(cmyk[8, 8].astype(int) - [255, 0, 255]).max() < 6
    # 16-bit grayscale: scaled by its maximum to 0..255
    values = np.array([[0, 1000], [30000, 60000]], np.uint16)
    g16 = read_rgb(_write(tmp_path / "g16.png", Image.fromarray(values)))
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert g16[..., 0].tolist() == [[0, 4], [128, 255]] and (g16[..., 0] == g16[..., 2]).all()
    # palette without and with a transparent index (composited on black)
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 200, 30, 40, 5, 6, 7] + [0] * 759)
    pal.putpixel((0, 0), 1)
    pal.putpixel((1, 0), 2)
    assert read_rgb(_write(tmp_path / "p.png", pal)).tolist() == [[[200, 30, 40], [5, 6, 7]]]
    assert read_rgb(_write(tmp_path / "pt.png", pal, transparency=2)).tolist() == [[[200, 30, 40], [0, 0, 0]]]
    # RGBA half transparent: composited on black
    rgba = read_rgb(_write(tmp_path / "a.png", Image.new("RGBA", (2, 2), (200, 100, 50, 128))))
    assert np.abs(rgba[0, 0].astype(int) - [100, 50, 25]).max() <= 1
    # L and LA
    assert read_rgb(_write(tmp_path / "l.png", Image.new("L", (3, 2), 77))).tolist() == [[[77] * 3] * 3] * 2
    la = read_rgb(_write(tmp_path / "la.png", Image.new("LA", (3, 2), (200, 255))))
    assert la.shape == (2, 3, 3) and (la == 200).all()


@pytest.mark.parametrize("size", [(1, 1), (1, 8), (8, 1), (16, 1)])
def test_single_pixels_and_thin_strips_within_the_limit_are_read(tmp_path, size):
    Image.new("RGB", size, (9, 8, 7)).save(tmp_path / "s.png")
    rgb = read_rgb(tmp_path / "s.png")
    assert rgb.shape == (size[1], size[0], 3) and rgb[0, 0].tolist() == [9, 8, 7]


def _bad_files(root: Path) -> dict[str, str]:
    """Broken files under ``root``: name -> a word the refusal must contain."""
    data = RNG.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    for ext in ("jpg", "png"):  # the first half of a valid file
        Image.fromarray(data).save(root / f"full.{ext}")
        raw = (root / f"full.{ext}").read_bytes()
        (root / f"trunc_{ext}.{ext}").write_bytes(raw[: len(raw) // 2])
        (root / f"full.{ext}").unlink()
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is not an image\n")
    os.symlink(root / "does-not-exist.png", root / "dangling.png")
    Image.new("RGB", (100, 1)).save(root / "strip.png")
    return {"trunc_jpg.jpg": "truncated", "trunc_png.png": "truncated", "zero.jpg": "empty file",
            "text.jpg": "not an image", "dangling.png": "dangling symlink", "strip.png": "aspect"}


def test_broken_files_are_refused_with_a_reason_naming_them(tmp_path):
    for name, reason in _bad_files(tmp_path).items():
        with pytest.raises(ImageReadError) as info:
            read_rgb(tmp_path / name)
        assert str(info.value).startswith(str(tmp_path / name)) and reason in str(info.value), info.value


def test_unreadable_file_is_refused(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not block reads")
    Image.new("RGB", (4, 4)).save(tmp_path / "locked.png")
    (tmp_path / "locked.png").chmod(0)
    try:
        with pytest.raises(ImageReadError, match="locked.png: not readable"):
            read_rgb(tmp_path / "locked.png")
    finally:
        (tmp_path / "locked.png").chmod(0o644)


def test_large_jpeg_decodes_reduced_and_other_large_images_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(images_mod, "MAX_DECODE_PIXELS", 200_000)
    big = np.repeat(np.repeat(_blocks(2, 3, 16), 20, axis=0), 20, axis=1)  # 640 x 960
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=95)
    Image.fromarray(big).save(tmp_path / "big.png")
    rgb = read_rgb(tmp_path / "big.jpg")
    assert rgb.shape == (320, 480, 3)  # libjpeg's 1/2 scale: the largest that fits 200k pixels
    assert np.abs(_centres(rgb, 160) - _centres(big, 320)).max() < 12
    with pytest.raises(ImageReadError, match="big.png: 960x640 .* exceeds the decode limit"):
        read_rgb(tmp_path / "big.png")


def test_same_key_from_two_files_is_an_error_naming_both(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "x.jpg")
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "x.png")
    with pytest.raises(ValueError, match="'a/x'") as info:
        list_image_folder(tmp_path)
    assert "x.jpg" in str(info.value) and "x.png" in str(info.value)


def test_empty_dataset_error_names_the_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=f"empty dataset: no images found in {tmp_path}"):
        list_split({"images": str(tmp_path), "annotations": None})


def test_folder_link_loop_is_listed_once(tmp_path):
    (tmp_path / "d").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "d" / "x.png")
    os.symlink(tmp_path, tmp_path / "d" / "loop")
    keys = [r.key for r in list_image_folder(tmp_path)]
    assert "d/x" in keys and len(keys) == len(set(keys)) and len(keys) <= 2


# ---------------------------------------------------------------- through mining

MINING = {"backbone": {"name": "vit_tiny_patch16_224", "pretrained": False}, "short_side": 32,
          "batch_size": 2}


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    bad = _bad_files(root)
    good = {"one_pixel": (1, 1), "row": (8, 1), "column": (1, 8), "wide": (48, 32)}
    for name, size in good.items():
        pixels = RNG.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{name}.png")
    Image.new("CMYK", (40, 30), (0, 200, 100, 0)).save(root / "cmyk.jpg")
    Image.new("LA", (30, 40), (90, 128)).save(root / "gray_alpha.png")
    return root, {Path(n).stem: r for n, r in bad.items()}, set(good) | {"cmyk", "gray_alpha"}


def test_mining_skip_policy_lists_every_bad_file_with_its_reason(mixed_folder, tmp_path):
    root, bad, good = mixed_folder
    records = list_image_folder(root)
    torch.manual_seed(0)
    stats = mine_shard(records, tmp_path / "shard-000.h5", MINING, torch.device("cpu"), "skip")
    assert stats["images"] == len(good) and stats["skipped"] == len(bad)
    mined = {m.key: m for m in read_mask_shard(tmp_path / "shard-000.h5")}
    assert set(mined) == good
    assert mined["one_pixel"].mask.shape == (1, 1) and mined["column"].mask.shape == (8, 1)
    assert mined["row"].mask.shape == (1, 8)
    skipped = {s.key: s for s in shard_skipped(tmp_path / "shard-000.h5")}
    assert set(skipped) == set(bad)
    for key, reason in bad.items():
        assert reason in skipped[key].reason and Path(skipped[key].path).parent == root
    # later stages leave the skipped images out; the per-run report lists them with reasons
    assert {r.key for r in without_skipped(records, skipped_keys([tmp_path / "shard-000.h5"]))} == good
    report = input_report({"train": [tmp_path / "shard-000.h5"]}, "skip")
    assert report["splits"] == {"train": {"mined": len(good), "skipped": len(bad)}}
    assert {s["key"]: s["reason"] for s in report["skipped"]} == {k: v.reason for k, v in skipped.items()}


def test_mining_fail_policy_names_the_file_and_leaves_no_shard(mixed_folder, tmp_path):
    root, _, _ = mixed_folder
    records = [r for r in list_image_folder(root) if r.key in ("wide", "zero")]
    with pytest.raises(ImageReadError, match=r"zero\.jpg: empty file"):
        mine_shard(records, tmp_path / "shard-000.h5", MINING, torch.device("cpu"), "fail")
    assert list(tmp_path.iterdir()) == []


def test_input_report_command_writes_json_and_markdown(mixed_folder, tmp_path, monkeypatch):
    root, bad, _ = mixed_folder
    monkeypatch.chdir(tmp_path)
    records = list_image_folder(root)
    mine_shard(records, tmp_path / "m" / "shard-000.h5", MINING, torch.device("cpu"), "skip")
    cfg = json.dumps({"dataset": {"source": "images", "train": {"images": str(root)},
                                  "on_bad_image": "skip", "num_shards": 1}})
    assert cli_main(["input-report", "--config", cfg, "--masks-train", "m/shard-000.h5",
                     "--out-json", "r.json", "--out-md", "r.md"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["on_bad_image"] == "skip" and len(report["skipped"]) == len(bad)
    md = (tmp_path / "r.md").read_text()
    assert "dangling symlink" in md and "zero.jpg" in md and "`skip`" in md
