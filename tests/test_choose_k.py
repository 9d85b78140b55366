"""Choosing k without labels: blobs of known number, the elbow and silhouette rules, files, bad inputs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from maskdistill.choose_k import (
    best_silhouette_k,
    choose_k,
    elbow_k,
    sample_indices,
    sample_silhouette,
    usable_ks,
)
from maskdistill.settings import section_settings
from maskdistill.storage import CorruptFileError

CFG = section_settings("clustering", {"num_clusters": 3, "overclustering": 2, "kmeans_batch_size": 1000,
                                      "n_init": 3, "seed": 0})
BLOBS, PER_BLOB, DIM = 4, 25, 8


def write_shard(path: Path, features: np.ndarray, complete: bool = True) -> Path:
    """A feature shard in the layout clustering.describe_shard writes (keys, features, complete)."""
    with h5py.File(path, "w") as h5:
        h5.create_dataset("keys", data=np.array([f"{path.stem}_{i}" for i in range(len(features))],
                                                dtype=object), dtype=h5py.string_dtype())
        h5.create_dataset("features", data=features.astype(np.float32))
        h5.attrs["complete"] = complete
    return path


def blob_features(seed: int = 0) -> np.ndarray:
    """``BLOBS`` tight Gaussian blobs in ``DIM``-D around well-separated centres, shuffled."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, (BLOBS, DIM))
    x = np.repeat(centres, PER_BLOB, axis=0) + rng.normal(0, 0.3, (BLOBS * PER_BLOB, DIM))
    return x[rng.permutation(len(x))]


@pytest.fixture(scope="module")
def blob_run(tmp_path_factory):
    """choose_k run once on 4 blobs split over two shards, ks 2..8, with its output paths."""
    root = tmp_path_factory.mktemp("choose_k")
    x = blob_features()
    shards = [write_shard(root / "train_0.h5", x[:40]), write_shard(root / "train_1.h5", x[40:])]
    out = {"out_json": root / "out" / "choose_k.json", "out_png": root / "out" / "choose_k.png",
           "out_csv": root / "out" / "choose_k.csv"}
    summary = choose_k(shards, range(2, 9), CFG, sample_size=60, **out)
    return summary, out


def test_blobs_suggest_their_number(blob_run):
    summary, _ = blob_run
    assert summary["ks"] == list(range(2, 9))
    assert summary["suggested_k"] == BLOBS
    assert summary["elbow_k"] == BLOBS
    sil = summary["silhouette"]
    assert max(sil) == sil[summary["ks"].index(BLOBS)]
    assert sil[summary["ks"].index(BLOBS)] > 0.8  # tight blobs: near-perfect clustering
    assert "silhouette" in summary["rule"]["suggested_k"] and "elbow" in summary["rule"]["elbow_k"]
    assert summary["features"] == BLOBS * PER_BLOB and summary["sample"] == 60
    assert summary["skipped"] == []


def test_inertia_decreases_with_k(blob_run):
    summary, _ = blob_run
    inertia = np.array(summary["inertia"])
    assert (np.diff(inertia) < 0).all()
    assert np.allclose(summary["inertia_per_feature"], inertia / summary["features"])
    # whitened rows have unit norm, so no point is farther than 2 from its centroid
    assert inertia[0] < 4 * summary["features"]


def test_files_hold_the_curves(blob_run):
    summary, out = blob_run
    table = pd.read_csv(out["out_csv"])
    assert list(table.columns) == ["k", "inertia", "inertia_per_feature", "silhouette"]
    assert table["k"].tolist() == summary["ks"]
    assert np.allclose(table["inertia"], summary["inertia"])
    assert np.allclose(table["silhouette"], summary["silhouette"])
    stored = json.loads(out["out_json"].read_text())
    assert stored == summary
    listed = {"ks", "inertia", "silhouette", "suggested_k", "elbow_k", "rule", "features", "sample"}
    assert listed <= set(stored)
    with Image.open(out["out_png"]) as png:
        assert png.format == "PNG" and png.size == (900, 360)
    assert not [p for p in out["out_json"].parent.iterdir() if p.name.startswith(".")]  # no temp files


def test_one_log_line_per_k(tmp_path, caplog):
    shard = write_shard(tmp_path / "train_0.h5", blob_features())
    with caplog.at_level(logging.INFO, logger="maskdistill"):
        choose_k([shard], [2, 4], CFG, sample_size=50, out_json=tmp_path / "k.json",
                 out_png=tmp_path / "k.png", out_csv=tmp_path / "k.csv")
    per_k = [r.getMessage() for r in caplog.records if r.getMessage().startswith("choose_k: k = ")]
    assert [m.split(":")[1].strip() for m in per_k] == ["k = 2", "k = 4"]


