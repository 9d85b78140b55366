"""Dense CRF refinement (Krähenbühl & Koltun) of label maps or class probabilities.

The paper's settings: 10 mean-field iterations, a Gaussian (smoothness) kernel with sxy 1 and
compatibility 3, and a bilateral (appearance) kernel with sxy 67, srgb 3 and compatibility 4.
A hard label map becomes probabilities by giving its label ``label_confidence`` and sharing the
rest among the other labels present in the image (pixels labelled 255 get a uniform distribution);
the CRF then chooses among the labels present in the image.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

from maskdistill.images import ImageRecord, read_rgb
from maskdistill.settings import CrfSettings, section_settings
from maskdistill.storage import IGNORE_LABEL, read_label_png, write_label_png
from maskdistill.training import progress


@cache
def default_settings() -> CrfSettings:
    """The paper's CRF settings: the config schema's defaults of the ``crf`` section."""
    return section_settings("crf")


def _densecrf():
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as err:  # pragma: no cover - depends on the install
        raise RuntimeError("dense CRF needs the 'pydensecrf2' package (pip install pydensecrf2)") from err
    return dcrf


def probabilities_from_labels(labels: np.ndarray, num_labels: int, confidence: float = 0.7
                              ) -> np.ndarray:
    """(num_labels, H, W) float32 probabilities of a hard label map; 255 -> uniform."""
    if not 0 < confidence < 1:
        raise ValueError(f"label confidence must lie in (0, 1), got {confidence}")
    if num_labels < 2:
        raise ValueError(f"a CRF needs at least 2 labels, got {num_labels}")
    labels = np.asarray(labels)
    valid = labels != IGNORE_LABEL
    if valid.any() and int(labels[valid].max()) >= num_labels:
        raise ValueError(f"label {int(labels[valid].max())} outside 0..{num_labels - 1}")
    probs = np.full((num_labels,) + labels.shape, (1.0 - confidence) / (num_labels - 1), np.float32)
    ys, xs = np.nonzero(valid)
    probs[labels[valid].astype(np.int64), ys, xs] = confidence
    probs[:, ~valid] = 1.0 / num_labels
    return probs


def refine_probabilities(image: np.ndarray, probs: np.ndarray, s: CrfSettings | None = None
                         ) -> np.ndarray:
    """Mean-field dense CRF over ``probs`` (C, H, W) for an RGB uint8 ``image``; returns (C, H, W).

    ``s``: kernel settings and iterations (None: the paper's, :func:`default_settings`).
    """
    s = s or default_settings()
    image = np.asarray(image)
    probs = np.asarray(probs, dtype=np.float32)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"CRF image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"CRF probabilities {probs.shape} do not match image {image.shape[:2]}")
    c, h, w = probs.shape
    dcrf = _densecrf()
    crf = dcrf.DenseCRF2D(w, h, c)
    unary = -np.log(np.clip(probs, 1e-8, 1.0)).reshape(c, -1)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=s.gaussian_sxy, compat=s.gaussian_compat)
    crf.addPairwiseBilateral(sxy=s.bilateral_sxy, srgb=s.bilateral_srgb,
                             rgbim=np.array(image, dtype=np.uint8, order="C"),  # writable copy
                             compat=s.bilateral_compat)
    q = crf.inference(s.iterations)
    return np.asarray(q, dtype=np.float32).reshape(c, h, w)


def refine_labels(image: np.ndarray, labels_or_probs: np.ndarray,
                  s: CrfSettings | None = None) -> np.ndarray:
    """CRF-refined uint8 label map (H, W) of a label map (H, W) or probabilities (C, H, W).

    A label map is refined among the labels it contains (the CRF cannot invent new ones); 255
    pixels take the label the CRF gives them. ``s``: None = the paper's settings.
    """
    s = s or default_settings()
    arr = np.asarray(labels_or_probs)
    if arr.ndim == 3:
        return refine_probabilities(image, arr, s).argmax(0).astype(np.uint8)
    if arr.ndim != 2:
        raise ValueError(f"expected a label map (H, W) or probabilities (C, H, W), got {arr.shape}")
    present = np.unique(arr[arr != IGNORE_LABEL])
    if present.size <= 1:  # nothing to choose between
        return np.where(arr == IGNORE_LABEL, present[0] if present.size else 0, arr).astype(np.uint8)
    compact = np.full(256, IGNORE_LABEL, dtype=np.int64)
    compact[present] = np.arange(present.size)
    probs = probabilities_from_labels(compact[arr], present.size, s.label_confidence)
    refined = refine_probabilities(image, probs, s).argmax(0)
    return present[refined].astype(np.uint8)


def refine_folder(records: list[ImageRecord], labels_dir: Path, out_dir: Path, s: CrfSettings) -> int:
    """Write ``out_dir/<key>.png``: the CRF-refined ``labels_dir/<key>.png`` of every record.

    Returns the number of label maps written.
    """
    labels_dir, out_dir = Path(labels_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for rec in progress(records, total=len(records), desc="CRF refinement"):
        src = labels_dir / f"{rec.key}.png"
        labels = read_label_png(src)
        rgb = read_rgb(rec.path)
        if labels.shape != rgb.shape[:2]:
            raise ValueError(f"{src}: label size {labels.shape} differs from image {rec.path} "
                             f"size {rgb.shape[:2]}")
        write_label_png(out_dir / f"{rec.key}.png", refine_labels(rgb, labels, s))
    return len(records)
