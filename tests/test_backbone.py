"""ViT construction and checkpoint loading (DINO layouts, safetensors), q/k extraction; the shipped
demo ViT (DINO on the demo scenes): it attends to objects, and carries its recipe."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
import yaml
from conftest import REPO
from safetensors import safe_open
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from maskdistill.backbone import (
    DEMO_WEIGHTS,
    check_vit_name,
    cls_features,
    create_vit,
    dino_pos_embed,
    last_block_qk,
    load_resnet_weights,
    use_dino_pos_embed,
)
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


# ---------------------------------------------------------------- DINO positional embeddings


def _bicubic_matrix(out_len: int, in_len: int, inv_scale: float) -> np.ndarray:
    """(out_len, in_len) weights of PyTorch's bicubic resampling (align_corners False, a = -0.75,
    border indices clamped), written from the formula: output i samples the input at
    (i + 0.5) * inv_scale - 0.5."""
    a = -0.75

    def near(x: float) -> float:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: float) -> float:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    m = np.zeros((out_len, in_len))
    for i in range(out_len):
        src = (i + 0.5) * inv_scale - 0.5
        base = int(np.floor(src))
        t = src - base
        for offset, weight in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t)), strict=True):
            m[i, min(max(base + offset, 0), in_len - 1)] += weight
    return m


def test_dino_pos_embed_follows_the_formula_on_a_non_square_grid():
    # a 2x2 pretrained grid (2 channels, not symmetric) to a 3-row, 5-column patch grid
    grid = np.array([[[1.0, -2.0], [4.0, 0.5]], [[-3.0, 7.0], [2.0, -1.0]]])  # (2 channels, 2, 2)
    pos = torch.tensor(grid, dtype=torch.float32).permute(1, 2, 0).reshape(1, 4, 2)
    out = dino_pos_embed(pos, (3, 5))
    # DINO: scale factor (rows + 0.1) / 2 on the rows, (columns + 0.1) / 2 on the columns
    rows, cols = _bicubic_matrix(3, 2, 2 / 3.1), _bicubic_matrix(5, 2, 2 / 5.1)
    expected = np.stack([rows @ grid[c] @ cols.T for c in range(2)], axis=-1).reshape(1, 15, 2)
    assert out.shape == (1, 15, 2)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)
    # resampling to the exact grid (timm: factor 3/2 and 5/2) gives other embeddings
    rows, cols = _bicubic_matrix(3, 2, 2 / 3), _bicubic_matrix(5, 2, 2 / 5)
    exact = np.stack([rows @ grid[c] @ cols.T for c in range(2)], axis=-1).reshape(1, 15, 2)
    assert np.abs(out.numpy() - exact).max() > 0.05


def test_dino_pos_embed_keeps_the_pretrained_grid_and_refuses_non_square_embeddings():
    pos = torch.randn(1, 9, 4)
    assert torch.equal(dino_pos_embed(pos, (3, 3)), pos)
    assert not torch.allclose(dino_pos_embed(pos, (3, 4))[:, :3], pos[:, :3])
    with pytest.raises(ValueError, match="8 patches"):
        dino_pos_embed(torch.zeros(1, 8, 4), (3, 3))


def _tiny_vit(reg_tokens: int, no_embed_class: bool) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=8, embed_dim=8, depth=2, num_heads=2, num_classes=0,
                              reg_tokens=reg_tokens, no_embed_class=no_embed_class, dynamic_img_size=True)
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize(("reg_tokens", "no_embed_class"), [(0, False), (2, False), (2, True)])
def test_dino_pos_embed_reaches_the_first_block_of_both_forward_paths(reg_tokens, no_embed_class):
    model = _tiny_vit(reg_tokens, no_embed_class)
    use_dino_pos_embed(model)
    model.patch_embed.proj.weight.zero_()  # patch tokens = bias only, so the block input is known
    x = torch.randn(1, 3, 24, 40)  # a 3x5 grid from a 2x2 pretrained one
    prefix = 1 + reg_tokens
    pos = model.pos_embed
    patch_pos = dino_pos_embed(pos[:, 0 if no_embed_class else prefix:], (3, 5))
    expected = torch.cat([model.cls_token, *([model.reg_token] if reg_tokens else []),
                          model.patch_embed.proj.bias.expand(1, 15, 8) + patch_pos], dim=1)
    if not no_embed_class:
        expected[:, :prefix] += pos[:, :prefix]
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    last_block_qk(model, x)
    cls_features(model, x)
    assert len(seen) == 2
    for tokens in seen:
        torch.testing.assert_close(tokens, expected)


def test_create_vit_with_dino_pos_embed_equals_timm_on_the_pretrained_size_only():
    timm_vit = create_vit("vit_tiny_patch16_224")
    dino_vit = create_vit("vit_tiny_patch16_224", pos_embed="dino")
    square, other = torch.randn(1, 3, 224, 224), torch.randn(1, 3, 48, 80)
    assert torch.equal(cls_features(timm_vit, square), cls_features(dino_vit, square))
    assert not torch.allclose(last_block_qk(timm_vit, other)[1], last_block_qk(dino_vit, other)[1], atol=1e-3)
    with pytest.raises(ValueError, match="pos_embed"):
        create_vit("vit_tiny_patch16_224", pos_embed="exact")


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


@pytest.mark.numeric
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
