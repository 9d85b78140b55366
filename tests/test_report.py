"""The report: this run beside the paper, the per-class and stage tables (Markdown and CSV)."""

import numpy as np
import pytest
from test_ground_truth import voc_like_split

from maskdistill.evaluation import evaluate
from maskdistill.ground_truth import folder_ground_truth
from maskdistill.paper import PAPER_VOC_PER_CLASS, VOC_CLASSES_WITH_BACKGROUND
from maskdistill.storage import write_json, write_label_png


def test_gt_semantic_folder_ignores_255_and_reports_paper_columns(tmp_path):
    images, gt_dir, gts = voc_like_split(tmp_path)
    pred = tmp_path / "pred"
    for key, gt in gts.items():
        p = np.where(gt == 15, 1, np.where(gt == 8, 2, 0)).astype(np.uint8)
        p[0, :] = 2  # wrong everywhere the GT says ignore: must not count
        write_label_png(pred / f"{key}.png", p)
    gt = folder_ground_truth(gt_dir, VOC_CLASSES_WITH_BACKGROUND,
                             {"a": images / "a.jpg", "b": images / "b.jpg"})
    out = tmp_path / "out"
    metrics = evaluate({"segmentation": pred}, gt, images, num_pred=3, out_metrics=out / "m.json",
                       out_report=out / "r.md", out_figure=out / "f.png", notes=[], paper="voc")
    seg = metrics["segmentation"]
    assert seg["miou"] == pytest.approx(100.0) and seg["pixel_accuracy"] == pytest.approx(100.0)
    assert seg["per_class"]["person"] == 100.0 and seg["per_class"]["aeroplane"] is None
    report = (out / "r.md").read_text()
    # this run beside the paper: the 45.8 row names the stage it came from
    assert "| clustering mIoU: segmentation model | 100.0 | 45.8 | +54.2 | segmentation |" in report
    assert "| linear probe mIoU | - | 58.7 | - | - |" in report
    # per-class table in VOC order with the paper's rows as columns
    assert "| class | segmentation | paper clustering | paper clustering+CRF | paper linear |" in report
    assert "| aeroplane | - | 74.7 | 80.3 | 80.5 |" in report
    table = report.split("## IoU per class")[1].split("##")[0]
    rows = [line.split(" | ")[0].lstrip("| ") for line in table.splitlines()
            if line.startswith("| ") and "class" not in line]
    assert rows == list(VOC_CLASSES_WITH_BACKGROUND)
    assert len(PAPER_VOC_PER_CLASS["clustering"]) == 21
    # the published per-class rows average to the headline numbers (up to the rows' rounding)
    for row, headline in (("clustering", 45.8), ("clustering+crf", 48.9), ("linear", 58.7),
                          ("linear+crf", 62.8)):
        assert np.mean(PAPER_VOC_PER_CLASS[row]) == pytest.approx(headline, abs=0.1)


def test_demo_report_says_no_paper_reference(tmp_path):
    images, gt_dir, gts = voc_like_split(tmp_path)
    pred = tmp_path / "pred"
    for key, gt in gts.items():
        write_label_png(pred / f"{key}.png", np.zeros_like(gt))
    out = tmp_path / "out"
    write_json(tmp_path / "ap.json", {"multi": {"AP": 12.5, "AP50": 30.0, "AP75": 5.0, "num_matched": 2},
                                      "single": {"AP": 20.0, "AP50": 40.0, "AP75": 10.0}})
    write_json(tmp_path / "lp.json", {"miou": 55.5, "miou_crf": 57.0, "epochs": 3,
                                      "per_class": {"background": 90.0, "person": 21.0}})
    metrics = evaluate({"segmentation": pred}, folder_ground_truth(gt_dir), images, 3, out / "m.json",
                       out / "r.md", out / "f.png", notes=[], paper="demo",
                       extras={"mask_ap": tmp_path / "ap.json", "linear_probe": tmp_path / "lp.json"})
    report = (out / "r.md").read_text()
    assert "No paper reference for this dataset" in report and "45.8" not in report
    assert metrics["mask_ap"]["multi"]["AP50"] == 30.0 and metrics["meta"]["paper"] is None
    assert "| multi object | 12.5 | 30.0 | 5.0 | 2 |" in report
    assert "mIoU 55.5, with CRF 57.0" in report
    assert "| person | 0.0 | 21.0 |" in report  # the probe's per-class column


def test_report_tables_are_written_as_csv_with_the_metrics_numbers(tmp_path):
    import pandas as pd

    images, gt_dir, gts = voc_like_split(tmp_path)
    for key, gt in gts.items():
        write_label_png(tmp_path / "good" / f"{key}.png", np.where(gt == 15, 1, 0).astype(np.uint8))
        write_label_png(tmp_path / "zeros" / f"{key}.png", np.zeros_like(gt))
    write_json(tmp_path / "lp.json", {"miou": 55.5, "per_class": {"background": 90.0, "person": 21.0}})
    out = tmp_path / "out"
    metrics = evaluate({"good": tmp_path / "good", "zeros": tmp_path / "zeros"},
                       folder_ground_truth(gt_dir), images, 3, out / "metrics.json", out / "report.md",
                       out / "report.png", notes=[], paper="voc",
                       extras={"linear_probe": tmp_path / "lp.json"})
    per_class = pd.read_csv(out / "report_per_class.csv", index_col="class")
    stages = pd.read_csv(out / "report_stages.csv", index_col="stage")
    assert list(per_class.index) == list(VOC_CLASSES_WITH_BACKGROUND)
    assert list(per_class.columns) == ["good", "zeros", "linear_probe", "paper clustering",
                                       "paper clustering+CRF", "paper linear"]
    for stage in ("good", "zeros"):
        for name, iou in metrics[stage]["per_class"].items():  # exactly the numbers of metrics.json
            assert (pd.isna(per_class.loc[name, stage]) if iou is None
                    else per_class.loc[name, stage] == iou), (stage, name)
        assert stages.loc[stage, "mIoU"] == metrics[stage]["miou"]
        assert stages.loc[stage, "pixel accuracy"] == metrics[stage]["pixel_accuracy"]
    assert per_class.loc["person", "linear_probe"] == 21.0 and pd.isna(per_class.loc["cat", "linear_probe"])
    assert tuple(per_class["paper clustering"]) == PAPER_VOC_PER_CLASS["clustering"]
    assert list(stages.index) == ["good", "zeros"]
