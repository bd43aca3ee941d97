"""Validation before training: each case produces its message; fatal ones stop check-data and the DataModule."""

from __future__ import annotations

import pytest

from sam3_lora.data.check import check_data, check_data_report
from sam3_lora.data.coco import SplitPaths, read_split
from sam3_lora.data.datamodule import CocoDataModule
from sam3_lora.data.report import DataValidationError
from tests.data_fixtures import (box_annotation, coco_dict, image_entry, shapes_root,  # noqa: F401 (fixture)
                                 write_split, write_valid_dataset)

GOOD = box_annotation(1, 0, 1, [2, 2, 10, 10])
DOG = box_annotation(2, 0, 2, [20, 20, 10, 10])


def _report(root, data=None, make_images=True):
    if data is not None:
        write_split(root, "train", data, make_images)
    return read_split(SplitPaths.roboflow(root, "train"), "train").report


def _only(report, kind):
    """The problems of one kind, asserting that one exists and that its message names the file."""
    found = [p for p in report.problems if p.kind == kind]
    assert found, f"no '{kind}' problem in {report.problems}"
    assert all(p.file.endswith("_annotations.coco.json") for p in found)
    return found


# ----- fatal ----------------------------------------------------------------------------------------------------
def test_missing_json(tmp_path):
    (problem,) = _only(_report(tmp_path), "missing_json")
    assert problem.severity == "fatal" and "not found" in problem.message


def test_invalid_json(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "_annotations.coco.json").write_text('{"images": [')
    (problem,) = _only(_report(tmp_path), "invalid_json")
    assert problem.severity == "fatal" and "not valid JSON" in problem.message


def test_json_without_images_list(tmp_path):
    (problem,) = _only(_report(tmp_path, {"annotations": [], "categories": []}, make_images=False), "invalid_json")
    assert "'images'" in problem.message


def test_missing_image_file(tmp_path):
    (problem,) = _only(_report(tmp_path, coco_dict([image_entry(3)], [GOOD]), make_images=False),
                       "missing_image_file")
    assert problem.severity == "fatal" and "image id 3" in problem.message and "img3.jpg" in problem.message


def test_unreadable_image(tmp_path):
    data = coco_dict([image_entry(0)], [GOOD])
    write_split(tmp_path, "train", data, make_images=False)
    (tmp_path / "train" / "img0.jpg").write_bytes(b"this is not a jpeg")
    (problem,) = _only(_report(tmp_path), "unreadable_image")
    assert problem.severity == "fatal" and "image id 0" in problem.message


def test_image_size_differs_from_json(tmp_path):
    data = coco_dict([image_entry(0)], [GOOD])
    write_split(tmp_path, "train", data)  # files are 64x48
    data["images"][0]["width"] = 80
    (problem,) = _only(_report(tmp_path, data, make_images=False), "image_size_mismatch")
    assert problem.severity == "fatal" and "64x48" in problem.message and "80x48" in problem.message


def test_annotation_of_unknown_category(tmp_path):
    data = coco_dict([image_entry(0)], [box_annotation(17, 0, 9, [1, 1, 5, 5])])
    (problem,) = _only(_report(tmp_path, data), "unknown_category")
    assert problem.severity == "fatal" and "annotation id 17" in problem.message and "'category_id'" in problem.message


def test_duplicate_image_id(tmp_path):
    images = [image_entry(0), {**image_entry(0), "file_name": "other.jpg"}]
    (problem,) = _only(_report(tmp_path, coco_dict(images, [GOOD])), "duplicate_image_id")
    assert problem.severity == "fatal" and "image id 0" in problem.message and "other.jpg" in problem.message


def test_duplicate_category_id(tmp_path):
    categories = [{"id": 1, "name": "cat"}, {"id": 1, "name": "lynx"}]
    (problem,) = _only(_report(tmp_path, coco_dict([image_entry(0)], [GOOD], categories)), "duplicate_category_id")
    assert problem.severity == "fatal" and "category id 1" in problem.message and "lynx" in problem.message


def test_evaluation_split_with_a_category_train_lacks(tmp_path):
    train = coco_dict([image_entry(0)], [GOOD, DOG])
    valid = coco_dict([image_entry(0)], [GOOD, DOG], [{"id": 1, "name": "cat"}, {"id": 2, "name": "wolf"}])
    write_valid_dataset(tmp_path, train, valid)
    text, usable = check_data_report(check_data(tmp_path))
    assert not usable
    assert "category id 2 field 'name' is 'wolf' here but 'dog' in train" in text


# ----- repaired -------------------------------------------------------------------------------------------------
def test_annotation_of_unknown_image_is_dropped(tmp_path):
    (problem,) = _only(_report(tmp_path, coco_dict([image_entry(0)], [GOOD, box_annotation(5, 99, 1, [1, 1, 5, 5])])),
                       "unknown_image")
    assert problem.severity == "repaired" and "annotation id 5" in problem.message and "99" in problem.message


def test_duplicate_annotation_ids_are_renumbered(tmp_path):
    data = coco_dict([image_entry(0)], [GOOD, {**DOG, "id": 1}])
    write_split(tmp_path, "train", data)
    split = read_split(SplitPaths.roboflow(tmp_path, "train"), "train")
    (problem,) = _only(split.report, "duplicate_annotation_id")
    assert problem.severity == "repaired" and "annotation id 1" in problem.message
    assert [a["id"] for a in split.clean_dataset["annotations"]] == [1, 2]


