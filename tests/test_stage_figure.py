"""The stage-by-stage figure."""

from __future__ import annotations

import numpy as np
from PIL import Image
from test_mask_quality import square, write_gt, write_shard

from maskdistill.stage_figure import attention_overlay, stage_figure
from maskdistill.storage import write_label_png


def test_attention_overlay_is_brightest_where_the_affinity_peaks():
    rgb = np.full((16, 16, 3), 100, np.uint8)
    aff = np.zeros((2, 2), np.float32)
    aff[1, 0] = 1.0
    out = attention_overlay(rgb, aff).astype(int).sum(-1)
    assert out[12, 3] > out[3, 12]


def test_stage_figure_has_one_row_per_image_and_a_column_per_stage(tmp_path):
    a = square(20, 20, 2, 2, 8)
    for key in ("im1", "im2"):
        Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / f"{key}.png")
        write_label_png(tmp_path / "seg" / f"{key}.png", a.astype(np.uint8))
    write_shard(tmp_path / "s.h5", {"im1": a, "im2": a})
    write_gt(tmp_path / "pred.json", [[a], [a]])
    stage_figure(["im1", "im2", "missing"], tmp_path, [tmp_path / "s.h5"], tmp_path / "pred.json",
                 tmp_path / "seg", tmp_path / "fig.png")
    w, h = Image.open(tmp_path / "fig.png").size
    assert (w, h) == (5 * 220, 2 * 220)
