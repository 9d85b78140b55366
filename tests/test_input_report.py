"""The per-run input report: images mined and skipped per split, as JSON, Markdown and CSV."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_images import mixed_folder as make_mixed_folder

from maskdistill.cli import main as cli_main
from maskdistill.datasets import list_image_folder
from maskdistill.input_report import input_report, skipped_keys, write_input_report
from maskdistill.mining import mine_shard
from maskdistill.settings import section_settings
from maskdistill.storage import CorruptFileError, MaskShardWriter, MinedMask, SkippedImage

MINING = section_settings("mining", {"backbone": {"name": "vit_tiny_patch16_224", "pretrained": False},
                                     "short_side": 32, "batch_size": 2})
SKIPPED = {
    "train": [SkippedImage("a/zero", "/data/a/zero.jpg", "empty file (0 bytes)"),
              SkippedImage("pipe", "/data/pipe.png", "cannot decode image (x | y)")],
    "val": [SkippedImage("gone", "/data/gone.png", "file not found")],
}


def _shard(path: Path, mined: list[str], skipped: list[SkippedImage]) -> Path:
    """A complete mask shard holding ``mined`` (2x2 empty masks) and listing ``skipped``."""
    with MaskShardWriter(path, {}) as writer:
        for key in mined:
            writer.append(MinedMask(key=key, file_name=f"{key}.png", height=2, width=2,
                                    mask=np.zeros((2, 2), bool), box=[0.0, 0.0, 0.0, 0.0],
                                    patch_mask=np.zeros((1, 1), bool),
                                    cls_affinity=np.zeros((1, 1), np.float32), seed=0))
        writer.set_skipped(skipped)
    return path


@pytest.fixture
def shards(tmp_path) -> dict[str, list[Path]]:
    return {"train": [_shard(tmp_path / "train-0.h5", ["x", "y"], SKIPPED["train"][:1]),
                      _shard(tmp_path / "train-1.h5", ["z"], SKIPPED["train"][1:])],
            "val": [_shard(tmp_path / "val-0.h5", ["v"], SKIPPED["val"])]}


def test_report_counts_mined_and_skipped_images_per_split(shards):
    report = input_report(shards, "skip")
    assert report["on_bad_image"] == "skip"
    assert report["splits"] == {"train": {"mined": 3, "skipped": 2}, "val": {"mined": 1, "skipped": 1}}
    assert report["skipped"] == [{"split": split, "key": s.key, "path": s.path, "reason": s.reason}
                                 for split, items in SKIPPED.items() for s in items]


def test_files_hold_one_row_per_skipped_image_with_its_reason(shards, tmp_path):
    report = input_report(shards, "skip")
    write_input_report(report, tmp_path / "r" / "input_report.json", tmp_path / "r" / "input_report.md")
    assert json.loads((tmp_path / "r" / "input_report.json").read_text()) == report
    table = pd.read_csv(tmp_path / "r" / "input_report.csv")
    assert list(table.columns) == ["split", "key", "path", "reason"]
    assert table.to_dict("records") == report["skipped"]
    md = (tmp_path / "r" / "input_report.md").read_text()
    assert "`skip`" in md and "- train: 3 images mined, 2 skipped" in md
    assert "`/data/a/zero.jpg`" in md and "empty file (0 bytes)" in md
    assert "(x / y)" in md  # a '|' in a reason does not break the table


def test_a_run_without_skipped_images_says_so(tmp_path):
    report = input_report({"train": [_shard(tmp_path / "s.h5", ["x"], [])]}, "fail")
    write_input_report(report, tmp_path / "r.json", tmp_path / "r.md")
    assert report["skipped"] == [] and "No image was skipped." in (tmp_path / "r.md").read_text()
    assert pd.read_csv(tmp_path / "r.csv").empty


def test_skipped_keys_are_read_back_per_split(shards, tmp_path):
    write_input_report(input_report(shards, "skip"), tmp_path / "r.json", tmp_path / "r.md")
    assert skipped_keys(tmp_path / "r.json", "train") == {"a/zero", "pipe"}
    assert skipped_keys(tmp_path / "r.json", "val") == {"gone"}
    assert skipped_keys(tmp_path / "r.json", "test") == set()
    (tmp_path / "other.json").write_text(json.dumps({"images": []}))
    with pytest.raises(CorruptFileError, match="other.json: not an input report"):
        skipped_keys(tmp_path / "other.json", "train")


# ---------------------------------------------------------------- through the command line


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    return make_mixed_folder(tmp_path_factory.mktemp("mixed"))


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


def test_the_extra_folders_shards_are_reported_under_their_own_split(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "extra0").mkdir()
    (tmp_path / "extra1").mkdir()
    _shard(tmp_path / "train.h5", ["t"], [])
    _shard(tmp_path / "extra0" / "shard-000.h5", ["e"], SKIPPED["val"])
    _shard(tmp_path / "extra0" / "shard-001.h5", ["f", "g"], [])
    _shard(tmp_path / "extra1" / "shard-000.h5", ["h"], [])
    cfg = json.dumps({"dataset": {"source": "demo", "on_bad_image": "skip"}})
    assert cli_main(["input-report", "--config", cfg, "--masks-train", "train.h5", "--masks-extra",
                     "extra0/shard-000.h5", "extra0/shard-001.h5", "extra1/shard-000.h5",
                     "--out-json", "r.json", "--out-md", "r.md"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["splits"] == {"train": {"mined": 1, "skipped": 0}, "extra0": {"mined": 3, "skipped": 1},
                                "extra1": {"mined": 1, "skipped": 0}}
    assert [(r["split"], r["key"]) for r in report["skipped"]] == [("extra0", "gone")]
