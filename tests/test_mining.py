"""Stage 1: every rule of the mask construction, on hand-built q/k with known geometry; whole
shards mined with a tiny random ViT, under both ``on_bad_image`` policies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_images import mixed_folder as make_mixed_folder

from maskdistill.datasets import list_image_folder, without_skipped
from maskdistill.images import ImageReadError
from maskdistill.input_report import input_report, skipped_keys, write_input_report
from maskdistill.mining import (
    MiningParams,
    image_tensor,
    mask_from_qk,
    mass_threshold,
    mine_shard,
    mining_params,
    padded_hw,
    shape_order,
    upsample_patch_mask,
    upsample_patch_mask_reference,
)
from maskdistill.settings import section_settings
from maskdistill.storage import read_mask_shard, shard_skipped

U = torch.tensor([1.0, 0.0, 0.0, 0.0])  # "object" key direction
V = torch.tensor([0.0, 1.0, 0.0, 0.0])
W = torch.tensor([0.0, 0.0, 1.0, 0.0])  # a component every key can share


def build_qk(keys: torch.Tensor, cls_aff: torch.Tensor, heads: int = 3):
    """q/k (heads, 1 + n, 4) whose CLS affinity per head equals ``cls_aff[h]`` and keys ``keys``.

    The CLS query reads only dimension 3: q_cls = 1000 e3 and k_p[3] = affinity(p) / 1000, so the
    CLS affinity is exact while the key-key affinity G is (up to 1e-5) that of ``keys``.
    """
    n = keys.shape[0]
    q = torch.zeros(heads, 1 + n, 4)
    k = torch.zeros(heads, 1 + n, 4)
    q[:, 0, 3] = 1000.0
    for h in range(heads):
        k[h, 1:, :3] = keys[:, :3]
        k[h, 1:, 3] = cls_aff[h] / 1000.0
    return q, k


def scene(gh=8, gw=8):
    """Object = 3x3 block at rows 1-3, cols 1-3; same-looking blob at rows 6-7, cols 6-7;
    a single object-like patch at (4, 4) touching the object only diagonally."""
    keys = torch.zeros(gh, gw, 4)
    keys[...] = -U * 0.5 + V * 0.3
    obj = torch.zeros(gh, gw, dtype=torch.bool)
    obj[1:4, 1:4] = True
    blob = torch.zeros_like(obj)
    blob[6:8, 6:8] = True
    diag = torch.zeros_like(obj)
    diag[4, 4] = True
    keys[obj | blob | diag] = U
    aff = torch.full((gh, gw), 0.05)
    aff[obj] = torch.linspace(1.0, 2.0, int(obj.sum()))
    aff[blob] = 0.3
    aff[diag] = 0.2
    return keys.reshape(-1, 4), aff.reshape(-1), obj


def test_mass_threshold_keeps_top_half_of_mass():
    values = torch.tensor([3.0, 1.0, 4.0, 2.0])  # sorted 1,2,3,4 -> cum 0.1,0.3,0.6,1.0
    assert mass_threshold(values, 0.5).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert mass_threshold(values, 0.8).tolist() == [1.0, 0.0, 1.0, 1.0]


def test_known_scene_gives_the_object_block():
    keys, aff, obj = scene()
    q, k = build_qk(keys, aff.expand(3, -1))
    pm = mask_from_qk(q, k, (8, 8))
    assert pm.mask.tolist() == obj.numpy().tolist()  # blob and diagonal patch removed
    assert pm.seed == int(torch.argmax(aff))
    assert np.allclose(pm.cls_affinity.ravel(), aff.numpy())


def test_connected_component_is_4_connected():
    keys, aff, obj = scene()
    q, k = build_qk(keys, aff.expand(3, -1))
    pm = mask_from_qk(q, k, (8, 8))
    assert not pm.mask[4, 4]  # touches (3, 3) only diagonally
    assert not pm.mask[6:8, 6:8].any()


def test_first_heads_only_define_the_cls_affinity():
    keys, aff, obj = scene()
    other = torch.full_like(aff, 0.05)
    other[6 * 8 + 6] = 50.0  # the last head loves the blob
    per_head = torch.stack([aff, aff, other])
    q, k = build_qk(keys, per_head)
    default = mask_from_qk(q, k, (8, 8))  # heads 0 and 1 only
    assert default.mask.tolist() == obj.numpy().tolist()
    all_heads = mask_from_qk(q, k, (8, 8), MiningParams(cls_heads=3))
    assert all_heads.seed == 6 * 8 + 6
    assert all_heads.mask[6:8, 6:8].all() and not all_heads.mask[1:4, 1:4].any()


def test_seed_is_top1_of_the_mass_masked_affinity():
    keys, aff, _ = scene()
    aff = aff.clone()
    aff[0] = 1.5  # background patch with high affinity, but its key points away from the object
    q, k = build_qk(keys, aff.expand(3, -1))
    pm = mask_from_qk(q, k, (8, 8))
    assert pm.seed == int(torch.argmax(aff))  # the object's best patch (2.0) still wins
    aff[0] = 9.0
    q, k = build_qk(keys, aff.expand(3, -1))
    pm = mask_from_qk(q, k, (8, 8))
    assert pm.seed == 0


def test_attention_seed_is_not_outvoted_by_one_head_with_large_logits():
    # 1x10 strip: object patches 0-2 (key U), background 3-9 (key -U). Head 0 has large logits
    # on background patch 7; heads 1 and 2 put theirs on the object (most on patch 1). The raw mean affinity
    # follows head 0; the softmax attention (each head sums to 1) follows the two heads.
    keys = torch.stack([U] * 3 + [-U] * 7)
    per_head = torch.zeros(3, 10)
    per_head[0, 7] = 60.0
    per_head[1:, 1] = 20.0
    per_head[1:, 0] = per_head[1:, 2] = 10.0  # so that patch 1 passes the 50 % mass threshold
    q, k = build_qk(keys, per_head)
    raw = mask_from_qk(q, k, (1, 10), MiningParams(cls_heads=3, proposal_ratio=0.5))
    assert raw.seed == 7 and raw.mask.ravel().tolist() == [False] * 3 + [True] * 7
    params = MiningParams(cls_heads=3, proposal_ratio=0.5, seed_from="attention")
    attended = mask_from_qk(q, k, (1, 10), params)
    assert attended.seed == 1 and attended.mask.ravel().tolist() == [True] * 3 + [False] * 7
    np.testing.assert_allclose(attended.cls_affinity, raw.cls_affinity)  # same map is stored


def test_expansion_drops_proposals_dissimilar_to_the_seed():
    # 1x6 strip: patches 0-2 object (key U), 3-5 background (key -U). Background patches get the
    # second-highest affinities, so they are proposals, but G[s, p] < 0 removes them.
    keys = torch.stack([U, U, U, -U, -U, -U])
    aff = torch.tensor([5.0, 0.1, 0.1, 4.0, 4.0, 4.0])
    q, k = build_qk(keys, aff.expand(3, -1))
    pm = mask_from_qk(q, k, (1, 6), MiningParams(proposal_ratio=0.7))
    assert pm.seed == 0
    assert pm.mask.ravel().tolist() == [True, True, True, False, False, False]


def test_proposal_count_limits_the_expansion():
    # Patches 0-3 point along U, patch 4-7 along U+V/2 (similar to U, weaker affinity).
    # With 2 proposals only U patches vote; the potential is still positive on 4-7 (U.(U+V/2) > 0).
    keys = torch.stack([U] * 4 + [U + V * 0.5] * 4 + [-U] * 2)
    aff = torch.tensor([4.0, 3.9, 3.8, 3.7, 0.3, 0.3, 0.3, 0.3, 0.01, 0.01])
    q, k = build_qk(keys, aff.expand(3, -1))
    pm = mask_from_qk(q, k, (1, 10), MiningParams(proposal_ratio=0.2))  # int(0.2 * 10) = 2
    assert pm.mask.ravel().tolist() == [True] * 8 + [False] * 2
    # A proposal set dominated by -U patches flips the potential: use a seed among them.
    aff2 = torch.tensor([0.01] * 8 + [4.0, 3.0])
    q, k = build_qk(keys, aff2.expand(3, -1))
    pm2 = mask_from_qk(q, k, (1, 10), MiningParams(proposal_ratio=0.2))
    assert pm2.mask.ravel().tolist() == [False] * 8 + [True] * 2


def test_centred_keys_stop_a_shared_key_component_from_flooding_the_mask():
    # Object keys U, background keys -U, all plus a large shared component W: every raw key
    # affinity is positive, so the raw expansion takes the whole strip; centred keys do not.
    keys = torch.stack([U, U, U, -U, -U, -U]) + 3.0 * W
    aff = torch.tensor([5.0, 4.5, 4.5, 0.1, 0.1, 0.1])
    q, k = build_qk(keys, aff.expand(3, -1))
    flooded = mask_from_qk(q, k, (1, 6), MiningParams(proposal_ratio=0.5))
    assert flooded.mask.all()
    centred = mask_from_qk(q, k, (1, 6), MiningParams(proposal_ratio=0.5, center_keys=True))
    assert centred.mask.ravel().tolist() == [True, True, True, False, False, False]


def test_cls_heads_outside_range_names_the_key():
    keys, aff, _ = scene()
    q, k = build_qk(keys, aff.expand(3, -1))
    with pytest.raises(ValueError, match="mining.cls_heads"):
        mask_from_qk(q, k, (8, 8), MiningParams(cls_heads=4))


def test_the_default_settings_are_the_papers_rules():
    assert mining_params(section_settings("mining")) == MiningParams()
    params = mining_params(section_settings("mining", {"cls_heads": 2, "seed_from": "attention"}))
    assert params == MiningParams(cls_heads=2, seed_from="attention")


def test_upsample_nearest_through_resized_frame():
    pm = np.array([[1, 0, 1], [0, 1, 0]], bool)
    # 2x3 patches of 16 px -> padded 32x48; resized image 32x40 (last column partly padding);
    # original 64x80 = resized x2.
    up = upsample_patch_mask(pm, 16, (32, 40), (64, 80))
    assert up.shape == (64, 80)
    expected = np.kron(pm, np.ones((32, 32), bool))[:, :80]
    assert (up == expected).all()


def test_reference_upsampling_grows_the_mask_by_one_pixel():
    pm = np.zeros((3, 3), bool)
    pm[1, 1] = True
    # patch 2: the object is pixels 2-3 of the 6x6 resized frame; the original is twice as large
    up = upsample_patch_mask_reference(pm, 2, (6, 6), (12, 12))
    expected = np.zeros((12, 12), bool)
    expected[3:9, 3:9] = True  # nearest would be 4:8; Pillow's bicubic rings one pixel further out
    assert np.array_equal(up, expected)
    assert np.array_equal(upsample_patch_mask(pm, 2, (6, 6), (12, 12))[3:9, 3:9], np.pad(np.ones((4, 4)), 1))


def test_reference_upsampling_crops_to_the_resized_frame_and_uses_pillows_default_filter():
    pm = np.array([[0, 1, 0], [1, 1, 0]], bool)
    # 2x3 patches of 4 px, resized image 7x10: the last row and two columns are padding
    up = upsample_patch_mask_reference(pm, 4, (7, 10), (7, 10))
    assert np.array_equal(up, np.kron(pm, np.ones((4, 4), bool))[:7, :10])  # same size: no resize
    full = Image.fromarray(np.kron(pm, np.full((4, 4), 255, np.uint8))[:7, :10])
    # the authors call Image.resize without a filter: bicubic for a mode-L image (Pillow >= 7)
    assert np.array_equal(upsample_patch_mask_reference(pm, 4, (7, 10), (15, 21)),
                          np.asarray(full.resize((21, 15))) > 0)


def test_reference_input_is_torchvisions_transform_then_zero_padding():
    from torchvision import transforms

    rgb = np.random.default_rng(2).integers(0, 256, (333, 499, 3), dtype=np.uint8)
    tv = transforms.Compose([transforms.Resize(64), transforms.ToTensor(),
                             transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    expected = tv(Image.fromarray(rgb))
    x = image_tensor(rgb, 64, 16, "reference")
    assert expected.shape == (3, 64, 95) and x.shape == (3, 64, 96)
    assert torch.equal(x[:, :, :95], expected) and not x[:, :, 95:].any()
    with pytest.raises(ValueError, match="mining.preprocess"):
        image_tensor(rgb, 64, 16, "exact")


def test_batching_uses_the_size_rule_of_the_preprocessing():
    # 64 * 252 / 200 = 80.64: torchvision truncates to 80 (5 patches), ours rounds to 81 (6 patches)
    assert padded_hw((200, 252), 64, 16, "reference") == (64, 80)
    assert padded_hw((200, 252), 64, 16, "ours") == (64, 96)
    sizes = [(200, 252), (64, 80), (200, 252)]
    assert shape_order(sizes, 64, 16, "reference") == [0, 1, 2]  # one input size
    assert shape_order(sizes, 64, 16, "ours") == [1, 0, 2]


def _write_images(folder: Path, sizes):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate(sizes):
        arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        arr[h // 4: h // 2, w // 4: w // 2] = 255
        Image.fromarray(arr).save(folder / f"img{i}.png")


def test_mine_shard_writes_full_size_masks(tmp_path):
    _write_images(tmp_path / "imgs", [(40, 56), (40, 56), (33, 20)])
    records = list_image_folder(tmp_path / "imgs")
    cfg = section_settings("mining", {"backbone": {"name": "vit_tiny_patch16_224"}, "short_side": 48,
                                      "cls_heads": None, "mass": 0.5, "proposal_ratio": 0.4,
                                      "batch_size": 2})
    out = tmp_path / "shard.h5"
    stats = mine_shard(records, out, cfg, torch.device("cpu"))
    assert stats["images"] == 3
    items = {it.key: it for it in read_mask_shard(out)}
    assert set(items) == {"img0", "img1", "img2"}
    assert items["img2"].mask.shape == (33, 20)
    for it in items.values():
        assert it.mask.any()
        ys, xs = np.nonzero(it.mask)
        assert it.box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert it.patch_mask.reshape(-1)[it.seed]
    assert not list(tmp_path.glob(".shard*"))  # no temporary file left behind


def test_mine_shard_with_reference_preprocessing(tmp_path, monkeypatch):
    from maskdistill import mining
    from maskdistill.images import torchvision_resized_hw

    _write_images(tmp_path / "imgs", [(40, 57), (33, 20)])  # 48 * 57 / 40 = 68.4 -> 68
    records = list_image_folder(tmp_path / "imgs")
    made = []
    create = mining.create_vit
    monkeypatch.setattr(mining, "create_vit", lambda *a, **kw: made.append(kw) or create(*a, **kw))
    cfg = section_settings("mining", {"backbone": {"name": "vit_tiny_patch16_224"}, "short_side": 48,
                                      "preprocess": "reference"})
    out = tmp_path / "shard.h5"
    assert mine_shard(records, out, cfg, torch.device("cpu"))["images"] == 2
    assert made == [{"pos_embed": "dino"}]
    items = {it.key: it for it in read_mask_shard(out)}
    # inputs 48x68 -> padded 48x80 (3x5 patches); 79x48 -> 80x48 (5x3 patches)
    for key, hw, grid in (("img0", (40, 57), (3, 5)), ("img1", (33, 20), (5, 3))):
        it = items[key]
        assert it.mask.shape == hw and it.patch_mask.shape == grid
        resized = torchvision_resized_hw(*hw, 48)
        assert np.array_equal(it.mask, upsample_patch_mask_reference(it.patch_mask, 16, resized, hw))


@pytest.mark.numeric
def test_mixed_sizes_are_mined_in_full_batches_with_the_masks_of_batch_size_one(tmp_path, monkeypatch):
    # The shard alternates image sizes (and holds an unreadable file): taken in shard order, no two
    # neighbours share an input size and every forward pass would hold one image.
    from maskdistill import mining

    sizes = [(40, 56), (33, 20), (64, 64), (40, 56), (33, 20), (40, 56), (33, 20), (40, 56), (33, 20)]
    _write_images(tmp_path / "imgs", sizes)  # inputs 32x48 (x4), 64x32 (x4), 32x32 (x1) at short side 32
    (tmp_path / "imgs" / "img3x.png").write_text("not an image")
    records = list_image_folder(tmp_path / "imgs")
    passes: list[tuple[int, ...]] = []
    forward = mining.last_block_qk
    monkeypatch.setattr(mining, "last_block_qk",
                        lambda model, x: passes.append(tuple(x.shape)) or forward(model, x))
    shards = {}
    for batch_size, threads in ((1, 1), (4, 2)):
        passes.clear()
        cfg = section_settings("mining", {"backbone": {"name": "test_vit"}, "short_side": 32,
                                          "batch_size": batch_size, "decode_threads": threads})
        out = tmp_path / f"batch{batch_size}.h5"
        stats = mine_shard(records, out, cfg, torch.device("cpu"), on_bad_image="skip")
        assert stats["images"] == 9 and stats["skipped"] == 1 and stats["batches"] == len(passes)
        shards[batch_size] = read_mask_shard(out)
        assert [s.key for s in shard_skipped(out)] == ["img3x"]
    assert sorted(passes) == [(1, 3, 32, 32), (4, 3, 32, 48), (4, 3, 64, 32)]  # full batches of one shape
    one, four = shards[1], shards[4]
    assert [m.key for m in four] == [m.key for m in one] == [f"img{i}" for i in range(9)]  # shard order kept
    for a, b in zip(one, four, strict=True):
        assert (a.height, a.width, a.box, a.seed) == (b.height, b.width, b.box, b.seed), a.key
        assert np.array_equal(a.mask, b.mask) and np.array_equal(a.patch_mask, b.patch_mask), a.key
        np.testing.assert_allclose(a.cls_affinity, b.cls_affinity, rtol=1e-4, atol=1e-5)


def test_failed_shard_leaves_no_file(tmp_path):
    _write_images(tmp_path / "imgs", [(32, 32), (32, 32)])
    (tmp_path / "imgs" / "img9.png").write_bytes(b"not an image")
    records = list_image_folder(tmp_path / "imgs")
    cfg = section_settings("mining", {"backbone": {"name": "vit_tiny_patch16_224"}, "short_side": 32,
                                      "mass": 0.5, "proposal_ratio": 0.4})
    out = tmp_path / "shard.h5"
    with pytest.raises(ImageReadError, match="img9.png"):
        mine_shard(records, out, cfg, torch.device("cpu"))
    assert not out.exists() and not list(tmp_path.glob(".shard*"))
    stats = mine_shard(records, out, cfg, torch.device("cpu"), on_bad_image="skip")
    assert stats == {**stats, "images": 2, "skipped": 1}


def test_truncated_shard_is_refused(tmp_path):
    from maskdistill.storage import CorruptFileError, read_mask_shard

    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(CorruptFileError, match="bad.h5"):
        read_mask_shard(bad)


def test_decoding_runs_a_bounded_number_of_images_ahead(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from maskdistill import mining
    from maskdistill.images import ImageRecord

    started = []
    monkeypatch.setattr(mining, "_decode", lambda r, *args: started.append(r.key) or r.key)
    records = [ImageRecord(key=f"k{i}", path=Path(f"k{i}.png")) for i in range(50)]
    with ThreadPoolExecutor(2) as pool:
        stream = mining._prefetch(pool, records, 32, 16, ahead=4)
        first = next(stream)
        assert first == "k0" and len(started) <= 5  # never the whole shard in memory
        assert [first, *stream] == [r.key for r in records]  # order kept


# ---------------------------------------------------------------- dataset.on_bad_image

MINING = section_settings("mining", {"backbone": {"name": "vit_tiny_patch16_224", "pretrained": False},
                                     "short_side": 32, "batch_size": 2})


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    return make_mixed_folder(tmp_path_factory.mktemp("mixed"))


def test_mining_skip_policy_lists_every_bad_file_with_its_reason(mixed_folder, tmp_path):
    root, bad, good = mixed_folder
    records = list_image_folder(root)
    torch.manual_seed(0)
    stats = mine_shard(records, tmp_path / "shard-000.h5", MINING, torch.device("cpu"), "skip")
    assert stats["images"] == len(good) and stats["skipped"] == len(bad)
    mined = {m.key: m for m in read_mask_shard(tmp_path / "shard-000.h5")}
    assert set(mined) == good
    assert mined["one_pixel"].mask.shape == (1, 1) and mined["column"].mask.shape == (8, 1)
    assert mined["row"].mask.shape == (1, 8)
    skipped = {s.key: s for s in shard_skipped(tmp_path / "shard-000.h5")}
    assert set(skipped) == set(bad)
    for key, reason in bad.items():
        assert reason in skipped[key].reason and Path(skipped[key].path).parent == root
    # later stages leave the skipped images out; the per-run report lists them with reasons
    report = input_report({"train": [tmp_path / "shard-000.h5"]}, "skip")
    report_json = tmp_path / "input_report.json"
    write_input_report(report, report_json, tmp_path / "input_report.md")
    assert {r.key for r in without_skipped(records, skipped_keys(report_json, "train"))} == good
    assert report["splits"] == {"train": {"mined": len(good), "skipped": len(bad)}}
    assert {s["key"]: s["reason"] for s in report["skipped"]} == {k: v.reason for k, v in skipped.items()}


def test_mining_fail_policy_names_the_file_and_leaves_no_shard(mixed_folder, tmp_path):
    root, _, _ = mixed_folder
    records = [r for r in list_image_folder(root) if r.key in ("wide", "zero")]
    with pytest.raises(ImageReadError, match=r"zero\.jpg: empty file"):
        mine_shard(records, tmp_path / "shard-000.h5", MINING, torch.device("cpu"), "fail")
    assert list(tmp_path.iterdir()) == []
