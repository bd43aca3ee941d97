"""Mask AP with box-only ground truth: the box-only object is an ignore region for segm, a target for bbox."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_util

from sam3_lora.evaluation import evaluate_coco, load_ground_truth
from sam3_lora.evaluation.box_only import has_box_only, segm_ground_truth

SIZE = 64


def _rle(x, y, w, h) -> dict:
    binary = np.zeros((SIZE, SIZE), np.uint8)
    binary[y:y + h, x:x + w] = 1
    rle = mask_util.encode(np.asfortranarray(binary))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


@pytest.fixture
def ground_truth():
    dataset = {
        "images": [{"id": 1, "width": SIZE, "height": SIZE, "file_name": "a.png"}],
        "categories": [{"id": 1, "name": "crack"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "area": 400, "iscrowd": 0,
             "segmentation": [[4, 4, 24, 4, 24, 24, 4, 24]]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [36, 36, 20, 20], "area": 400, "iscrowd": 0},
        ],
    }
    return load_ground_truth(dataset)


def test_box_only_object_is_ignored_by_mask_ap_and_counted_by_box_ap(ground_truth):
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "score": 0.9, "segmentation": _rle(4, 4, 20, 20)},
        {"image_id": 1, "category_id": 1, "bbox": [36, 36, 20, 20], "score": 0.95, "segmentation": _rle(36, 36, 20, 20)},
    ]
    assert has_box_only(ground_truth)
    segm = evaluate_coco(segm_ground_truth(ground_truth), results, ("segm",))
    assert segm["segm_mAP"] == pytest.approx(1.0)  # the confident detection on the box-only object is not an FP
    bbox = evaluate_coco(ground_truth, results, ("bbox",))
    assert bbox["bbox_mAP"] == pytest.approx(1.0)
    only_first = evaluate_coco(ground_truth, results[:1], ("bbox",))
    assert only_first["bbox_mAR100"] == pytest.approx(0.5)  # for boxes, the box-only object is a real target


def test_box_only_conversion_leaves_the_input_untouched(ground_truth):
    converted = segm_ground_truth(ground_truth)
    assert "segmentation" not in ground_truth.dataset["annotations"][1]
    assert converted.dataset["annotations"][1]["iscrowd"] == 1
