"""What a fine-tune keeps: negative-prompt false positives and source-domain mAP, before and after.

- Negative prompts: every test image is asked for each category absent from it (no instance, crowd or not) and
  for every `data.extra_negative_prompts` phrase. A (image, absent prompt) pair is a false positive when its best
  detection scores above `fp_threshold` (score = sigmoid(logit) x sigmoid(presence), as evaluation scores).
  A model that "fires on any prompt" has a rate of 1.0.
- Source domain: COCO mAP on a second dataset (`retention.data.root`), the base model's own domain; the drop
  after fine-tuning is what the adapter destroyed there.

Both are plain loops over a DataLoader on the model's device (rank zero only under DDP, see train.py).
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sam3_lora.data.dataset import DatasetSettings, load_sample
from sam3_lora.data.queries import QuerySpec, build_datapoint
from sam3_lora.evaluation.evaluator import CocoEvaluator
from sam3_lora.evaluation.postprocess import final_predictions, query_scores

log = logging.getLogger(__name__)


class NegativePromptDataset(Dataset):
    """One item per image that has at least one absent prompt; its queries are exactly the absent prompts.

    Args:
        records: the split's `ImageRecord`s.
        settings: the evaluation `DatasetSettings` (its `phrases` hold categories and extra negative phrases).
    """

    def __init__(self, records, settings: DatasetSettings):
        self.settings = settings
        self.items = [(r, q) for r in records if (q := absent_prompts(r, settings.phrases))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        record, queries = self.items[index]
        sample, categories, has_mask = load_sample(record, self.settings, seed=0)
        return build_datapoint(sample, categories, has_mask, queries, record.image_id,
                               (record.height, record.width), index * len(self.settings.phrases))


def absent_prompts(record, phrases: Iterable[QuerySpec]) -> list[QuerySpec]:
    """Phrases whose category has no instance (crowd included) in `record`; extra phrases are always absent."""
    present = {i.category_id for i in record.instances}
    return [q for q in phrases if q.category_id not in present]


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _predict(model: nn.Module, loader: DataLoader):
    """Yield (batch, final predictions) in eval mode; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    device = _model_device(model)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=_low_precision(model))
    try:
        for batch in loader:
            batch = move_data_to_device(batch, device)
            with autocast:
                outputs = model(batch)
            yield batch, outputs
    finally:
        model.train(was_training)


def _low_precision(model: nn.Module) -> bool:
    from sam3_lora.memory import frozen_low_precision

    return frozen_low_precision(model)


def negative_prompt_rates(model: nn.Module, loader: DataLoader, threshold: float) -> dict[str, float]:
    """False-positive rate and mean top score over (image, absent prompt) pairs.

    Args:
        model: a SAM3 (adapted or not).
        loader: batches of `NegativePromptDataset` (every query is an absent prompt).
        threshold: a pair is a false positive when its best detection scores above this.

    Returns:
        `neg_fp_rate` (share of pairs above `threshold`), `neg_mean_top_score`, `neg_pairs` (count); the
        rates are -1 when there is no pair.
    """
    top_scores = []
    for _, outputs in _predict(model, loader):
        scores = query_scores(final_predictions(outputs))
        top_scores.append(scores.max(dim=1).values.float().cpu())
    tops = torch.cat(top_scores) if top_scores else torch.empty(0)
    if tops.numel() == 0:
        log.warning("no (image, absent prompt) pair to measure negative-prompt false positives on")
        return {"neg_fp_rate": -1.0, "neg_mean_top_score": -1.0, "neg_pairs": 0.0}
    return {"neg_fp_rate": float((tops > threshold).float().mean()), "neg_mean_top_score": float(tops.mean()),
            "neg_pairs": float(tops.numel())}


def negative_prompt_loader(datamodule, batch_size: int | None = None) -> DataLoader:
    """Absent-prompt batches over the datamodule's test split (valid when it has none)."""
    evaluation = datamodule.test_dataloader()
    dataset = NegativePromptDataset(evaluation.dataset.records, evaluation.dataset.settings)
    return DataLoader(dataset, batch_size=batch_size or evaluation.batch_size, shuffle=False, num_workers=0,
                      collate_fn=evaluation.collate_fn)


def coco_metrics(model: nn.Module, datamodule, topk: int = 100) -> dict[str, float]:
    """COCO bbox (and segm, when the model has a mask head and the data masks) numbers on the test split."""
    from sam3_lora.evaluation.box_only import segm_ground_truth
    from sam3_lora.evaluation.coco_eval import load_ground_truth
    from sam3_lora.lora import base_sam3

    with_masks = base_sam3(model).segmentation_head is not None and datamodule.with_masks
    ground_truth = load_ground_truth(datamodule.annotation_file("test"))
    settings = {"category_names": datamodule.category_names, "topk": topk}
    evaluators = [CocoEvaluator(ground_truth, iou_types=("bbox",), **settings)]
    if with_masks:  # box-only objects are ignore regions for segm, as in training's evaluation (box_only.py)
        evaluators.append(CocoEvaluator(segm_ground_truth(ground_truth), iou_types=("segm",), **settings))
    for batch, outputs in _predict(model, datamodule.test_dataloader()):
        for evaluator in evaluators:
            evaluator.update(outputs, batch)
    return {k: v for evaluator in evaluators for k, v in evaluator.compute().items()}


def measure_retention(model: nn.Module, datamodule, source_datamodule, fp_threshold: float) -> dict[str, float]:
    """Negative-prompt rates on `datamodule`'s test split and COCO numbers on `source_datamodule` (each if not None).

    Returns:
        `neg_fp_rate`, `neg_mean_top_score`, `neg_pairs`, and `source/<coco metric>` for the source dataset.
    """
    metrics = {}
    if datamodule is not None:
        metrics.update(negative_prompt_rates(model, negative_prompt_loader(datamodule), fp_threshold))
    if source_datamodule is not None:
        source = coco_metrics(model, source_datamodule)
        metrics.update({f"source/{k}": float(v) for k, v in source.items() if "/" not in k})
    return metrics


def build_source_datamodule(data_cfg, overrides) -> object | None:
    """The source-domain datamodule: `data_cfg` with `overrides` (`retention.data`); None when no root is set."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    if overrides is None or overrides.get("root") is None:
        return None
    merged = OmegaConf.merge(data_cfg, overrides)
    datamodule = instantiate(merged, _convert_="all")
    datamodule.setup("test")
    return datamodule


# Rows of the retention summary: (key, label).
_ROWS = [("neg_fp_rate", "negative-prompt FP rate"), ("neg_mean_top_score", "negative mean top score"),
         ("source/bbox_mAP50", "source bbox mAP50"), ("source/segm_mAP50", "source segm mAP50")]


def format_retention(before: dict, after: dict) -> str:
    """Render retention numbers before (zero-shot) and after fine-tuning, with the change."""
    lines = [f"{'retention':<26}  {'zero-shot':>9}  {'fine-tuned':>10}  {'delta':>7}"]
    for key, label in _ROWS:
        if key not in before and key not in after:
            continue
        zero, tuned = before.get(key), after.get(key)
        delta = f"{tuned - zero:+.4f}" if zero is not None and tuned is not None else "n/a"
        lines.append(f"{label:<26}  {_fmt(zero):>9}  {_fmt(tuned):>10}  {delta:>7}")
    return "\n".join(lines)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"