def test_k_beyond_the_features_is_skipped(tmp_path):
    shard = write_shard(tmp_path / "train_0.h5", blob_features()[:10])
    summary = choose_k([shard], [2, 4, 10, 11, 50], CFG, sample_size=100, out_json=tmp_path / "k.json",
                       out_png=tmp_path / "k.png", out_csv=tmp_path / "k.csv")
    assert summary["ks"] == [2, 4, 10]
    assert [n["k"] for n in summary["skipped"]] == [11, 50]
    assert "10 features" in summary["skipped"][0]["reason"]
    assert summary["sample"] == 10
    assert pd.read_csv(tmp_path / "k.csv")["k"].tolist() == [2, 4, 10]


def test_elbow_is_the_knee_of_the_scaled_curve():
    assert elbow_k([1, 2, 3, 4, 5], [100.0, 20.0, 10.0, 8.0, 7.0]) == 2
    assert elbow_k([2, 4, 6, 8], [50.0, 48.0, 5.0, 4.0]) == 6
    assert elbow_k([2, 3, 4], [5.0, 5.0, 5.0]) == 2  # flat: no knee, the first k


def test_best_silhouette_skips_undefined_and_prefers_the_smaller_k_on_ties():
    assert best_silhouette_k([2, 3, 4, 5], [0.2, 0.7, 0.7, None]) == 3
    assert best_silhouette_k([2, 3], [None, None]) is None


def test_silhouette_of_two_known_pairs_and_undefined_cases():
    z = np.array([[0.0], [1.0], [10.0], [11.0]])
    # a = 1 for every point; b = 10.5, 9.5, 9.5, 10.5 -> s = 1 - a / b
    expected = np.mean([1 - 1 / 10.5, 1 - 1 / 9.5, 1 - 1 / 9.5, 1 - 1 / 10.5])
    assert sample_silhouette(z, np.array([0, 0, 1, 1])) == pytest.approx(expected)
    assert sample_silhouette(z, np.zeros(4, int)) is None  # one cluster
    assert sample_silhouette(z, np.arange(4)) is None  # every point its own cluster


def test_sample_is_seeded_distinct_and_capped():
    a, b = sample_indices(100, 30, seed=3), sample_indices(100, 30, seed=3)
    assert (a == b).all() and len(np.unique(a)) == 30 and a.max() < 100
    assert not (a == sample_indices(100, 30, seed=4)).all()
    assert (sample_indices(5, 30, seed=0) == np.arange(5)).all()
    with pytest.raises(ValueError, match="sample_size"):
        sample_indices(100, 1, seed=0)


def test_usable_ks_sorts_deduplicates_and_refuses_too_few():
    assert usable_ks([6, 2, 4, 2], 100) == ([2, 4, 6], [])
    with pytest.raises(ValueError, match="at least two different k"):
        usable_ks([3], 100)
    with pytest.raises(ValueError, match="at least two different k"):
        usable_ks([3, 3], 100)
    with pytest.raises(ValueError, match="at least 1"):
        usable_ks([0, 2], 100)
    with pytest.raises(ValueError, match="at least two are needed"):
        usable_ks([2, 20, 30], 10)


def _run(shards, tmp_path, ks=(2, 3)):
    return choose_k(shards, ks, CFG, sample_size=50, out_json=tmp_path / "o" / "k.json",
                    out_png=tmp_path / "o" / "k.png", out_csv=tmp_path / "o" / "k.csv")


def test_no_features_names_the_shards(tmp_path):
    empty = write_shard(tmp_path / "train_0.h5", np.zeros((0, DIM)))
    with pytest.raises(ValueError, match=r"no clustering features in .*train_0\.h5"):
        _run([empty], tmp_path)
    with pytest.raises(ValueError, match="no shards given"):
        _run([], tmp_path)
    assert not (tmp_path / "o").exists()  # nothing written


def test_fewer_than_two_ks_is_refused(tmp_path):
    shard = write_shard(tmp_path / "train_0.h5", blob_features())
    with pytest.raises(ValueError, match="at least two different k"):
        _run([shard], tmp_path, ks=[4])


def test_mismatched_feature_dimensions_name_the_shard(tmp_path):
    a = write_shard(tmp_path / "train_0.h5", blob_features()[:20])
    b = write_shard(tmp_path / "train_1.h5", np.ones((5, DIM + 1)))
    with pytest.raises(ValueError, match=r"train_1\.h5: features have 9 dimensions"):
        _run([a, b], tmp_path)


def test_incomplete_shard_names_the_file(tmp_path):
    bad = write_shard(tmp_path / "train_0.h5", blob_features(), complete=False)
    with pytest.raises(CorruptFileError, match=r"train_0\.h5: incomplete"):
        _run([bad], tmp_path)
