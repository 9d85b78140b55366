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
