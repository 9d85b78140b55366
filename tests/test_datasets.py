"""PASCAL VOC 2012 and COCO20k layouts on tiny trees built in tmp; the paper configs; their dry runs."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from test_workflow import planned_rules

from maskdistill.cli import main
from maskdistill.config import ConfigError, validate_config
from maskdistill.datasets import (
    VOC_CLASSES,
    DatasetLayoutError,
    coco20k_instances,
    coco20k_records,
    dataset_source,
    list_image_folder,
    shard_of,
    shard_records,
    voc_records,
    voc_split_names,
    write_voc_instances,
)
from maskdistill.settings import load_settings, section_settings
from maskdistill.storage import decode_segmentation

REPO = Path(__file__).resolve().parents[1]
H, W = 30, 40
PERSON, DOG, CAT = VOC_CLASSES.index("person") + 1, VOC_CLASSES.index("dog") + 1, VOC_CLASSES.index("cat") + 1

# ---------------------------------------------------------------- folders of images and shards


def test_nested_folders_keep_distinct_keys(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "x.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "b" / "x.png")
    assert [r.key for r in list_image_folder(tmp_path)] == ["a/x", "b/x"]


def test_same_key_from_two_files_is_an_error_naming_both(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "x.jpg")
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "x.png")
    with pytest.raises(ValueError, match="'a/x'") as info:
        list_image_folder(tmp_path)
    assert "x.jpg" in str(info.value) and "x.png" in str(info.value)


def test_empty_dataset_error_names_the_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "notes.txt").write_text("no images here")
    images = section_settings("dataset", {"source": "images", "train": {"images": str(tmp_path)}})
    with pytest.raises(ValueError, match=f"empty dataset, no images found in {tmp_path}"):
        dataset_source(images).records("train")


def test_folder_link_loop_is_listed_once(tmp_path):
    (tmp_path / "d").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "d" / "x.png")
    os.symlink(tmp_path, tmp_path / "d" / "loop")
    keys = [r.key for r in list_image_folder(tmp_path)]
    assert "d/x" in keys and len(keys) == len(set(keys)) and len(keys) <= 2


def test_shards_are_stable_when_images_are_added(tmp_path):
    keys = [f"img{i:03d}" for i in range(50)]
    before = {k: shard_of(k, 4) for k in keys}
    after = {k: shard_of(k, 4) for k in keys + [f"new{i}" for i in range(10)]}
    assert all(after[k] == before[k] for k in keys)
    assert len(set(before.values())) == 4


def test_shard_records_partition_the_split(tmp_path):
    for i in range(12):
        Image.new("RGB", (4, 4)).save(tmp_path / f"{i}.png")
    records = list_image_folder(tmp_path)
    parts = [shard_records(records, s, 3) for s in range(3)]
    assert sorted(r.key for p in parts for r in p) == sorted(r.key for r in records)
    with pytest.raises(ValueError, match="shard 3"):
        shard_records(records, 3, 3)


# ---------------------------------------------------------------- tiny VOC tree

VOC_TRAIN = ["2007_000032", "2007_000039"]
VOC_VAL = ["2007_000033", "2008_000002"]
VOC_AUG_ONLY = ["2008_000123", "2009_000001", "2010_000005"]  # SBD images outside train/val


def _palette_png(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[1:21] = np.random.default_rng(0).integers(0, 255, (20, 3))
    pal[255] = 224
    im.putpalette(pal.ravel().tolist())
    im.save(path)


def _box(labels: np.ndarray, y0: int, y1: int, x0: int, x1: int, value: int) -> None:
    """Fill rows y0..y1-1, cols x0..x1-1 with ``value`` and draw a 1-px void (255) border around it."""
    labels[y0 - 1:y1 + 1, x0 - 1:x1 + 1] = 255
    labels[y0:y1, x0:x1] = value


# objects of the val images: (y0, y1, x0, x1, class)
VAL_OBJECTS = {
    "2007_000033": [(5, 15, 5, 20, PERSON), (18, 28, 25, 38, DOG)],
    "2008_000002": [(3, 10, 3, 12, CAT), (12, 25, 14, 30, PERSON), (4, 8, 30, 36, PERSON)],
}


def make_voc(root: Path, aug: bool = True) -> Path:
    """A VOCdevkit/VOC2012 tree with the standard folders, palette PNGs and 255 borders."""
    voc = root / "VOCdevkit" / "VOC2012"
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("\n".join(VOC_TRAIN) + "\n")
    (sets / "val.txt").write_text("\n".join(VOC_VAL) + "\n")
    (sets / "trainval.txt").write_text("\n".join(sorted(VOC_TRAIN + VOC_VAL)) + "\n")
    (voc / "JPEGImages").mkdir()
    rng = np.random.default_rng(1)
    for name in VOC_TRAIN + VOC_VAL + VOC_AUG_ONLY:
        pixels = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(voc / "JPEGImages" / f"{name}.jpg")
    for name in VOC_TRAIN + VOC_VAL:
        cls = np.zeros((H, W), np.uint8)
        obj = np.zeros((H, W), np.uint8)
        for i, (y0, y1, x0, x1, c) in enumerate(VAL_OBJECTS.get(name, [(6, 20, 6, 30, DOG)]), start=1):
            _box(cls, y0, y1, x0, x1, c)
            _box(obj, y0, y1, x0, x1, i)
        _palette_png(voc / "SegmentationClass" / f"{name}.png", cls)
        _palette_png(voc / "SegmentationObject" / f"{name}.png", obj)
    if aug:
        for name in VOC_TRAIN + VOC_VAL + VOC_AUG_ONLY:
            Image.fromarray(np.zeros((H, W), np.uint8), mode="L").save(
                _mkparent(voc / "SegmentationClassAug" / f"{name}.png"))
    return voc


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_voc_splits_list_their_jpegs_with_stable_ids(tmp_path):
    voc = make_voc(tmp_path)
    val = voc_records(voc, "val")
    assert [r.key for r in val] == sorted(VOC_VAL)
    assert [r.path for r in val] == [voc / "JPEGImages" / f"{n}.jpg" for n in sorted(VOC_VAL)]
    assert [r.image_id for r in val] == [2007000033, 2008000002]
    assert [r.key for r in voc_records(voc, "train")] == VOC_TRAIN


def test_voc_train_aug_is_the_aug_labels_minus_val_unless_a_list_file_exists(tmp_path):
    voc = make_voc(tmp_path)
    assert voc_split_names(voc, "train_aug") == sorted(VOC_TRAIN + VOC_AUG_ONLY)
    (voc / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("2009_000001\n2007_000032\n")
    assert [r.key for r in voc_records(voc, "train_aug")] == ["2007_000032", "2009_000001"]
    explicit = tmp_path / "mine.txt"
    explicit.write_text("2010_000005\n")
    assert voc_split_names(voc, "train_aug", str(explicit)) == ["2010_000005"]


def test_voc_source_resolves_to_train_aug_and_val(tmp_path):
    voc = make_voc(tmp_path)
    ds = load_settings({"dataset": {"source": "voc", "voc": {"root": str(voc)}}}).dataset
    source = dataset_source(ds, str(tmp_path / "results"))
    assert [r.key for r in source.records("train")] == sorted(VOC_TRAIN + VOC_AUG_ONLY)
    assert [r.key for r in source.records("val")] == sorted(VOC_VAL)
    assert source.gt_instances("val") == str(tmp_path / "results" / "gt" / "voc_val.json")


def test_voc_instances_have_the_known_masks_boxes_and_categories(tmp_path):
    voc = make_voc(tmp_path)
    out = tmp_path / "gt" / "voc_val.json"
    assert main(["voc-instances", "--root", str(voc), "--split", "val", "--out", str(out)]) == 0
    coco = json.loads(out.read_text())
    assert [(c["id"], c["name"]) for c in coco["categories"]] == list(enumerate(VOC_CLASSES, start=1))
    assert [(im["id"], im["file_name"], im["height"], im["width"]) for im in coco["images"]] == [
        (2007000033, "2007_000033.jpg", H, W), (2008000002, "2008_000002.jpg", H, W)]
    by_image: dict[int, list] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"]) == 5
    for im in coco["images"]:
        anns = by_image[im["id"]]
        expected = VAL_OBJECTS[im["file_name"][:-4]]
        assert len(anns) == len(expected)
        for ann, (y0, y1, x0, x1, c) in zip(anns, expected, strict=True):
            assert ann["category_id"] == c and ann["iscrowd"] == 0
            assert ann["bbox"] == [x0, y0, x1 - x0, y1 - y0]
            assert ann["area"] == (y1 - y0) * (x1 - x0)  # the 255 border belongs to no instance
            mask = decode_segmentation(ann["segmentation"], H, W)
            want = np.zeros((H, W), bool)
            want[y0:y1, x0:x1] = True
            assert (mask == want).all()


def test_voc_missing_folders_and_lists_are_named_with_their_place(tmp_path):
    with pytest.raises(DatasetLayoutError, match="VOC2012.*expected .*nowhere"):
        voc_records(tmp_path / "nowhere", "val")
    voc = make_voc(tmp_path)
    (voc / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"expected .*ImageSets/Segmentation/val\.txt"):
        voc_records(voc, "val")
    (voc / "JPEGImages" / "2007_000039.jpg").unlink()
    with pytest.raises(DatasetLayoutError, match=r"1 VOC 'train' images .*2007_000039\.jpg"):
        voc_records(voc, "train")
    bare = make_voc(tmp_path / "bare", aug=False)
    with pytest.raises(DatasetLayoutError, match=r"train_aug\.txt.*SegmentationClassAug"):
        voc_records(bare, "train_aug")
    (bare / "SegmentationObject" / "2008_000002.png").unlink()
    with pytest.raises(DatasetLayoutError, match=r"SegmentationObject/2008_000002\.png"):
        write_voc_instances(bare, "val", tmp_path / "x.json")
    assert main(["voc-instances", "--root", str(bare), "--out", str(tmp_path / "y.json")]) == 1
    assert not (tmp_path / "y.json").exists()


# ---------------------------------------------------------------- tiny COCO tree

COCO_IDS = [9, 25, 30, 34, 36]  # all in the (made-up) instances_train2014.json
LISTED = [25, 9, 36]            # the made-up coco_20k_filenames.txt


def _coco_name(i: int) -> str:
    return f"COCO_train2014_{i:012d}.jpg"


def make_coco(root: Path) -> dict[str, Path]:
    """train2014/ images, annotations/instances_train2014.json and a coco_20k_filenames.txt."""
    images = root / "coco" / "train2014"
    images.mkdir(parents=True)
    for i in COCO_IDS:
        Image.new("RGB", (W, H), (i, 2 * i, 3 * i)).save(images / _coco_name(i))
    cats = [{"id": 1, "name": "person", "supercategory": "person"},
            {"id": 18, "name": "dog", "supercategory": "animal"},
            {"id": 90, "name": "toothbrush", "supercategory": "indoor"}]
    anns = []
    for i in COCO_IDS:
        for j, cat in enumerate((1, 18, 90)[: 1 + i % 3]):
            anns.append({"id": 100 * i + j, "image_id": i, "category_id": cat, "iscrowd": 0,
                         "bbox": [j, j, 5, 5], "area": 25.0,
                         "segmentation": [[j, j, j + 5, j, j + 5, j + 5, j, j + 5]]})
    data = {"info": {"description": "made up"}, "licenses": [],
            "images": [{"id": i, "file_name": _coco_name(i), "height": H, "width": W} for i in COCO_IDS],
            "annotations": anns, "categories": cats}
    ann_file = root / "coco" / "annotations" / "instances_train2014.json"
    ann_file.parent.mkdir()
    ann_file.write_text(json.dumps(data))
    names = root / "coco" / "coco_20k_filenames.txt"
    names.write_text("".join(f"{_coco_name(i)}\n" for i in LISTED))
    return {"images": images, "annotations": ann_file, "filenames": names}


def test_coco20k_lists_only_the_named_images_with_their_coco_ids(tmp_path):
    paths = make_coco(tmp_path)
    records = coco20k_records(paths["images"], paths["filenames"])
    assert [r.key for r in records] == [_coco_name(i)[:-4] for i in sorted(LISTED)]
    assert [r.image_id for r in records] == sorted(LISTED)
    assert all(r.path.parent == paths["images"] for r in records)


def test_coco20k_instances_keep_the_listed_images_and_their_annotations(tmp_path):
    paths = make_coco(tmp_path)
    out = tmp_path / "gt" / "coco20k.json"
    argv = ["coco20k-instances", "--annotations", str(paths["annotations"]),
            "--filenames", str(paths["filenames"]), "--out", str(out)]
    assert main(argv) == 0
    sub = json.loads(out.read_text())
    full = json.loads(paths["annotations"].read_text())
    assert [im["id"] for im in sub["images"]] == sorted(LISTED)
    assert sorted(a["id"] for a in sub["annotations"]) == sorted(
        a["id"] for a in full["annotations"] if a["image_id"] in LISTED)
    assert len(sub["annotations"]) == sum(1 + i % 3 for i in LISTED)
    assert sub["categories"] == full["categories"] and sub["info"] == full["info"]


def test_coco20k_errors_name_the_missing_file_or_entry(tmp_path):
    paths = make_coco(tmp_path)
    with open(paths["filenames"], "a") as f:
        f.write("COCO_train2014_000000000077.jpg\n")
    with pytest.raises(ValueError, match=r"1 images listed .* not in this instances file: "
                                         r"COCO_train2014_000000000077\.jpg"):
        coco20k_instances(paths["annotations"], paths["filenames"])
    with pytest.raises(DatasetLayoutError, match=r"COCO_train2014_000000000077\.jpg"):
        coco20k_records(paths["images"], paths["filenames"])
    with pytest.raises(DatasetLayoutError, match=r"dataset\.coco20k\.filenames.*expected .*missing\.txt"):
        coco20k_records(paths["images"], tmp_path / "missing.txt")
    with pytest.raises(DatasetLayoutError, match=r"train2014 image.*expected .*nope"):
        coco20k_records(tmp_path / "nope", paths["filenames"])


# ---------------------------------------------------------------- paper configs


def _load(name: str) -> dict:
    return yaml.safe_load((REPO / "configs" / name).read_text())


def _merged(base: dict, over: dict) -> dict:
    """Snakemake's --configfile merge: ``over`` updates ``base`` key by key."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.mark.parametrize("name,k", [("voc.yaml", 20), ("coco20k.yaml", 80)])
