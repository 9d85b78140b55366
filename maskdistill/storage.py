"""Files that stages exchange: atomic writes, HDF5 mask shards, COCO RLE, PNG label maps."""

from __future__ import annotations

import glob
import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

SHARD_FORMAT_VERSION = 1
_UMASK = os.umask(0)
os.umask(_UMASK)
IGNORE_LABEL = 255


class CorruptFileError(RuntimeError):
    """A stage file exists but cannot be trusted (truncated, incomplete or wrong format)."""


@contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the body succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix or f".tmp{final.suffix}"
    remove_stale_temps(final, suffix)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix, dir=final.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the final file normal permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def remove_stale_temps(final: Path, suffix: str) -> list[Path]:
    """Delete temporary files a killed writer of ``final`` left behind (one writer per output)."""
    pattern = f".{glob.escape(final.name)}.*{glob.escape(suffix)}"
    stale = [t for t in final.parent.glob(pattern) if t.is_file()]
    for t in stale:
        t.unlink(missing_ok=True)
    return stale


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file, naming the file in any error."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"JSON file not found: {p}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise CorruptFileError(f"{p}: not valid JSON ({err})") from err


def iter_json_items(path: str | os.PathLike[str], prefix: str) -> Iterator[Any]:
    """The items under ``prefix`` of a JSON file (ijson's notation: ``"annotations.item"`` for each
    element of the top-level ``annotations`` list, ``"item"`` for each element of a top-level list),
    parsed one at a time, so that memory does not grow with the file."""
    import ijson

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"JSON file not found: {p}")
    with open(p, "rb") as f:
        try:
            yield from ijson.items(f, prefix, use_float=True)
        except ijson.JSONError as err:
            raise CorruptFileError(f"{p}: not valid JSON ({err})") from err


def json_top_level(path: str | os.PathLike[str]) -> str:
    """``"list"`` or ``"dict"``: what a JSON file holds at its top level (from its first character)."""
    with open(path, "rb") as f:
        while (c := f.read(1)) and c.isspace():
            pass
    if c not in (b"[", b"{"):
        raise CorruptFileError(f"{path}: not a JSON object or list")
    return "list" if c == b"[" else "dict"


def annotation_groups(path: str | os.PathLike[str], prefix: str = "annotations.item"
                      ) -> Iterator[tuple[Any, list[dict[str, Any]]]]:
    """Each ``image_id`` of a COCO file's annotations with its annotations (in file order), streamed.

    Two passes over the file: the first counts each image's annotations, the second yields an
    image as soon as its last annotation is read. Files that list annotations image by image, as
    the workflow writes them, hold one image's annotations in memory at a time; any other order
    is read correctly too, holding the images begun but not finished.
    """
    remaining: Counter[Any] = Counter()
    for i, ann in enumerate(iter_json_items(path, prefix)):
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise ValueError(f"{path}: annotation {i} lacks 'image_id'")
        remaining[ann["image_id"]] += 1
    pending: dict[Any, list[dict[str, Any]]] = {}
    for ann in iter_json_items(path, prefix):
        image_id = ann["image_id"]
        group = pending.setdefault(image_id, [])
        group.append(ann)
        remaining[image_id] -= 1
        if not remaining[image_id]:
            yield image_id, pending.pop(image_id)
    if pending:  # the file changed between the passes
        raise CorruptFileError(f"{path}: changed while it was read")


# ---------------------------------------------------------------- label maps


def write_label_png(path: str | os.PathLike[str], labels: np.ndarray) -> None:
    """Write a uint8 label map as a single-channel PNG (atomic)."""
    if labels.ndim != 2:
        raise ValueError(f"label map must be 2-D, got shape {labels.shape}")
    if labels.max(initial=0) > 255 or labels.min(initial=0) < 0:
        raise ValueError("label values must lie in 0..255")
    with atomic_path(path, suffix=".tmp.png") as tmp:
        Image.fromarray(labels.astype(np.uint8), mode="L").save(tmp)


