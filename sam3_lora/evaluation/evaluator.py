"""Accumulate COCO results over an evaluation pass (any number of ranks) and compute COCO numbers: a torchmetrics Metric.

torchmetrics owns the pass's state (`reset`, `update`, `compute`), and the synchronisation around `compute`: under
DDP it gathers every rank's results before computing and restores each rank's own afterwards, so every rank
computes the same numbers.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch.distributed as dist
from torchmetrics import Metric

from sam3_lora.evaluation.coco_eval import IOU_TYPES, check_segmentation, evaluate_coco
from sam3_lora.evaluation.postprocess import final_predictions, predictions_to_coco

log = logging.getLogger(__name__)


class CocoEvaluator(Metric):
    """COCO bbox/segm evaluation of SAM3 predictions against a split's ground truth (a `torchmetrics.Metric`).

    The state `queries` is a list with one `(image_id, category_id, results)` entry per evaluated query, the
    results being COCO dicts with RLE masks (never dense masks). A query seen twice (a DistributedSampler pads the
    last batch with repeats) is counted once.

    Args:
        coco_gt: ground truth from `load_ground_truth` (written by `sam3_lora.data`).
        iou_types: any of "bbox", "segm"; "segm" needs masks on every ground-truth annotation.
        category_names: category id → name for per-class keys (default: the ground truth's names).
        topk: detections kept per (image, category) query.
        mask_threshold: mask probability threshold before RLE encoding.

    Raises:
        ValueError: an unknown iou type, or "segm" on ground truth without masks.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, coco_gt, iou_types: Sequence[str] = IOU_TYPES, category_names: dict[int, str] | None = None,
                 topk: int = 100, mask_threshold: float = 0.5) -> None:
        super().__init__()
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
        # "cat": merging two states concatenates their lists; `_sync_dist` gathers them across ranks.
        self.add_state("queries", default=[], dist_reduce_fx="cat")

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
        by_query: dict[tuple[int, int], list[dict]] = {
            (int(image_id), int(category_id)): []
            for image_id, category_id in zip(metadata.original_image_id.tolist(),
                                             metadata.original_category_id.tolist())}
        for result in results:
            by_query[(result["image_id"], result["category_id"])].append(result)
        self.queries.extend((image_id, category_id, kept) for (image_id, category_id), kept in by_query.items())

    def compute(self) -> dict[str, float]:
        """COCO numbers of every query seen in this pass, by all ranks (the same on every rank).

        Returns:
            `{bbox,segm}_{mAP,mAP50,mAP75,mAP_s,mAP_m,mAP_l,mAR100}` and `{bbox,segm}_AP/<name>`; -1 values
            when nothing was predicted.
        """
        unique = {(image_id, category_id): kept for image_id, category_id, kept in self.queries}  # repeats once
        results = [result for kept in unique.values() for result in kept]
        image_ids = {image_id for image_id, _ in unique}
        log.info("COCO evaluation: %d detections over %d images", len(results), len(image_ids))
        return evaluate_coco(self.coco_gt, results, self.iou_types, image_ids=image_ids or None,
                             category_names=self.category_names)

    def _apply(self, fn, *args, **kwargs):
        """`.to(device)` etc. leave `queries` alone: Python objects, not tensors (as MeanAveragePrecision's masks)."""
        return super()._apply(fn, exclude_state=("queries",))

    def _sync_dist(self, dist_sync_fn: Any = None, process_group: Any = None) -> None:
        """Gather every rank's `queries` (Python objects: torchmetrics' own gather handles tensors only).

        The same way torchmetrics' MeanAveragePrecision gathers its RLE masks
        (torchmetrics/detection/mean_ap.py `_gather_tuple_list`); torchmetrics restores this rank's own list
        after `compute` (`unsync`).
        """
        group = process_group or self.process_group
        parts: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, self.queries, group=group)
        self.queries = [query for part in parts for query in part]
