"""Helpers for the data tests: hand-written tiny COCO splits and a small generated shapes dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam3_lora.data.coco import ROBOFLOW_ANNOTATION_FILE
from sam3_lora.data.shapes import write_shapes_dataset

# Small enough to generate in ~0.1 s, large enough for 2 batches of 8 and every special annotation kind
# (the shapes writer places them at image indices 0-4 of each split).
SMALL_SHAPES = {"num_train": 16, "num_valid": 6, "num_test": 6, "image_size": (112, 160), "progress": False}


def write_image(path: Path, width: int, height: int, mode: str = "RGB", value: int = 128) -> Path:
    """Write a flat image of the given PIL mode (JPEG for RGB/L, PNG otherwise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode in ("I;16",):
        Image.fromarray(np.full((height, width), value * 257, np.uint16)).save(path)
    else:
        Image.new(mode, (width, height), value if mode in ("L", "P", "1") else (value,) * len(mode)).save(path)
    return path


def coco_dict(images: list[dict], annotations: list[dict], categories: list[dict] | None = None) -> dict:
    """A COCO dict; default categories = Roboflow-style background 0 + 'cat' (1) + 'dog' (2)."""
    if categories is None:
        categories = [{"id": 0, "name": "pets", "supercategory": "none"},
                      {"id": 1, "name": "cat", "supercategory": "pets"},
                      {"id": 2, "name": "dog", "supercategory": "pets"}]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_split(root: Path, split: str, data: dict, make_images: bool = True) -> Path:
    """Write ROOT/<split>/_annotations.coco.json (and flat images for every entry) and return the json path."""
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    if make_images:
        for image in data["images"]:
            write_image(folder / image["file_name"], image["width"], image["height"])
    path = folder / ROBOFLOW_ANNOTATION_FILE
    path.write_text(json.dumps(data))
    return path


def image_entry(image_id: int, width: int = 64, height: int = 48) -> dict:
    """An images[] entry named after its id."""
    return {"id": image_id, "file_name": f"img{image_id}.jpg", "width": width, "height": height}


def box_annotation(ann_id: int, image_id: int, category_id: int, bbox: list, **extra) -> dict:
    """An annotation with a box (and whatever else is passed)."""
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "area": float(bbox[2] * bbox[3]) if len(bbox) == 4 else 0.0, "iscrowd": 0, "segmentation": [],
            **extra}


def write_valid_dataset(root: Path, train: dict, valid: dict | None = None) -> Path:
    """Train split as given; valid = a copy of train unless given (both splits are required)."""
    write_split(root, "train", train)
    write_split(root, "valid", valid if valid is not None else train)
    return root


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """A small source-style shapes dataset, shared by the data tests (read-only)."""
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes") / "source", seed=0, **SMALL_SHAPES)
