"""Stage 3: confident predictions, pasted by descending score without overwriting."""

import numpy as np

from maskdistill.pseudo_labels import label_map, paste_masks, select_confident, write_label_maps
from maskdistill.storage import encode_rle, read_label_png


def _ann(score, label, mask, image_id=1):
    return {"image_id": image_id, "category_id": label, "score": score,
            "segmentation": encode_rle(mask)}


def _box_mask(y0, y1, x0, x1, shape=(6, 8)):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def test_select_keeps_scores_at_or_above_tau_in_descending_order():
    anns = [{"score": 0.5}, {"score": 0.95}, {"score": 0.9}, {"score": 0.89}]
    assert [a["score"] for a in select_confident(anns, 0.9)] == [0.95, 0.9]


def test_select_falls_back_to_the_single_best():
    anns = [{"score": 0.3}, {"score": 0.7}, {"score": 0.5}]
    assert [a["score"] for a in select_confident(anns, 0.9)] == [0.7]
    assert select_confident([], 0.9) == []


def test_paste_never_overwrites_a_taken_pixel():
    a, b = _box_mask(0, 4, 0, 4), _box_mask(2, 6, 2, 6)
    out = paste_masks([a, b], [3, 7], (6, 8))
    assert (out[a] == 3).all()
    assert (out[b & ~a] == 7).all()
    assert (out[~(a | b)] == 0).all()


def test_most_confident_mask_wins_the_overlap():
    a, b = _box_mask(0, 4, 0, 4), _box_mask(2, 6, 2, 6)
    image = {"id": 1, "height": 6, "width": 8, "file_name": "x.png"}
    anns = [_ann(0.91, 2, a), _ann(0.99, 5, b), _ann(0.2, 4, _box_mask(0, 6, 6, 8))]
    out = label_map(image, anns, 0.9)
    assert out[3, 3] == 5  # overlap goes to the 0.99 mask
    assert out[0, 0] == 2
    assert (out[:, 6:] == 0).all()  # the 0.2 mask is dropped


def test_write_label_maps_one_png_per_image_including_empty(tmp_path):
    a = _box_mask(1, 3, 1, 3)
    inst = {"images": [{"id": 1, "height": 6, "width": 8, "file_name": "sub/a.jpg", "key": "sub/a"},
                       {"id": 2, "height": 6, "width": 8, "file_name": "b.jpg"}],
            "annotations": [_ann(0.5, 1, a, image_id=1)]}
    stats = write_label_maps(inst, tmp_path, tau=0.9)
    assert stats == {"images": 2, "masks_kept": 1, "masks_total": 1}
    assert (read_label_png(tmp_path / "sub" / "a.png") == a.astype(np.uint8)).all()
    assert not read_label_png(tmp_path / "b.png").any()


def test_label_maps_from_a_streamed_file_equal_those_from_the_dict(tmp_path):
    from maskdistill.pseudo_labels import write_label_maps_file
    from maskdistill.storage import write_json

    rng = np.random.default_rng(0)
    images = [{"id": i, "height": 6, "width": 8, "file_name": f"im{i}.jpg"} for i in range(4)]
    # annotations not grouped by image, image 3 without any, one of an image not listed
    anns = [_ann(float(rng.uniform()), int(rng.integers(1, 5)), rng.random((6, 8)) > 0.6, image_id=i)
            for i in (0, 1, 0, 2, 1, 0, 5)]
    inst = {"images": images, "annotations": anns}
    write_json(tmp_path / "inst.json", inst)
    expected = write_label_maps(inst, tmp_path / "dict", tau=0.5)
    assert write_label_maps_file(tmp_path / "inst.json", tmp_path / "file", tau=0.5) == expected
    assert expected["images"] == 4 and expected["masks_total"] == 7
    for i in range(4):
        assert (read_label_png(tmp_path / "file" / f"im{i}.png") ==
                read_label_png(tmp_path / "dict" / f"im{i}.png")).all()
    assert read_label_png(tmp_path / "file" / "im0.png").any()
    assert not read_label_png(tmp_path / "file" / "im3.png").any()
