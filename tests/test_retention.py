"""Retention (evaluation/retention.py): negative-prompt false positives and source-domain mAP, hand cases + a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from sam3_lora.data.coco import ImageRecord, Instance
from sam3_lora.data.queries import EXTRA_PHRASE_CATEGORY_ID, QuerySpec
from sam3_lora.data.shapes import write_shapes_dataset
from sam3_lora.evaluation.retention import (absent_prompts, format_retention, measure_retention,
                                            negative_prompt_rates)
from sam3_lora.train import run
from tests.conftest import make_batch
from tests.train_helpers import compose_config

SMALL = {"num_train": 8, "num_valid": 6, "num_test": 6, "progress": False}


class ConstantScoreModel(nn.Module):
    """Answers every query with 5 detections whose score is sigmoid(logit) x sigmoid(presence) = `score`."""

    def __init__(self, score: float):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the loop a device
        self.logit = torch.logit(torch.tensor(score ** 0.5))

    def forward(self, batch):
        queries = len(batch.find_metadatas[0].original_image_id)
        return {"pred_logits": torch.full((queries, 5, 1), float(self.logit)),
                "pred_boxes": torch.tensor([0.5, 0.5, 0.2, 0.2]).repeat(queries, 5, 1),
                "presence_logit_dec": torch.full((queries, 1), float(self.logit))}


def test_model_that_answers_every_prompt_has_fp_rate_one():
    loader = [make_batch(num_images=2), make_batch(num_images=1, seed=1)]  # 6 queries
    rates = negative_prompt_rates(ConstantScoreModel(0.9), loader, threshold=0.5)
    assert rates == pytest.approx({"neg_fp_rate": 1.0, "neg_mean_top_score": 0.9, "neg_pairs": 6.0})


def test_model_that_never_answers_has_fp_rate_zero_and_threshold_is_read():
    loader = [make_batch(num_images=2)]
    assert negative_prompt_rates(ConstantScoreModel(0.3), loader, threshold=0.5)["neg_fp_rate"] == 0.0
    assert negative_prompt_rates(ConstantScoreModel(0.3), loader, threshold=0.2)["neg_fp_rate"] == 1.0


def test_absent_prompts_are_missing_categories_and_extra_phrases():
    phrases = [QuerySpec("red circle", 1, 0), QuerySpec("blue square", 2, 1), QuerySpec("green triangle", 3, 2),
               QuerySpec("yellow star", EXTRA_PHRASE_CATEGORY_ID, 3)]
    record = ImageRecord(image_id=7, path=Path("x.png"), width=10, height=10, apply_exif=False, instances=(
        Instance(annotation_id=1, category_id=1, bbox=(0, 0, 2, 2), segmentation=None, is_crowd=False),
        Instance(annotation_id=2, category_id=3, bbox=(0, 0, 9, 9), segmentation=None, is_crowd=True)))  # crowd = present
    assert [q.text for q in absent_prompts(record, phrases)] == ["blue square", "yellow star"]


def test_format_retention_shows_before_after_and_delta():
    text = format_retention({"neg_fp_rate": 0.25, "source/bbox_mAP50": 0.8},
                            {"neg_fp_rate": 0.5, "source/bbox_mAP50": 0.6})
    assert "+0.2500" in text and "-0.2000" in text and "source bbox mAP50" in text


@pytest.fixture(scope="module")
def source_root(tmp_path_factory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("src") / "shapes_source", style="source", **SMALL)


def test_base_model_on_its_own_domain_keeps_its_map(source_root, tmp_path):
    """builtin:tiny evaluated on its source style: retention's source mAP is the test mAP, and it is high."""
    out = tmp_path / "eval"
    cfg = compose_config(source_root, out, ["train=false", "model.checkpoint=builtin:tiny",
                                            f"retention.data.root={source_root}", "retention.fp_threshold=0.5",
                                            "data.extra_negative_prompts=[yellow star]"])
    run(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    tested, kept = metrics["fine_tuned"] if "fine_tuned" in metrics else metrics["zero_shot"], \
        metrics["retention"]["zero_shot"]
    assert kept["source/bbox_mAP50"] == pytest.approx(tested["test/bbox_mAP50"], abs=1e-6)
    assert kept["source/bbox_mAP50"] > 0.5  # the shipped base knows its own domain
    # 6 images x (2 absent categories on average + 1 extra phrase): every image has an absent prompt
    assert kept["neg_pairs"] >= 6 and 0.0 <= kept["neg_fp_rate"] <= 1.0


def test_fine_tuning_run_reports_retention_before_and_after(source_root, tmp_path):
    target = write_shapes_dataset(tmp_path / "shapes_target", style="target", **SMALL)
    cfg = compose_config(target, tmp_path / "run", ["model.checkpoint=builtin:tiny", f"retention.data.root={source_root}"])
    run(cfg)
    retention = json.loads((tmp_path / "run/metrics.json").read_text())["retention"]
    for stage in ("zero_shot", "fine_tuned"):
        assert {"neg_fp_rate", "neg_mean_top_score", "source/bbox_mAP50"} <= set(retention[stage])
    assert retention["zero_shot"] != retention["fine_tuned"]  # measured twice, on different weights


def test_retention_without_source_or_negatives_measures_nothing():
    assert measure_retention(ConstantScoreModel(0.9), None, None, 0.5) == {}
