"""COCO ground truth preparation and COCOeval numbers (faster-coco-eval, equal to pycocotools).

The split's own json is the ground truth, with two corrections: annotation ids are re-indexed from 1
(pycocotools and faster-coco-eval never count a match to annotation id 0 as a true positive), and
categories the data config dropped are removed with their annotations. Crowd regions stay: COCOeval
ignores detections matched to them, as on COCO.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster
from pycocotools import mask as mask_util

log = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm")
# COCOeval.stats index of each summary number (pycocotools' summarize() order).
SUMMARY_INDEX = {"mAP": 0, "mAP50": 1, "mAP75": 2, "mAP_s": 3, "mAP_m": 4, "mAP_l": 5, "mAR100": 8}
MISSING = -1.0  # COCO's value for "not measurable" (no ground truth, no detections evaluated)


def prepare_ground_truth(annotation_file: str | Path | dict, category_ids: Iterable[int] | None = None) -> COCO:
    """Load a split's COCO json as evaluation ground truth.

    Args:
        annotation_file: path of the split's `_annotations.coco.json` (or its loaded dict).
        category_ids: original COCO category ids the data config keeps; None keeps every category.

    Returns:
        A faster-coco-eval `COCO` (same API as pycocotools') with every image, only the kept categories
        and their annotations, annotation ids 1..n, `iscrowd` defaulted to 0 and `area` filled when absent.

    Raises:
        ValueError: a kept category id is not in the file.
    """
    dataset = _read_dataset(annotation_file)
    available = {c["id"] for c in dataset.get("categories", [])}
    keep = available if category_ids is None else set(int(c) for c in category_ids)
    if keep - available:
        raise ValueError(f"{annotation_file}: category ids {sorted(keep - available)} are not among the file's "
                         f"categories {sorted(available)}; check the data config's kept categories")
    images = {image["id"]: image for image in dataset.get("images", [])}
    annotations = [a for a in dataset.get("annotations", []) if a["category_id"] in keep]
    for new_id, annotation in enumerate(annotations, start=1):
        annotation["id"] = new_id
        annotation.setdefault("iscrowd", 0)
        if "area" not in annotation:
            annotation["area"] = _area(annotation, images[annotation["image_id"]])
    dataset["annotations"] = annotations
    dataset["categories"] = [c for c in dataset.get("categories", []) if c["id"] in keep]
    return COCO(dataset)


def _read_dataset(annotation_file: str | Path | dict) -> dict:
    if isinstance(annotation_file, dict):
        return copy.deepcopy(annotation_file)
    path = Path(annotation_file)
    if not path.exists():
        raise FileNotFoundError(f"COCO annotation file {path} does not exist")
    return json.loads(path.read_text())


def _area(annotation: dict, image: dict) -> float:
    segmentation = annotation.get("segmentation")
    if segmentation:
        rle = _to_rle(segmentation, image["height"], image["width"])
        return float(mask_util.area(rle))
    _, _, w, h = annotation["bbox"]
    return float(w * h)


def _to_rle(segmentation, height: int, width: int) -> dict:
    if isinstance(segmentation, list):
        return mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    if isinstance(segmentation.get("counts"), list):
        return mask_util.frPyObjects(segmentation, height, width)
    return segmentation


def check_segmentation(coco_gt: COCO) -> None:
    """Raise ValueError naming the first annotation without a usable segmentation (needed for "segm")."""
    for annotation in coco_gt.dataset.get("annotations", []):
        if not annotation.get("segmentation"):
            raise ValueError(
                f"annotation of image {annotation['image_id']} (category {annotation['category_id']}) has no "
                "segmentation: mask AP needs masks on every annotation; evaluate with iou_types=('bbox',)"
            )


def evaluate_coco(
    coco_gt: COCO,
    results: list[dict],
    iou_types: Sequence[str] = IOU_TYPES,
    image_ids: Iterable[int] | None = None,
    category_names: dict[int, str] | None = None,
    max_dets: int = 100,
) -> dict[str, float]:
    """Run COCOeval on COCO results and return named numbers.

    Args:
        coco_gt: ground truth from `prepare_ground_truth`.
        results: COCO result dicts (`segmentation` needed for "segm").
        iou_types: any of "bbox", "segm".
        image_ids: images that were predicted (so a partial pass does not count unseen images as misses);
            None evaluates every ground-truth image.
        category_names: category id → name for the per-class keys (default: the ground truth's names).
        max_dets: COCOeval's largest maxDets (the `mAR100` number uses it).

    Returns:
        `{iou}_{mAP,mAP50,mAP75,mAP_s,mAP_m,mAP_l,mAR100}` and `{iou}_AP/<name>` per category; -1 where COCO
        cannot measure (no ground truth of that kind, or no results at all).
    """
    names = category_names or {c["id"]: c["name"] for c in coco_gt.dataset.get("categories", [])}
    if not results:
        log.warning("COCO evaluation: no predictions to evaluate; every metric is %s", MISSING)
        return _missing_metrics(iou_types, names, coco_gt.getCatIds())
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        metrics.update(_evaluate_one(coco_gt, results, iou_type, image_ids, names, max_dets))
    return metrics


def _evaluate_one(coco_gt, results, iou_type, image_ids, names, max_dets) -> dict[str, float]:
    coco_dt = coco_gt.loadRes(copy.deepcopy(results))
    evaluator = COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=log.debug)
    if image_ids is not None:
        evaluator.params.imgIds = sorted(set(int(i) for i in image_ids))
    evaluator.params.maxDets = [1, 10, max_dets]
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    metrics = {f"{iou_type}_{key}": float(evaluator.stats[index]) for key, index in SUMMARY_INDEX.items()}
    for category_id, ap in per_class_ap(evaluator).items():
        metrics[f"{iou_type}_AP/{names.get(category_id, category_id)}"] = ap
    return metrics


def per_class_ap(evaluator) -> dict[int, float]:
    """AP@[.5:.95] per category (area "all", largest maxDets) from an accumulated COCOeval; -1 without GT."""
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # (iou thresholds, recall points, categories)
    aps = {}
    for k, category_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k]
        values = values[values > -1]
        aps[int(category_id)] = float(np.mean(values)) if values.size else MISSING
    return aps


def _missing_metrics(iou_types, names, category_ids) -> dict[str, float]:
    metrics = {f"{iou}_{key}": MISSING for iou in iou_types for key in SUMMARY_INDEX}
    metrics.update({f"{iou}_AP/{names.get(c, c)}": MISSING for iou in iou_types for c in category_ids})
    return metrics
