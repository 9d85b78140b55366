"""Confusion matrices, Hungarian / majority matching and mIoU, checked by hand."""

import numpy as np
import pytest

from maskdistill.metrics import confusion_matrix, mapping_from_votes, match_clusters, miou_after_matching

# ---------------------------------------------------------------- confusion


def test_confusion_by_hand_and_ignore_skipped():
    pred = np.array([[0, 1, 2], [1, 2, 2]])
    gt = np.array([[0, 1, 255], [255, 1, 0]])
    conf = confusion_matrix(pred, gt, num_pred=3, num_gt=2)
    # kept pixels (pred, gt): (0,0) (1,1) (2,1) (2,0); the two gt=255 pixels are skipped
    assert conf.dtype == np.int64
    assert conf.tolist() == [[1, 0], [0, 1], [1, 1]]
    assert conf.sum() == 4


def test_confusion_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="predicted label 3"):
        confusion_matrix(np.array([[3]]), np.array([[0]]), num_pred=3, num_gt=2)
    with pytest.raises(ValueError, match="ground-truth label 5"):
        confusion_matrix(np.array([[0]]), np.array([[5]]), num_pred=3, num_gt=2)
    # a bad prediction under an ignored GT pixel does not count
    assert confusion_matrix(np.array([[9]]), np.array([[255]]), 3, 2).sum() == 0


# ---------------------------------------------------------------- matching + mIoU


def test_hungarian_iou_on_a_permuted_case():
    # pred 0 is mostly class 2, pred 1 is class 0, pred 2 mostly class 1
    conf = np.array([[0, 2, 8], [10, 0, 0], [2, 6, 0]])
    mapping = match_clusters(conf, "iou")
    assert mapping.tolist() == [2, 0, 1]
    m = miou_after_matching(conf, mapping, ["background", "a", "b"])
    # IoU bg = 10/(10+12-10), a = 6/(8+8-6), b = 8/(10+8-8)
    assert m["per_class"]["background"] == pytest.approx(100 * 10 / 12)
    assert m["per_class"]["a"] == pytest.approx(60.0)
    assert m["per_class"]["b"] == pytest.approx(80.0)
    assert m["miou"] == pytest.approx((100 * 10 / 12 + 60 + 80) / 3)  # 74.44
    assert m["pixel_accuracy"] == pytest.approx(100 * 24 / 28)
    assert m["mapping"] == [2, 0, 1]


def test_class_absent_from_gt_and_prediction_is_left_out():
    conf = np.array([[4, 0, 0], [1, 3, 0]])  # class 2 never appears; 2 preds <= 3 classes
    mapping = match_clusters(conf, "iou")
    assert mapping.tolist() == [0, 1]
    m = miou_after_matching(conf, mapping, ["bg", "x", "y"])
    assert m["per_class"] == {"bg": pytest.approx(80.0), "x": pytest.approx(75.0), "y": None}
    assert m["miou"] == pytest.approx(77.5)


def test_gt_class_with_no_matched_prediction_counts_as_zero():
    conf = np.array([[6, 2]])  # one predicted label, two present classes
    m = miou_after_matching(conf, match_clusters(conf), ["bg", "x"])
    assert m["per_class"] == {"bg": pytest.approx(75.0), "x": 0.0}
    assert m["miou"] == pytest.approx(37.5)


def test_permuting_predicted_ids_keeps_miou():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, size=(20, 30))
    gt[rng.random(gt.shape) < 0.1] = 255
    pred = np.where(rng.random(gt.shape) < 0.7, np.where(gt == 255, 0, gt), rng.integers(0, 4))
    names = ["bg", "a", "b", "c"]
    perm = np.array([3, 0, 2, 1])
    for mode in ("iou", "confusion"):
        c1 = confusion_matrix(pred, gt, 4, 4)
        c2 = confusion_matrix(perm[pred], gt, 4, 4)
        m1 = miou_after_matching(c1, match_clusters(c1, mode), names)
        m2 = miou_after_matching(c2, match_clusters(c2, mode), names)
        assert m1["miou"] == pytest.approx(m2["miou"])
        assert m1["per_class"] == pytest.approx(m2["per_class"])
        assert match_clusters(c1, mode).tolist() == [0, 1, 2, 3]
        assert match_clusters(c2, mode)[perm].tolist() == [0, 1, 2, 3]