def test_box_out_of_bounds_is_clipped(tmp_path):
    data = coco_dict([image_entry(0)], [box_annotation(4, 0, 1, [-5, 40, 20, 20])])
    write_split(tmp_path, "train", data)
    split = read_split(SplitPaths.roboflow(tmp_path, "train"), "train")
    (problem,) = _only(split.report, "bbox_out_of_bounds")
    assert problem.severity == "repaired" and "annotation id 4" in problem.message
    assert split.records[0].instances[0].bbox == (0.0, 40.0, 15.0, 8.0)


@pytest.mark.parametrize("bbox", [[10, 10, 0, 5], [10, 10, 5, -1], [70, 60, 5, 5], [1, 2, 3], None])
def test_degenerate_box_without_segmentation_is_dropped(tmp_path, bbox):
    data = coco_dict([image_entry(0)], [GOOD, {**box_annotation(8, 0, 1, [0, 0, 1, 1]), "bbox": bbox}])
    write_split(tmp_path, "train", data)
    split = read_split(SplitPaths.roboflow(tmp_path, "train"), "train")
    (problem,) = _only(split.report, "degenerate_bbox")
    assert problem.severity == "repaired" and "annotation id 8" in problem.message
    assert [i.annotation_id for i in split.records[0].instances] == [1]


def test_degenerate_box_with_segmentation_is_rebuilt(tmp_path):
    polygon = [[10, 10, 30, 10, 30, 20, 10, 20]]
    data = coco_dict([image_entry(0)], [box_annotation(8, 0, 1, [10, 10, 0, 0], segmentation=polygon)])
    write_split(tmp_path, "train", data)
    split = read_split(SplitPaths.roboflow(tmp_path, "train"), "train")
    (problem,) = _only(split.report, "bbox_from_segmentation")
    assert problem.severity == "repaired"
    assert split.records[0].instances[0].bbox == pytest.approx((10, 10, 20, 10), abs=1)


@pytest.mark.parametrize("segmentation", [[[]], [[1, 1, 5, 5, 9, 9]], [[4, 4, 4, 4, 4, 4, 4, 4]]])
def test_empty_polygon_becomes_box_only(tmp_path, segmentation):
    """Empty parts, collinear points (zero area) and a degenerate point polygon cover no pixel."""
    data = coco_dict([image_entry(0)], [box_annotation(6, 0, 1, [1, 1, 9, 9], segmentation=segmentation)])
    write_split(tmp_path, "train", data)
    split = read_split(SplitPaths.roboflow(tmp_path, "train"), "train")
    (problem,) = _only(split.report, "empty_polygon")
    assert problem.severity == "repaired" and "annotation id 6" in problem.message
    assert split.records[0].instances[0].segmentation is None


def test_invalid_polygon_parts_are_dropped(tmp_path):
    segmentation = [[5, 5, 25, 5, 25, 20, 5, 20], [1, 2, 3], [1, 2, "x", 4, 5, 6]]
    data = coco_dict([image_entry(0)], [box_annotation(6, 0, 1, [5, 5, 20, 15], segmentation=segmentation)])
    write_split(tmp_path, "train", data)
    split = read_split(SplitPaths.roboflow(tmp_path, "train"), "train")
    (problem,) = _only(split.report, "invalid_polygon")
    assert problem.severity == "repaired" and "dropped 2 polygon part(s)" in problem.message
    assert split.records[0].instances[0].segmentation == [[5, 5, 25, 5, 25, 20, 5, 20]]


def test_rle_of_the_wrong_size_becomes_box_only(tmp_path):
    rle = {"size": [10, 10], "counts": [5, 95]}
    (problem,) = _only(_report(tmp_path, coco_dict([image_entry(0)], [box_annotation(6, 0, 1, [1, 1, 5, 5],
                                                                                     segmentation=rle)])),
                       "invalid_rle")
    assert problem.severity == "repaired" and "[48, 64]" in problem.message


def test_segmentation_of_unknown_shape_becomes_box_only(tmp_path):
    data = coco_dict([image_entry(0)], [box_annotation(6, 0, 1, [1, 1, 5, 5], segmentation={"points": [1, 2]})])
    (problem,) = _only(_report(tmp_path, data), "invalid_segmentation")
    assert problem.severity == "repaired"


# ----- warnings -------------------------------------------------------------------------------------------------
def test_category_without_instances(tmp_path):
    (problem,) = _only(_report(tmp_path, coco_dict([image_entry(0)], [GOOD])), "category_without_instances")
    assert problem.severity == "warning" and "category id 2 ('dog')" in problem.message


# ----- what users see -------------------------------------------------------------------------------------------
def test_check_data_reports_a_fatal_problem(tmp_path):
    write_valid_dataset(tmp_path, coco_dict([image_entry(0)], [GOOD, DOG]))
    (tmp_path / "valid" / "img0.jpg").unlink()
    out, usable = check_data_report(check_data(tmp_path))
    assert not usable
    assert "FATAL" in out and "valid/img0.jpg not found" in out and "FAILED" in out


def test_check_data_on_generated_shapes_is_clean(shapes_root):
    out, usable = check_data_report(check_data(shapes_root))
    assert usable
    for expected in ("== train", "== valid", "== test", "red circle", "boxes-only", "without objects",
                     "dropped category 0 'shapes'", "0 fatal, 0 repaired, 0 warnings", "OK:"):
        assert expected in out


def test_datamodule_setup_stops_on_fatal_problems_naming_them(tmp_path):
    write_valid_dataset(tmp_path, coco_dict([image_entry(0)], [GOOD, box_annotation(3, 0, 5, [1, 1, 4, 4])]))
    with pytest.raises(DataValidationError, match="annotation id 3 field 'category_id' = 5"):
        CocoDataModule(root=str(tmp_path), resolution=56, num_workers=0).setup()
