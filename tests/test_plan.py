"""The plan (maskdistill.plan): what runs for each source and setting, and the per-rule config that
decides Snakemake reruns."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from PIL import Image
from test_datasets import VOC_TRAIN, VOC_VAL, make_coco, make_voc

from maskdistill.config import validate_config
from maskdistill.plan import FEATURE_KEYS, make_plan, rule_config


def test_a_key_added_later_reruns_nothing_at_its_neutral_value():
    before = validate_config({})
    before["dataset"]["demo"].pop("background")  # a config from before the key existed
    now = validate_config({})
    assert now["dataset"]["demo"]["background"] == "plain"
    assert rule_config(now, "mining") == rule_config(before, "mining")
    clutter = copy.deepcopy(now)
    clutter["dataset"]["demo"]["background"] = "clutter"
    assert json.loads(rule_config(clutter))["dataset"]["demo"]["background"] == "clutter"
    assert now["dataset"]["demo"]["background"] == "plain"  # the config itself is left alone


def test_the_seed_rule_added_later_reruns_mining_only_when_changed():
    before = validate_config({})
    before["mining"].pop("seed_from")
    now = validate_config({})
    assert rule_config(now, "mining") == rule_config(before, "mining")
    attention = copy.deepcopy(now)
    attention["mining"]["seed_from"] = "attention"
    assert rule_config(attention, "mining") != rule_config(now, "mining")
    assert rule_config(attention, "clustering") == rule_config(now, "clustering")


def test_the_decoding_threads_of_the_features_added_later_rerun_nothing_at_one():
    before = validate_config({})
    before["clustering"].pop("decode_threads")
    now = validate_config({})
    features = {"only": FEATURE_KEYS}
    assert rule_config(now, "clustering", **features) == rule_config(before, "clustering", **features)
    four = copy.deepcopy(now)
    four["clustering"]["decode_threads"] = 4
    assert json.loads(rule_config(four, "clustering", **features))["clustering"]["decode_threads"] == 4


# ---------------------------------------------------------------- the plan of each source


def _images(root: Path, n: int = 3) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (i, i, i)).save(root / f"im{i}.png")
    return root


def test_the_demo_plans_every_stage_with_the_diagnostics_first():
    plan = make_plan({"clustering": {"num_clusters": 4, "overclustering": 2}})
    assert set(plan.splits) == {"train", "val"} and plan.eval_split == "val"
    assert plan.gt_instances == "results/demo/val/instances.json" and plan.has_gt
    assert plan.num_labels == 9 and plan.shards == ("000", "001")
    assert list(plan.eval_stages) == ["patch_kmeans", "initial_masks", "maskrcnn", "segmentation"]
    assert plan.eval_stages["maskrcnn"] == "results/pseudo_labels/val"
    assert plan.targets() == ["results/segmentation/predictions/train",
                              "results/segmentation/predictions/val", "results/input_report.json",
                              "results/clusters/gallery_train.jpg", "results/clusters/gallery_val.jpg",
                              "results/segmentation/gallery_train.jpg",
                              "results/segmentation/gallery_val.jpg",
                              "results/metrics.json", "results/report.md", "results/report.rst"]
    assert "results/choose_k/choose_k.png" in make_plan({"choose_k": {"enabled": True}}).targets()
    assert plan.splits["val"][0] == ("scene_0000", "results/demo/val/images/scene_0000.png")


def test_the_crf_round_is_the_final_stage_and_is_scored_with_and_without_crf():
    plan = make_plan({"crf": {"self_training": True}, "evaluation": {"crf": True, "diagnostics": False}})
    assert plan.final_segmentation == "segmentation_crf"
    assert list(plan.eval_stages) == ["initial_masks", "maskrcnn", "segmentation", "segmentation_crf",
                                      "segmentation_crf+crf"]
    assert plan.eval_stages["segmentation_crf+crf"] == "results/segmentation_crf/crf/val"


def test_pretraining_points_mining_and_clustering_at_its_weights():
    plan = make_plan({"pretrain": {"enabled": True, "arch": "vit_demo_patch8_128"}})
    for section in ("mining", "clustering"):
        assert plan.config[section]["backbone"] == {"name": "vit_demo_patch8_128", "pretrained": False,
                                                    "checkpoint": "results/pretrain/backbone.safetensors"}
        assert getattr(plan.settings, section).backbone.checkpoint == plan.pretrained


def test_hub_weights_are_fetched_only_for_vits_that_load_them_from_the_hub():
    import yaml
    from conftest import REPO

    paper = make_plan({"weights_cache": "/shared/weights"})
    names = {w.key: w.name for w in paper.hub_weights}
    assert names == {"mining.backbone.name": "vit_small_patch16_224.dino",
                     "clustering.backbone.name": "vit_small_patch8_224.dino"}
    fetch = json.loads(paper.fetch_config())  # the params of fetch_weights: nothing a stage tunes
    assert set(fetch) == {"mining", "clustering", "weights_cache", "version"}
    assert fetch["mining"] == {"backbone": paper.config["mining"]["backbone"]}
    assert fetch["weights_cache"] == "/shared/weights"
    assert make_plan(yaml.safe_load((REPO / "config.yaml").read_text())).hub_weights == []  # shipped ViT
    assert make_plan({"pretrain": {"enabled": True}}).hub_weights == []  # our own DINO weights
    random = {"name": "vit_small_patch8_224.dino", "pretrained": False}
    local = make_plan({"clustering": {"backbone": random}})
    assert [w.key for w in local.hub_weights] == ["mining.backbone.name"]


def test_a_train_folder_alone_is_segmented_but_not_evaluated(tmp_path):
    plan = make_plan({"dataset": {"source": "images", "train": {"images": str(_images(tmp_path / "a"))}},
                      "gallery": {"enabled": False}})
    assert list(plan.splits) == ["train"] and not plan.has_gt and not plan.mask_ap
    assert plan.targets() == ["results/segmentation/predictions/train", "results/input_report.json"]


def test_a_val_folder_with_annotations_is_evaluated_against_them(tmp_path):
    val = _images(tmp_path / "val", 2)
    (tmp_path / "val.json").write_text(json.dumps({
        "images": [{"id": i + 1, "file_name": f"im{i}.png", "height": 8, "width": 8} for i in range(2)],
        "annotations": [], "categories": [{"id": 1, "name": "thing"}]}))
    plan = make_plan({"dataset": {"source": "images", "train": {"images": str(_images(tmp_path / "t"))},
                                  "val": {"images": str(val), "annotations": str(tmp_path / "val.json")}}})
    assert plan.has_gt and plan.gt_instances == str(tmp_path / "val.json") and plan.mask_ap
    assert [key for key, _ in plan.splits["val"]] == ["im0", "im1"]


def test_the_linear_probe_needs_label_maps_outside_the_demo_and_voc(tmp_path):
    val = _images(tmp_path / "val", 1)
    (tmp_path / "val.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "im0.png", "height": 8, "width": 8}], "annotations": [],
        "categories": [{"id": 1, "name": "thing"}]}))
    dataset = {"source": "images", "train": {"images": str(_images(tmp_path / "t"))},
               "val": {"images": str(val), "annotations": str(tmp_path / "val.json")}}
    with pytest.raises(ValueError, match="linear_probe.train_labels"):
        make_plan({"dataset": dataset, "linear_probe": {"enabled": True}})
    labels = {"train_labels": str(tmp_path / "t"), "val_labels": str(val)}
    plan = make_plan({"dataset": dataset, "linear_probe": {"enabled": True, **labels}})
    assert plan.linear_probe and plan.probe_labels == {"train": str(tmp_path / "t"), "val": str(val)}
    assert make_plan({}).probe_labels == {"train": "results/demo/train/semantic",
                                          "val": "results/demo/val/semantic"}


def test_voc_is_evaluated_on_val_with_its_label_pngs(tmp_path):
    voc = make_voc(tmp_path)
    plan = make_plan({"dataset": {"source": "voc", "voc": {"root": str(voc), "train_split": "train"}}})
    assert [k for k, _ in plan.splits["train"]] == VOC_TRAIN and plan.eval_split == "val"
    assert plan.gt_instances == "results/gt/voc_val.json"
    assert plan.gt_semantic == str(voc / "SegmentationClass")
    assert plan.probe_labels == {"train": str(voc / "SegmentationClassAug"),
                                 "val": str(voc / "SegmentationClass")}


def test_voc_mask_ap_on_the_segmentation_trainval_set_plans_its_images_for_prediction_only(tmp_path):
    voc = make_voc(tmp_path)
    dataset = {"source": "voc", "voc": {"root": str(voc), "train_split": "train"}}
    default = make_plan({"dataset": dataset})
    assert (default.mask_ap_split, default.mask_ap_gt) == ("val", "results/gt/voc_val.json")
    assert list(default.splits) == ["train", "val"]
    plan = make_plan({"dataset": dataset, "evaluation": {"mask_ap_split": "seg_trainval"}})
    assert plan.mask_ap and plan.mask_ap_split == "seg_trainval"
    assert plan.mask_ap_gt == "results/gt/voc_trainval.json"  # rules/datasets.smk writes it
    assert [k for k, _ in plan.splits["seg_trainval"]] == sorted(VOC_TRAIN + VOC_VAL)
    assert plan.gt_instances == "results/gt/voc_val.json"  # mIoU stays on val
    assert "results/segmentation/predictions/seg_trainval" not in plan.targets()  # not mined
    off = make_plan({"dataset": dataset, "evaluation": {"mask_ap": False, "mask_ap_split": "seg_trainval"}})
    assert "seg_trainval" not in off.splits


def test_a_mask_ap_split_the_source_lacks_is_an_error_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"'evaluation.mask_ap_split'.*demo has no split 'seg_trainval'"):
        make_plan({"evaluation": {"mask_ap_split": "seg_trainval"}})
    with pytest.raises(ValueError, match=r"'evaluation.mask_ap_split'.*'train'.*use one of eval\)$"):
        make_plan({"evaluation": {"mask_ap_split": "train"}})  # the demo's train split has no GT


def test_the_evaluation_keys_added_later_rerun_nothing_at_today_s_values():
    before = validate_config({})
    for key in ("mapping", "mask_ap_split", "single_object", "majority", "absent_classes"):
        before["evaluation"].pop(key)
    now = validate_config({})
    assert rule_config(now, "evaluation") == rule_config(before, "evaluation")
    masks = copy.deepcopy(now)
    masks["evaluation"]["mapping"] = "masks"
    assert json.loads(rule_config(masks, "evaluation"))["evaluation"]["mapping"] == "masks"
    authors = copy.deepcopy(now)
    authors["evaluation"] |= {"majority": "iou", "absent_classes": "zero"}
    planned = json.loads(rule_config(authors, "evaluation"))["evaluation"]
    assert (planned["majority"], planned["absent_classes"]) == ("iou", "zero")  # the authors' rules rerun it


def test_coco20k_is_one_split_evaluated_on_itself(tmp_path):
    paths = {k: str(v) for k, v in make_coco(tmp_path).items()}
    plan = make_plan({"dataset": {"source": "coco20k", "coco20k": paths}})
    assert list(plan.splits) == ["train"] and plan.eval_split == "train" and plan.has_gt
    assert plan.gt_instances == "results/gt/coco20k.json"
    assert plan.targets()[:3] == ["results/segmentation/predictions/train", "results/input_report.json",
                                  "results/clusters/gallery_train.jpg"]
    unlabelled = make_plan({"dataset": {"source": "coco20k", "coco20k": {**paths, "annotations": None}}})
    assert not unlabelled.has_gt and "results/metrics.json" not in unlabelled.targets()


# ---------------------------------------------------------------- clustering: crops, whitening, K-means rows


def test_the_clustering_keys_added_later_rerun_nothing_at_their_neutral_values():
    before = validate_config({})
    for key in ("crop", "center", "fit_on", "extra_images"):
        before["clustering"].pop(key)
    now = validate_config({})
    features = {"only": FEATURE_KEYS}
    assert rule_config(now, "clustering") == rule_config(before, "clustering")
    assert rule_config(now, "clustering", **features) == rule_config(before, "clustering", **features)
    native = copy.deepcopy(now)
    native["clustering"]["crop"] = "native"  # the crops change: the features are extracted again
    assert json.loads(rule_config(native, "clustering", **features))["clustering"]["crop"] == "native"
    for key, value in (("center", False), ("fit_on", ["train", "val"]), ("extra_images", ["/data/voc07"])):
        changed = copy.deepcopy(now)
        changed["clustering"][key] = value  # K-means only: the features stay
        assert rule_config(changed, "clustering", **features) == rule_config(now, "clustering", **features)
        assert json.loads(rule_config(changed, "clustering"))["clustering"][key] == value


def test_an_extra_image_folder_is_a_split_mined_for_kmeans_only(tmp_path):
    extra = _images(tmp_path / "voc07", 5)
    (extra / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(extra / "sub" / "deep.jpg")
    plan = make_plan({"dataset": {"num_shards": 2}, "clustering": {"extra_images": [str(extra)],
                                                                   "fit_on": ["train", "val"]}})
    keys = ["im0", "im1", "im2", "im3", "im4", "sub/deep"]
    assert list(plan.extra_splits) == ["extra0"] and "extra0" not in plan.splits
    assert [k for k, _ in plan.extra_splits["extra0"]] == keys
    assert plan.extra_splits["extra0"][-1] == ("sub/deep", str(extra / "sub" / "deep.jpg"))
    shards = [plan.shard_members("extra0", shard) for shard in plan.shards]
    assert sorted(k for members in shards for k, _ in members) == keys and all(shards)
    assert plan.kmeans_splits == ("train", "val", "extra0")
    # no pseudo-labels, detector, segmentation or evaluation for it
    assert not any("extra" in target for target in plan.targets())
    assert not any("extra" in folder for folder in plan.eval_stages.values())
    assert plan.eval_split == "val"
    assert make_plan({}).extra_splits == {} and make_plan({}).kmeans_splits == ("train",)


def test_an_extra_folder_adds_only_the_images_not_planned_already(tmp_path):
    train = _images(tmp_path / "coco" / "t", 2)  # the dataset's images lie inside the extra folder
    Image.new("RGB", (8, 8)).save(tmp_path / "coco" / "other.png")
    cfg = {"dataset": {"source": "images", "train": {"images": str(train)}},
           "clustering": {"extra_images": [str(tmp_path / "coco"), str(train)]}}
    with pytest.raises(ValueError, match=r"clustering\.extra_images.*already planned"):
        make_plan(cfg)  # the second folder adds nothing
    cfg["clustering"]["extra_images"] = [str(tmp_path / "coco")]
    assert make_plan(cfg).extra_splits == {"extra0": [("other", str(tmp_path / "coco" / "other.png"))]}


def test_a_missing_or_empty_extra_folder_and_an_absent_fit_on_split_name_their_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"clustering\.extra_images.*folder not found.*nowhere"):
        make_plan({"clustering": {"extra_images": [str(tmp_path / "nowhere")]}})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"clustering\.extra_images.*no images found"):
        make_plan({"clustering": {"extra_images": [str(tmp_path / "empty")]}})
    train = {"dataset": {"source": "images", "train": {"images": str(_images(tmp_path / "t"))}}}
    with pytest.raises(ValueError, match=r"clustering\.fit_on.*val"):
        make_plan(train | {"clustering": {"fit_on": ["train", "val"]}})
