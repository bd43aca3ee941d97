"""What every converter produces: source images with COCO-style annotations, and the report of what was skipped.

A format reader (yolo.py, masks.py, voc.py) turns its source into a `SourceDataset`; splits.py assigns splits and
writer.py writes the Roboflow-layout COCO export. Anything a reader cannot convert is recorded in a `SkipReport`
(kind + where + why) instead of being dropped silently.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

from sam3_lora.data.images import CorruptImageError, ImageHeader, read_header, read_image_rgb

# File extensions read as images (what PIL decodes and ultralytics accepts).
IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


class ConversionError(ValueError):
    """The source cannot be converted at all (missing folder, unreadable class table, ...); the message says why."""


class SkipItem(Exception):
    """Raised by a reader's per-item helpers: this item (object, line, image) is skipped for `reason`."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


@dataclass(frozen=True)
class Annotation:
    """One object, in the COCO image's pixel coordinates.

    Attributes:
        category: class name (category ids are assigned by the writer).
        bbox: COCO [x, y, w, h].
        segmentation: COCO polygon parts or compressed RLE (counts as str); None for a box-only object.
        is_crowd: written as `iscrowd: 1` (never a training target, ignored in evaluation).
    """

    category: str
    bbox: tuple[float, float, float, float]
    segmentation: list | dict | None = None
    is_crowd: bool = False


@dataclass
class SourceImage:
    """One source image and its converted objects.

    Attributes:
        path: the image file.
        key: the image's path relative to the source root (stable across machines: it orders deterministic
            splits and names the image in messages).
        width / height: the size the annotations refer to (written to the json).
        split: "train", "valid" or "test" when the source says so, else None (assigned by splits.py).
    """

    path: Path
    key: str
    width: int
    height: int
    split: str | None
    annotations: list[Annotation] = field(default_factory=list)


@dataclass
class SourceDataset:
    """A whole source: class names in category-id order and every convertible image."""

    categories: list[str]
    images: list[SourceImage]


@dataclass(frozen=True)
class Skipped:
    """One item the converter left out. `kind` is a stable short name (e.g. "unknown_class") used for counting."""

    kind: str
    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class SkipReport:
    """Everything skipped while reading a source, in the order found."""

    items: list[Skipped] = field(default_factory=list)

    def add(self, kind: str, where: str | Path, reason: str) -> None:
        """Record one skipped item."""
        self.items.append(Skipped(kind, str(where), reason))

    def counts(self) -> Counter[str]:
        """How many items of each kind were skipped."""
        return Counter(s.kind for s in self.items)

    def summary_lines(self, examples: int = 3) -> list[str]:
        """Per kind: 'kind xN' and the first few examples."""
        lines = []
        for kind, count in self.counts().most_common():
            lines.append(f"{kind} x{count}")
            lines.extend(f"    {s}" for s in [s for s in self.items if s.kind == kind][:examples])
        return lines


def relative_name(path: Path, root: Path) -> str:
    """`path` relative to the source root for messages (absolute when it lies elsewhere)."""
    path, root = Path(path).resolve(), Path(root).resolve()
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def open_image(path: Path) -> ImageHeader:
    """Read the size of an image and decode it fully once, so the export never contains an unreadable image.

    Raises:
        SkipItem: "missing_image" or "unreadable_image".
    """
    try:
        header = read_header(path)
        read_image_rgb(path, apply_exif=False)
    except FileNotFoundError:
        raise SkipItem("missing_image", f"image file {path} not found") from None
    except CorruptImageError as err:
        raise SkipItem("unreadable_image", str(err)) from None
    return header


def annotation_size(header: ImageHeader, drawn_on: tuple[int, int] | None = None) -> tuple[int, int]:
    """(width, height) the annotations refer to: the EXIF-rotated image, unless they were drawn on the stored pixels.

    Args:
        header: the image's header.
        drawn_on: (width, height) the source states for its annotations (a mask's size, VOC's <size>), if any.

    Raises:
        SkipItem: "image_size_mismatch" when `drawn_on` is neither the rotated nor the stored size.
    """
    if drawn_on is None or tuple(drawn_on) == header.oriented_size:
        return header.oriented_size
    if tuple(drawn_on) == header.raw_size:  # check-data then warns that the EXIF rotation is ignored
        return header.raw_size
    raise SkipItem("image_size_mismatch", f"annotations are for {drawn_on[0]}x{drawn_on[1]} but the image is "
                   f"{header.oriented_size[0]}x{header.oriented_size[1]}")


def read_png_values(path: Path) -> np.ndarray:
    """A mask PNG's values: (H, W) for single-channel and palette images (palette indices), (H, W, C) otherwise.

    Raises:
        SkipItem: "unreadable_mask".
    """
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("L") if img.mode == "1" else img)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise SkipItem("unreadable_mask", f"cannot read mask {path} ({err})") from None


def mask_annotation(category: str, mask: np.ndarray, is_crowd: bool = False) -> Annotation:
    """An object from a boolean (H, W) mask: compressed RLE (lossless) and the mask's tight box."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    bbox = tuple(float(v) for v in mask_utils.toBbox(rle))
    return Annotation(category, bbox, {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
                      is_crowd)


def clip_box(x0: float, y0: float, x1: float, y1: float, width: int, height: int) -> tuple[float, float, float, float]:
    """Corner box → COCO [x, y, w, h] clipped to the image.

    Raises:
        SkipItem: "empty_box" when nothing of the box is inside the image.
    """
    given = f"box x {x0:g}..{x1:g}, y {y0:g}..{y1:g}"
    x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
    y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
    if x1 <= x0 or y1 <= y0:
        raise SkipItem("empty_box", f"{given} covers no area inside the {width}x{height} image")
    return (float(x0), float(y0), float(x1 - x0), float(y1 - y0))
