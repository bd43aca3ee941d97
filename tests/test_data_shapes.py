"""The synthetic shapes dataset: deterministic, Roboflow-like, every annotation kind, two styles."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from sam3_lora.data.coco import ROBOFLOW_ANNOTATION_FILE
from sam3_lora.data.masks import segmentation_kind
from sam3_lora.data.shapes import DEFAULT_CATEGORIES, write_shapes_dataset
from tests.data_fixtures import SMALL_SHAPES, shapes_root  # noqa: F401 (fixture)

TINY = {**SMALL_SHAPES, "num_train": 6, "num_valid": 5, "num_test": 0}


def _digest(root):
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _annotations(root, split):
    return json.loads((root / split / ROBOFLOW_ANNOTATION_FILE).read_text())


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    first = _digest(write_shapes_dataset(tmp_path / "a", seed=3, **TINY))
    again = _digest(write_shapes_dataset(tmp_path / "b", seed=3, **TINY))
    other = _digest(write_shapes_dataset(tmp_path / "c", seed=4, **TINY))
    assert first == again
    assert first != other
    assert "test/_annotations.coco.json" not in first  # num_test=0 omits the split


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_every_split_has_every_annotation_kind_and_the_roboflow_background(shapes_root, split):
    data = _annotations(shapes_root, split)
    kinds = {segmentation_kind(a["segmentation"]) for a in data["annotations"]}
    assert {"polygon", "rle", "uncompressed_rle", "none"} <= kinds
    assert any(a["iscrowd"] for a in data["annotations"])
    annotated = {a["image_id"] for a in data["annotations"]}
    assert any(image["id"] not in annotated for image in data["images"])
    assert data["categories"][0] == {"id": 0, "name": "shapes", "supercategory": "none"}
    assert [c["name"] for c in data["categories"][1:]] == list(DEFAULT_CATEGORIES)
    assert min(a["id"] for a in data["annotations"]) == 0  # like Roboflow: exercises renumbering


def test_target_style_is_a_different_domain_with_the_same_categories(tmp_path):
    source = write_shapes_dataset(tmp_path / "s", style="source", seed=0, **TINY)
    target = write_shapes_dataset(tmp_path / "t", style="target", seed=0, **TINY)
    assert _annotations(source, "train")["categories"] == _annotations(target, "train")["categories"]

    def brightness(root):
        return np.mean([np.asarray(Image.open(p)).mean() for p in (root / "train").glob("*.jpg")])

    assert brightness(source) > 150 > 90 > brightness(target)  # light vs dark backgrounds


def test_categories_are_configurable_and_checked(tmp_path):
    root = write_shapes_dataset(tmp_path / "x", categories=["yellow star", "purple hexagon"], **TINY)
    assert [c["name"] for c in _annotations(root, "train")["categories"]] == ["shapes", "yellow star",
                                                                              "purple hexagon"]
    with pytest.raises(ValueError, match="'pink circle'"):
        write_shapes_dataset(tmp_path / "y", categories=["pink circle"], **TINY)


def test_write_shapes_dataset_writes_once_then_refuses_to_overwrite(tmp_path):
    out = tmp_path / "shapes"
    write_shapes_dataset(out, style="target", seed=1, num_train=3, num_valid=2, num_test=1, progress=False)
    assert (out / "valid" / ROBOFLOW_ANNOTATION_FILE).is_file()
    with pytest.raises(FileExistsError, match="already exists"):
        write_shapes_dataset(out, num_train=1, num_valid=1, num_test=0, progress=False)