def test_paper_configs_validate_with_the_paper_settings(name, k):
    cfg = validate_config(_load(name))
    assert cfg["mining"]["backbone"] == {"name": "vit_small_patch16_224.dino", "pretrained": True,
                                         "checkpoint": None}
    assert cfg["mining"]["short_side"] == 640
    assert cfg["clustering"]["backbone"]["name"] == "vit_small_patch8_224.dino"
    assert cfg["clustering"]["num_clusters"] == k and cfg["clustering"]["overclustering"] == 1
    assert cfg["pseudo_labels"]["tau"] == 0.9
    seg = cfg["segmentation"]
    assert (seg["arch"], seg["output_stride"], seg["atrous_rates"], seg["frozen_stages"]) == (
        "resnet50", 8, [12, 24, 36], 2)
    assert (seg["epochs"], seg["batch_size"], seg["lr"], seg["lr_drop_epochs"]) == (45, 16, 0.002, [40])
    assert (seg["hard_pixel_fraction"], seg["crop_size"], seg["scale_range"], seg["rotation_degrees"]) == (
        0.2, 512, [0.75, 1.25], 5)
    assert seg["pretrained_backbone"] and cfg["detector"]["pretrained_backbone"]
    assert cfg["detector"]["trainable_layers"] == 3
    # the authors' code, item by item (README "Paper settings")
    assert cfg["mining"]["preprocess"] == "reference"
    clu = cfg["clustering"]
    assert (clu["crop"], clu["center"], clu["kmeans_batch_size"], clu["seed"], clu["n_init"]) == (
        "native", False, 1000, 1234, 3)
    assert clu["extra_images"]  # K-means also sees the VOC 2007 support set / all COCO images
    det = cfg["detector"]
    assert (det["backend"], det["architecture"], det["batchnorm"], det["detections_per_image"]) == (
        "detectron2", "c4", "train", 100)
    assert (det["train_min_size"], det["test_min_size"], det["warmup_iters"]) == ([480, 800], 800, 100)
    assert (seg["transform"], seg["hard_pixel_count"]) == ("reference", "batch")
    assert (cfg["crf"]["unary"], cfg["crf"]["channel_order"]) == ("probabilities", "bgr")
    ev = cfg["evaluation"]
    assert (ev["mapping"], ev["single_object"]) == ("masks", "reference")
    assert (ev["majority"], ev["absent_classes"]) == ("iou", "zero")
    assert ev["mask_ap_split"] == ("seg_trainval" if name == "voc.yaml" else "eval")
    probe = cfg["linear_probe"]
    assert (probe["transform"], probe["rotation_degrees"], probe["head_init"]) == ("reference", 5, "normal")


