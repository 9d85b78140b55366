"""Dense CRF refinement of label maps and probabilities."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from maskdistill.settings import section_settings
from maskdistill.storage import write_label_png


def test_crf_moves_a_noisy_label_map_to_the_image_edge():
    from maskdistill.crf import refine_labels

    h, w, edge = 40, 40, 20
    image = np.zeros((h, w, 3), np.uint8)
    image[:, :edge] = (30, 30, 30)
    image[:, edge:] = (220, 200, 190)
    truth = np.zeros((h, w), np.uint8)
    truth[:, edge:] = 1
    rng = np.random.default_rng(0)
    noisy = np.zeros((h, w), np.uint8)
    noisy[:, edge - 4:] = 1  # boundary 4 px off the edge
    flip = rng.random((h, w)) < 0.15
    noisy[flip] = 1 - noisy[flip]
    noisy[0, 0] = 255  # an unlabelled pixel gets a label
    before = (noisy == truth).mean()
    refined = refine_labels(image, noisy)
    after = (refined == truth).mean()
    assert refined.dtype == np.uint8 and refined.shape == (h, w) and 255 not in refined
    assert before < 0.85 and after > 0.97, (before, after)
    # probabilities in, labels out; a label map with one label stays as it is
    probs = np.stack([1.0 - truth, truth]).astype(np.float32) * 0.6 + 0.2
    assert (refine_labels(image, probs) == truth).mean() > 0.97
    assert (refine_labels(image, np.full((h, w), 3, np.uint8)) == 3).all()


def test_crf_refine_folder_and_bad_input(tmp_path):
    from maskdistill.crf import probabilities_from_labels, refine_folder, refine_labels
    from maskdistill.images import ImageRecord
    from maskdistill.storage import read_label_png

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    write_label_png(tmp_path / "lab" / "a.png", np.eye(8, dtype=np.uint8))
    refine_folder([ImageRecord("a", tmp_path / "a.png")], tmp_path / "lab", tmp_path / "out",
                  section_settings("crf"))
    assert read_label_png(tmp_path / "out" / "a.png").shape == (8, 8)
    with pytest.raises(ValueError, match="do not match"):
        refine_labels(np.zeros((8, 8, 3), np.uint8), np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ValueError, match="label 2 outside"):
        probabilities_from_labels(np.array([[2]]), 2)


# ---------------------------------------------------------------- CRF from the model's probabilities


def _crf(**over):
    return section_settings("crf", over)


def test_probabilities_from_logits_upsample_bilinearly_then_softmax():
    from maskdistill.crf import probabilities_from_logits

    logits = np.zeros((2, 1, 2), np.float32)
    logits[0, 0] = (0.0, 4.0)  # class 1 stays 0
    # 2 -> 4 columns, bilinear with align_corners False: source x = -0.25, 0.25, 0.75, 1.25
    # (clamped to 0 .. 1) -> 0, 1, 3, 4; then the image is twice as tall (rows repeat)
    probs = probabilities_from_logits(logits, (1, 4), (2, 4))
    expected = 1.0 / (1.0 + np.exp(-np.array([0.0, 1.0, 3.0, 4.0])))
    assert probs.shape == (2, 2, 4) and probs.dtype == np.float32
    np.testing.assert_allclose(probs[0], np.stack([expected, expected]), atol=1e-6)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-6)


def test_crf_from_probabilities_agrees_with_labels_when_confident_not_when_ambiguous():
    from maskdistill.crf import refine_labels, refine_softmax

    h, w = 30, 40
    # two colours, confident unary that agrees with them: both routes give the same map
    image = np.zeros((h, w, 3), np.uint8)
    image[:, 20:] = (220, 200, 190)
    truth = np.zeros((h, w), np.uint8)
    truth[:, 20:] = 1
    confident = np.stack([1.0 - truth, truth]).astype(np.float32) * 0.98 + 0.01
    assert (refine_softmax(image, confident) == truth).all()
    assert (refine_labels(image, truth) == truth).all()
    # one colour; left half confidently class 1 (0.95), right half barely class 0 (0.55): from
    # the probabilities the confident class takes the whole same-coloured image, while the hard
    # label map (0.7 for its argmax) keeps each half's label
    flat = np.full((h, w, 3), 120, np.uint8)
    probs = np.empty((2, h, w), np.float32)
    probs[1], probs[0] = 0.95, 0.05
    probs[1, :, 20:], probs[0, :, 20:] = 0.45, 0.55
    hard = probs.argmax(0).astype(np.uint8)
    assert (refine_softmax(flat, probs) == 1).all()
    assert (refine_labels(flat, hard) == hard).all()


def test_crf_channel_order_bgr_feeds_the_reversed_image():
    from maskdistill.crf import refine_probabilities

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)
    probs = rng.random((3, 12, 14)).astype(np.float32)
    probs /= probs.sum(0)
    rgb, bgr = _crf(), _crf(channel_order="bgr")
    np.testing.assert_array_equal(refine_probabilities(image, probs, bgr),
                                  refine_probabilities(image[:, :, ::-1].copy(), probs, rgb))
    # the lattice is not symmetric in the channels: the order matters on a coloured image
    reordered = refine_probabilities(image, probs, bgr)
    assert not np.array_equal(reordered, refine_probabilities(image, probs, rgb))
    with pytest.raises(ValueError, match="crf.channel_order"):
        refine_probabilities(image, probs, _crf(channel_order="hsv"))


def test_refine_folder_from_stored_logits(tmp_path):
    import torch

    from maskdistill.crf import probabilities_from_logits, refine_folder, refine_softmax
    from maskdistill.images import ImageRecord
    from maskdistill.segmentation import write_logits
    from maskdistill.storage import read_label_png

    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    write_label_png(tmp_path / "lab" / "a.png", np.zeros((10, 12), np.uint8))
    low = torch.tensor(rng.normal(size=(1, 3, 2, 2)), dtype=torch.float32)
    (tmp_path / "logits").mkdir()
    write_logits(tmp_path / "logits" / "a.npz", low, (16, 16))
    s = _crf(unary="probabilities")
    records = [ImageRecord("a", tmp_path / "a.png")]
    refine_folder(records, tmp_path / "lab", tmp_path / "out", s, tmp_path / "logits")
    stored = low[0].half().float().numpy()  # what the float16 file holds
    expected = refine_softmax(image, probabilities_from_logits(stored, (16, 16), (10, 12)), s)
    np.testing.assert_array_equal(read_label_png(tmp_path / "out" / "a.png"), expected)
    with pytest.raises(ValueError, match="--logits"):
        refine_folder(records, tmp_path / "lab", tmp_path / "out", s)
    with pytest.raises(FileNotFoundError, match="b.npz"):
        Image.fromarray(image).save(tmp_path / "b.png")
        write_label_png(tmp_path / "lab" / "b.png", np.zeros((10, 12), np.uint8))
        refine_folder([ImageRecord("b", tmp_path / "b.png")], tmp_path / "lab", tmp_path / "out", s,
                      tmp_path / "logits")
