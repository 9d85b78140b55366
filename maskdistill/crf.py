"""Dense CRF refinement (Krähenbühl & Koltun) of label maps or class probabilities.

The paper's settings: 10 mean-field iterations, a Gaussian (smoothness) kernel with sxy 1 and
compatibility 3, and a bilateral (appearance) kernel with sxy 67, srgb 3 and compatibility 4.
``unary`` says where the CRF starts. labels: a hard label map becomes probabilities by giving its
label ``label_confidence`` and sharing the rest among the other labels present in the image (pixels
labelled 255 get a uniform distribution); the CRF then chooses among the labels present in the
image. probabilities (the authors' code): the model's low-resolution logits, upsampled bilinearly to
the model's input size and then to the image size, softmax, unary -log(p) (p clipped at 1e-5, as
pydensecrf's ``unary_from_softmax``); the CRF chooses among all classes. ``channel_order`` bgr feeds
the appearance kernel the image in OpenCV's order, as the authors' code does: the permutohedral
lattice is not symmetric in its feature dimensions, so the order changes the result.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

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


UNARIES = ("labels", "probabilities")
CHANNEL_ORDERS = ("rgb", "bgr")
SOFTMAX_CLIP = 1e-5  # pydensecrf's unary_from_softmax default, which the authors' code uses


def _check(s: CrfSettings) -> CrfSettings:
    if s.unary not in UNARIES:
        raise ValueError(f"config key 'crf.unary': {s.unary!r} is not one of {list(UNARIES)}")
    if s.channel_order not in CHANNEL_ORDERS:
        raise ValueError(f"config key 'crf.channel_order': {s.channel_order!r} is not one of "
                         f"{list(CHANNEL_ORDERS)}")
    return s


def probabilities_from_logits(logits: np.ndarray | torch.Tensor, input_hw: tuple[int, int],
                              image_hw: tuple[int, int]) -> np.ndarray:
    """float32 softmax probabilities (C, H, W) at ``image_hw`` of logits (C, h, w).

    The logits are upsampled bilinearly (align_corners False) to ``input_hw``, the size the model
    saw (what its forward does), then to the image size (what the authors' CRF does), then softmax.
    """
    t = torch.as_tensor(np.asarray(logits) if not torch.is_tensor(logits) else logits).float()
    if t.ndim != 3:
        raise ValueError(f"expected logits (C, h, w), got shape {tuple(t.shape)}")
    t = t[None]
    for hw in (tuple(input_hw), tuple(image_hw)):
        if tuple(t.shape[-2:]) != hw:
            t = F.interpolate(t, size=hw, mode="bilinear", align_corners=False)
    return torch.softmax(t[0], dim=0).numpy()


def refine_probabilities(image: np.ndarray, probs: np.ndarray, s: CrfSettings | None = None,
                         clip: float = 1e-8) -> np.ndarray:
    """Mean-field dense CRF over ``probs`` (C, H, W) for an RGB uint8 ``image``; returns (C, H, W).

    ``s``: kernel settings, iterations and channel order (None: the paper's,
    :func:`default_settings`); unary -log(max(p, ``clip``)).
    """
    s = s or default_settings()
    image = np.asarray(image)
    probs = np.asarray(probs, dtype=np.float32)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"CRF image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"CRF probabilities {probs.shape} do not match image {image.shape[:2]}")
    if _check(s).channel_order == "bgr":
        image = image[:, :, ::-1]
    c, h, w = probs.shape
    dcrf = _densecrf()
    crf = dcrf.DenseCRF2D(w, h, c)
    unary = -np.log(np.clip(probs, clip, 1.0)).reshape(c, -1)
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


def refine_softmax(image: np.ndarray, probs: np.ndarray, s: CrfSettings | None = None) -> np.ndarray:
    """uint8 label map (H, W): the CRF over a model's softmax ``probs`` (C, H, W), every class a
    candidate, unary clipped as pydensecrf's ``unary_from_softmax`` (the authors' route)."""
    return refine_probabilities(image, probs, s, clip=SOFTMAX_CLIP).argmax(0).astype(np.uint8)


def read_logits(path: Path) -> tuple[np.ndarray, tuple[int, int]]:
    """Low-resolution logits (C, h, w) and the model input size stored by
    :func:`maskdistill.segmentation.write_logits`; a clear error for a missing or damaged file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"logits for the CRF not found: {path} (crf.unary: probabilities needs the "
                                "prediction rule's logits)")
    try:
        with np.load(path) as data:
            logits, input_hw = data["logits"], data["input_hw"]
    except Exception as err:  # numpy raises several types for damaged files
        raise ValueError(f"{path}: unreadable logits ({err}); delete it and rerun the prediction") from err
    return logits, (int(input_hw[0]), int(input_hw[1]))


def refine_image(rgb: np.ndarray, labels: np.ndarray, s: CrfSettings,
                 logits: tuple[np.ndarray, tuple[int, int]] | None = None) -> np.ndarray:
    """The CRF-refined uint8 label map of one image as ``s.unary`` says: from the hard ``labels``
    (:func:`refine_labels`), or from ``logits`` ((C, h, w), model input size), see
    :func:`probabilities_from_logits` and :func:`refine_softmax`."""
    if _check(s).unary == "labels":
        return refine_labels(rgb, labels, s)
    if logits is None:
        raise ValueError("config key 'crf.unary' is 'probabilities' but no logits were given")
    return refine_softmax(rgb, probabilities_from_logits(logits[0], logits[1], rgb.shape[:2]), s)


def refine_folder(records: list[ImageRecord], labels_dir: Path, out_dir: Path, s: CrfSettings,
                  logits_dir: Path | None = None) -> int:
    """Write ``out_dir/<key>.png``: the CRF-refined ``labels_dir/<key>.png`` of every record, or with
    ``crf.unary`` probabilities the CRF over the softmax of ``logits_dir/<key>.npz``.

    Returns the number of label maps written.
    """
    if _check(s).unary == "probabilities" and logits_dir is None:
        raise ValueError("config key 'crf.unary' is 'probabilities': the CRF needs the predictions' "
                         "logits folder (--logits)")
    labels_dir, out_dir = Path(labels_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for rec in progress(records, total=len(records), desc="CRF refinement"):
        src = labels_dir / f"{rec.key}.png"
        labels = read_label_png(src)
        rgb = read_rgb(rec.path)
        if labels.shape != rgb.shape[:2]:
            raise ValueError(f"{src}: label size {labels.shape} differs from image {rec.path} "
                             f"size {rgb.shape[:2]}")
        logits = None
        if s.unary == "probabilities":
            assert logits_dir is not None
            logits = read_logits(Path(logits_dir) / f"{rec.key}.npz")
        write_label_png(out_dir / f"{rec.key}.png", refine_image(rgb, labels, s, logits))
    return len(records)
