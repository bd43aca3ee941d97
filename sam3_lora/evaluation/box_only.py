"""Mask evaluation when some ground-truth objects have only a box.

A box-only object has an unknown mask: for segm AP it is neither a miss nor a target. It becomes a crowd
region covering its box, so detections on it are ignored (COCO's crowd rule) and not counted as false
positives; bbox AP keeps it as an ordinary object.
"""

from __future__ import annotations

import copy

from faster_coco_eval import COCO


def has_box_only(coco_gt: COCO) -> bool:
    """Whether any annotation lacks a segmentation."""
    return any(not a.get("segmentation") for a in coco_gt.dataset.get("annotations", []))


def segm_ground_truth(coco_gt: COCO) -> COCO:
    """Copy of `coco_gt` where box-only annotations are crowd regions shaped like their box."""
    dataset = copy.deepcopy(coco_gt.dataset)
    for annotation in dataset.get("annotations", []):
        if not annotation.get("segmentation"):
            x, y, w, h = annotation["bbox"]
            annotation["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
            annotation["iscrowd"] = 1
    return COCO(dataset)