def read_label_png(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a label PNG (palette or grayscale) as a uint8 array without colour conversion."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"label map not found: {p}")
    with Image.open(p) as im:
        if im.mode not in ("L", "P", "I;16", "I"):
            raise ValueError(f"{p}: label maps must be single-channel, got mode {im.mode}")
        return np.array(im).astype(np.uint8)


# ---------------------------------------------------------------- COCO RLE


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """Binary mask (H, W) -> COCO compressed RLE with a JSON-friendly ``counts`` string."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def decode_segmentation(seg: Any, height: int, width: int) -> np.ndarray:
    """COCO segmentation (polygons, RLE or uncompressed RLE) -> bool mask (H, W)."""
    if isinstance(seg, list):
        rles = mask_utils.frPyObjects(seg, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = dict(seg)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    return mask_utils.decode(rle).astype(bool)


def key_of_file(file_name: str) -> str:
    """An image's key: its (relative) file name without the extension."""
    return Path(file_name).as_posix().rsplit(".", 1)[0]


def box_iou(a, b) -> float:
    """IoU of two boxes [x0, y0, x1, y1]."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def mask_to_box(mask: np.ndarray) -> list[float]:
    """Tight box [x0, y0, x1, y1] (exclusive end) of a bool mask; zeros when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


# ---------------------------------------------------------------- HDF5 mask shards


@dataclass
class MinedMask:
    """One image's mined object mask and what produced it."""

    key: str
    file_name: str  # path relative to the images root
    height: int
    width: int
    mask: np.ndarray  # bool (H, W) at the original image size
    box: list[float]  # x0, y0, x1, y1 in original pixels
    patch_mask: np.ndarray  # bool (gh, gw) on the patch grid
    cls_affinity: np.ndarray  # float32 (gh, gw), CLS->patch affinity averaged over heads
    seed: int  # flat index of the seed patch


@dataclass(frozen=True)
class SkippedImage:
    """An image a stage skipped under ``dataset.on_bad_image: skip``, and why."""

    key: str
    path: str
    reason: str


def _one_line(text: str) -> str:
    return " ".join(str(text).replace("\t", " ").splitlines())


def shard_skipped(path: str | os.PathLike[str]) -> list[SkippedImage]:
    """The images a complete mask shard records as skipped."""
    with open_mask_shard(path) as h5:
        text = _text(h5.attrs.get("skipped", ""))
    out = []
    for line in filter(None, text.split("\n")):
        parts = line.split("\t")
        if len(parts) == 2:  # older shards: path and reason only
            parts = [Path(parts[0]).stem, *parts]
        if len(parts) != 3:
            raise CorruptFileError(f"{path}: malformed 'skipped' entry {line!r}")
        out.append(SkippedImage(*parts))
    return out


class MaskShardWriter:
    """Stream mined masks into one HDF5 shard; the file appears under its name only when closed."""

    def __init__(self, path: str | os.PathLike[str], attrs: dict[str, Any]):
        self._ctx = atomic_path(path, suffix=".tmp.h5")
        self._tmp = self._ctx.__enter__()
        self._h5 = h5py.File(self._tmp, "w")
        self._h5.attrs["format_version"] = SHARD_FORMAT_VERSION
        self._h5.attrs["complete"] = False
        for name, value in attrs.items():
            self._h5.attrs[name] = value
        vlen_u8 = h5py.vlen_dtype(np.uint8)
        vlen_f4 = h5py.vlen_dtype(np.float32)
        str_dt = h5py.string_dtype()
        self._sets = {
            "keys": self._h5.create_dataset("keys", (0,), str_dt, maxshape=(None,)),
            "files": self._h5.create_dataset("files", (0,), str_dt, maxshape=(None,)),
            "image_hw": self._h5.create_dataset("image_hw", (0, 2), np.int32, maxshape=(None, 2)),
            "grid_hw": self._h5.create_dataset("grid_hw", (0, 2), np.int32, maxshape=(None, 2)),
            "boxes": self._h5.create_dataset("boxes", (0, 4), np.float32, maxshape=(None, 4)),
            "seeds": self._h5.create_dataset("seeds", (0,), np.int32, maxshape=(None,)),
            "masks": self._h5.create_dataset("masks", (0,), vlen_u8, maxshape=(None,)),
            "patch_masks": self._h5.create_dataset("patch_masks", (0,), vlen_u8, maxshape=(None,)),
            "cls_affinity": self._h5.create_dataset("cls_affinity", (0,), vlen_f4, maxshape=(None,)),
        }
        self.count = 0  # results written
        self._size = 0  # slots the datasets hold
        self._filled: set[int] = set()

    def append(self, item: MinedMask, slot: int | None = None) -> None:
        """Add one image's result, at position ``slot`` of the shard (default: after the last).

        Results may come in any order; :meth:`close` closes the gaps that no result filled (images
        that were skipped), keeping the slots' order.
        """
        i = self._size if slot is None else slot
        if i < 0 or i in self._filled:
            raise ValueError(f"mask shard slot {i} is negative or already written")
        if i >= self._size:
            for ds in self._sets.values():
                ds.resize(i + 1, axis=0)
            self._size = i + 1
        s = self._sets
        s["keys"][i] = item.key
        s["files"][i] = item.file_name
        s["image_hw"][i] = (item.height, item.width)
        s["grid_hw"][i] = item.patch_mask.shape
        s["boxes"][i] = item.box
        s["seeds"][i] = item.seed
        s["masks"][i] = np.packbits(item.mask.astype(bool).ravel())
        s["patch_masks"][i] = item.patch_mask.astype(np.uint8).ravel()
        s["cls_affinity"][i] = item.cls_affinity.astype(np.float32).ravel()
        self._filled.add(i)
        self.count += 1

    def _close_gaps(self) -> None:
        """Move the written slots down over the unwritten ones, in order (one entry in memory)."""
        for new, old in enumerate(sorted(self._filled)):
            if new != old:
                for ds in self._sets.values():
                    ds[new] = ds[old]
        for ds in self._sets.values():
            ds.resize(self.count, axis=0)
        self._size = self.count
        self._filled = set(range(self.count))

    def set_skipped(self, items: list[SkippedImage]) -> None:
        """Record the images that were skipped, one ``key<TAB>path<TAB>reason`` line each."""
        self._h5.attrs["skipped"] = "\n".join(
            "\t".join(_one_line(v) for v in (it.key, it.path, it.reason)) for it in items)

    def close(self) -> None:
        """Close the gaps, mark complete and move the file to its final name."""
        if self.count != self._size:
            self._close_gaps()
        self._h5.attrs["complete"] = True
        self._h5.attrs["num_images"] = self.count
        self._h5.close()
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
        """Drop the temporary file."""
        try:
            self._h5.close()
        finally:
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self) -> MaskShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def open_mask_shard(path: str | os.PathLike[str]) -> h5py.File:
    """Open a mask shard for reading, refusing incomplete or foreign files with a clear error."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"mask shard not found: {p}")
    try:
        h5 = h5py.File(p, "r")
    except OSError as err:
        raise CorruptFileError(f"{p}: not a readable HDF5 file ({err}); delete it and rerun") from err
    try:
        if h5.attrs.get("format_version") != SHARD_FORMAT_VERSION or not h5.attrs.get("complete"):
            raise CorruptFileError(f"{p}: incomplete or unknown mask shard (no 'complete' flag); "
                                   "delete it and rerun")
        n = int(h5.attrs.get("num_images", -1))
        if any(len(h5[name]) != n for name in ("keys", "boxes", "masks")):
            raise CorruptFileError(f"{p}: shard datasets disagree with num_images={n}")
    except (OSError, KeyError, RuntimeError) as err:
        h5.close()
        if isinstance(err, CorruptFileError):
            raise
        raise CorruptFileError(f"{p}: damaged mask shard ({err}); delete it and rerun") from err
    return h5


def read_mask_shard(path: str | os.PathLike[str]) -> list[MinedMask]:
    """Read every mined mask in a shard (all in memory: prefer :func:`iter_mask_shard`)."""
    return list(iter_mask_shard(path))


def iter_mask_shard(path: str | os.PathLike[str], rows: Iterable[int] | None = None) -> Iterator[MinedMask]:
    """Yield a shard's mined masks one at a time, in file order or the given ``rows``; only the mask
    being yielded is decoded (the file stays open until the iterator is exhausted or closed)."""
    try:
        with open_mask_shard(path) as h5:
            for i in range(int(h5.attrs["num_images"])) if rows is None else rows:
                yield _mask_at(h5, i)
    except (OSError, KeyError, ValueError) as err:
        raise _damaged(path, err) from err


def mask_shard_keys(path: str | os.PathLike[str]) -> list[str]:
    """The image keys of a shard, in file order, without reading any mask."""
    try:
        with open_mask_shard(path) as h5:
            return [_text(k) for k in h5["keys"][:]]
    except (OSError, KeyError, ValueError) as err:
        raise _damaged(path, err) from err


def iter_masks_by_key(paths: Sequence[str | os.PathLike[str]]) -> Iterator[MinedMask]:
    """The mined masks of several shards merged in key order, one decoded at a time."""
    index = sorted(((key, s, row) for s, p in enumerate(paths) for row, key in enumerate(mask_shard_keys(p))),
                   key=lambda t: t[0])
    with ExitStack() as files:
        shards = [files.enter_context(open_mask_shard(p)) for p in paths]
        for _, s, row in index:
            try:
                item = _mask_at(shards[s], row)
            except (OSError, KeyError, ValueError) as err:
                raise _damaged(paths[s], err) from err
            yield item


class MaskIndex:
    """The mined masks of several shards, by key: the keys are known up front (nothing else is
    read), a mask is read and decoded only when :meth:`get` asks for it. Use it in a ``with``
    block, which keeps the shards open."""

    def __init__(self, paths: Sequence[str | os.PathLike[str]]):
        self.paths = [Path(p) for p in paths]
        self.rows = {key: (s, row) for s, p in enumerate(self.paths)
                     for row, key in enumerate(mask_shard_keys(p))}
        self._files = ExitStack()
        self._shards: list[h5py.File] = []

    def __enter__(self) -> MaskIndex:
        self._shards = [self._files.enter_context(open_mask_shard(p)) for p in self.paths]
        return self

    def __exit__(self, *exc: object) -> None:
        self._files.close()
        self._shards = []

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def get(self, key: str) -> MinedMask:
        """The mined mask of ``key`` (KeyError when no shard has it)."""
        s, row = self.rows[key]
        try:
            return _mask_at(self._shards[s], row)
        except (OSError, KeyError, ValueError) as err:
            raise _damaged(self.paths[s], err) from err


def _damaged(path: str | os.PathLike[str], err: Exception) -> CorruptFileError:
    return CorruptFileError(f"{path}: damaged mask shard ({err}); delete it and rerun")


def _mask_at(h5: h5py.File, i: int) -> MinedMask:
    """Row ``i`` of an open mask shard, its mask unpacked to (H, W) bool."""
    h, w = (int(v) for v in h5["image_hw"][i])
    gh, gw = (int(v) for v in h5["grid_hw"][i])
    bits = np.unpackbits(h5["masks"][i], count=h * w).astype(bool)
    return MinedMask(
        key=_text(h5["keys"][i]),
        file_name=_text(h5["files"][i]),
        height=h,
        width=w,
        mask=bits.reshape(h, w),
        box=[float(v) for v in h5["boxes"][i]],
        patch_mask=h5["patch_masks"][i].astype(bool).reshape(gh, gw),
        cls_affinity=h5["cls_affinity"][i].reshape(gh, gw),
        seed=int(h5["seeds"][i]),
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def digest_path(path: str | os.PathLike[str]) -> str:
    """SHA-1 of a file's bytes, or of every file below a folder (names and bytes, sorted)."""
    import hashlib

    p = Path(path)
    h = hashlib.sha1()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(f.relative_to(p).as_posix().encode() if p.is_dir() else b"")
        h.update(f.read_bytes())
    return h.hexdigest()
