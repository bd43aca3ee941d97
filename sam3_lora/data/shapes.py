"""Deterministic synthetic COCO dataset of coloured shapes, written in Roboflow's layout.

`write_shapes_dataset(OUT)` writes OUT/{train,valid,test}/_annotations.coco.json + JPEGs. Like a Roboflow export
it has the empty background category 0 (supercategory "none") and ids starting at 0. Every split contains every
annotation kind the reader must handle: polygons (several parts where a shape is cut by an occluder), compressed
RLE (forced, and wherever a visible region has a hole), uncompressed RLE, a box-only annotation, a crowd region,
and images without objects. Image i of a split depends only on (seed, style, split, i).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from rich.progress import track

from sam3_lora.data.coco import ROBOFLOW_ANNOTATION_FILE
from sam3_lora.data.shapes_render import STYLES, DrawnShape, crowd_cluster, parse_category, place_shapes, render

log = logging.getLogger(__name__)

DEFAULT_CATEGORIES = ("red circle", "blue square", "green triangle")
SPLITS = ("train", "valid", "test")
# Image index modulo this selects a special annotation kind (below); the rest are plain polygon images.
SPECIAL_PERIOD = 20
EMPTY, RLE, UNCOMPRESSED_RLE, BOX_ONLY, CROWD = 0, 1, 2, 3, 4
JPEG_QUALITY = 92


def write_shapes_dataset(out_dir: str | Path, style: str = "source", seed: int = 0, num_train: int = 300,
                         num_valid: int = 50, num_test: int = 50, image_size: int | Sequence[int] = (112, 160),
                         categories: Sequence[str] | None = None, objects_per_image: Sequence[int] = (1, 4),
                         progress: bool = True) -> Path:
    """Write the synthetic dataset (atomically: a partial dataset never appears at `out_dir`).

    Args:
        out_dir: dataset root to create; must not exist yet.
        style: "source" (filled shapes, light backgrounds) or "target" (hatched shapes, dark striped backgrounds,
            smaller): same categories, shifted domain.
        seed: everything is a function of (seed, style, split, image index).
        num_train / num_valid / num_test: images per split (test may be 0 to omit the split).
        image_size: side of the (square) images, or (min, max) to draw width and height per image.
        categories: "<colour> <shape>" names (see shapes_render.COLOURS / SHAPES); default 3 categories.
        objects_per_image: (min, max) separate objects per non-empty image.
        progress: show a progress bar.

    Returns:
        `out_dir` as a Path.

    Raises:
        FileExistsError: `out_dir` already exists.
        ValueError: unknown style or category.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; delete it or choose another folder")
    if style not in STYLES:
        raise ValueError(f"style {style!r} must be one of {STYLES}")
    names = list(categories or DEFAULT_CATEGORIES)
    for name in names:
        parse_category(name)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    jobs = [(split, i) for split, n in zip(SPLITS, (num_train, num_valid, num_test)) for i in range(n)]
    generator = _SplitWriter(tmp, style, seed, names, _size_range(image_size), tuple(objects_per_image))
    for split, index in track(jobs, description=f"shapes ({style})", disable=not progress):
        generator.add_image(split, index)
    generator.write_jsons()
    tmp.rename(out_dir)
    log.info("wrote %d shapes images (%s style) to %s", len(jobs), style, out_dir)
    return out_dir


