"""COCO segmentations (polygons, compressed and uncompressed RLE) → masks, through pycocotools.

pycocotools does the geometry (`frPyObjects`, `merge`, `decode`, `toBbox`); this module only decides what
counts as a valid segmentation, so that a broken one can be dropped with a message instead of crashing a
worker mid-epoch.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from pycocotools import mask as mask_utils

SegmentationKind = Literal["none", "polygon", "rle", "uncompressed_rle", "invalid"]


def segmentation_kind(segmentation: Any) -> SegmentationKind:
    """Classify a COCO `segmentation` field.

    Returns:
        "none" for a missing/empty field (a box-only annotation), "polygon" for a list of coordinate lists,
        "rle" for {"size", "counts": str|bytes}, "uncompressed_rle" for {"size", "counts": [int, ...]},
        otherwise "invalid".
    """
    if segmentation is None or (isinstance(segmentation, (list, dict)) and len(segmentation) == 0):
        return "none"
    if isinstance(segmentation, list):
        return "polygon"
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        return "uncompressed_rle" if isinstance(segmentation["counts"], list) else "rle"
    return "invalid"


def valid_polygon_parts(parts: list) -> tuple[list[list[float]], int]:
    """Keep the polygon parts pycocotools can rasterise: ≥ 3 points, an even number of finite numbers.

    Returns:
        (kept parts, number of parts dropped).
    """
    kept = [[float(v) for v in part] for part in parts if _is_valid_part(part)]
    return kept, len(parts) - len(kept)


def _is_valid_part(part: Any) -> bool:
    if not isinstance(part, list) or len(part) < 6 or len(part) % 2:
        return False
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in part)


def rle_problem(rle: dict, height: int, width: int) -> str | None:
    """Why an RLE segmentation cannot be used on an image of this size, or None if it can."""
    size = rle.get("size")
    if not (isinstance(size, (list, tuple)) and [int(s) for s in size] == [height, width]):
        return f"RLE size {size} differs from the image's [height, width] = [{height}, {width}]"
    try:
        area = float(mask_utils.area(to_rle(rle, height, width)))
    except (ValueError, TypeError, OverflowError) as err:
        return f"RLE counts cannot be decoded ({err})"
    if isinstance(rle["counts"], list) and sum(rle["counts"]) != height * width:
        return f"uncompressed RLE counts sum to {sum(rle['counts'])}, expected height*width = {height * width}"
    return None if area >= 0 else "RLE area is negative"


def to_rle(segmentation: list | dict, height: int, width: int) -> dict:
    """Any valid COCO segmentation → one compressed RLE (polygon parts are merged, as `COCO.annToRLE` does)."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    counts = segmentation["counts"]
    return {"size": segmentation["size"], "counts": counts.encode() if isinstance(counts, str) else counts}


def decode_mask(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """Rasterise a valid COCO segmentation to an (H, W) uint8 {0, 1} mask."""
    return mask_utils.decode(to_rle(segmentation, height, width))


def segmentation_bbox(segmentation: list | dict, height: int, width: int) -> list[float]:
    """Tight COCO [x, y, w, h] box of a valid segmentation."""
    return [float(v) for v in mask_utils.toBbox(to_rle(segmentation, height, width))]


def segmentation_area(segmentation: list | dict, height: int, width: int) -> int:
    """Number of pixels a valid segmentation covers (pycocotools' RLE area, no rasterisation)."""
    return int(mask_utils.area(to_rle(segmentation, height, width)))
