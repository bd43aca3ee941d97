"""Round trips: synthetic shapes (COCO) → YOLO / mask PNGs / VOC (writers below) → `sam3-lora convert` → COCO.

Each converted export must have the same splits and images, the same instances per image (category, crowd flag,
mask or box-only) as far as the format can express them, boxes within 1 px and masks that differ from the source
only within 1 px of the source mask's boundary. Why 1 px: YOLO polygons are traced through the centres of the
boundary pixels (cv2.findContours), and a polygon through pixel centres rasterises (pycocotools) with or without
those boundary pixels. Mask PNGs carry the pixels themselves and must match exactly. A VOC object map holds one
object per pixel: where two source polygons rasterise onto the same boundary pixel (13 pixels in SHAPES), the later
object keeps it, so VOC masks get the boundary check too.
"""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image

from sam3_lora.cli import main
from sam3_lora.data.coco import read_splits, resolve_split_paths
from sam3_lora.data.masks import decode_mask, segmentation_bbox
from sam3_lora.data.shapes import write_shapes_dataset

# 5+ images per split so each split holds every special annotation kind (shapes.py puts them at indices 0-4).
SHAPES = {"num_train": 6, "num_valid": 5, "num_test": 5, "image_size": (112, 160), "progress": False}
# Box tolerance per format: YOLO boxes come from polygons through boundary-pixel centres (up to 1 px inside the
# mask's box); mask PNG boxes are the same mask's box and VOC stores whole-pixel corners, so those must be exact
# (an off-by-one in VOC's 1-based convention would hide inside a 1 px tolerance).
BOX_TOLERANCE_PX = {"yolo": 1.0, "masks": 1e-6, "voc": 1e-6}
# Sanity floor on top of the boundary check: even the smallest shapes object keeps this much overlap.
MIN_MASK_IOU = 0.7
# The comparison must run over many objects: SHAPES has 32 (YOLO), 29 (mask PNGs), 35 (VOC) at seed 0.
MIN_COMPARED_OBJECTS = 25


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = write_shapes_dataset(tmp_path_factory.mktemp("convert") / "shapes", **SHAPES)
    return root, read_splits(resolve_split_paths(root))


def reference_instances(record, fmt: str) -> list:
    """The source instances a format can express: YOLO and mask PNGs have no crowd regions, mask PNGs no boxes."""
    if fmt == "yolo":
        return [i for i in record.instances if not i.is_crowd]
    if fmt == "masks":
        return [i for i in record.instances if not i.is_crowd and i.segmentation is not None]
    return list(record.instances)


def write_yolo(shapes_root: Path, splits: dict, out: Path) -> Path:
    """ultralytics layout: data.yaml, images/<split>/, labels/<split>/*.txt (masks as one bridged polygon each)."""
    names = list(splits["train"].categories.values())
    class_ids = {category_id: names.index(n) for category_id, n in splits["train"].categories.items()}
    folders = {"train": "train", "valid": "val", "test": "test"}
    for split, data in splits.items():
        for record in data.records:
            image = out / "images" / folders[split] / record.path.name
            image.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(record.path, image)
            lines = [_yolo_line(class_ids[i.category_id], i, record.width, record.height)
                     for i in reference_instances(record, "yolo")]
            label = out / "labels" / folders[split] / f"{record.path.stem}.txt"
            label.parent.mkdir(parents=True, exist_ok=True)
            if lines or record.image_id % 2:  # some background images get an empty label file, some none
                label.write_text("\n".join(lines) + "\n" if lines else "")
    (out / "data.yaml").write_text(yaml.safe_dump({"path": ".", "train": "images/train", "val": "images/val",
                                                   "test": "images/test", "names": names}))
    return out


def _yolo_line(class_id: int, instance, width: int, height: int) -> str:
    if instance.segmentation is None:
        x, y, w, h = instance.bbox
        values = [(x + w / 2) / width, (y + h / 2) / height, w / width, h / height]
    else:
        points = bridged_polygon(decode_mask(instance.segmentation, height, width))
        values = (points / [width, height]).reshape(-1).tolist()
    return " ".join([str(class_id), *(f"{v:.6f}" for v in values)])


