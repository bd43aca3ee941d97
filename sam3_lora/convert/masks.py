"""Folders of mask PNGs (one PNG per object, or one label map per image) → converter records.

Layout (per image either kind; both may appear in one dataset):

    SRC/images/[<split>/]<stem>.<ext>            the images; <split> = train, valid (or val), test — optional
    SRC/masks/[<split>/]<stem>/<class>_<k>.png   instance masks: one PNG per object, non-zero pixels = the object
    SRC/masks/[<split>/]<stem>.png               or a label map: single-channel or palette PNG, pixel = class value
    SRC/classes.json                             {"classes": {"1": "cat", "2": "dog"}, "background": 0, "ignore": [255]}

- Instance PNGs: the class is the file stem without its last `_<number>` ("hard_hat_2.png" → "hard_hat"; a stem
  without a number is the class itself). Colour PNGs count a pixel as the object when any RGB channel is non-zero.
- classes.json: "classes" maps pixel values to class names (a list means values 1, 2, ...); pixels with the
  "background" value (default 0) or an "ignore" value (default none; e.g. 255, VOC's void border) are no object.
  Required for label maps; optional for instance PNGs, where it fixes the category order and the allowed names
  (without it, categories are the names found, sorted).
- A label map gives one object per connected region (8-connectivity) of each class value: touching objects of one
  class merge into one — use instance PNGs when that matters.
- An image without masks is a background image (kept, no objects).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from sam3_lora.convert.common import (IMAGE_SUFFIXES, Annotation, ConversionError, SkipItem, SkipReport,
                                      SourceDataset, SourceImage, annotation_size, mask_annotation, open_image,
                                      read_png_values)
from sam3_lora.data.images import ImageHeader

log = logging.getLogger(__name__)

SPLIT_FOLDERS = {"train": "train", "valid": "valid", "val": "valid", "test": "test"}
CLASS_TABLE = "classes.json"
_NUMBERED = re.compile(r"^(?P<name>.+)_\d+$")


@dataclass(frozen=True)
class ClassTable:
    """classes.json: pixel value → class name, and the values that are no object."""

    names: dict[int, str]
    background: frozenset[int]
    ignore: frozenset[int]


def load_class_table(path: Path) -> ClassTable | None:
    """Read classes.json (see the module docstring); None when the file does not exist.

    Raises:
        ConversionError: unreadable json, wrong field types, or two values with the same name.
    """
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        classes = data["classes"]
        if isinstance(classes, list):
            classes = {i: name for i, name in enumerate(classes, start=1)}
        names = {int(v): str(n) for v, n in classes.items()}
        background = frozenset([int(data.get("background", 0))])
        ignore = frozenset(int(v) for v in data.get("ignore", []))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise ConversionError(f"{path}: expected {{\"classes\": {{\"1\": \"cat\", ...}} or [\"cat\", ...], "
                              f"\"background\": 0, \"ignore\": [255]}} ({type(err).__name__}: {err})") from None
    if len(set(names.values())) < len(names):
        raise ConversionError(f"{path} field 'classes' gives one name to several values; names must be unique")
    return ClassTable(names, background, ignore)


def read_masks(src: str | Path, skipped: SkipReport) -> SourceDataset:
    """Read a mask-PNG dataset (see the module docstring).

    Raises:
        ConversionError: no images/ or masks/ folder, no mask matching any image, label maps without classes.json.
    """
    src = Path(src)
    images_dir, masks_dir = src / "images", src / "masks"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise ConversionError(f"{folder} not found; expected SRC/images/ and SRC/masks/ (see "
                                  "`sam3-lora convert masks --help`)")
    table = load_class_table(src / CLASS_TABLE)
    images, with_masks = [], 0
    for path in sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        rel = path.relative_to(images_dir)
        split = SPLIT_FOLDERS.get(rel.parts[0]) if len(rel.parts) > 1 else None
        mask_base = masks_dir / rel.parent / rel.stem
        try:
            image, has_masks = _read_image(path, rel.as_posix(), split, mask_base, table, skipped)
        except SkipItem as skip:
            skipped.add(skip.kind, rel.as_posix(), skip.reason)
            continue
        images.append(image)
        with_masks += has_masks
    if images and not with_masks:
        raise ConversionError(f"none of the {len(images)} images under {images_dir} has masks: expected "
                              f"{masks_dir}/<same sub-folder>/<image stem>/<class>_<k>.png or <image stem>.png")
    log.info("%s: %d images, %d with masks (the others are kept as background images)", src, len(images),
             with_masks)
    found = {a.category for image in images for a in image.annotations}
    categories = [table.names[v] for v in sorted(table.names)] if table else sorted(found)
    return SourceDataset(categories, images)


def _read_image(path: Path, key: str, split: str | None, mask_base: Path, table: ClassTable | None,
                skipped: SkipReport) -> tuple[SourceImage, bool]:
    header = open_image(path)
    label_map = mask_base.parent / f"{mask_base.name}.png"
    if mask_base.is_dir() and label_map.is_file():
        raise SkipItem("ambiguous_masks", f"both {mask_base}/ and {label_map} exist; keep one")
    if mask_base.is_dir():
        width, height, annotations = _instance_masks(sorted(mask_base.glob("*.png")), header, table, skipped)
    elif label_map.is_file():
        if table is None:
            raise ConversionError(f"{label_map} is a label map, which needs {CLASS_TABLE} next to images/ "
                                  "(pixel value → class name)")
        width, height, annotations = _label_map(label_map, header, table, skipped)
    else:
        (width, height), annotations = annotation_size(header), []
    return SourceImage(path, key, width, height, split, annotations), mask_base.is_dir() or label_map.is_file()


def class_of_mask_file(path: Path) -> str:
    """"hard_hat_2.png" → "hard_hat"; "cat.png" → "cat"."""
    match = _NUMBERED.match(path.stem)
    return match["name"] if match else path.stem


def _instance_masks(files: list[Path], header: ImageHeader, table: ClassTable | None,
                    skipped: SkipReport) -> tuple[int, int, list[Annotation]]:
    size, annotations = None, []
    for file in files:
        try:
            mask = _foreground(read_png_values(file))
            if size is None:  # the first mask decides which image size the masks refer to
                size = annotation_size(header, (mask.shape[1], mask.shape[0]))
            annotations.append(_instance(file, mask, size, table))
        except SkipItem as skip:
            skipped.add(skip.kind, file, skip.reason)
    width, height = size or annotation_size(header)
    return width, height, annotations


def _foreground(values: np.ndarray) -> np.ndarray:
    """Non-zero pixels; for colour PNGs any non-zero colour channel (alpha is ignored)."""
    if values.ndim == 2:
        return values > 0
    colour = values[..., :3] if values.shape[2] >= 3 else values[..., :1]  # LA: L only
    return colour.max(axis=2) > 0


def _instance(file: Path, mask: np.ndarray, size: tuple[int, int], table: ClassTable | None) -> Annotation:
    category = class_of_mask_file(file)
    if table is not None and category not in table.names.values():
        raise SkipItem("unknown_class", f"class '{category}' (from the file name) is not in {CLASS_TABLE}: "
                       f"{sorted(table.names.values())}")
    if (mask.shape[1], mask.shape[0]) != size:
        raise SkipItem("mask_size_mismatch", f"mask is {mask.shape[1]}x{mask.shape[0]}, the image's other masks "
                       f"{size[0]}x{size[1]}")
    if not mask.any():
        raise SkipItem("empty_mask", "mask has no non-zero pixel")
    return mask_annotation(category, mask)


def _label_map(file: Path, header: ImageHeader, table: ClassTable,
               skipped: SkipReport) -> tuple[int, int, list[Annotation]]:
    values = read_png_values(file)
    if values.ndim != 2:
        raise SkipItem("rgb_label_map", f"label map {file} has {values.shape[2]} channels; save it single-channel "
                       "or as a palette PNG (pixel = class value)")
    width, height = annotation_size(header, (values.shape[1], values.shape[0]))
    annotations = []
    for value, count in zip(*np.unique(values, return_counts=True)):
        value = int(value)
        if value in table.background or value in table.ignore:
            continue
        if value not in table.names:
            skipped.add("unknown_class", file, f"pixel value {value} ({count} px) is not in {CLASS_TABLE} "
                        f"(values {sorted(table.names)}); those pixels are left out")
            continue
        regions, labels = cv2.connectedComponents((values == value).astype(np.uint8), connectivity=8)
        annotations += [mask_annotation(table.names[value], labels == k) for k in range(1, regions)]
    return width, height, annotations
