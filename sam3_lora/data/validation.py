"""Checks and repairs on a raw COCO annotation dict, before anything trains on it.

Each function handles one part of the json, records what it finds in a `ValidationReport` (fatal / repaired /
warning, naming the file, the id and the field) and returns the cleaned part. Policy:
fatal = ambiguous or unusable data the user must fix (broken json, empty image/category lists, entries of the wrong
type, ids that are not integers in [0, 2^31), duplicate image/category ids, annotations of unknown categories,
missing/unreadable/mis-sized image files); repaired = a single annotation's defect with an obvious fix (clip a
box, drop a degenerate box, a broken or undecodable segmentation or polygon parts far outside the image, renumber
duplicate annotation ids, drop an annotation of an image that does not exist); warning = legal but suspicious.
Whatever the json holds, reading it raises nothing: tests/test_data_properties.py mutates exports to check that.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sam3_lora.data import masks
from sam3_lora.data.images import CorruptImageError, read_header, read_image_rgb
from sam3_lora.data.report import ValidationReport

# Boxes poking out of the image by less than this many pixels are rounding noise: clipped without a report.
BOX_TOLERANCE_PX = 0.5
# PIL refuses to decode larger images (DecompressionBombError at 2 x Image.MAX_IMAGE_PIXELS); a json claiming more
# is wrong, and rasterising its polygons at that size would exhaust memory before the file is even opened.
MAX_IMAGE_PIXELS = 2 * 89_478_485
MAX_ID = 2**31  # ids (and image sizes) must fit sam3's int32 metadata tensors


def load_annotation_json(path: Path, report: ValidationReport) -> dict | None:
    """Read and parse an annotation file; a missing file or invalid json is fatal (returns None)."""
    if not path.is_file():
        report.add("fatal", "missing_json", path, "annotation file not found; pass the right path "
                   "(Roboflow layout: ROOT/<split>/_annotations.coco.json)")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        report.add("fatal", "invalid_json", path, f"not valid JSON ({err}); re-export the dataset")
        return None
    return data if _has_coco_lists(data, path, report) else None


def _has_coco_lists(data: Any, path: Path, report: ValidationReport) -> bool:
    if not isinstance(data, dict):
        report.add("fatal", "invalid_json", path, "top level is not a JSON object with images/annotations/categories")
        return False
    data.setdefault("annotations", [])  # a split of pure negatives may omit the list
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    for key in missing:
        report.add("fatal", "invalid_json", path, f"field '{key}' is missing or not a list")
    empty = [] if missing else [k for k in ("images", "categories") if not data[k]]
    for key in empty:
        report.add("fatal", "invalid_json", path, f"field '{key}' is an empty list: a split needs images and "
                   "categories to ask about")
    return not missing and not empty


def index_images(images: list[dict], path: Path, report: ValidationReport) -> dict[int, dict]:
    """Image entries by id; missing fields or duplicate ids are fatal."""
    by_id: dict[int, dict] = {}
    for position, image in enumerate(images):
        if not isinstance(image, dict):
            report.add("fatal", "invalid_image_entry", path, f"images[{position}] is {image!r}, not an object with "
                       "fields 'id', 'file_name', 'width', 'height'")
            continue
        missing = [k for k in ("id", "file_name", "width", "height") if k not in image]
        if missing:
            report.add("fatal", "invalid_image_entry", path,
                       f"images[{position}] (id {image.get('id')}) lacks field(s) {missing}")
            continue
        if not _is_id(image["id"]) or not isinstance(image["file_name"], str) or not image["file_name"]:
            report.add("fatal", "invalid_image_entry", path, f"images[{position}] field 'id' = {image['id']!r} / "
                       f"field 'file_name' = {image['file_name']!r}: need an integer id in [0, 2^31) and a file name")
            continue
        if not (_positive_int(image["width"]) and _positive_int(image["height"])):
            report.add("fatal", "invalid_image_entry", path, f"image id {image['id']} field 'width'/'height' = "
                       f"{image['width']}/{image['height']} must be positive integers")
            continue
        if image["width"] * image["height"] > MAX_IMAGE_PIXELS:
            report.add("fatal", "invalid_image_entry", path, f"image id {image['id']} field 'width'/'height' = "
                       f"{image['width']}/{image['height']} is larger than any image PIL decodes "
                       f"({MAX_IMAGE_PIXELS} pixels); fix the size")
            continue
        if image["id"] in by_id:
            report.add("fatal", "duplicate_image_id", path, f"image id {image['id']} field 'id' is used by "
                       f"'{by_id[image['id']]['file_name']}' and '{image['file_name']}'; make ids unique")
            continue
        by_id[image["id"]] = image
    return by_id


def index_categories(categories: list[dict], path: Path, report: ValidationReport) -> dict[int, dict]:
    """Category entries by id; missing id/name or duplicate ids are fatal, duplicate names a warning."""
    by_id: dict[int, dict] = {}
    for position, category in enumerate(categories):
        if not isinstance(category, dict) or not _is_id(category.get("id")) \
                or not isinstance(category.get("name"), str):
            shown = category.get("id") if isinstance(category, dict) else category
            report.add("fatal", "invalid_category_entry", path,
                       f"categories[{position}] (id {shown!r}) needs an integer field 'id' in [0, 2^31) and a string "
                       "field 'name'")
        elif category["id"] in by_id:
            report.add("fatal", "duplicate_category_id", path, f"category id {category['id']} field 'id' is used "
                       f"by '{by_id[category['id']]['name']}' and '{category['name']}'; make ids unique")
        else:
            by_id[category["id"]] = category
    for name, count in Counter(c["name"] for c in by_id.values()).items():
        if count > 1:
            report.add("warning", "duplicate_category_name", path, f"{count} categories are named '{name}': "
                       "their queries share one text; give them distinct phrases with data.prompts")
    return by_id


def clean_annotations(annotations: list[dict], images: dict[int, dict], categories: dict[int, dict],
                      path: Path, report: ValidationReport) -> list[dict]:
    """Check every annotation's references, box and segmentation; return the usable, repaired ones.

    Annotation ids are renumbered 1..N when any is missing, duplicated or < 1 (pycocotools never counts a
    ground truth with id 0 as a true positive).
    """
    cleaned = []
    for position, ann in enumerate(annotations):
        if _has_valid_references(ann, position, images, categories, path, report):
            fixed = clean_annotation(ann, images[ann["image_id"]], path, report)
            if fixed is not None:
                cleaned.append(fixed)
    _renumber_if_needed(cleaned, path, report)
    return cleaned


def _has_valid_references(ann: dict, position: int, images: dict, categories: dict, path: Path,
                          report: ValidationReport) -> bool:
    if not isinstance(ann, dict):
        report.add("fatal", "invalid_annotation_entry", path, f"annotations[{position}] is {ann!r}, not an object "
                   "with fields 'image_id', 'category_id', 'bbox'")
        return False
    ann_id = ann.get("id", f"at annotations[{position}]")
    if not _is_id(ann.get("category_id")) or ann["category_id"] not in categories:
        report.add("fatal", "unknown_category", path, f"annotation id {ann_id} field 'category_id' = "
                   f"{ann.get('category_id')!r} is not in 'categories' (ids {sorted(categories)}); "
                   "add the category or fix the annotation")
        return False
    if not _is_id(ann.get("image_id")) or ann["image_id"] not in images:
        report.add("repaired", "unknown_image", path, f"annotation id {ann_id} field 'image_id' = "
                   f"{ann.get('image_id')} is not in 'images'; annotation dropped")
        return False
    return True


def clean_annotation(ann: dict, image: dict, path: Path, report: ValidationReport) -> dict | None:
    """Repair one annotation (segmentation first, since a broken box can be rebuilt from it); None = dropped."""
    fixed = dict(ann)
    fixed["iscrowd"] = int(bool(ann.get("iscrowd", 0)))
    fixed["segmentation"] = _clean_segmentation(ann, image, path, report)
    bbox = _clean_bbox(fixed, image, path, report)
    if bbox is None:
        return None
    fixed["bbox"] = bbox
    fixed["area"] = _area(fixed, image)
    return fixed


def _clean_segmentation(ann: dict, image: dict, path: Path, report: ValidationReport) -> list | dict:
    """The usable segmentation, or [] (box-only) with a repaired problem when it is broken."""
    seg, where = ann.get("segmentation"), f"annotation id {ann.get('id')} field 'segmentation'"
    kind = masks.segmentation_kind(seg)
    if kind == "none":
        return []
    if kind == "invalid":
        report.add("repaired", "invalid_segmentation", path, f"{where} is neither polygons nor RLE; kept as box-only")
        return []
    if kind == "polygon":
        seg, dropped = masks.valid_polygon_parts(seg)
        if dropped and seg:
            report.add("repaired", "invalid_polygon", path, f"{where}: dropped {dropped} polygon part(s) with "
                       "fewer than 3 points, an odd length or non-numbers")
        seg, far = _parts_within_reach(seg, image["width"], image["height"])
        if far:
            report.add("repaired", "polygon_out_of_bounds", path, f"{where}: dropped {far} polygon part(s) with "
                       f"points more than one image size outside the {image['width']}x{image['height']} image")
    else:
        problem = masks.rle_problem(seg, image["height"], image["width"]) or _undecodable(seg, image)
        if problem:
            report.add("repaired", "invalid_rle", path, f"{where}: {problem}; kept as box-only")
            return []
    if not seg or masks.segmentation_area(seg, image["height"], image["width"]) == 0:
        report.add("repaired", "empty_polygon", path, f"{where} covers no pixel; kept as box-only")
        return []
    return seg


def _undecodable(rle: dict, image: dict) -> str | None:
    """Why pycocotools cannot decode an RLE (its runs must add up to height*width), found here, not mid-epoch."""
    try:
        masks.decode_mask(rle, image["height"], image["width"])
    except (ValueError, TypeError, OverflowError) as err:
        return f"RLE counts cannot be decoded ({err})"
    return None


def _parts_within_reach(parts: list[list[float]], width: int, height: int) -> tuple[list[list[float]], int]:
    """Keep the polygon parts whose points lie at most one image size outside the image.

    pycocotools rasterises each edge point by point (5 samples per pixel of its length, whatever the image size),
    so a coordinate like 1e9 costs gigabytes; a point that far out is an export error, not a shape.
    """
    reach = max(width, height)

    def near(part: list[float]) -> bool:
        return (all(-reach <= x <= width + reach for x in part[0::2])
                and all(-reach <= y <= height + reach for y in part[1::2]))

    kept = [part for part in parts if near(part)]
    return kept, len(parts) - len(kept)


def _clean_bbox(ann: dict, image: dict, path: Path, report: ValidationReport) -> list[float] | None:
    """Clip the box to the image; rebuild it from the segmentation or drop the annotation if degenerate."""
    where = f"annotation id {ann.get('id')} (image id {image['id']}) field 'bbox'"
    box = ann.get("bbox")
    if _is_box(box):
        clipped = _clip_box(box, image["width"], image["height"])
        if clipped[2] > 0 and clipped[3] > 0:
            if max(abs(a - b) for a, b in zip(clipped, box)) > BOX_TOLERANCE_PX:
                report.add("repaired", "bbox_out_of_bounds", path,
                           f"{where} {box} exceeds the {image['width']}x{image['height']} image; clipped to {clipped}")
            return clipped
    if ann["segmentation"]:
        rebuilt = masks.segmentation_bbox(ann["segmentation"], image["height"], image["width"])
        report.add("repaired", "bbox_from_segmentation", path, f"{where} = {box} is missing or degenerate; "
                   f"replaced by the segmentation's box {rebuilt}")
        return rebuilt
    report.add("repaired", "degenerate_bbox", path, f"{where} = {box} is missing, degenerate or outside the "
               "image and there is no segmentation; annotation dropped")
    return None


def _is_box(box: Any) -> bool:
    return (isinstance(box, (list, tuple)) and len(box) == 4
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box))


def _clip_box(box: list[float], width: int, height: int) -> list[float]:
    x0, y0 = min(max(box[0], 0.0), width), min(max(box[1], 0.0), height)
    x1, y1 = min(max(box[0] + box[2], 0.0), width), min(max(box[1] + box[3], 0.0), height)
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def _area(ann: dict, image: dict) -> float:
    if ann["segmentation"]:
        return float(masks.segmentation_area(ann["segmentation"], image["height"], image["width"]))
    return float(ann["bbox"][2] * ann["bbox"][3])


def _renumber_if_needed(annotations: list[dict], path: Path, report: ValidationReport) -> None:
    ids = Counter(a.get("id") if _positive_int(a.get("id")) else None for a in annotations)  # None: renumbered
    for ann_id, count in ids.items():
        if ann_id is not None and count > 1:
            report.add("repaired", "duplicate_annotation_id", path, f"annotation id {ann_id} field 'id' is used "
                       f"{count} times; all annotation ids renumbered 1..N")
    if any(count > 1 or not _positive_int(i) for i, count in ids.items()):
        for new_id, ann in enumerate(annotations, start=1):
            ann["id"] = new_id


def _positive_int(value: Any) -> bool:
    return _is_id(value) and value > 0


def _is_id(value: Any) -> bool:
    """A usable COCO id: a JSON integer (a bool is not one, though Python says it is) in [0, 2^31), the range of
    the int32 id tensors sam3's collate builds (sam3/model/data_misc.py: `original_category_id__type`)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_ID