def bridged_polygon(mask: np.ndarray) -> np.ndarray:
    """All contours of a mask (parts and holes) as ONE polygon, joined by zero-width there-and-back bridges.

    A YOLO line holds one polygon per object, so exporters join parts like this (ultralytics' merge_multi_segment);
    the doubled bridge edges cancel when pycocotools rasterises the polygon (even-odd rule).
    """
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    parts = [c.reshape(-1, 2).astype(float) for c in contours]
    anchor = parts[0][:1]
    joined = [parts[0], anchor]
    for part in parts[1:]:
        joined += [part, part[:1], anchor]
    return np.concatenate(joined)


def write_masks(shapes_root: Path, splits: dict, out: Path) -> Path:
    """images/<split>/<file> and masks/<split>/<stem>/<class>_<k>.png (0/255), no classes.json."""
    for split, data in splits.items():
        for record in data.records:
            image = out / "images" / split / record.path.name
            image.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(record.path, image)
            folder = out / "masks" / split / record.path.stem
            folder.mkdir(parents=True, exist_ok=True)  # an empty folder = an image without objects
            for k, instance in enumerate(reference_instances(record, "masks")):
                mask = decode_mask(instance.segmentation, record.height, record.width)
                name = data.categories[instance.category_id]
                Image.fromarray(mask * 255).save(folder / f"{name}_{k}.png")
    return out


def write_voc(shapes_root: Path, splits: dict, out: Path) -> Path:
    """Annotations/*.xml (crowd → difficult), JPEGImages/, SegmentationObject/*.png (palette), ImageSets/Main."""
    for folder in ("Annotations", "JPEGImages", "SegmentationObject", "ImageSets/Main"):
        (out / folder).mkdir(parents=True)
    for split, data in splits.items():
        set_name = {"train": "train", "valid": "val", "test": "test"}[split]
        (out / "ImageSets/Main" / f"{set_name}.txt").write_text("".join(f"{r.path.stem}\n" for r in data.records))
        for record in data.records:
            shutil.copy(record.path, out / "JPEGImages" / record.path.name)
            _write_voc_image(record, data.categories, out)
    return out


