"""Image reading: decode any image file to RGB (or say why not), resize, normalise, pad."""

from __future__ import annotations

import os
import struct
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Decoding limits, the same for every stage (so all stages see the same pixels of an image):
MAX_DECODE_PIXELS = 64_000_000  # larger JPEGs decode at 1/2, 1/4 or 1/8 scale; other formats are refused
MAX_ASPECT_RATIO = 16.0  # thinner strips are refused: resizing their short side would explode the long one
BAD_IMAGE_POLICIES = ("fail", "skip")
# PIL refuses headers above 2x its limit before we can ask for a reduced JPEG decode; raise it to
# a header-only bound and enforce MAX_DECODE_PIXELS ourselves (on what is actually decoded).
if Image.MAX_IMAGE_PIXELS is not None:
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS, MAX_DECODE_PIXELS * 64 // 2)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error,
                  zlib.error, Image.DecompressionBombError)


T = TypeVar("T")
R = TypeVar("R")


class ImageReadError(RuntimeError):
    """An image file could not be decoded."""


@dataclass(frozen=True)
class ImageRecord:
    """One image of a split: a stable key, its file, and its COCO id when it has one."""

    key: str  # relative path without extension, '/' separated; unique in the split
    path: Path
    image_id: int | None = None


def read_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an image as uint8 RGB (H, W, 3), applying its EXIF orientation.

    Grayscale, palette (transparency composited on black), RGBA/LA (same), CMYK and 16-bit or
    float images become 8-bit RGB. JPEGs over ``MAX_DECODE_PIXELS`` are decoded at a reduced
    scale (libjpeg's 1/2, 1/4 or 1/8; memory stays bounded), other images over it and strips
    thinner than 1:``MAX_ASPECT_RATIO`` are refused. Every failure is an :class:`ImageReadError`
    whose message starts with the path and says why.
    """
    p = Path(path)
    _check_file(p)
    try:
        with Image.open(p) as im:
            _check_size(p, im)
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                arr = np.asarray(im, dtype=np.float32)
                arr = np.nan_to_num(arr - min(float(arr.min()), 0.0))
                top = max(float(arr.max()), 1.0)
                im = Image.fromarray((arr * (255.0 / top)).round().astype(np.uint8))
            alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La")
            if alpha or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                canvas = Image.new("RGB", im.size, (0, 0, 0))
                canvas.paste(im, mask=im.getchannel("A"))
                im = canvas
            rgb = np.asarray(im.convert("RGB"))
    except ImageReadError:
        raise
    except Image.UnidentifiedImageError as err:
        raise ImageReadError(f"{p}: not an image (unknown format: {err})") from err
    except PermissionError as err:
        raise ImageReadError(f"{p}: not readable (permission denied)") from err
    except _DECODE_ERRORS as err:
        raise ImageReadError(f"{p}: cannot decode image ({type(err).__name__}: {err})") from err
    if rgb.ndim != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ImageReadError(f"{p}: empty image")
    return rgb


_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that turn the image by 90 degrees


def decoded_hw(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """The (height, width) that :func:`read_rgb` returns for ``path``, from the header alone.

    The EXIF orientation and the reduced decode of large JPEGs are taken into account; nothing is
    decoded. None when the header cannot be read or the image would be refused (:func:`read_rgb`
    then says why).
    """
    p = Path(path)
    try:
        _check_file(p)
        with Image.open(p) as im:
            _check_size(p, im)  # may ask for a reduced JPEG decode, which changes im.size
            width, height = im.size
            orientation = im.getexif().get(0x0112, 1)  # ExifTags.Base.Orientation
    except (ImageReadError, *_DECODE_ERRORS):
        return None
    return (width, height) if orientation in _SWAPPING_ORIENTATIONS else (height, width)


def file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be an image as far as its directory entry tells (no decoding), or None.

    Dangling symlinks, vanished files, folders, empty and unreadable files are named here, so the
    workflow's planner can refuse them before any job and every stage gives the same reason.
    """
    p = Path(path)
    if p.is_symlink() and not p.exists():
        return f"dangling symlink (target {os.readlink(p)} does not exist)"
    if not p.exists():
        return "file not found"
    if not p.is_file():
        return "not a regular file"
    if p.stat().st_size == 0:
        return "empty file (0 bytes)"
    if not os.access(p, os.R_OK):
        return "not readable (permission denied)"
    return None


def _check_file(p: Path) -> None:
    """Clear reasons for files that cannot be images before PIL sees them."""
    problem = file_problem(p)
    if problem:
        raise ImageReadError(f"{p}: {problem}")


def _check_size(p: Path, im: Image.Image) -> None:
    """Refuse strips and oversized images from the header; ask for a reduced decode of big JPEGs."""
    w, h = im.size
    if w < 1 or h < 1:
        raise ImageReadError(f"{p}: empty image ({w}x{h})")
    if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise ImageReadError(f"{p}: {w}x{h} is thinner than 1:{MAX_ASPECT_RATIO:g} (aspect-ratio limit)")
    if w * h <= MAX_DECODE_PIXELS:
        return
    if im.format == "JPEG":
        for scale in (2, 4, 8):
            if (w // scale) * (h // scale) <= MAX_DECODE_PIXELS:
                im.draft(im.mode, (-(-w // scale), -(-h // scale)))
                return
    raise ImageReadError(f"{p}: {w}x{h} = {w * h / 1e6:.0f} MP exceeds the decode limit of "
                         f"{MAX_DECODE_PIXELS / 1e6:.0f} MP (JPEGs reduce on load; other formats do not)")


def resized_hw(height: int, width: int, short_side: int) -> tuple[int, int]:
    """Size after scaling the shorter side to ``short_side`` (aspect kept, at least 1 px)."""
    scale = short_side / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def torchvision_resized_hw(height: int, width: int, short_side: int) -> tuple[int, int]:
    """Size after ``torchvision.transforms.Resize(short_side)``: the shorter side becomes
    ``short_side``, the longer ``int(short_side * long / short)`` (truncated, not rounded)."""
    short, long = min(height, width), max(height, width)
    new_long = int(short_side * long / short)
    return (short_side, new_long) if height <= width else (new_long, short_side)


def resize_bilinear(rgb: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> uint8 RGB of ``size_hw``, resized as ``torchvision.transforms.Resize``
    resizes a PIL image: ``torchvision.transforms.functional.resize``, bilinear with antialiasing
    (Pillow's filter, which widens its support when it shrinks)."""
    if tuple(size_hw) == rgb.shape[:2]:
        return rgb
    out = TF.resize(Image.fromarray(rgb), list(size_hw), InterpolationMode.BILINEAR, antialias=True)
    return np.asarray(out)


def to_tensor(rgb: np.ndarray, size_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """uint8 RGB -> normalised float tensor (3, H, W), optionally resized (Pillow bicubic)."""
    im = rgb
    if size_hw is not None and size_hw != rgb.shape[:2]:
        im = np.asarray(Image.fromarray(rgb).resize((size_hw[1], size_hw[0]), Image.BICUBIC))
    t = torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return t.sub_(mean).div_(std)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the last two dims (bottom, right) up to a multiple of ``multiple``."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    return torch.nn.functional.pad(x, (0, pw, 0, ph))


def read_ahead(pool: Executor, fn: Callable[[T], R], items: Iterable[T], ahead: int) -> Iterator[R]:
    """``fn(item)`` for each item, in order, computed in ``pool``'s threads at most ``ahead`` items
    in advance of the consumer (decoding overlaps the forward pass; memory stays bounded)."""
    pending: deque[Future[R]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last one shorter)."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
