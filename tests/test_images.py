"""Image listing, stable shards and decoding."""

import numpy as np
import pytest
from PIL import Image

from maskdistill.images import (
    ImageReadError,
    list_image_folder,
    read_rgb,
    resized_hw,
    shard_of,
    shard_records,
)


def test_shards_are_stable_when_images_are_added(tmp_path):
    keys = [f"img{i:03d}" for i in range(50)]
    before = {k: shard_of(k, 4) for k in keys}
    after = {k: shard_of(k, 4) for k in keys + [f"new{i}" for i in range(10)]}
    assert all(after[k] == before[k] for k in keys)
    assert len(set(before.values())) == 4


def test_shard_records_partition_the_split(tmp_path):
    for i in range(12):
        Image.new("RGB", (4, 4)).save(tmp_path / f"{i}.png")
    records = list_image_folder(tmp_path)
    parts = [shard_records(records, s, 3) for s in range(3)]
    assert sorted(r.key for p in parts for r in p) == sorted(r.key for r in records)
    with pytest.raises(ValueError, match="shard 3"):
        shard_records(records, 3, 3)


def test_nested_folders_keep_distinct_keys(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "x.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "b" / "x.png")
    assert [r.key for r in list_image_folder(tmp_path)] == ["a/x", "b/x"]


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (6, 2))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees
    im.save(tmp_path / "r.jpg", exif=exif)
    assert read_rgb(tmp_path / "r.jpg").shape == (6, 2, 3)


def test_grayscale_palette_and_rgba_become_rgb(tmp_path):
    Image.new("L", (3, 2), 7).save(tmp_path / "g.png")
    Image.new("P", (3, 2)).save(tmp_path / "p.png")
    Image.new("RGBA", (3, 2), (10, 20, 30, 255)).save(tmp_path / "a.png")
    for name in ("g.png", "p.png", "a.png"):
        arr = read_rgb(tmp_path / name)
        assert arr.shape == (2, 3, 3) and arr.dtype == np.uint8
    assert read_rgb(tmp_path / "a.png")[0, 0].tolist() == [10, 20, 30]


def test_undecodable_file_error_names_it(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(ImageReadError, match="bad.jpg"):
        read_rgb(tmp_path / "bad.jpg")


def test_resized_hw_scales_the_shorter_side():
    assert resized_hw(375, 500, 640) == (640, 853)
    assert resized_hw(1, 300, 16) == (16, 4800)
