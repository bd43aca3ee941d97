"""Box-exemplar prompts: query planning, boxes through the transforms into sam3's geometry encoder, AP per type."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sam3.train.data.collator import collate_fn_api

from sam3_lora.data.queries import VISUAL_PROMPT, QuerySpec, build_datapoint, with_eval_exemplars, with_train_exemplars
from sam3_lora.data.shapes import write_shapes_dataset
from sam3_lora.data.transforms import TransformedSample, apply_transform, build_train_transform
from sam3_lora.evaluation import CocoEvaluator, load_ground_truth
from sam3_lora.evaluation.prompt_types import PromptTypeEvaluator, query_prompt_types
from sam3_lora.model import build_sam3
from sam3_lora.train import run
from tests.conftest import REPO, tiny_model_config
from tests.train_helpers import compose_config

RED, BLUE = QuerySpec("red circle", 1, 0), QuerySpec("blue square", 2, 1)


def test_train_exemplars_turn_positives_only_and_pick_an_existing_instance():
    rng = np.random.default_rng(0)
    queries = with_train_exemplars([RED, BLUE], {1: 3}, rng, probability=1.0, text_probability=0.0)
    assert queries[0].prompt == "box" and 0 <= queries[0].exemplar < 3
    assert queries[1] == BLUE  # a negative has no instance to show
    both = with_train_exemplars([RED], {1: 1}, rng, probability=1.0, text_probability=1.0)
    assert both[0].prompt == "text+box"
    untouched_rng = np.random.default_rng(0)
    assert with_train_exemplars([RED], {1: 1}, untouched_rng, 0.0, 0.5) == [RED]
    assert untouched_rng.random() == np.random.default_rng(0).random()  # prob 0 draws nothing: old streams kept


def test_eval_exemplars_add_box_and_text_box_for_positives():
    queries = with_eval_exemplars([RED, BLUE], {1: 2})
    assert [(q.text, q.prompt) for q in queries] == [("red circle", "text"), ("blue square", "text"),
                                                      ("red circle", "box"), ("red circle", "text+box")]


def _flipped_sample(resolution: int = 56):
    """A 100 x 50 (W x H) image, two objects, plain resize + certain horizontal flip."""
    image = np.zeros((50, 100, 3), np.uint8)
    boxes = [[10, 5, 20, 10], [60, 20, 30, 20]]  # COCO xywh pixels
    transform = build_train_transform(resolution, scale_range=None, hflip=1.0, color_jitter=0.0)
    return apply_transform(transform, image, boxes, None, seed=0)


def test_exemplar_box_reaches_the_geometry_encoder_in_transformed_coordinates():
    sample = _flipped_sample()
    # hand-computed: flip x -> W - x - w, then normalise; cxcywh of object 1 (60, 20, 30, 20) in 100 x 50
    expected = torch.tensor([(100 - 60 - 30 + 15) / 100, (20 + 10) / 50, 30 / 100, 20 / 50])
    queries = [QuerySpec("red circle", 1, 0, prompt="box", exemplar=1), QuerySpec("red circle", 1, 0)]
    datapoint = build_datapoint(sample, [1, 1], [False, False], queries, image_id=3, original_size=(50, 100),
                                coco_image_id_base=0)
    assert datapoint.find_queries[0].query_text == VISUAL_PROMPT
    assert datapoint.find_queries[0].object_ids_output == [0, 1]  # the exemplar instance is still a target
    batch = collate_fn_api([datapoint], "all", with_seg_masks=False)["all"]
    assert query_prompt_types(batch) == ["box", "text"]

    model = build_sam3(**tiny_model_config(resolution=56)).eval()
    seen = {}

    def capture(module, args, kwargs):
        seen["prompt"] = kwargs["geo_prompt"]

    model.geometry_encoder.register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        model(batch)
    prompt = seen["prompt"]
    # (boxes, queries, 4) sequence-first; query 0 carries the exemplar, query 1 only padding
    assert prompt.box_embeddings[0, 0] == pytest.approx(expected, abs=1e-5)
    assert prompt.box_mask.tolist() == [[False], [True]]


def _ground_truth(tmp_path: Path):
    data = {"images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.png"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [40, 40, 20, 20], "area": 400,
                             "iscrowd": 0}],
            "categories": [{"id": 1, "name": "red circle"}, {"id": 2, "name": "blue square"}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return load_ground_truth(path)


def test_per_prompt_type_ap_on_a_hand_case(tmp_path):
    """text finds the object, box finds it, text+box misses it, the negative fires: the numbers say exactly that."""
    sample = TransformedSample(image=torch.zeros(3, 28, 28), boxes=torch.tensor([[0.5, 0.5, 0.2, 0.2]]),
                               masks=None, mask_areas=None, kept=[0])
    queries = with_eval_exemplars([RED, BLUE], {1: 1})  # text red, text blue, box red, text+box red
    datapoint = build_datapoint(sample, [1], [False], queries, image_id=1, original_size=(100, 100),
                                coco_image_id_base=0)
    batch = collate_fn_api([datapoint], "all", with_seg_masks=False)["all"]
    hit, miss = [0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]
    outputs = {"pred_logits": torch.full((4, 1, 1), 3.0),
               "pred_boxes": torch.tensor([[hit], [hit], [hit], [miss]]),
               "presence_logit_dec": torch.full((4, 1), 3.0)}
    ground_truth = _ground_truth(tmp_path)
    evaluator = PromptTypeEvaluator(lambda: [CocoEvaluator(ground_truth, iou_types=("bbox",))])
    evaluator.update(outputs, batch)
    metrics = evaluator.compute()
    assert metrics["bbox_mAP50@text"] == pytest.approx(1.0)  # text on the positive pair
    assert metrics["bbox_mAP50@box"] == pytest.approx(1.0)
    assert metrics["bbox_mAP50@text+box"] == pytest.approx(0.0)
    # the run's own key: all text queries; blue square's detection has no ground truth (no GT category -> -1 AP)
    assert metrics["bbox_AP/red circle"] == pytest.approx(1.0)
    evaluator.reset()
    text_only = build_datapoint(sample, [1], [False], [RED], image_id=1, original_size=(100, 100),
                                coco_image_id_base=0)
    evaluator.update({k: v[:1] for k, v in outputs.items()},
                     collate_fn_api([text_only], "all", with_seg_masks=False)["all"])
    assert not any("@" in k for k in evaluator.compute())  # no exemplar query seen: no per-type keys


@pytest.fixture(scope="module")
def target_root(tmp_path_factory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("ex") / "shapes_target", style="target", num_train=8,
                                num_valid=4, num_test=4, progress=False)


def test_train_py_with_exemplars_end_to_end_then_predict_box(target_root, tmp_path):
    out = tmp_path / "run"
    run(compose_config(target_root, out, ["model.checkpoint=builtin:tiny", "data.exemplar_prob=0.5"]))
    metrics = json.loads((out / "metrics.json").read_text())
    for stage in ("zero_shot", "fine_tuned"):
        for prompt_type in ("text", "box", "text+box"):
            assert 0.0 <= metrics[stage][f"test/bbox_mAP50@{prompt_type}"] <= 1.0
    image = sorted((target_root / "test").glob("*.jpg"))[0]
    result = subprocess.run([sys.executable, "-m", "sam3_lora.cli", "predict", str(out / "adapter"), str(image),
                             "--box", "10,12,30,25", "--threshold", "0", "--out", str(tmp_path / "pred")],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "pred" / "predictions.json").read_text())