def _write_voc_image(record, categories: dict, out: Path) -> None:
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = record.path.name
    size = ET.SubElement(root, "size")
    for key, value in (("width", record.width), ("height", record.height), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    objects = np.zeros((record.height, record.width), np.uint8)
    for index, instance in enumerate(reference_instances(record, "voc"), start=1):
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = categories[instance.category_id]
        ET.SubElement(obj, "difficult").text = str(int(instance.is_crowd))
        box = ET.SubElement(obj, "bndbox")
        x, y, w, h = instance.bbox  # shapes boxes are whole pixels; VOC corners are 1-based and inclusive
        for key, value in (("xmin", x + 1), ("ymin", y + 1), ("xmax", x + w), ("ymax", y + h)):
            ET.SubElement(box, key).text = str(int(round(value)))
        if instance.segmentation is not None:
            objects[decode_mask(instance.segmentation, record.height, record.width) > 0] = index
    ET.ElementTree(root).write(out / "Annotations" / f"{record.path.stem}.xml")
    if objects.any():
        palette = Image.fromarray(objects).convert("P")  # L → P keeps the values as palette indices
        # distinct colours: Pillow re-indexes a palette PNG whose colours repeat
        palette.putpalette([v for i in range(256) for v in (i, 255 - i, (i * 7) % 256)])
        palette.save(out / "SegmentationObject" / f"{record.path.stem}.png")


WRITERS = {"yolo": write_yolo, "masks": write_masks, "voc": write_voc}


@pytest.mark.parametrize("fmt", ["yolo", "masks", "voc"])
def test_round_trip_keeps_splits_instances_boxes_and_masks(shapes, tmp_path, capsys, fmt):
    shapes_root, reference = shapes
    source = WRITERS[fmt](shapes_root, reference, tmp_path / fmt)
    assert main(["convert", fmt, str(source), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "splits from the source (train/valid/test)" in printed and "skipped: 0 item(s)" in printed
    converted = read_splits(resolve_split_paths(tmp_path / "out"))
    assert set(converted) == set(reference)
    compared = 0
    for split, data in reference.items():
        expected = {r.path.name: r for r in data.records}
        actual = {r.path.name: r for r in converted[split].records}
        assert set(actual) == set(expected), f"{fmt} {split}: images moved between splits"
        for name, record in expected.items():
            compared += assert_same_instances(reference_instances(record, fmt), data.categories, actual[name],
                                              converted[split].categories, exact_masks=fmt == "masks",
                                              boxes_from_masks=fmt != "voc", box_tolerance=BOX_TOLERANCE_PX[fmt])
    assert compared >= MIN_COMPARED_OBJECTS, compared
    assert main(["check-data", str(tmp_path / "out")]) == 0


def assert_same_instances(expected: list, expected_names: dict, record, actual_names: dict,
                          exact_masks: bool, boxes_from_masks: bool, box_tolerance: float) -> int:
    """Same (category, crowd, has mask) multiset; matched pairs: boxes within tolerance, masks within the boundary band.

    `boxes_from_masks`: the format stores no box for a masked object (YOLO polygons, mask PNGs), so the box to
    compare with is the tight box of the source's mask. (The shapes json box belongs to the unrasterised shape:
    its own polygon rasterises up to 1 px smaller, a difference in the source that no conversion can recover.)
    """
    def signature(instance, names):
        return names[instance.category_id], instance.is_crowd, instance.segmentation is not None

    assert Counter(signature(i, expected_names) for i in expected) == \
        Counter(signature(i, actual_names) for i in record.instances), record.path.name
    unmatched = list(record.instances)
    for instance in expected:
        candidates = [c for c in unmatched if signature(c, actual_names) == signature(instance, expected_names)]
        match = max(candidates, key=lambda c: box_iou(c.bbox, instance.bbox))
        unmatched.remove(match)
        expected_box = instance.bbox
        if instance.segmentation is not None:
            reference = decode_mask(instance.segmentation, record.height, record.width)
            if boxes_from_masks:
                expected_box = segmentation_bbox(instance.segmentation, record.height, record.width)
        corners = np.abs(np.array(_corners(match.bbox)) - _corners(expected_box))
        assert corners.max() <= box_tolerance, f"{record.path.name}: box {match.bbox} vs {expected_box}"
        if instance.segmentation is not None:
            mask = decode_mask(match.segmentation, record.height, record.width)
            if exact_masks:
                np.testing.assert_array_equal(mask, reference)
            assert differs_only_near_boundary(reference, mask), record.path.name
            assert (reference & mask).sum() / (reference | mask).sum() >= MIN_MASK_IOU
    return len(expected)


def differs_only_near_boundary(reference: np.ndarray, mask: np.ndarray) -> bool:
    """True when every differing pixel is within 1 px (8-neighbourhood) of the reference mask's boundary."""
    kernel = np.ones((3, 3), np.uint8)
    band = cv2.dilate(reference, kernel).astype(bool) & ~cv2.erode(reference, kernel).astype(bool)
    return not ((reference != mask) & ~band).any()


def _corners(bbox) -> tuple[float, float, float, float]:
    x, y, w, h = bbox
    return x, y, x + w, y + h


def box_iou(a, b) -> float:
    ax0, ay0, ax1, ay1 = _corners(a)
    bx0, by0, bx1, by1 = _corners(b)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def test_boundary_check_catches_a_shifted_mask():
    """The mask check is not vacuous: a mask shifted by 2 px fails it, one pixel trimmed off the edge passes."""
    reference = np.zeros((30, 30), np.uint8)
    reference[5:20, 8:22] = 1
    assert not differs_only_near_boundary(reference, np.roll(reference, 2, axis=1))
    trimmed = reference.copy()
    trimmed[5, 8:22] = 0
    assert differs_only_near_boundary(reference, trimmed)
