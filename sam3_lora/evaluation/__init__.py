"""Evaluation: SAM3 outputs → COCO results (presence-scored boxes + RLE masks) → COCOeval numbers.

`postprocess` turns predictions into COCO results, `coco_eval` loads ground truth and runs COCOeval,
`evaluator.CocoEvaluator` (a torchmetrics Metric) accumulates a pass (under DDP too), `comparison` compares zero-shot and fine-tuned runs.
"""

from sam3_lora.evaluation.coco_eval import evaluate_coco, load_ground_truth, per_class_ap
from sam3_lora.evaluation.evaluator import CocoEvaluator
from sam3_lora.evaluation.postprocess import final_predictions, predictions_to_coco, query_scores
from sam3_lora.evaluation.comparison import format_comparison

__all__ = [
    "CocoEvaluator", "evaluate_coco", "final_predictions", "format_comparison", "load_ground_truth", "per_class_ap",
    "predictions_to_coco", "query_scores",
]
