"""Decode image files into RGB uint8 arrays, whatever mode they were saved in.

Real exports contain grayscale, RGBA, palette and 16-bit PNGs next to JPEGs with EXIF orientation; the model
wants (H, W, 3) uint8 RGB in the orientation the annotations were drawn on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}  # EXIF values that rotate by 90/270 degrees (swap width and height)
_READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


class CorruptImageError(OSError):
    """An image file that exists but cannot be decoded."""


@dataclass(frozen=True)
class ImageHeader:
    """Size information read without decoding the pixels.

    Attributes:
        raw_size: (width, height) as stored in the file.
        oriented_size: (width, height) after applying the EXIF orientation.
    """

    raw_size: tuple[int, int]
    oriented_size: tuple[int, int]


def read_header(path: Path) -> ImageHeader:
    """Read an image's size and EXIF orientation (fast: the pixel data is not decoded).

    Raises:
        FileNotFoundError: the file does not exist.
        CorruptImageError: the file is not a readable image.
    """
    try:
        with Image.open(path) as img:
            raw = img.size
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except FileNotFoundError:
        raise
    except _READ_ERRORS as err:
        raise CorruptImageError(f"{path}: not a readable image ({err})") from err
    oriented = raw[::-1] if orientation in _TRANSPOSED_ORIENTATIONS else raw
    return ImageHeader(raw_size=raw, oriented_size=oriented)


def read_image_rgb(path: Path, apply_exif: bool = True) -> np.ndarray:
    """Decode an image file to an (H, W, 3) uint8 RGB array.

    Args:
        path: the image file.
        apply_exif: rotate/flip by the EXIF orientation tag (False when the annotations were drawn on the stored
            pixels, which the split reader detects from the json's width/height).

    Returns:
        A C-contiguous uint8 array.

    Raises:
        FileNotFoundError: the file does not exist.
        CorruptImageError: the file cannot be decoded (truncated, not an image, ...).
    """
    try:
        with Image.open(path) as img:
            img.load()
            if apply_exif:
                img = ImageOps.exif_transpose(img)
            return to_rgb_array(img)
    except FileNotFoundError:
        raise
    except _READ_ERRORS as err:
        raise CorruptImageError(f"{path}: cannot decode image ({err})") from err


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """Convert a PIL image of any mode to (H, W, 3) uint8 RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _high_bit_depth_to_rgb(np.asarray(img))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when a palette image with transparency goes straight to RGB
    return np.ascontiguousarray(np.asarray(img.convert("RGB")))


def _high_bit_depth_to_rgb(values: np.ndarray) -> np.ndarray:
    # 16-bit (and 32-bit int / float) grayscale: map the full 16-bit range linearly to 8 bits, so the same
    # intensity always gives the same value (per-image min-max would change the appearance between images).
    # Values that already fit in 8 bits are taken as 8-bit.
    values = values.astype(np.float32)
    if values.max(initial=0) > 255:
        values = values / 257.0
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
