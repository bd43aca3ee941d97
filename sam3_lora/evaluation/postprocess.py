"""SAM3 outputs → COCO results: presence-scored, boxes and RLE masks in original image coordinates.

Follows sam3's own `sam3.eval.postprocessors.PostProcessImage` (score = sigmoid(logit) × sigmoid(presence),
cxcywh → xyxy scaled by the original (W, H), masks bilinearly resized from logits then thresholded), with two
differences: top-k is taken per (image, category) query *before* masks are resized, so only kept masks are
ever dense, and masks are resized and encoded in chunks on whatever device the outputs live on (sam3's
`always_interpolate_masks_on_gpu` asserts CUDA). Boxes are clipped to the image, as detectron2 does.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from pycocotools import mask as mask_util
from sam3.model import box_ops
from sam3.model.data_misc import interpolate
from sam3.model.model_misc import SAM3Output

# Masks resized to the original size at once; bounds peak memory at MASK_CHUNK × H × W floats.
MASK_CHUNK = 16


def final_predictions(sam3_output: SAM3Output | dict) -> dict:
    """Return the final predictions of a SAM3 forward: the last step of the last stage.

    Args:
        sam3_output: what `Sam3Image.forward` returns in eval mode (a `SAM3Output`, a list of stages, each a
            list of interactive steps), or an already-final dict (returned unchanged).

    Returns:
        The dict with `pred_logits` (Q, N, 1), `pred_boxes` (Q, N, 4), `presence_logit_dec` (Q, 1) and,
        with a mask head, `pred_masks` (Q, N, h, w).

    Raises:
        ValueError: the output holds no stage.
    """
    if isinstance(sam3_output, dict):
        return sam3_output
    stages = sam3_output.output if isinstance(sam3_output, SAM3Output) else list(sam3_output)
    if not stages or not stages[-1]:
        raise ValueError("SAM3 output holds no stage/step: was the model run on an empty batch?")
    return stages[-1][-1]


def query_scores(outputs: dict) -> torch.Tensor:
    """Detection scores (Q, N): sigmoid(pred_logits) × sigmoid(presence_logit_dec), as sam3 scores them."""
    scores = outputs["pred_logits"].float().sigmoid()[..., 0]
    if "presence_logit_dec" in outputs:
        scores = scores * outputs["presence_logit_dec"].float().sigmoid().view(-1, 1)
    return scores


def boxes_to_coco_xywh(boxes_cxcywh: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Normalised cxcywh boxes (..., 4) → absolute COCO xywh in an image of (height, width), clipped to it."""
    xyxy = box_ops.box_cxcywh_to_xyxy(boxes_cxcywh.float())
    scale = torch.tensor([width, height, width, height], dtype=xyxy.dtype, device=xyxy.device)
    xyxy = (xyxy * scale).clamp(min=0)
    xyxy = torch.minimum(xyxy, scale)
    return box_ops.box_xyxy_to_xywh(xyxy)


def encode_mask_logits(mask_logits: torch.Tensor, height: int, width: int, threshold: float = 0.5) -> list[dict]:
    """Resize low-resolution mask logits (K, h, w) to (height, width), threshold and RLE-encode them.

    Args:
        mask_logits: mask logits of K detections.
        height: original image height.
        width: original image width.
        threshold: probability above which a pixel belongs to the mask.

    Returns:
        K COCO RLEs (`{"size": [H, W], "counts": str}`), from pycocotools' `mask.encode`.
    """
    logit_threshold = math.log(threshold / (1.0 - threshold))  # sigmoid(x) > t  ⇔  x > logit(t)
    rles = []
    for chunk in mask_logits.float().split(MASK_CHUNK):
        resized = interpolate(chunk.unsqueeze(1), (height, width), mode="bilinear", align_corners=False)
        binary = (resized[:, 0] > logit_threshold).cpu().numpy()
        rles += mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def predictions_to_coco(
    outputs: dict,
    metadata,
    topk: int = 100,
    with_masks: bool = True,
    mask_threshold: float = 0.5,
) -> list[dict]:
    """Convert final SAM3 predictions for a batch of (image, category) queries into COCO results.

    No score threshold is applied: COCO AP needs the full ranked list. Each query keeps its `topk` best
    detections (COCOeval's maxDets also counts per image and category).

    Args:
        outputs: `final_predictions(...)` of the batch (Q queries).
        metadata: per-query metadata with tensors `original_image_id` (Q,), `original_category_id` (Q,)
            and `original_size` (Q, 2) as (H, W): `batch.find_metadatas[0]` of a sam3 `BatchedDatapoint`.
        topk: detections kept per query.
        with_masks: add an RLE `segmentation` (ignored when the model has no mask head).
        mask_threshold: mask probability threshold.

    Returns:
        COCO result dicts: `image_id`, `category_id` (original ids), `bbox` (xywh, original pixels), `score`,
        and `segmentation` when masks are produced.

    Raises:
        ValueError: the metadata does not describe one entry per query.
    """
    scores = query_scores(outputs)
    num_queries = scores.shape[0]
    if len(metadata.original_image_id) != num_queries:
        raise ValueError(f"metadata describes {len(metadata.original_image_id)} queries but the outputs hold "
                         f"{num_queries}: pass batch.find_metadatas[0] of the batch that produced the outputs")
    masks = outputs.get("pred_masks") if with_masks else None
    results = []
    for q in range(num_queries):
        results += _query_results(q, scores[q], outputs["pred_boxes"][q], masks, metadata, topk, mask_threshold)
    return results


def _query_results(q, scores, boxes, masks, metadata, topk, mask_threshold) -> list[dict]:
    top_scores, index = scores.topk(min(topk, scores.numel()))
    height, width = (int(v) for v in metadata.original_size[q])
    xywh = boxes_to_coco_xywh(boxes[index], height, width).cpu().tolist()
    image_id = int(metadata.original_image_id[q])
    category_id = int(metadata.original_category_id[q])
    results = [{"image_id": image_id, "category_id": category_id, "bbox": [round(v, 3) for v in box],
                "score": float(score)} for box, score in zip(xywh, top_scores.cpu().tolist())]
    if masks is not None:
        for result, rle in zip(results, encode_mask_logits(masks[q][index], height, width, mask_threshold)):
            result["segmentation"] = rle
    return results
