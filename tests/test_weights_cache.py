"""Hub weights (maskdistill.weights_cache): which ones a config needs, and, with the network
unreachable, a clear error naming the config key, or the cached file loaded offline.

No test downloads anything: the hub is pointed at a closed local port (http://127.0.0.1:9) and the
cached weights are a tiny timm ViT's random weights, put into the cache the way the Hugging Face
hub library lays it out. The workflow's side (fetch_weights before any model job, jobs offline) is
tested in tests/test_workflow.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from maskdistill import weights_cache
from maskdistill.backbone import create_vit
from maskdistill.config import ConfigError, check_references, validate_config
from maskdistill.settings import VitSettings, load_settings
from maskdistill.weights_cache import (
    WeightsUnavailable,
    cache_folder,
    config_hub_weights,
    fetch_weights,
    hub_weight,
    manifest_file,
)

CLOSED_PORT = "http://127.0.0.1:9"  # nothing listens there: connection refused at once
TINY_HUB = "test_vit.r160_in1k"  # a 0.3 M parameter timm ViT whose weights live on the hub


def put_in_hub_cache(folder: Path, repo: str, filename: str, state: dict[str, torch.Tensor]) -> Path:
    """Store ``state`` as ``repo``'s ``filename`` in a Hugging Face hub cache (its documented layout:
    refs/main names the snapshot that holds the file)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = folder / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    (base / "snapshots" / commit).mkdir(parents=True)
    save_file(state, str(base / "snapshots" / commit / filename))
    return base / "snapshots" / commit / filename


@pytest.fixture
def offline_hub(monkeypatch):
    """The hub library pointed at a closed port, as on a GPU node without internet."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", CLOSED_PORT)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_the_paper_defaults_name_two_hub_weights_and_the_demo_none():
    weights = config_hub_weights(load_settings({}))
    assert [(w.key, w.name, w.repo) for w in weights] == [
        ("mining.backbone.name", "vit_small_patch16_224.dino", "timm/vit_small_patch16_224.dino"),
        ("clustering.backbone.name", "vit_small_patch8_224.dino", "timm/vit_small_patch8_224.dino")]
    assert weights[0].filenames == ("model.safetensors", "pytorch_model.bin")  # timm's order
    # The shipped demo ViT (a local file), a local checkpoint and a random ViT need no download.
    assert hub_weight("mining.backbone", VitSettings("vit_demo_patch8_128.dino_demo", True)) is None
    assert hub_weight("mining.backbone", VitSettings("vit_small_patch16_224.dino", True, "w.pth")) is None
    assert hub_weight("mining.backbone", VitSettings("vit_small_patch16_224.dino", False)) is None
    shipped = {"name": "vit_demo_patch8_128.dino_demo", "pretrained": True}
    demo = load_settings({"mining": {"backbone": shipped},
                          "clustering": {"backbone": {"name": "vit_tiny_patch16_224"}}})
    assert config_hub_weights(demo) == []


def test_the_default_cache_follows_xdg_and_the_setting_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_folder(None) == tmp_path / "xdg" / "maskdistill" / "weights"
    assert cache_folder(str(tmp_path / "mine")) == tmp_path / "mine"
    monkeypatch.chdir(tmp_path)  # a relative folder is taken from where the workflow runs
    assert cache_folder("shared/weights") == tmp_path / "shared" / "weights"


def test_a_cache_inside_the_workflow_folders_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="config key 'weights_cache'.*results/ folder"):
        check_references(validate_config({"weights_cache": "results/weights",
                                           "mining": {"backbone": {"name": "vit_tiny_patch16_224"}},
                                           "clustering": {"backbone": {"name": "vit_tiny_patch16_224"}}}))


def test_unreachable_hub_and_empty_cache_fail_once_naming_every_key_and_the_fixes(tmp_path, offline_hub,
                                                                                monkeypatch):
    attempts = []
    reach = weights_cache.unreachable
    monkeypatch.setattr(weights_cache, "unreachable",
                        lambda url, timeout: attempts.append(url) or reach(url, 2))
    with pytest.raises(WeightsUnavailable) as info:
        fetch_weights(config_hub_weights(load_settings({})), tmp_path / "cache")
    message = str(info.value)
    assert "config key 'mining.backbone.name': 'vit_small_patch16_224.dino'" in message
    assert "config key 'clustering.backbone.name': 'vit_small_patch8_224.dino'" in message
    assert "127.0.0.1:9 cannot be reached" in message and str(tmp_path / "cache") in message
    assert "where the internet can be reached" in message and "checkpoint:" in message
    assert attempts == [CLOSED_PORT]  # one try for both weights, no retries


def test_hub_switched_off_is_named(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsUnavailable, match="HF_HUB_OFFLINE is set"):
        fetch_weights(config_hub_weights(load_settings({})), tmp_path)


def test_cached_weights_are_found_and_loaded_without_the_network(tmp_path, offline_hub):
    weight = hub_weight("mining.backbone", VitSettings(TINY_HUB, True))
    assert weight is not None and weight.repo == f"timm/{TINY_HUB}"
    torch.manual_seed(1)
    state = timm.create_model(TINY_HUB).state_dict()  # stands for the hub's file, head included
    file = put_in_hub_cache(tmp_path, weight.repo, "model.safetensors", state)
    manifest = fetch_weights([weight], tmp_path)
    source = f"Hugging Face hub timm/{TINY_HUB}"
    assert manifest["weights"] == [{"key": "mining.backbone.name", "name": TINY_HUB, "file": str(file),
                                    "source": source, "bytes": file.stat().st_size}]
    (tmp_path / "weights.json").write_text(json.dumps(manifest))
    assert manifest_file(tmp_path / "weights.json", TINY_HUB) == file
    model = create_vit(TINY_HUB, pretrained=True, weights_file=file)
    loaded = model.state_dict()
    assert "head.weight" not in loaded  # num_classes=0: timm drops the classifier
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    file.unlink()  # the cache was emptied after fetching: the job says what to do
    with pytest.raises(WeightsUnavailable, match="gone from the weights cache.*delete .*weights.json"):
        manifest_file(tmp_path / "weights.json", TINY_HUB)