@pytest.mark.parametrize("name", ["voc.yaml", "coco20k.yaml"])
def test_paper_configs_override_every_demo_setting_of_config_yaml(name):
    """No demo value may leak into a paper run, even if a paper config is merged over config.yaml
    (the Snakefile reads config.yaml only when no --configfile is given)."""
    demo = yaml.safe_load((REPO / "config.yaml").read_text())
    paper = _load(name)
    merged = validate_config(_merged(demo, paper))
    alone = validate_config(paper)
    for cfg in (merged, alone):
        cfg["dataset"].pop("demo")
        if "pretrain" in cfg:  # inert while disabled (the paper uses DINO hub weights)
            assert cfg.pop("pretrain")["enabled"] is False
    assert merged == alone


def test_benchmark_sources_require_their_paths():
    with pytest.raises(ConfigError, match=r"dataset\.voc\.root"):
        validate_config({"dataset": {"source": "voc"}})
    with pytest.raises(ConfigError, match=r"dataset\.coco20k\.filenames"):
        validate_config({"dataset": {"source": "coco20k", "coco20k": {"images": "x"}}})
    with pytest.raises(ConfigError, match=r"dataset\.voc\.train_split"):
        validate_config({"dataset": {"source": "voc", "voc": {"root": "x", "train_split": "aug"}}})


