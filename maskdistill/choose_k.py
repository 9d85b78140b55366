"""Choosing k without labels: K-means for a range of k on the train split's clustering features.

For each k the features are clustered exactly as the clustering stage does (:func:`fit_kmeans` with
``k`` centroids: same whitening, MiniBatchKMeans batch size, restarts and seed). Two curves against k
come out: the inertia (sum of squared distances of the whitened features to their centroid) and the
silhouette score on one fixed random sample of the features. The suggested k has the highest
silhouette; the elbow of the inertia curve is reported beside it. Here k counts centroids, so it is
``clustering.num_clusters`` when ``clustering.overclustering`` is 1.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import pairwise_distances_argmin_min, silhouette_score

from maskdistill.clustering import fit_kmeans, read_features, whiten
from maskdistill.settings import ClusteringSettings
from maskdistill.storage import atomic_path, write_json
from maskdistill.training import progress

log = logging.getLogger("maskdistill")

SILHOUETTE_RULE = "highest silhouette score (Euclidean on whitened features, on the random sample)"
ELBOW_RULE = ("elbow: the k farthest from the straight line between the first and last point of the "
              "inertia curve, both axes scaled to [0, 1]")
FALLBACK_RULE = "elbow (no k had a defined silhouette score)"


def read_train_features(feature_shards: Sequence[Path]) -> np.ndarray:
    """All rows of the feature shards, in shard order, as one (n, d) array.

    Raises ValueError naming the shards when they hold no features, or the shard whose feature
    dimension differs from the first shard's.
    """
    parts: list[np.ndarray] = []
    for path in feature_shards:
        _, feats = read_features(path)
        if feats.ndim != 2:
            raise ValueError(f"{path}: features must be a 2-D array, got shape {feats.shape}")
        if parts and feats.shape[1] != parts[0].shape[1]:
            raise ValueError(f"{path}: features have {feats.shape[1]} dimensions, but "
                             f"{feature_shards[0]} has {parts[0].shape[1]}")
        parts.append(feats)
    if not parts or sum(len(p) for p in parts) == 0:
        names = ", ".join(str(p) for p in feature_shards) or "(no shards given)"
        raise ValueError(f"choose_k: no clustering features in {names}")
    return np.concatenate(parts)


def usable_ks(ks: Sequence[int], num_features: int) -> tuple[list[int], list[dict[str, Any]]]:
    """The distinct ``ks`` in increasing order that K-means can fit on ``num_features`` rows, and a
    note ({"k", "reason"}) for each k skipped because it exceeds the feature count.

    Raises ValueError for fewer than two distinct ks, a k below 1, or fewer than two usable ks.
    """
    distinct = sorted({int(k) for k in ks})
    if len(distinct) < 2:
        raise ValueError(f"choose_k: at least two different k are needed, got {list(ks)}")
    if distinct[0] < 1:
        raise ValueError(f"choose_k: every k must be at least 1, got {distinct[0]}")
    kept = [k for k in distinct if k <= num_features]
    skipped = [{"k": k, "reason": f"more clusters than the {num_features} features"}
               for k in distinct if k > num_features]
    if len(kept) < 2:
        raise ValueError(f"choose_k: only {kept} of the ks {distinct} fit {num_features} features; "
                         "at least two are needed")
    return kept, skipped


def sample_indices(num_features: int, sample_size: int, seed: int) -> np.ndarray:
    """Sorted indices of at most ``sample_size`` distinct rows of ``num_features``, drawn with ``seed``."""
    if sample_size < 2:
        raise ValueError(f"choose_k: sample_size must be at least 2, got {sample_size}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_features, size=min(sample_size, num_features), replace=False))


def nearest_centroids(z: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label and squared Euclidean distance of each row of ``z`` to its nearest centroid (chunked)."""
    labels, dist = pairwise_distances_argmin_min(z, centroids)
    return labels, dist.astype(np.float64) ** 2


def sample_silhouette(z: np.ndarray, labels: np.ndarray) -> float | None:
    """Silhouette score of the rows ``z`` with ``labels``; None where undefined (fewer than two
    clusters present, or every row its own cluster)."""
    present = len(np.unique(labels))
    if present < 2 or present > len(z) - 1:
        return None
    return float(silhouette_score(z, labels, metric="euclidean"))


def score_k(features: np.ndarray, k: int, sample: np.ndarray, s: ClusteringSettings) -> dict[str, Any]:
    """K-means with ``k`` centroids fitted as the clustering stage does -> {"k", "inertia",
    "inertia_per_feature", "silhouette"} (silhouette on the rows ``sample``, None if undefined)."""
    model = fit_kmeans(features, replace(s, num_clusters=k, overclustering=1))
    z = whiten(features, model["mean"], model["std"])
    labels, sq_dist = nearest_centroids(z, model["centroids"])
    inertia = float(sq_dist.sum())
    return {"k": k, "inertia": inertia, "inertia_per_feature": inertia / len(features),
            "silhouette": sample_silhouette(z[sample], labels[sample])}


