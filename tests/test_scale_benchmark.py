"""benchmarks/scale.py at a tiny size: every CPU rule runs on the synthetic data and gets a row."""

from __future__ import annotations

import importlib.util
import sys

from conftest import REPO


def test_scale_benchmark_measures_every_cpu_rule(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("scale", REPO / "benchmarks" / "scale.py")
    scale = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "scale", scale)  # its dataclasses look their module up
    spec.loader.exec_module(scale)
    table = scale.main(["--sizes", "24", "--clusters", "3", "--classes", "3", "--preds-per-image", "3",
                        "--shards", "2", "--workdir", str(tmp_path), "--json", str(tmp_path / "rows.json")])
    assert list(table["rule"]) == ["cluster", "initial_labels", "pseudo_labels", "mask_ap", "mask_quality",
                                   "evaluate"]
    assert (table["images"] == 24).all() and (table["peak_mb"] > 0).all() and (table["seconds"] > 0).all()
    mem = dict(zip(table["rule"], table["profile_mem_mb"], strict=True))
    assert mem["cluster"] == 32000 and mem["evaluate"] == 8000  # profiles/slurm/config.yaml
    assert "| cluster " in capsys.readouterr().out
    assert len(list((tmp_path / "n24" / "results" / "pseudo_labels").glob("*.png"))) == 24
    assert (tmp_path / "rows.json").is_file()
