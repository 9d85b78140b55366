"""ViT backbones: timm construction, local checkpoints (DINO, timm, safetensors), q/k and CLS features."""

from __future__ import annotations

import difflib
import logging
import types
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

log = logging.getLogger("maskdistill")

DEMO_VIT = "vit_demo_patch8_128"

# timm registry entry for a small ViT that trains on CPUs (pretrain.arch in the demo config).
# ``.dino_demo``: DINO-pretrained on the demo's train scenes (docs/pretraining.md), shipped in the package.
DEMO_WEIGHTS = Path(__file__).parent / "weights" / f"{DEMO_VIT}.dino_demo.safetensors"
default_cfgs = generate_default_cfgs({
    f"{DEMO_VIT}.dino_demo": {"file": str(DEMO_WEIGHTS), "num_classes": 0, "input_size": (3, 128, 128),
                              "license": "mit"},
    f"{DEMO_VIT}.untrained": {"num_classes": 0, "input_size": (3, 128, 128)},
})


@register_model
def vit_demo_patch8_128(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Pico/8 (dim 192, depth 6, 3 heads, 4 register tokens, 2.7 M parameters) for 128 px
    images. Registers (Darcet et al., 2024) give global information a place other than background
    patches, which keeps the CLS attention on objects."""
    args = {"img_size": 128, "patch_size": 8, "embed_dim": 192, "depth": 6, "num_heads": 3,
            "reg_tokens": 4}
    return build_model_with_cfg(VisionTransformer, DEMO_VIT, pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn, **{**args, **kwargs})


_WRAPPER_KEYS = ("teacher", "student", "model", "state_dict", "module")
_PREFIXES = ("module.", "backbone.", "encoder.")


def check_vit_name(name: str) -> None:
    """Raise a ValueError naming close matches when ``name`` is not a timm model."""
    base = name.split(".")[0]
    if timm.is_model(name) or timm.is_model(base):
        return
    close = difflib.get_close_matches(base, timm.list_models("vit_*"), n=5)
    raise ValueError(f"unknown timm model '{name}'" + (f"; did you mean {close}?" if close else ""))


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint (.pth/.pt/.bin or .safetensors) and unwrap DINO/timm/Lightning layouts."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"{p}: cannot read checkpoint ({err})") from err
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ValueError(f"{p}: checkpoint holds no state dict")
    out = {}
    for k, v in state.items():
        if not torch.is_tensor(v):
            continue
        for prefix in _PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


POS_EMBED_MODES = ("timm", "dino")


def create_vit(name: str, pretrained: bool = False, checkpoint: str | None = None,
               weights_file: str | Path | None = None,
               pos_embed: Literal["timm", "dino"] = "timm") -> nn.Module:
    """A timm ViT in eval mode, frozen, accepting any input size (``dynamic_img_size``).

    Weights come from ``checkpoint`` when given (DINO ``.pth`` files included), else, when
    ``pretrained``, from ``weights_file`` (the hub weights of ``name`` already downloaded, see
    :mod:`maskdistill.weights_cache`; nothing is downloaded then) or the timm hub, else random
    initialisation. ``pos_embed``: how the positional embeddings reach another patch grid than the
    pretrained one: ``timm`` resamples them to the exact grid (timm's ``resample_abs_pos_embed``),
    ``dino`` as DINO's ``interpolate_pos_encoding`` does (:func:`dino_pos_embed`).
    """
    check_vit_name(name)
    if pos_embed not in POS_EMBED_MODES:
        raise ValueError(f"pos_embed={pos_embed!r} is not one of {list(POS_EMBED_MODES)}")
    hub = pretrained and checkpoint is None
    overlay = {"file": str(weights_file)} if hub and weights_file else None
    if overlay and not Path(weights_file).is_file():
        raise FileNotFoundError(f"weights of '{name}' not found: {weights_file}")
    with torch.random.fork_rng(devices=[]):  # a random init is the same in every job and stage
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=hub, num_classes=0, dynamic_img_size=True,
                                  pretrained_cfg_overlay=overlay)
    if not hasattr(model, "blocks") or not hasattr(model.blocks[-1].attn, "qkv"):
        raise ValueError(f"timm model '{name}' is not a ViT with fused qkv attention")
    if checkpoint:
        state = load_state_dict_file(checkpoint)
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.", "head_"))}
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = checkpoint_filter_fn(state, model)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(("head", "fc_norm"))]
        if missing:
            raise ValueError(f"{checkpoint}: does not fit '{name}'; missing keys {missing[:8]}")
        if unexpected:
            log.warning("%s: ignored %d unexpected keys, e.g. %s", checkpoint, len(unexpected),
                        unexpected[:4])
        log.info("loaded ViT weights from %s", checkpoint)
    elif overlay:
        log.info("loaded the hub weights of '%s' from %s", name, weights_file)
    elif not pretrained:
        log.warning("ViT '%s' is RANDOMLY INITIALISED (no pretrained weights, no checkpoint)", name)
    if pos_embed == "dino":
        use_dino_pos_embed(model)
    model.eval().requires_grad_(False)
    return model


def dino_pos_embed(patch_pos: torch.Tensor, grid_hw: tuple[int, int],
                   pretrained_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """DINO's positional-embedding interpolation: (1, N0h*N0w, dim) on the pretrained grid
    ``pretrained_hw`` (None: square) -> (1, gh*gw, dim) on the patch grid ``grid_hw`` (rows,
    columns), both row-major like the patch tokens.

    As DINO's ``interpolate_pos_encoding``: bicubic ``F.interpolate`` (``align_corners=False``) of
    the (1, dim, N0h, N0w) grid with ``scale_factor`` ((gh + 0.1) / N0h, (gw + 0.1) / N0w). The
    factor, not the output size, sets where the samples fall (source row of output row i:
    (i + 0.5) N0h / (gh + 0.1) - 0.5), so this differs from resampling to the exact grid. (DINO's
    code names the input's dims 2 and 3 ``w`` and ``h``, so its ``w0`` is the row count: the
    first factor does belong to the rows.) The pretrained grid itself is returned unchanged, as
    DINO does for a square input of the pretrained size. Computed in float32, returned in the
    input's dtype.
    """
    _, n, dim = patch_pos.shape
    oh, ow = pretrained_hw or (_square_side(n),) * 2
    if oh * ow != n:
        raise ValueError(f"positional embedding of {n} patches is not a {oh}x{ow} grid")
    gh, gw = grid_hw
    if (gh, gw) == (oh, ow):
        return patch_pos
    grid = patch_pos.float().reshape(1, oh, ow, dim).permute(0, 3, 1, 2)
    out = torch.nn.functional.interpolate(grid, scale_factor=((gh + 0.1) / oh, (gw + 0.1) / ow),
                                          mode="bicubic", align_corners=False)
    if out.shape[-2:] != (gh, gw):
        raise ValueError(f"DINO interpolation gave a {tuple(out.shape[-2:])} grid, expected {grid_hw}")
    return out.permute(0, 2, 3, 1).reshape(1, gh * gw, dim).to(patch_pos.dtype)


def _square_side(n: int) -> int:
    """The side of a square grid of ``n`` positions; a ValueError if there is none."""
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f"positional embedding of {n} patches is not a square grid")
    return side


def _dino_pos_embed_method(self: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """timm's ``VisionTransformer._pos_embed`` with :func:`dino_pos_embed` instead of timm's
    resampling: ``x`` (B, gh, gw, dim) patch tokens -> (B, prefix + gh*gw, dim) with the prefix
    (class, register) tokens first; prefix embeddings, when the ViT has them, are kept as they are."""
    b, gh, gw, dim = x.shape
    prefix = [tok.expand(b, -1, -1) for tok in (self.cls_token, self.reg_token) if tok is not None]
    n_embed_prefix = 0 if self.no_embed_class else self.num_prefix_tokens
    pos = self.pos_embed
    patch_pos = dino_pos_embed(pos[:, n_embed_prefix:], (gh, gw), tuple(self.patch_embed.grid_size))
    x = x.reshape(b, gh * gw, dim)
    if self.no_embed_class:  # prefix tokens carry no positional embedding
        x = torch.cat([*prefix, x + patch_pos], dim=1)
    else:
        x = torch.cat([*prefix, x], dim=1) + torch.cat([pos[:, :n_embed_prefix], patch_pos], dim=1)
    return self.pos_drop(x)


def use_dino_pos_embed(model: nn.Module) -> None:
    """Make a timm ViT (``dynamic_img_size``) add DINO-interpolated positional embeddings
    (:func:`dino_pos_embed`) in every forward path that goes through ``model._pos_embed``."""
    if not isinstance(model, VisionTransformer) or model.pos_embed is None or not model.dynamic_img_size:
        raise ValueError("pos_embed 'dino' needs a timm VisionTransformer with a learned positional "
                         "embedding and dynamic_img_size")
    model._pos_embed = types.MethodType(_dino_pos_embed_method, model)


def patch_size(model: nn.Module) -> int:
    """The square patch size of a timm ViT."""
    ps = model.patch_embed.patch_size
    return int(ps[0] if isinstance(ps, tuple | list) else ps)


@torch.inference_mode()
def last_block_qk(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k of the last block, each (B, heads, tokens, head_dim), prefix tokens first.

    Stops after the last block's qkv projection: the rest of the network is not needed for mining.
    """
    tokens = model.patch_embed(x)
    tokens = model._pos_embed(tokens)
    tokens = model.patch_drop(tokens)
    tokens = model.norm_pre(tokens)
    for blk in model.blocks[:-1]:
        tokens = blk(tokens)
    last = model.blocks[-1]
    attn = last.attn
    b, n, _ = tokens.shape
    qkv = attn.qkv(last.norm1(tokens)).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    return attn.q_norm(q), attn.k_norm(k)


@torch.inference_mode()
def cls_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Final-norm CLS token (B, dim)."""
    return model.forward_features(x)[:, 0]


MOCO_PREFIXES = ("module.encoder_q.", "encoder_q.", "module.base_encoder.", "base_encoder.")


def resnet_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """ResNet weights from a local file: torchvision keys, or MoCo v2 (``encoder_q.``) / v3
    (``base_encoder.``) layouts whose other encoder, queue and heads are dropped; ``fc`` dropped."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"pretrained backbone not found: {p}")
    try:
        state: Any = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"{p}: cannot read backbone checkpoint ({err})") from err
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict):
        raise ValueError(f"{p}: backbone checkpoint holds no state dict")
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
    prefix = next((pre for pre in MOCO_PREFIXES if any(k.startswith(pre) for k in tensors)), None)
    if prefix is not None:
        log.info("%s: MoCo layout, using keys under '%s'", p, prefix)
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    else:
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return {k: v for k, v in tensors.items() if not k.startswith("fc.")}


def load_resnet_weights(resnet: nn.Module, path: str | Path) -> None:
    """Load :func:`resnet_state_dict` into ``resnet`` (a ResNet or its trunk); every trunk weight
    must be present and fit, else a ValueError names the file."""
    state = resnet_state_dict(path)
    expected = {k for k in resnet.state_dict() if not k.startswith("fc.")}
    missing = sorted(expected - set(state))
    # FrozenBatchNorm2d has no num_batches_tracked buffer
    unexpected = sorted(k for k in set(state) - expected if not k.endswith("num_batches_tracked"))
    if missing or unexpected:
        raise ValueError(f"{path}: does not fit the ResNet backbone (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    try:
        resnet.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit the backbone ({err})") from err
    log.info("loaded ResNet weights from %s (%d tensors)", path, len(state))
