"""Image reading: every kind of awkward or broken image file is decoded correctly or refused with a
reason naming it; and how image folders are listed and sharded (``maskdistill.datasets``).

Files are made here (PIL/numpy). ``bad_files`` and ``mixed_folder`` also serve the mining and
input-report tests, which run the ``on_bad_image`` policies on them end to end.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import maskdistill.images as images_mod
from maskdistill.images import (
    ImageReadError,
    decoded_hw,
    read_rgb,
    resize_bilinear,
    resized_hw,
    torchvision_resized_hw,
)

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


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (6, 2))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees
    im.save(tmp_path / "r.jpg", exif=exif)
    assert read_rgb(tmp_path / "r.jpg").shape == (6, 2, 3)


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


def test_grayscale_palette_and_rgba_become_rgb(tmp_path):
    Image.new("L", (3, 2), 7).save(tmp_path / "g.png")
    Image.new("P", (3, 2)).save(tmp_path / "p.png")
    Image.new("RGBA", (3, 2), (10, 20, 30, 255)).save(tmp_path / "a.png")
    for name in ("g.png", "p.png", "a.png"):
        arr = read_rgb(tmp_path / name)
        assert arr.shape == (2, 3, 3) and arr.dtype == np.uint8
    assert read_rgb(tmp_path / "a.png")[0, 0].tolist() == [10, 20, 30]


@pytest.mark.parametrize("size", [(1, 1), (1, 8), (8, 1), (16, 1)])
def test_single_pixels_and_thin_strips_within_the_limit_are_read(tmp_path, size):
    Image.new("RGB", size, (9, 8, 7)).save(tmp_path / "s.png")
    rgb = read_rgb(tmp_path / "s.png")
    assert rgb.shape == (size[1], size[0], 3) and rgb[0, 0].tolist() == [9, 8, 7]


def test_resized_hw_scales_the_shorter_side():
    assert resized_hw(375, 500, 640) == (640, 853)
    assert resized_hw(1, 300, 16) == (16, 4800)


@pytest.mark.parametrize("hw", [(333, 500), (500, 333), (333, 499), (64, 90), (7, 5)])
def test_reference_resize_is_torchvisions_resize(hw):
    from torchvision import transforms

    rgb = np.random.default_rng(1).integers(0, 256, (*hw, 3), dtype=np.uint8)
    expected = np.asarray(transforms.Resize(64)(Image.fromarray(rgb)))
    size = torchvision_resized_hw(*hw, 64)
    assert size == expected.shape[:2]
    assert np.array_equal(resize_bilinear(rgb, size), expected)


def test_torchvision_size_rule_truncates_the_longer_side():
    assert torchvision_resized_hw(333, 499, 64) == (64, 95)  # 95.9 -> 95
    assert resized_hw(333, 499, 64) == (64, 96)  # ours rounds
    assert torchvision_resized_hw(499, 333, 64) == (95, 64)
    assert torchvision_resized_hw(375, 500, 640) == (640, 853)  # 853.3


def bad_files(root: Path) -> dict[str, str]:
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


def mixed_folder(root: Path) -> tuple[Path, dict[str, str], set[str]]:
    """``bad_files`` plus readable awkward images (1-pixel, strips, CMYK, grey + alpha) under ``root``:
    (root, key of each bad file -> a word of its refusal, keys of the good ones)."""
    bad = bad_files(root)
    good = {"one_pixel": (1, 1), "row": (8, 1), "column": (1, 8), "wide": (48, 32)}
    for name, size in good.items():
        pixels = RNG.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{name}.png")
    Image.new("CMYK", (40, 30), (0, 200, 100, 0)).save(root / "cmyk.jpg")
    Image.new("LA", (30, 40), (90, 128)).save(root / "gray_alpha.png")
    return root, {Path(n).stem: r for n, r in bad.items()}, set(good) | {"cmyk", "gray_alpha"}


def test_broken_files_are_refused_with_a_reason_naming_them(tmp_path):
    for name, reason in bad_files(tmp_path).items():
        with pytest.raises(ImageReadError) as info:
            read_rgb(tmp_path / name)
        assert str(info.value).startswith(str(tmp_path / name)) and reason in str(info.value), info.value


def test_the_header_tells_the_decoded_size_of_every_readable_image(tmp_path, monkeypatch):
    # Mining orders a shard by image size before decoding: the header's size must be read_rgb's,
    # EXIF rotation and the reduced decode of large JPEGs included; unreadable headers say None.
    root, bad, good = mixed_folder(tmp_path)
    for orientation in (3, 6, 8):
        im = Image.fromarray(_blocks(2, 3, 4))
        exif = im.getexif()
        exif[ORIENTATION] = orientation
        im.save(root / f"turned{orientation}.jpg", exif=exif)
    monkeypatch.setattr(images_mod, "MAX_DECODE_PIXELS", 200_000)
    Image.fromarray(np.zeros((640, 960, 3), np.uint8)).save(root / "big.jpg")
    files = sorted(p for p in root.iterdir() if p.name != "dangling.png") + [root / "dangling.png"]
    sizes = {p.stem: decoded_hw(p) for p in files}
    assert sizes["turned6"] == sizes["turned8"] == (12, 8) and sizes["turned3"] == (8, 12)
    assert sizes["big"] == (320, 480)
    for path in files:
        if path.stem in good or path.stem.startswith(("turned", "big")):
            assert sizes[path.stem] == read_rgb(path).shape[:2], path.name
    assert all(sizes[key] is None for key in ("zero", "text", "dangling", "strip"))


def test_undecodable_file_error_names_it(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(ImageReadError, match="bad.jpg"):
        read_rgb(tmp_path / "bad.jpg")


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


# ---------------------------------------------------------------- listing (maskdistill.datasets)
