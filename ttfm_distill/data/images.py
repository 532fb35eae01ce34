"""Decode one dataset value into a fixed-size uint8 image ``(C, H, W)``.

Accepted values: a PIL image, a ``datasets`` image dict (``{"bytes", "path"}``),
raw encoded bytes, a file path, or a numeric array ``(H, W)``, ``(H, W, C)`` or
``(C, H, W)``.  Images are converted to the teacher's channel count (1 = L,
3 = RGB, 4 = RGBA), resized so they cover the target size (aspect ratio kept)
and center-cropped to it.
"""

from __future__ import annotations

import io

import numpy as np

from .errors import DataError

MODES = {1: "L", 3: "RGB", 4: "RGBA"}
VALUE_RANGES = {"0-255": (0.0, 255.0), "0-1": (0.0, 1.0), "-1-1": (-1.0, 1.0)}


def describe_value(value) -> str:
    if isinstance(value, dict):
        return value.get("path") or "embedded bytes"
    if isinstance(value, str):
        return value
    return type(value).__name__


def to_pil(value, value_range: str = "auto"):
    """A dataset value as a PIL image (raises ``ValueError`` with the reason)."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes"):
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise ValueError("the image value holds neither bytes nor a path")
    if isinstance(value, (bytes, bytearray)):
        img = Image.open(io.BytesIO(value))
        img.load()
        return img
    if isinstance(value, str):
        with Image.open(value) as img:
            img.load()
            return img.copy()
    return array_to_pil(np.asarray(value), value_range)


def array_to_pil(arr: np.ndarray, value_range: str = "auto"):
    from PIL import Image

    if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"holds {arr.dtype} values, not an image or numeric array")
    if arr.ndim == 2:
        arr = arr[..., None]
    elif arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4) and arr.shape[0] in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"holds arrays of shape {tuple(arr.shape)}, not 1-, 3- or 4-channel images "
                         "((H, W), (H, W, C) or (C, H, W))")
    if value_range == "auto":
        value_range = "0-255" if np.issubdtype(arr.dtype, np.integer) else "0-1"
    lo, hi = VALUE_RANGES[value_range]
    a = arr.astype(np.float32)
    if a.size and (a.min() < lo - 1e-3 * (hi - lo) or a.max() > hi + 1e-3 * (hi - lo)):
        raise ValueError(f"holds values in [{a.min():.3g}, {a.max():.3g}], outside {value_range}; "
                         "set data_range=0-255, 0-1 or -1-1")
    u8 = np.clip(np.rint((a - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(u8[..., 0] if u8.shape[-1] == 1 else u8, mode=MODES[u8.shape[-1]])


def _bands(img) -> int:
    if img.mode == "P":
        return 4 if "transparency" in img.info else 3
    return len(img.getbands())


def convert_channels(img, channels: int, strict: bool):
    """``img`` with ``channels`` bands; ``strict`` refuses any conversion."""
    if channels not in MODES:
        raise DataError(f"the teacher takes {channels}-channel images; images can only be made 1 (L), 3 (RGB) or "
                        "4 (RGBA) channels")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / float greyscale: scale, don't clip
        a = np.asarray(img, dtype=np.float32)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        from PIL import Image

        img = Image.fromarray(np.clip(a / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    have = _bands(img)
    if strict and have != channels:
        raise ValueError(f"has {have} channels but the teacher takes {channels} (data_channels=strict; use "
                         "data_channels=convert to convert greyscale/RGB)")
    return img if img.mode == MODES[channels] else img.convert(MODES[channels])


def resize_cover_crop(img, height: int, width: int):
    """Resize (aspect kept) so ``img`` covers ``height x width``, then center-crop to it."""
    from PIL import Image

    w, h = img.size
    if (w, h) != (width, height):
        scale = max(height / h, width / w)
        new = (max(width, round(w * scale)), max(height, round(h * scale)))
        if new != (w, h):
            img = img.resize(new, Image.LANCZOS if scale < 1 else Image.BICUBIC)
        left, top = (new[0] - width) // 2, (new[1] - height) // 2
        img = img.crop((left, top, left + width, top + height))
    return img


def prepare_image(value, channels: int, height: int, width: int, strict: bool = False,
                  value_range: str = "auto") -> np.ndarray:
    """One dataset value -> uint8 ``(channels, height, width)``; ``ValueError`` says why it cannot."""
    img = convert_channels(to_pil(value, value_range), channels, strict)
    arr = np.asarray(resize_cover_crop(img, height, width), dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def to_unit_range(u8):
    """uint8 tensor -> float32 in [-1, 1]."""
    return u8.float().div_(127.5).sub_(1.0)
