"""Reading a COCO split: every annotation kind, Roboflow quirks, image modes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from sam3_lora.data.coco import SplitPaths, read_split, read_splits, resolve_split_paths
from sam3_lora.data.images import read_image_rgb
from sam3_lora.data.masks import decode_mask
from sam3_lora.evaluation import load_ground_truth
from tests.data_fixtures import box_annotation, coco_dict, image_entry, write_image, write_split

TWO_PART_POLYGON = [[5, 5, 25, 5, 25, 20, 5, 20], [40, 30, 60, 30, 50, 45]]  # a rectangle and a triangle


def _read(root, split="train", **kwargs):
    return read_split(SplitPaths.roboflow(root, split), split, **kwargs)


def _mask(height, width, box):
    mask = np.zeros((height, width), np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 1
    return mask


def test_multi_part_polygon_area_equals_pycocotools_annToMask(tmp_path):
    ann = box_annotation(1, 0, 1, [5, 5, 55, 40], segmentation=TWO_PART_POLYGON)
    path = write_split(tmp_path, "train", coco_dict([image_entry(0)], [ann]))
    instance = _read(tmp_path).records[0].instances[0]
    ours = decode_mask(instance.segmentation, 48, 64)
    reference = COCO(str(path)).annToMask(ann)
    assert ours.sum() == reference.sum() > 0
    assert np.array_equal(ours, reference)


@pytest.mark.parametrize("compressed", [True, False])
def test_rle_round_trips(tmp_path, compressed):
    mask = _mask(48, 64, (10, 8, 30, 20))
    rle = mask_utils.encode(np.asfortranarray(mask))
    if compressed:
        segmentation = {"size": rle["size"], "counts": rle["counts"].decode()}
    else:  # COCO's uncompressed form: column-major run lengths starting with zeros
        flat = mask.flatten(order="F")
        runs = np.diff(np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]]))
        segmentation = {"size": [48, 64], "counts": runs.tolist()}
    ann = box_annotation(1, 0, 1, [10, 8, 20, 12], segmentation=segmentation)
    write_split(tmp_path, "train", coco_dict([image_entry(0)], [ann]))
    instance = _read(tmp_path).records[0].instances[0]
    assert np.array_equal(decode_mask(instance.segmentation, 48, 64), mask)


def test_box_only_annotation_keeps_its_box_without_segmentation(tmp_path):
    write_split(tmp_path, "train", coco_dict([image_entry(0)], [box_annotation(1, 0, 2, [3, 4, 10, 12])]))
    split = _read(tmp_path)
    instance = split.records[0].instances[0]
    assert instance.segmentation is None and instance.bbox == (3, 4, 10, 12)
    assert split.report.fatal == [] and split.report.of("repaired") == []


def test_crowd_is_kept_for_evaluation_but_never_a_target(tmp_path):
    anns = [box_annotation(1, 0, 1, [0, 0, 20, 20], iscrowd=1, segmentation=TWO_PART_POLYGON),
            box_annotation(2, 0, 1, [30, 30, 10, 10])]
    write_split(tmp_path, "train", coco_dict([image_entry(0)], anns))
    split = _read(tmp_path)
    record = split.records[0]
    assert [i.annotation_id for i in record.targets] == [2]
    assert [i.is_crowd for i in record.instances] == [True, False]
    assert [a["iscrowd"] for a in split.clean_dataset["annotations"]] == [1, 0]


def test_roboflow_background_category_is_dropped_by_default(tmp_path):
    write_split(tmp_path, "train", coco_dict([image_entry(0)], [box_annotation(1, 0, 1, [0, 0, 9, 9])]))
    assert _read(tmp_path).categories == {1: "cat", 2: "dog"}
    assert _read(tmp_path).dropped_categories == {0: "pets"}
    assert _read(tmp_path, drop_background_category=False).categories == {0: "pets", 1: "cat", 2: "dog"}


def test_zero_based_and_non_contiguous_ids_are_kept(tmp_path):
    categories = [{"id": 42, "name": "b", "supercategory": "x"}, {"id": 0, "name": "a", "supercategory": "x"},
                  {"id": 7, "name": "c", "supercategory": "x"}]
    anns = [box_annotation(0, 0, 0, [0, 0, 5, 5]), box_annotation(5, 0, 42, [5, 5, 5, 5]),
            box_annotation(9, 0, 7, [9, 9, 5, 5])]
    write_split(tmp_path, "train", coco_dict([image_entry(0)], anns, categories))
    split = _read(tmp_path)
    assert split.categories == {0: "a", 7: "c", 42: "b"}
    assert sorted(i.category_id for i in split.records[0].instances) == [0, 7, 42]
    # pycocotools never matches a ground truth with id 0, so the repaired json renumbers from 1
    assert [a["id"] for a in split.clean_dataset["annotations"]] == [1, 2, 3]


def test_images_without_annotations_are_pure_negative_records(tmp_path):
    data = coco_dict([image_entry(0), image_entry(1)], [box_annotation(1, 0, 1, [0, 0, 9, 9])])
    write_split(tmp_path, "train", data)
    records = _read(tmp_path).records
    assert [(r.image_id, len(r.targets)) for r in records] == [(0, 1), (1, 0)]


def _exif_rotated_jpeg(path):
    # stored 40 wide x 20 high: left half red, right half blue; EXIF 6 = display rotated 90 degrees clockwise
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)


def test_exif_orientation_is_applied_when_the_json_size_is_the_rotated_one(tmp_path):
    (tmp_path / "train").mkdir()
    _exif_rotated_jpeg(tmp_path / "train" / "img0.jpg")
    write_split(tmp_path, "train", coco_dict([image_entry(0, width=20, height=40)], []), make_images=False)
    record = _read(tmp_path).records[0]
    pixels = read_image_rgb(record.path, record.apply_exif)
    assert record.apply_exif and pixels.shape == (40, 20, 3)
    assert pixels[5, 10, 0] > 200 and pixels[35, 10, 2] > 200  # the left (red) half is now on top


def test_exif_orientation_is_ignored_when_the_json_matches_the_stored_pixels(tmp_path):
    (tmp_path / "train").mkdir()
    _exif_rotated_jpeg(tmp_path / "train" / "img0.jpg")
    write_split(tmp_path, "train", coco_dict([image_entry(0, width=40, height=20)], []), make_images=False)
    split = _read(tmp_path)
    assert split.records[0].apply_exif is False
    assert split.report.kinds()["exif_orientation_ignored"] == 1


@pytest.mark.parametrize("mode,suffix", [("L", "png"), ("RGBA", "png"), ("P", "png"), ("I;16", "png"),
                                         ("LA", "png"), ("CMYK", "jpg"), ("RGB", "jpg")])
def test_any_image_mode_decodes_to_rgb_uint8(tmp_path, mode, suffix):
    path = write_image(tmp_path / f"img.{suffix}", 12, 8, mode, value=128)
    pixels = read_image_rgb(path)
    assert pixels.shape == (8, 12, 3) and pixels.dtype == np.uint8
    if mode in ("L", "I;16", "LA", "RGBA", "RGB"):
        assert abs(int(pixels[4, 6, 0]) - 128) <= 1  # 16-bit 128*257 maps back to 128


def test_repaired_json_is_what_evaluation_reads(tmp_path):
    data = coco_dict([image_entry(0)], [box_annotation(1, 0, 1, [60, 40, 10, 10])])  # pokes out of 64x48
    write_split(tmp_path, "train", data)
    written = _read(tmp_path).write_clean_json(tmp_path / "gt.json")
    clean = json.loads(written.read_text())
    assert clean["annotations"][0]["bbox"] == [60.0, 40.0, 4.0, 8.0]
    assert [c["id"] for c in clean["categories"]] == [1, 2]


def test_evaluation_ground_truth_is_final_ids_from_1_areas_filled_train_categories(tmp_path):
    """data/ is the one owner of ground truth: evaluation loads what it writes without repairing anything."""
    train = coco_dict([image_entry(0)], [box_annotation(1, 0, 1, [0, 0, 9, 9]), box_annotation(2, 0, 2, [9, 9, 9, 9])])
    polygon = box_annotation(0, 0, 1, [10, 10, 20, 10], segmentation=[[10, 10, 30, 10, 30, 20, 10, 20]])
    box_only = box_annotation(0, 0, 1, [2, 2, 5, 4])
    del polygon["area"], box_only["area"]
    bird = {"id": 3, "name": "bird", "supercategory": "pets"}  # listed only in valid, never annotated
    valid = coco_dict([image_entry(0)], [polygon, box_only], [*coco_dict([], [])["categories"][:2], bird])
    write_split(tmp_path, "train", train)
    write_split(tmp_path, "valid", valid)
    splits = read_splits(resolve_split_paths(tmp_path))
    written = splits["valid"].write_clean_json(tmp_path / "gt" / "valid.json")
    annotations = json.loads(written.read_text())["annotations"]
    assert [a["id"] for a in annotations] == [1, 2]  # raw ids 0, 0
    assert [a["area"] for a in annotations] == [200.0, 20.0]  # from the polygon, from the box
    coco_gt = load_ground_truth(written)
    assert sorted(coco_gt.getCatIds()) == [1, 2]  # train's: bird dropped, dog (absent here) kept

