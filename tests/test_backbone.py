"""ViT construction and checkpoint loading (DINO layouts, safetensors), q/k extraction; the shipped
demo ViT (DINO on the demo scenes): it attends to objects, and carries its recipe."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import yaml
from conftest import REPO
from safetensors import safe_open
from safetensors.torch import save_file

from maskdistill.backbone import DEMO_WEIGHTS, check_vit_name, create_vit, last_block_qk, load_resnet_weights
from maskdistill.demo import draw_scene
from maskdistill.mask_quality import cls_attention_on_objects
from maskdistill.settings import load_settings


def _reference():
    torch.manual_seed(3)
    return timm.create_model("vit_tiny_patch16_224", num_classes=0)


def test_dino_teacher_checkpoint_loads_with_prefixes_and_head(tmp_path):
    ref = _reference()
    state = {f"backbone.{k}": v for k, v in ref.state_dict().items()}
    state["head.mlp.0.weight"] = torch.zeros(2, 2)  # DINO projection head: ignored
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": state, "epoch": 100}, path)
    model = create_vit("vit_tiny_patch16_224", checkpoint=str(path))
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_safetensors_and_plain_state_dicts_load(tmp_path):
    ref = _reference()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "w.safetensors")
    model = create_vit("vit_tiny_patch16_224", checkpoint=str(tmp_path / "w.safetensors"))
    assert torch.equal(model.cls_token, ref.cls_token)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "small.pth"
    torch.save(timm.create_model("vit_small_patch16_224").state_dict(), path)
    with pytest.raises((ValueError, RuntimeError), match="small.pth|size mismatch"):
        create_vit("vit_tiny_patch16_224", checkpoint=str(path))


def test_missing_checkpoint_and_unknown_name_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        create_vit("vit_tiny_patch16_224", checkpoint=str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="vit_smal_patch16_224.*did you mean"):
        check_vit_name("vit_smal_patch16_224")
    check_vit_name("vit_small_patch16_224.dino")  # a hub tag on a known architecture is fine


def test_last_block_qk_matches_the_attention_module():
    model = create_vit("vit_tiny_patch16_224")
    x = torch.randn(1, 3, 48, 64)
    captured = {}
    attn = model.blocks[-1].attn
    handle = attn.qkv.register_forward_hook(lambda m, i, o: captured.setdefault("qkv", o))
    with torch.inference_mode():
        model.forward_features(x)
    handle.remove()
    q, k = last_block_qk(model, x)
    assert q.shape == (1, 3, 1 + 3 * 4, 64)
    qkv = captured["qkv"].reshape(1, 13, 3, 3, 64).permute(2, 0, 3, 1, 4)
    assert torch.allclose(q, qkv[0], atol=1e-5) and torch.allclose(k, qkv[1], atol=1e-5)


def test_resnet_weights_from_moco_v3_layout(tmp_path):
    import torchvision

    src = torchvision.models.resnet18(weights=None)
    state = {f"module.base_encoder.{k}": v for k, v in src.state_dict().items()}
    state.update({f"module.momentum_encoder.{k}": v * 0 for k, v in src.state_dict().items()})
    torch.save({"state_dict": state}, tmp_path / "moco.pth.tar")
    dst = torchvision.models.resnet18(weights=None)
    load_resnet_weights(dst, tmp_path / "moco.pth.tar")
    assert torch.equal(dst.conv1.weight, src.conv1.weight)


# ---------------------------------------------------------------- the shipped demo ViT

DEMO_CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())


@pytest.fixture(scope="module")
def val_scenes():
    demo = load_settings(DEMO_CONFIG).dataset.demo
    scenes = [draw_scene(demo, "val", i) for i in range(demo.num_val)]
    return [s[0] for s in scenes], [s[1] > 0 for s in scenes]


def test_demo_config_mines_and_clusters_with_the_shipped_weights():
    for section in ("mining", "clustering"):
        assert DEMO_CONFIG[section]["backbone"] == {"name": "vit_demo_patch8_128.dino_demo",
                                                    "pretrained": True, "checkpoint": None}
    assert DEMO_WEIGHTS.is_file() and DEMO_WEIGHTS.stat().st_size <= 15 * 2**20


def test_shipped_weights_record_the_config_that_reproduces_them():
    with safe_open(str(DEMO_WEIGHTS), "pt") as f:
        recipe = json.loads(f.metadata()["pretrain_config"])
        data = json.loads(f.metadata()["data_recipe"])
    for key, value in DEMO_CONFIG["pretrain"].items():
        if key != "enabled":
            assert recipe[key] == value, key
    # drawn by the demo generator with the demo's own settings (background included)
    assert data == {"demo": DEMO_CONFIG["dataset"]["demo"],
                    "demo_scenes": DEMO_CONFIG["pretrain"]["demo_scenes"]}


def test_shipped_vit_attends_to_objects_and_a_random_one_does_not(val_scenes):
    images, foregrounds = val_scenes
    trained = cls_attention_on_objects(create_vit("vit_demo_patch8_128.dino_demo", pretrained=True),
                                       images, foregrounds)
    random = cls_attention_on_objects(create_vit("vit_demo_patch8_128"), images, foregrounds)
    assert abs(random["share"] - random["area"]) < 3.0
    # the heads mining averages (mining.cls_heads of the demo config) look at objects 2.5x their area
    heads = DEMO_CONFIG["mining"]["cls_heads"]
    mined_heads = trained["share_per_head"][:heads]
    assert sum(mined_heads) / len(mined_heads) > 2.5 * trained["area"]