def test_confusion_and_iou_modes_pick_different_matchings():
    conf = np.array([[0, 2], [2, 5]])
    # counts: identity 0+5=5 > swap 2+2=4; IoU: identity 0 + 5/9 = 0.556 < swap 2/7 + 2/7 = 0.571
    assert match_clusters(conf, "confusion").tolist() == [0, 1]
    assert match_clusters(conf, "iou").tolist() == [1, 0]
    by_iou = miou_after_matching(conf, match_clusters(conf, "iou"), ["bg", "x"])
    by_count = miou_after_matching(conf, match_clusters(conf, "confusion"), ["bg", "x"])
    assert by_iou["miou"] == pytest.approx(100 * 2 / 7)
    assert by_count["miou"] == pytest.approx(100 * 5 / 9 / 2)
    assert by_iou["pixel_accuracy"] == pytest.approx(100 * 4 / 9)
    assert by_count["pixel_accuracy"] == pytest.approx(100 * 5 / 9)
    with pytest.raises(ValueError, match="matching mode"):
        match_clusters(conf, "dice")


def test_overclustering_majority_vote():
    conf = np.array([[5, 1], [0, 3], [2, 2], [0, 0]])  # 4 preds > 2 classes
    mapping = match_clusters(conf, "iou")
    assert mapping.tolist() == [0, 1, 0, 0]  # tie -> lowest class, empty row -> class 0
    m = miou_after_matching(conf, mapping, ["bg", "x"])
    # merged: class 0 <- preds 0,2,3 = [7, 3]; class 1 <- pred 1 = [0, 3]
    assert m["per_class"]["bg"] == pytest.approx(70.0)  # 7 / (10 + 7 - 7)
    assert m["per_class"]["x"] == pytest.approx(50.0)  # 3 / (3 + 6 - 3)
    assert m["miou"] == pytest.approx(60.0)
    assert m["pixel_accuracy"] == pytest.approx(100 * 10 / 13)


# ---------------------------------------------------------------- Hungarian / majority by hand


def test_hungarian_iou_beats_greedy_by_hand():
    # rows: predicted 0..2, cols: GT 0..2. Greedy on the largest IoU would give pred 0 -> GT 0
    # (IoU 50/(60+70-50) = 0.625), leaving pred 1 to GT 1 or 2. The optimum pairs 0->1, 1->0, 2->2.
    conf = np.array([[50, 10, 0], [20, 40, 0], [0, 0, 30]])
    # IoU table: (0,0) 50/80=.625 (0,1) 10/100=.1 (1,0) 20/110=.18 (1,1) 40/70=.571 (2,2) 1.0
    # identity: .625+.571+1 = 2.196; swap: .1+.18+1 = 1.28 -> identity wins here
    assert match_clusters(conf, "iou").tolist() == [0, 1, 2]
    # a case where maximising IoU and maximising matched pixels disagree
    conf = np.array([[60, 40], [0, 5]])
    # iou: identity 60/(100+60-60)=.6 + 5/(5+45-5)=.111 = .711; swap 40/(100+45-40)=.381 + 0 = .381
    assert match_clusters(conf, "iou").tolist() == [0, 1]
    m = miou_after_matching(conf, np.array([0, 1]), ["background", "a"])
    assert m["per_class"]["background"] == pytest.approx(60.0)
    assert m["per_class"]["a"] == pytest.approx(100 * 5 / 45)
    assert m["miou"] == pytest.approx((60.0 + 100 * 5 / 45) / 2)


def test_majority_vote_with_more_clusters_than_classes_by_hand():
    # 4 predicted labels, 2 GT classes: each predicted label goes to the class it overlaps most
    conf = np.array([[9, 1], [2, 8], [0, 3], [4, 4]])
    mapping = match_clusters(conf, "iou")
    assert mapping.tolist() == [0, 1, 1, 0]  # tie (4, 4) -> lowest class id
    m = miou_after_matching(conf, mapping, ["background", "thing"])
    # merged: class 0 <- rows 0, 3 = [13, 5]; class 1 <- rows 1, 2 = [2, 11]
    # IoU bg = 13 / (18 + 15 - 13) = 0.65, thing = 11 / (13 + 16 - 11) = 0.6111
    assert m["per_class"]["background"] == pytest.approx(65.0)
    assert m["per_class"]["thing"] == pytest.approx(100 * 11 / 18)
    assert m["pixel_accuracy"] == pytest.approx(100 * 24 / 31)


