"""Evaluation on real SAM3 outputs (tiny random-init model): same detections as sam3's own post-processor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from pycocotools import mask as mask_util
from sam3.eval.postprocessors import PostProcessImage
from sam3.model.model_misc import SAM3Output
from sam3.train.data.collator import collate_fn_api
from sam3.train.data.sam3_image_dataset import Datapoint, FindQueryLoaded, Image, InferenceMetadata

from sam3_lora import compat
from sam3_lora.evaluation import CocoEvaluator, final_predictions, load_ground_truth, predictions_to_coco
from sam3_lora.model import build_sam3

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
ORIGINAL_SIZE = (60, 80)  # (H, W) of the pretend original images; the model sees 112 × 112
NUM_QUERIES = 20          # decoder queries of conf/model/sam3_tiny.yaml


def tiny_config() -> dict:
    """`build_sam3` kwargs of conf/model/sam3_tiny.yaml (random init)."""
    config = OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(CONF / "sam3.yaml"),
                                                    OmegaConf.load(CONF / "sam3_tiny.yaml")))
    config.pop("_target_")
    config.pop("defaults", None)
    return config


def tiny_model() -> tuple[torch.nn.Module, dict]:
    """The random-init tiny SAM3, in eval mode (seeded), and its config."""
    config = tiny_config()
    torch.manual_seed(0)
    return build_sam3(**config).eval(), config


def datapoint(image_id: int, category_ids, resolution: int) -> Datapoint:
    queries = [
        FindQueryLoaded(query_text=f"cat{c}", image_id=0, object_ids_output=[], is_exhaustive=True,
                        inference_metadata=InferenceMetadata(
                            coco_image_id=image_id, original_image_id=image_id, original_category_id=c,
                            original_size=ORIGINAL_SIZE, object_id=0, frame_index=0))
        for c in category_ids
    ]
    image = torch.rand(3, resolution, resolution, generator=torch.Generator().manual_seed(image_id)) * 2 - 1
    return Datapoint(find_queries=queries, images=[Image(data=image, objects=[], size=(resolution, resolution))])


@pytest.fixture(scope="module")
def model_and_batch():
    model, config = tiny_model()
    batch = collate_fn_api([datapoint(1, [1, 2], config["resolution"]), datapoint(2, [1, 2], config["resolution"])],
                           "all", with_seg_masks=True)["all"]
    with torch.inference_mode():
        output = model(batch)
    return output, batch


def test_final_predictions_is_last_step_of_last_stage(model_and_batch):
    output, _ = model_and_batch
    final = final_predictions(output)
    assert final["pred_logits"].shape == (4, NUM_QUERIES, 1)
    staged = SAM3Output([[{"step": 0}, {"step": 1}], [{"step": 2}, {"step": 3}]])
    assert final_predictions(staged) == {"step": 3}
    assert final_predictions(final) is final


def test_same_detections_as_sam3_postprocessor(model_and_batch):
    output, batch = model_and_batch
    ours = predictions_to_coco(final_predictions(output), batch.find_metadatas[0], topk=NUM_QUERIES)
    reference = PostProcessImage(
        max_dets_per_img=-1, iou_type="segm", use_original_ids=True, use_original_sizes_box=True,
        use_original_sizes_mask=True, convert_mask_to_rle=True,
        # sam3/eval/postprocessors.py:154 asserts CUDA target sizes when this flag is set
        always_interpolate_masks_on_gpu=compat.has_cuda(),
    ).process_results(find_stages=output, find_metadatas=batch.find_metadatas)
    height, width = ORIGINAL_SIZE
    for image_id, theirs in reference.items():
        mine = sorted((r for r in ours if r["image_id"] == image_id), key=lambda r: -r["score"])
        order = torch.argsort(theirs["scores"], descending=True)
        assert len(mine) == len(order) == 2 * NUM_QUERIES
        assert [r["score"] for r in mine] == pytest.approx(theirs["scores"][order].tolist(), abs=1e-6)
        assert [r["category_id"] for r in mine] == theirs["labels"][order].tolist()
        xyxy = theirs["boxes"][order].clamp(min=0).minimum(torch.tensor([width, height, width, height]))
        xywh = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], dim=1)
        assert torch.tensor([r["bbox"] for r in mine]) == pytest.approx(xywh, abs=2e-3)
        for result, index in zip(mine, order.tolist()):
            expected = mask_util.decode(_as_bytes(theirs["masks_rle"][index]))
            assert (mask_util.decode(result["segmentation"]) == expected).all()


def _as_bytes(rle: dict) -> dict:
    counts = rle["counts"]
    return {"size": rle["size"], "counts": counts.encode() if isinstance(counts, str) else counts}


def test_evaluator_on_model_outputs(model_and_batch):
    output, batch = model_and_batch
    height, width = ORIGINAL_SIZE
    box = [10, 10, 30, 20]
    dataset = {
        "images": [{"id": i, "width": width, "height": height, "file_name": f"{i}.png"} for i in (1, 2)],
        "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": box, "area": 600, "iscrowd": 0,
                         "segmentation": [[10, 10, 40, 10, 40, 30, 10, 30]]}],
    }
    evaluator = CocoEvaluator(load_ground_truth(dataset), topk=5)
    evaluator.update(output, batch)
    metrics = evaluator.compute()
    expected_keys = {f"{iou}_{name}" for iou in ("bbox", "segm")
                     for name in ("mAP", "mAP50", "mAP75", "mAP_s", "mAP_m", "mAP_l", "mAR100")}
    assert expected_keys <= set(metrics)
    assert metrics["bbox_AP/square"] == -1.0  # no square anywhere: COCO cannot measure it
    assert 0.0 <= metrics["bbox_AP/circle"] <= 1.0
    assert sum(len(results) for _, _, results in evaluator.queries) == 4 * 5