def _size_range(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    low, high = (int(v) for v in image_size)
    return low, high


class _SplitWriter:
    """Accumulates images and annotations per split and writes them in Roboflow's layout."""

    def __init__(self, root: Path, style: str, seed: int, categories: list[str], size: tuple[int, int],
                 objects: tuple[int, int]):
        self.root, self.style, self.seed, self.size, self.objects = root, style, seed, size, objects
        self.categories = categories
        self.category_ids = {name: i + 1 for i, name in enumerate(categories)}  # 0 = Roboflow's background
        self.data: dict[str, dict] = {}

    def add_image(self, split: str, index: int) -> None:
        """Generate, save and annotate image `index` of `split`."""
        rng = np.random.default_rng([self.seed, STYLES.index(self.style), SPLITS.index(split), index])
        width, height = (int(rng.integers(self.size[0], self.size[1] + 1)) for _ in range(2))
        special = index % SPECIAL_PERIOD
        shapes = self._layout(special, height, width, rng)
        file_name = f"{split}_{index:06d}.jpg"
        folder = self.root / split
        folder.mkdir(parents=True, exist_ok=True)
        image = render(shapes, self.style, height, width, rng)
        cv2.imwrite(str(folder / file_name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        data = self._split(split)
        data["images"].append({"id": index, "file_name": file_name, "width": width, "height": height})
        for position, shape in enumerate(shapes):
            kind = CROWD if shape.is_crowd else special if position == 0 and special != CROWD else None
            data["annotations"].append(self._annotation(len(data["annotations"]), index, shape, kind))

    def _layout(self, special: int, height: int, width: int, rng: np.random.Generator) -> list[DrawnShape]:
        if special == EMPTY:
            return []
        count = int(rng.integers(self.objects[0], self.objects[1] + 1))
        chosen = [self.categories[int(rng.integers(len(self.categories)))] for _ in range(count)]
        shapes = place_shapes(chosen, self.style, height, width, rng)
        if special == CROWD:  # the crowd region lies under the separate shapes (first = bottom)
            cluster = crowd_cluster(self.categories[int(rng.integers(len(self.categories)))], self.style,
                                    height, width, rng)
            shapes = place_shapes_over(cluster, shapes)
        return shapes

    def _annotation(self, ann_id: int, image_id: int, shape: DrawnShape, kind: int | None) -> dict:
        visible = np.asfortranarray(shape.visible.astype(np.uint8))
        rle = mask_utils.encode(visible)
        ann = {"id": ann_id, "image_id": image_id, "category_id": self.category_ids[shape.category],
               "bbox": [float(v) for v in mask_utils.toBbox(rle)], "area": float(mask_utils.area(rle)),
               "segmentation": segmentation_for(visible, rle, kind), "iscrowd": int(kind == CROWD)}
        return ann

    def _split(self, split: str) -> dict:
        if split not in self.data:
            background = {"id": 0, "name": "shapes", "supercategory": "none"}
            named = [{"id": self.category_ids[n], "name": n, "supercategory": "shapes"} for n in self.categories]
            self.data[split] = {"info": {"description": f"synthetic shapes ({self.style} style), seed {self.seed}"},
                                "categories": [background, *named], "images": [], "annotations": []}
        return self.data[split]

    def write_jsons(self) -> None:
        """Write every split's annotation file."""
        for split, data in self.data.items():
            (self.root / split / ROBOFLOW_ANNOTATION_FILE).write_text(json.dumps(data), encoding="utf-8")


def place_shapes_over(cluster: DrawnShape, shapes: list[DrawnShape]) -> list[DrawnShape]:
    """Put a crowd cluster first (bottom) and recompute its visible part under the shapes; drop it if hidden."""
    covered = np.zeros_like(cluster.full)
    for shape in shapes:
        covered |= shape.full
    cluster.visible = cluster.full & ~covered
    return [cluster, *shapes] if cluster.visible.sum() >= 12 else shapes


def segmentation_for(visible: np.ndarray, rle: dict, kind: int | None) -> list | dict:
    """The COCO segmentation of a visible mask: polygons unless the kind (or a hole) asks for RLE."""
    if kind == BOX_ONLY:
        return []
    if kind in (UNCOMPRESSED_RLE, CROWD):  # COCO stores crowd regions as uncompressed RLE
        return uncompressed_rle(visible)
    polygons, has_hole = mask_polygons(visible)
    if kind == RLE or has_hole or not polygons:
        return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    return polygons


def mask_polygons(mask: np.ndarray) -> tuple[list[list[float]], bool]:
    """Outer contours of a mask as COCO polygon parts, and whether the mask has holes (polygons cannot say)."""
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return [], False
    outer = [c for c, h in zip(contours, hierarchy[0]) if h[3] < 0]
    parts = [c.reshape(-1).astype(float).tolist() for c in outer if len(c) >= 3]
    return parts, len(outer) < len(contours)


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE ({"size": [h, w], "counts": [run lengths, column-major, starting with 0s]})."""
    flat = mask.astype(np.uint8).flatten(order="F")
    boundaries = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], boundaries, [flat.size]])).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": [int(c) for c in counts]}

