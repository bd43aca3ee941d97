"""COCO ground truth loading and COCOeval numbers (faster-coco-eval, equal to pycocotools).

The ground truth is the json `sam3_lora.data` writes for each split (`CocoSplit.write_clean_json`): repaired
annotations with ids >= 1 (pycocotools and faster-coco-eval never count a match to annotation id 0 as a true
positive), areas filled, and exactly the trained categories. Evaluation only loads and checks it. Crowd regions
stay: COCOeval ignores detections matched to them, as on COCO.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster

log = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm")
# COCOeval.stats index of each summary number (pycocotools' summarize() order).
SUMMARY_INDEX = {"mAP": 0, "mAP50": 1, "mAP75": 2, "mAP_s": 3, "mAP_m": 4, "mAP_l": 5, "mAR100": 8}
MISSING = -1.0  # COCO's value for "not measurable" (no ground truth, no detections evaluated)


def load_ground_truth(annotation_file: str | Path | dict) -> COCO:
    """Load a split's final ground truth (written by `sam3_lora.data`) for COCOeval, unchanged.

    Args:
        annotation_file: path of the ground-truth json (`CocoDataModule.annotation_file(split)`) or its dict.

    Returns:
        A faster-coco-eval `COCO` (same API as pycocotools').

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: an annotation has an id < 1, a repeated id, or no `area`/`iscrowd`: the json is a raw
            export, not ground truth written by `sam3_lora.data`, which repairs and fills these.
    """
    dataset = _read_dataset(annotation_file)
    _check_final(dataset, annotation_file)
    return COCO(dataset)


def _read_dataset(annotation_file: str | Path | dict) -> dict:
    if isinstance(annotation_file, dict):
        return copy.deepcopy(annotation_file)
    path = Path(annotation_file)
    if not path.exists():
        raise FileNotFoundError(f"COCO annotation file {path} does not exist")
    return json.loads(path.read_text())


def _check_final(dataset: dict, source) -> None:
    seen: set = set()
    for annotation in dataset.get("annotations", []):
        ann_id = annotation.get("id")
        missing = [k for k in ("area", "iscrowd") if k not in annotation]
        if not isinstance(ann_id, int) or ann_id < 1 or ann_id in seen or missing:
            where = source if not isinstance(source, dict) else "the ground-truth dict"
            raise ValueError(
                f"{where}: annotation id {ann_id!r} is not final ground truth (ids must be unique integers >= 1 "
                f"and area/iscrowd present{'; missing ' + ', '.join(missing) if missing else ''}); evaluate "
                "against the json sam3_lora.data writes (CocoDataModule.annotation_file), not the raw export")
        seen.add(ann_id)


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
        coco_gt: ground truth from `load_ground_truth`.
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
