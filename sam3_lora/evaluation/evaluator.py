"""Accumulate COCO results over an evaluation pass (any number of ranks) and compute COCO numbers once."""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.distributed as dist

from sam3_lora.evaluation.coco_eval import IOU_TYPES, check_segmentation, evaluate_coco
from sam3_lora.evaluation.postprocess import final_predictions, predictions_to_coco

log = logging.getLogger(__name__)


class CocoEvaluator:
    """COCO bbox/segm evaluation of SAM3 predictions against a split's ground truth.

    Results are held as RLE, never dense masks, keyed by (image, category) query: a query seen twice (a
    DistributedSampler pads the last batch with repeats) is counted once.

    Args:
        coco_gt: ground truth from `load_ground_truth` (written by `sam3_lora.data`).
        iou_types: any of "bbox", "segm"; "segm" needs masks on every ground-truth annotation.
        category_names: category id → name for per-class keys (default: the ground truth's names).
        topk: detections kept per (image, category) query.
        mask_threshold: mask probability threshold before RLE encoding.

    Raises:
        ValueError: an unknown iou type, or "segm" on ground truth without masks.
    """

    def __init__(self, coco_gt, iou_types: Sequence[str] = IOU_TYPES, category_names: dict[int, str] | None = None,
                 topk: int = 100, mask_threshold: float = 0.5) -> None:
        unknown = set(iou_types) - set(IOU_TYPES)
        if unknown or not iou_types:
            raise ValueError(f"iou_types {list(iou_types)}: choose one or more of {list(IOU_TYPES)}")
        if "segm" in iou_types:
            check_segmentation(coco_gt)
        self.coco_gt = coco_gt
        self.iou_types = tuple(iou_types)
        self.category_names = category_names
        self.topk = topk
        self.mask_threshold = mask_threshold
        self._results: dict[tuple[int, int], list[dict]] = {}

    def reset(self) -> None:
        """Forget every accumulated result (call at the start of each evaluation pass)."""
        self._results = {}

    @torch.no_grad()
    def update(self, sam3_output, batch) -> None:
        """Post-process one batch's predictions and keep them as COCO results.

        Args:
            sam3_output: `Sam3Image.forward` output (eval mode) or its `final_predictions` dict.
            batch: the sam3 `BatchedDatapoint` it came from (`find_metadatas[0]` describes the queries).

        Raises:
            ValueError: "segm" is evaluated but the model has no mask head.
        """
        metadata = batch.find_metadatas[0]
        outputs = final_predictions(sam3_output)
        if "segm" in self.iou_types and "pred_masks" not in outputs:
            raise ValueError("mask AP (iou_types with 'segm') needs a model with a mask head, but the outputs have "
                             "no pred_masks: build the model with segmentation=true or evaluate iou_types=('bbox',)")
        results = predictions_to_coco(outputs, metadata, topk=self.topk,
                                      with_masks="segm" in self.iou_types, mask_threshold=self.mask_threshold)
        queries = zip(metadata.original_image_id.tolist(), metadata.original_category_id.tolist())
        for key in queries:
            self._results[(int(key[0]), int(key[1]))] = []
        for result in results:
            self._results[(result["image_id"], result["category_id"])].append(result)

    def compute(self) -> dict[str, float]:
        """Gather results from every rank and return COCO numbers (identical on every rank).

        Returns:
            `{bbox,segm}_{mAP,mAP50,mAP75,mAP_s,mAP_m,mAP_l,mAR100}` and `{bbox,segm}_AP/<name>`; -1 values
            when nothing was predicted.
        """
        gathered = _gather(self._results)
        if not _is_distributed() or dist.get_rank() == 0:
            metrics = self._evaluate(gathered)
        else:
            metrics = None
        return _broadcast(metrics)

    def _evaluate(self, gathered: dict[tuple[int, int], list[dict]]) -> dict[str, float]:
        results = [result for query in gathered.values() for result in query]
        image_ids = {image_id for image_id, _ in gathered}
        log.info("COCO evaluation: %d detections over %d images", len(results), len(image_ids))
        return evaluate_coco(self.coco_gt, results, self.iou_types, image_ids=image_ids or None,
                             category_names=self.category_names)


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather(results: dict) -> dict:
    if not _is_distributed():
        return results
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, results)
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged


def _broadcast(metrics: dict | None) -> dict[str, float]:
    if not _is_distributed():
        return metrics
    holder = [metrics]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