def check_image_files(images: dict[int, dict], image_dir: Path, path: Path, report: ValidationReport,
                      decode: bool = False) -> dict[int, bool]:
    """Check every image file exists, opens and has the json's size.

    Args:
        decode: also decode every image fully (slow; what `check-data` does). Otherwise only the header is read
            and a file corrupt past its header is found during the epoch (then skipped and counted).

    Returns:
        image id → whether to apply the EXIF orientation (False when the json's width/height match the stored,
        un-rotated pixels), for the images that passed.
    """
    apply_exif = {i: _exif_decision(img, image_dir, path, report) for i, img in images.items()}
    apply_exif = {i: v for i, v in apply_exif.items() if v is not None}
    if decode:
        with ThreadPoolExecutor() as pool:  # PIL releases the GIL while decoding
            errors = pool.map(lambda i: _decode_error(image_dir / images[i]["file_name"], apply_exif[i]), apply_exif)
            for image_id, error in zip(list(apply_exif), errors):
                if error:
                    report.add("fatal", "unreadable_image", path, f"image id {image_id} field 'file_name': {error}; "
                               "re-export or delete the image and its annotations")
                    del apply_exif[image_id]
    return apply_exif


def _exif_decision(image: dict, image_dir: Path, path: Path, report: ValidationReport) -> bool | None:
    file = image_dir / image["file_name"]
    where = f"image id {image['id']} field 'file_name' = '{image['file_name']}'"
    try:
        header = read_header(file)
    except FileNotFoundError:
        report.add("fatal", "missing_image_file", path, f"{where}: file {file} not found; copy it there or remove "
                   "the image and its annotations from the json")
        return None
    except CorruptImageError as err:
        report.add("fatal", "unreadable_image", path, f"{where}: {err}; re-export or delete it")
        return None
    expected = (image["width"], image["height"])
    if header.oriented_size == expected:
        return True
    if header.raw_size == expected:
        report.add("warning", "exif_orientation_ignored", path, f"{where}: json size {expected} matches the stored "
                   "pixels, not the EXIF-rotated image; annotations taken as drawn on the stored pixels")
        return False
    report.add("fatal", "image_size_mismatch", path, f"{where}: file is {header.oriented_size[0]}x"
               f"{header.oriented_size[1]} but 'width'/'height' say {expected[0]}x{expected[1]}; re-export")
    return None


def _decode_error(file: Path, apply_exif: bool) -> str | None:
    try:
        read_image_rgb(file, apply_exif)
    except (CorruptImageError, FileNotFoundError) as err:
        return str(err)
    return None


def background_categories(categories: dict[int, dict], annotations: list[dict]) -> set[int]:
    """Roboflow's extra category (the dataset name, supercategory "none") when it has no annotations."""
    used = {a["category_id"] for a in annotations}
    return {i for i, c in categories.items() if c.get("supercategory") == "none" and i not in used}


def warn_unused_categories(categories: dict[int, dict], annotations: list[dict], path: Path,
                           report: ValidationReport) -> None:
    """A category no (non-crowd) annotation uses can only ever be a negative query."""
    used = {a["category_id"] for a in annotations if not a["iscrowd"]}
    for category_id, category in categories.items():
        if category_id not in used:
            report.add("warning", "category_without_instances", path, f"category id {category_id} "
                       f"('{category['name']}') has no instances here; it is only ever asked as a negative")