# ---------------------------------------------------------------- dry runs of the full DAG

FULL_DAG = {"mine", "cluster_features", "cluster", "train_detector", "predict_detector", "pseudo_labels",
            "initial_labels", "train_segmentation", "predict_segmentation", "evaluate", "all"}


def _dry_run(workdir: Path, config: str, override: dict) -> subprocess.CompletedProcess:
    (workdir / "override.yaml").write_text(yaml.safe_dump(override))
    for stage in ("detector", "segmentation"):  # the MoCo weights must exist; a dry run never loads them
        _mkparent(workdir / _load(config)[stage]["pretrained_backbone"]).touch()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "-n", "-p",
           "--cores", "2", "--configfile", str(REPO / "configs" / config), str(workdir / "override.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def test_voc_config_plans_the_full_dag_on_a_tiny_tree(tmp_path):
    voc = make_voc(tmp_path)
    Image.new("RGB", (W, H)).save(voc / "JPEGImages" / "2012_999999.jpg")  # in no split list
    voc2007 = _mkparent(tmp_path / "VOCdevkit" / "VOC2007" / "JPEGImages" / "000001.jpg")
    Image.new("RGB", (W, H)).save(voc2007)
    extra = [str(voc / "JPEGImages"), str(voc2007.parent)]
    proc = _dry_run(tmp_path, "voc.yaml", {"dataset": {"num_shards": 2, "voc": {"root": str(voc)}},
                                           "clustering": {"extra_images": extra}})
    planned = planned_rules(proc)
    assert FULL_DAG | {"voc_instances", "mask_ap", "crf_refine"} <= planned
    assert "coco20k_instances" not in planned
    text = proc.stdout
    assert f"--gt-semantic {voc / 'SegmentationClass'}" in text and "--split val" in text
    assert "results/gt/voc_val.json" in text
    # the authors' protocol: K-means also fitted on two extra folders, mask AP on the 2913-image
    # segmentation trainval set, the CRF from the predictions' logits
    assert "results/masks/extra0/shard-" in text and "results/features/extra1/shard-" in text
    assert "--features-extra" in text
    assert "results/gt/voc_trainval.json" in text and "predictions_seg_trainval.json" in text
    assert "--logits results/segmentation/logits/val" in text


def test_coco20k_config_plans_the_full_dag_on_a_tiny_tree(tmp_path):
    paths = make_coco(tmp_path)
    override = {"dataset": {"num_shards": 2, "coco20k": {k: str(v) for k, v in paths.items()}},
                "clustering": {"extra_images": [str(paths["images"])]}}
    proc = _dry_run(tmp_path, "coco20k.yaml", override)
    planned = planned_rules(proc)
    assert FULL_DAG | {"coco20k_instances"} <= planned and "voc_instances" not in planned
    text = proc.stdout
    assert "--split train" in text and "--gt-semantic" not in text
    assert "segmentation/predictions/val" not in text and "pseudo_labels/val" not in text
    assert "results/masks/extra0/shard-" in text  # the train2014 images outside COCO20k, for K-means


def test_evaluate_scores_voc_val_against_segmentation_class_pngs(tmp_path):
    """SegmentationClass holds train and val maps; evaluate scores the val images only, 255 ignored."""
    voc = make_voc(tmp_path)
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    relabel = np.zeros(256, np.uint8)
    relabel[[PERSON, DOG, CAT]] = [1, 2, 3]  # predicted clusters: a permutation of the GT classes
    for name in VOC_VAL:
        gt = np.array(Image.open(voc / "SegmentationClass" / f"{name}.png"))
        Image.fromarray(relabel[gt], mode="L").save(pred_dir / f"{name}.png")
    cfg = json.dumps({"dataset": {"source": "voc", "voc": {"root": str(voc)}},
                      "clustering": {"num_clusters": 3}})  # 4 predicted labels with background
    out = tmp_path / "out"
    argv = ["evaluate", "--config", cfg, "--split", "val", "--gt-semantic", str(voc / "SegmentationClass"),
            "--pred", f"segmentation={pred_dir}", "--out-metrics", str(out / "m.json"),
            "--out-report", str(out / "r.md"), "--out-figure", str(out / "f.png")]
    assert main(argv) == 0
    metrics = json.loads((out / "m.json").read_text())
    assert metrics["meta"]["num_images"] == len(VOC_VAL)
    per_class = metrics["segmentation"]["per_class"]
    assert {k for k, v in per_class.items() if v is not None} == {"background", "person", "dog", "cat"}
    assert metrics["segmentation"]["miou"] == pytest.approx(100.0)