# ---------------------------------------------------------------- the mapping from mined-mask votes


def test_votes_map_clusters_by_hungarian_when_k_equals_c_and_by_majority_above():
    # cluster 1 votes twice for class 2, cluster 2 once for each: one-to-one sends cluster 1 to
    # class 2 and cluster 2 to class 1 (2 + 1 votes beat 0 + 1)
    votes = np.array([[0, 2], [1, 1]])
    assert mapping_from_votes(votes).tolist() == [0, 2, 1]
    # a third cluster (K = 3 > C = 2) without votes goes to background; ties go to the lower class
    over = np.array([[0, 2], [1, 1], [0, 0]])
    assert mapping_from_votes(over).tolist() == [0, 2, 1, 0]
    assert mapping_from_votes(np.array([[0, 2], [0, 1], [3, 0]])).tolist() == [0, 2, 2, 1]
    with pytest.raises(ValueError, match="votes"):
        mapping_from_votes(np.zeros((0, 2)))


# ---------------------------------------------------------------- the authors' scoring rules


def test_majority_by_iou_gives_a_small_class_the_cluster_that_majority_by_pixels_gives_away():
    # 3 clusters > 2 classes. Cluster 2 shares 6 pixels with the large background (96 pixels) and 4
    # with the small class x (5 pixels): most pixels say background, largest IoU says x
    # (6 / (10 + 96 - 6) = 0.06 against 4 / (10 + 5 - 4) = 0.36)
    conf = np.array([[90, 0], [0, 1], [6, 4]])
    by_pixels, by_iou = match_clusters(conf, "iou", "pixels"), match_clusters(conf, "iou", "iou")
    assert by_pixels.tolist() == [0, 1, 0] and by_iou.tolist() == [0, 1, 1]
    # pixels: background <- clusters 0, 2 = [96, 4], x <- cluster 1 = [0, 1]
    m = miou_after_matching(conf, by_pixels, ["bg", "x"])
    assert m["per_class"] == {"bg": pytest.approx(96.0), "x": pytest.approx(20.0)}
    # iou: background <- cluster 0 = [90, 0], x <- clusters 1, 2 = [6, 5]
    m = miou_after_matching(conf, by_iou, ["bg", "x"])
    assert m["per_class"] == {"bg": pytest.approx(100 * 90 / 96), "x": pytest.approx(100 * 5 / 11)}


def test_the_majority_rule_does_not_touch_the_hungarian_matching():
    conf = np.array([[2, 10, 0], [10, 2, 0], [0, 0, 7]])  # K = C: one-to-one, whatever the rule
    assert match_clusters(conf, "iou", "pixels").tolist() == match_clusters(conf, "iou", "iou").tolist() \
        == [1, 0, 2]


def test_a_class_absent_from_gt_and_prediction_counts_zero_under_the_authors_rule():
    conf = np.array([[4, 0, 0], [1, 3, 0]])  # class y in neither GT nor prediction
    m = miou_after_matching(conf, match_clusters(conf), ["bg", "x", "y"], "zero")
    assert m["per_class"] == {"bg": pytest.approx(80.0), "x": pytest.approx(75.0), "y": 0.0}
    assert m["miou"] == pytest.approx((80.0 + 75.0 + 0.0) / 3)
    # skip (the default) leaves it out: see test_class_absent_from_gt_and_prediction_is_left_out
    assert miou_after_matching(conf, match_clusters(conf), ["bg", "x", "y"])["miou"] == pytest.approx(77.5)


@pytest.mark.parametrize(("call", "key"), [
    (lambda c: match_clusters(c, "iou", "votes"), "evaluation.majority"),
    (lambda c: miou_after_matching(c, np.array([0, 1]), ["bg", "x"], "nan"), "evaluation.absent_classes"),
])
def test_an_unknown_scoring_rule_names_its_key(call, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        call(np.array([[3, 1], [0, 2]]))