def elbow_k(ks: Sequence[int], inertia: Sequence[float]) -> int:
    """The k whose point is farthest from the line through the first and last points of the
    inertia curve, both axes min-max scaled to [0, 1]; the smallest such k on ties."""
    x = np.asarray(ks, dtype=np.float64)
    y = np.asarray(inertia, dtype=np.float64)
    x = (x - x.min()) / (np.ptp(x) or 1.0)
    y = (y - y.min()) / (np.ptp(y) or 1.0)
    dx, dy = x[-1] - x[0], y[-1] - y[0]
    dist = np.abs(dx * (y - y[0]) - dy * (x - x[0])) / max(np.hypot(dx, dy), 1e-12)
    return int(ks[int(np.argmax(dist))])


def best_silhouette_k(ks: Sequence[int], silhouette: Sequence[float | None]) -> int | None:
    """The k with the highest silhouette (the smallest such k on ties); None if none is defined."""
    scored = [(sc, -k) for k, sc in zip(ks, silhouette, strict=True) if sc is not None]
    return -max(scored)[1] if scored else None


def write_table(rows: Sequence[dict[str, Any]], out_csv: Path) -> None:
    """CSV with one row per k: k, inertia, inertia_per_feature, silhouette (empty if undefined)."""
    frame = pd.DataFrame(rows, columns=["k", "inertia", "inertia_per_feature", "silhouette"])
    with atomic_path(out_csv, suffix=".tmp.csv") as tmp:
        frame.to_csv(tmp, index=False)


def write_curves(summary: dict[str, Any], out_png: Path) -> None:
    """PNG with two panels against k, inertia and silhouette, the suggested k marked on both
    (and the elbow on the inertia panel)."""
    from matplotlib.figure import Figure

    ks = summary["ks"]
    sil = [np.nan if v is None else v for v in summary["silhouette"]]
    fig = Figure(figsize=(9, 3.6), dpi=100)
    ax_i, ax_s = fig.subplots(1, 2)
    for ax, values, name in ((ax_i, summary["inertia"], "inertia"), (ax_s, sil, "silhouette")):
        ax.plot(ks, values, "o-", color="tab:blue", markersize=4)
        ax.axvline(summary["suggested_k"], color="tab:red", linestyle="--",
                   label=f"suggested k = {summary['suggested_k']}")
        ax.set_xlabel("k")
        ax.set_ylabel(name)
        ax.set_title(f"{name} against k")
    ax_i.axvline(summary["elbow_k"], color="tab:green", linestyle=":",
                 label=f"elbow k = {summary['elbow_k']}")
    ax_i.legend(fontsize=8)
    ax_s.legend(fontsize=8)
    fig.suptitle(f"choosing k: {summary['features']} features, silhouette on {summary['sample']}",
                 fontsize=10)
    fig.tight_layout()
    with atomic_path(out_png, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, format="png")


def choose_k(feature_shards: Sequence[Path], ks: Sequence[int], s: ClusteringSettings, *, sample_size: int,
             out_json: Path, out_png: Path, out_csv: Path) -> dict[str, Any]:
    """K-means for each k on the train split's clustering features (``feature_shards``): writes the
    curves (``out_csv``, ``out_png``) and the summary (``out_json``: ks, inertia, silhouette,
    suggested_k, elbow_k, rule, features, sample, skipped), and returns the summary."""
    features = read_train_features(feature_shards)
    kept, skipped = usable_ks(ks, len(features))
    for note in skipped:
        log.warning("choose_k: k = %d skipped: %s", note["k"], note["reason"])
    sample = sample_indices(len(features), sample_size, s.seed)
    rows = []
    for k in progress(kept, total=len(kept), desc="choosing k", unit="k"):
        rows.append(score_k(features, k, sample, s))
        log.info("choose_k: k = %d: inertia %.4g, silhouette %s", k, rows[-1]["inertia"],
                 rows[-1]["silhouette"])
    inertia = [r["inertia"] for r in rows]
    silhouette = [r["silhouette"] for r in rows]
    elbow = elbow_k(kept, inertia)
    best = best_silhouette_k(kept, silhouette)
    summary: dict[str, Any] = {
        "ks": kept, "inertia": inertia, "inertia_per_feature": [r["inertia_per_feature"] for r in rows],
        "silhouette": silhouette, "suggested_k": elbow if best is None else best, "elbow_k": elbow,
        "rule": {"suggested_k": FALLBACK_RULE if best is None else SILHOUETTE_RULE, "elbow_k": ELBOW_RULE},
        "features": len(features), "sample": len(sample), "skipped": skipped,
    }
    write_table(rows, out_csv)
    write_curves(summary, out_png)
    write_json(out_json, summary)
    log.info("choose_k: suggested k = %d (%s); elbow at k = %d", summary["suggested_k"],
             summary["rule"]["suggested_k"], elbow)
    return summary
