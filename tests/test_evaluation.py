"""COCO evaluation against hand-computed answers and against pycocotools' COCOeval run directly.

Predictions are hand-made SAM3 output dicts (logits, normalised cxcywh boxes, low-res mask logits), so every
number below is known in advance; no model is involved.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO as PyCOCO
from pycocotools.cocoeval import COCOeval as PyCOCOeval
from torchmetrics import Metric

from sam3_lora.evaluation import CocoEvaluator, evaluate_coco, load_ground_truth, predictions_to_coco
from sam3_lora.evaluation.coco_eval import SUMMARY_INDEX

SIDE = 64          # original images are SIDE × SIDE
LOW_RES = 16       # mask logits are LOW_RES × LOW_RES (SIDE / 4: cell edges fall on pixel edges)
PRESENCE = 20.0    # presence logit: sigmoid(20) = 1 - 2e-9
TOL = 1e-6


def rle(mask: np.ndarray) -> dict:
    encoded = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": encoded["size"], "counts": encoded["counts"].decode("ascii")}


def box_mask(x: int, y: int, w: int, h: int, side: int = SIDE) -> np.ndarray:
    mask = np.zeros((side, side), dtype=bool)
    mask[y:y + h, x:x + w] = True
    return mask


def gt_annotation(ann_id, image_id, category_id, box, iscrowd=0, side=SIDE) -> dict:
    x, y, w, h = box
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": list(box), "area": w * h,
            "iscrowd": iscrowd, "segmentation": rle(box_mask(x, y, w, h, side))}


def gt_dataset(annotations, num_images=2, categories=(1, 2), side=SIDE) -> dict:
    return {"images": [{"id": i, "file_name": f"{i}.jpg", "width": side, "height": side}
                       for i in range(1, num_images + 1)],
            "categories": [{"id": c, "name": f"cat{c}"} for c in categories],
            "annotations": annotations}


def detection(box, score, side=SIDE) -> dict:
    """One detection as SAM3 would output it: normalised cxcywh box, logit and low-res mask logits."""
    x, y, w, h = box
    cell = side // LOW_RES
    mask = torch.full((LOW_RES, LOW_RES), -10.0)
    mask[y // cell:(y + h) // cell, x // cell:(x + w) // cell] = 10.0
    cxcywh = torch.tensor([(x + w / 2) / side, (y + h / 2) / side, w / side, h / side])
    return {"box": cxcywh, "logit": math.log(score / (1 - score)), "mask": mask}


def sam3_outputs(queries: list[list[dict]]) -> dict:
    """Stack per-query detection lists (equal lengths) into SAM3's final output dict."""
    return {
        "pred_logits": torch.tensor([[[d["logit"]] for d in q] for q in queries]),
        "pred_boxes": torch.stack([torch.stack([d["box"] for d in q]) for q in queries]),
        "pred_masks": torch.stack([torch.stack([d["mask"] for d in q]) for q in queries]),
        "presence_logit_dec": torch.full((len(queries), 1), PRESENCE),
    }


def metadata(pairs: list[tuple[int, int]], side=SIDE) -> SimpleNamespace:
    """Per-query metadata like `BatchedDatapoint.find_metadatas[0]` for (image id, category id) pairs."""
    return SimpleNamespace(original_image_id=torch.tensor([p[0] for p in pairs]),
                           original_category_id=torch.tensor([p[1] for p in pairs]),
                           original_size=torch.tensor([[side, side]] * len(pairs)))


FILLER = detection((0, 0, 4, 4), 0.001)  # a low-scored miss padding every query to the same length


def run_case(tmp_path, dataset, query_pairs, query_detections, iou_types=("bbox", "segm")):
    """Evaluate through our pipeline; also write the results file and ground truth for a direct COCOeval."""
    outputs = sam3_outputs(query_detections)
    results = predictions_to_coco(outputs, metadata(query_pairs), topk=100)
    coco_gt = load_ground_truth(dataset)
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "gt.json").write_text(json.dumps(coco_gt.dataset))
    ours = evaluate_coco(coco_gt, results, iou_types)
    return ours, results


def pycocotools_stats(gt_json, results_json, iou_type) -> tuple[np.ndarray, np.ndarray]:
    """pycocotools' COCOeval run directly: (stats, per-category AP with COCO's -1 for no ground truth)."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = PyCOCO(str(gt_json))
        evaluator = PyCOCOeval(gt, gt.loadRes(str(results_json)), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    per_class = [precision[:, :, k][precision[:, :, k] > -1] for k in range(precision.shape[2])]
    return evaluator.stats, np.array([p.mean() if p.size else -1.0 for p in per_class])


def assert_equals_pycocotools(tmp_path, ours, iou_types=("bbox", "segm"), categories=(1, 2)):
    for iou_type in iou_types:
        stats, per_class = pycocotools_stats(tmp_path / "gt.json", tmp_path / "results.json", iou_type)
        for key, index in SUMMARY_INDEX.items():
            assert ours[f"{iou_type}_{key}"] == pytest.approx(stats[index], abs=TOL), (iou_type, key)
        for k, category in enumerate(sorted(categories)):
            assert ours[f"{iou_type}_AP/cat{category}"] == pytest.approx(per_class[k], abs=TOL), (iou_type, category)


# Two images, one object each: image 1 has cat1 at (16,16,16,16), image 2 has cat2 at (32,8,16,24).
BOX_1, BOX_2 = (16, 16, 16, 16), (32, 8, 16, 24)
PAIRS = [(1, 1), (1, 2), (2, 1), (2, 2)]


def perfect_detections():
    return [[detection(BOX_1, 0.9), FILLER], [detection(BOX_2, 0.05), FILLER],
            [detection(BOX_1, 0.04), FILLER], [detection(BOX_2, 0.8), FILLER]]


def test_perfect_predictions_give_one_and_annotation_id_zero_is_refused(tmp_path):
    # data/ renumbers annotation ids from 1 (tests/test_data_coco.py) because COCOeval never matches id 0
    renumbered = gt_dataset([gt_annotation(1, 1, 1, BOX_1), gt_annotation(2, 2, 2, BOX_2)])
    ours, _ = run_case(tmp_path, renumbered, PAIRS, perfect_detections())
    for iou_type in ("bbox", "segm"):
        assert ours[f"{iou_type}_mAP"] == pytest.approx(1.0, abs=TOL)
        assert ours[f"{iou_type}_AP/cat1"] == pytest.approx(1.0, abs=TOL)
        assert ours[f"{iou_type}_mAR100"] == pytest.approx(1.0, abs=TOL)
    assert_equals_pycocotools(tmp_path, ours)
    raw = tmp_path / "raw_gt.json"
    raw.write_text(json.dumps(gt_dataset([gt_annotation(0, 1, 1, BOX_1), gt_annotation(1, 2, 2, BOX_2)])))
    stats, _ = pycocotools_stats(raw, tmp_path / "results.json", "bbox")
    assert stats[0] == pytest.approx(0.5, abs=TOL)  # pycocotools on the raw ids: id 0 is never matched
    with pytest.raises(ValueError, match="annotation id 0 is not final ground truth"):
        load_ground_truth(raw)


def test_results_carry_original_ids_xywh_boxes_and_presence_scores(tmp_path):
    dataset = gt_dataset([gt_annotation(1, 1, 1, BOX_1), gt_annotation(2, 2, 2, BOX_2)])
    _, results = run_case(tmp_path, dataset, PAIRS, perfect_detections())
    best = max(results, key=lambda r: r["score"])
    assert (best["image_id"], best["category_id"]) == (1, 1)
    assert best["bbox"] == pytest.approx(list(BOX_1), abs=1e-3)
    assert best["score"] == pytest.approx(0.9 / (1 + math.exp(-PRESENCE)), abs=1e-7)
    # Bilinear upsampling of logits (as sam3 does) leaves out the 4 corner pixels of a 16 × 16 square.
    assert mask_util.area(best["segmentation"]) == 16 * 16 - 4
    assert len(results) == len(PAIRS) * 2


def test_shifted_box_gives_hand_computed_ap(tmp_path):
    # GT (10,10,20,20) in a 100-px image; prediction moved 4 px right: IoU = 16·20 / (2·400 − 320) = 2/3,
    # a match at IoU thresholds .50 .55 .60 .65 only → AP = 4/10, AP50 = 1, AP75 = 0.
    dataset = gt_dataset([gt_annotation(1, 1, 1, (10, 10, 20, 20), side=100)], num_images=1, categories=(1,),
                         side=100)
    outputs = sam3_outputs([[detection((14, 10, 20, 20), 0.9, side=100)]])
    results = predictions_to_coco(outputs, metadata([(1, 1)], side=100), with_masks=False)
    ours = evaluate_coco(load_ground_truth(dataset), results, ("bbox",))
    assert ours["bbox_mAP"] == pytest.approx(0.4, abs=TOL)
    assert ours["bbox_mAP50"] == pytest.approx(1.0, abs=TOL)
    assert ours["bbox_mAP75"] == pytest.approx(0.0, abs=TOL)


def test_confident_detection_on_negative_prompt_lowers_ap(tmp_path):
    # cat1 is absent from image 2; a 0.95 detection there ranks above the true 0.9 one: precision 1/2 at
    # every recall level → AP(cat1) = 0.5 exactly.
    dataset = gt_dataset([gt_annotation(1, 1, 1, BOX_1), gt_annotation(2, 2, 2, BOX_2)])
    detections = perfect_detections()
    detections[2] = [detection(BOX_2, 0.95), FILLER]
    ours, _ = run_case(tmp_path, dataset, PAIRS, detections)
    for iou_type in ("bbox", "segm"):
        assert ours[f"{iou_type}_AP/cat1"] == pytest.approx(0.5, abs=TOL)
        assert ours[f"{iou_type}_AP/cat2"] == pytest.approx(1.0, abs=TOL)
    assert_equals_pycocotools(tmp_path, ours)


def test_crowd_region_is_neither_a_miss_nor_a_false_positive(tmp_path):
    crowd = (40, 40, 20, 20)
    dataset = gt_dataset([gt_annotation(1, 1, 1, BOX_1), gt_annotation(2, 1, 1, crowd, iscrowd=1)],
                         num_images=1, categories=(1,))
    undetected, _ = run_case(tmp_path, dataset, [(1, 1)], [[detection(BOX_1, 0.9), FILLER]])
    assert undetected["bbox_mAP"] == pytest.approx(1.0, abs=TOL)
    inside = (44, 44, 8, 8)  # inside the crowd region, scored above the true detection
    detected, _ = run_case(tmp_path, dataset, [(1, 1)], [[detection(inside, 0.95), detection(BOX_1, 0.9)]])
    assert detected["bbox_mAP"] == pytest.approx(1.0, abs=TOL)
    assert detected["segm_mAP"] == pytest.approx(1.0, abs=TOL)
    assert_equals_pycocotools(tmp_path, detected, categories=(1,))


def test_category_absent_from_ground_truth_is_not_evaluated(tmp_path):
    # data/ writes evaluation ground truth with train's categories only (tests/test_data_coco.py): a category
    # not in it is neither a class nor a miss; one that is in it but never detected is a miss.
    pairs = [(1, 1), (2, 1)]
    detections = [[detection(BOX_1, 0.9), FILLER], [detection(BOX_2, 0.1), FILLER]]
    kept, _ = run_case(tmp_path, gt_dataset([gt_annotation(1, 1, 1, BOX_1)], categories=(1,)), pairs, detections)
    assert kept["bbox_mAP"] == pytest.approx(1.0, abs=TOL)
    assert not any("cat2" in key for key in kept)
    assert_equals_pycocotools(tmp_path, kept, categories=(1,))
    dataset = gt_dataset([gt_annotation(1, 1, 1, BOX_1), gt_annotation(2, 2, 2, BOX_2)])
    everything, _ = run_case(tmp_path, dataset, pairs, detections)
    assert everything["bbox_mAP"] == pytest.approx(0.5, abs=TOL)  # cat2's object counted as missed


def random_case(seed: int, num_images: int = 6, per_query: int = 5):
    """Random objects, crowds, near-misses and scores on a 4-px grid, for a reference comparison."""
    rng = np.random.default_rng(seed)
    annotations, pairs, detections = [], [], []
    for image_id in range(1, num_images + 1):
        for category in (1, 2):
            boxes = [random_box(rng) for _ in range(rng.integers(0, 3))]
            for box in boxes:
                annotations.append(gt_annotation(len(annotations) + 1, image_id, category, box,
                                                 iscrowd=int(rng.random() < 0.15)))
            found = [jitter(box, rng) for box in boxes if rng.random() < 0.7]
            found += [random_box(rng) for _ in range(per_query - len(found))]
            pairs.append((image_id, category))
            detections.append([detection(box, float(rng.uniform(0.01, 0.99))) for box in found])
    return gt_dataset(annotations, num_images=num_images), pairs, detections


def jitter(box, rng) -> tuple[int, int, int, int]:
    x, y, w, h = box
    dx, dy = (int(v) * 4 for v in rng.integers(-1, 2, size=2))
    return max(x + dx, 0), max(y + dy, 0), w, h


def random_box(rng) -> tuple[int, int, int, int]:
    x, y = (int(v) * 4 for v in rng.integers(0, 12, size=2))
    w, h = (int(v) * 4 for v in rng.integers(2, 5, size=2))
    return x, y, w, h


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_cases_equal_pycocotools(tmp_path, seed):
    dataset, pairs, detections = random_case(seed)
    ours, _ = run_case(tmp_path, dataset, pairs, detections)
    assert 0.0 < ours["bbox_mAP50"] < 1.0  # a non-trivial case
    assert_equals_pycocotools(tmp_path, ours)


def test_topk_keeps_best_detections_per_query():
    outputs = sam3_outputs([[detection(BOX_1, s) for s in (0.2, 0.9, 0.5, 0.7)]])
    results = predictions_to_coco(outputs, metadata([(1, 1)]), topk=2, with_masks=False)
    assert [round(r["score"], 6) for r in results] == [0.9, 0.7]
    assert "segmentation" not in results[0]


def test_evaluator_deduplicates_repeated_queries_and_reports_empty_passes():
    dataset = gt_dataset([gt_annotation(1, 1, 1, BOX_1), gt_annotation(2, 2, 2, BOX_2)])
    evaluator = CocoEvaluator(load_ground_truth(dataset), category_names={1: "circle", 2: "square"})
    with pytest.warns(UserWarning, match="called before the ``update`` method"):  # torchmetrics' own notice
        assert evaluator.compute()["bbox_mAP"] == -1.0
    batch = SimpleNamespace(find_metadatas=[metadata(PAIRS)])
    evaluator.update(sam3_outputs(perfect_detections()), batch)
    evaluator.update(sam3_outputs(perfect_detections()), batch)  # a DistributedSampler repeat
    assert isinstance(evaluator, Metric) and len(evaluator.queries) == 2 * len(PAIRS)  # the torchmetrics state
    held = [r for _, _, results in evaluator.queries for r in results]
    assert all(isinstance(r["segmentation"]["counts"], str) for r in held)  # RLE only, never dense masks
    metrics = evaluator.compute()
    assert metrics["segm_mAP"] == pytest.approx(1.0, abs=TOL)  # counted twice, each repeat would be a false positive
    assert metrics["bbox_AP/circle"] == pytest.approx(1.0, abs=TOL)
    evaluator.reset()
    assert evaluator.queries == []
    with pytest.warns(UserWarning, match="called before the ``update`` method"):
        assert evaluator.compute()["segm_AP/square"] == -1.0


def test_partial_pass_only_counts_seen_images():
    dataset = gt_dataset([gt_annotation(1, 1, 1, BOX_1), gt_annotation(2, 2, 2, BOX_2)])
    evaluator = CocoEvaluator(load_ground_truth(dataset), iou_types=("bbox",))
    evaluator.update(sam3_outputs(perfect_detections()[:2]), SimpleNamespace(find_metadatas=[metadata(PAIRS[:2])]))
    metrics = evaluator.compute()
    assert metrics["bbox_AP/cat1"] == pytest.approx(1.0, abs=TOL)
    assert metrics["bbox_AP/cat2"] == -1.0  # image 2 (cat2's only object) was not evaluated


def test_segm_needs_masks_in_ground_truth():
    annotation = gt_annotation(1, 1, 1, BOX_1)
    del annotation["segmentation"]
    coco_gt = load_ground_truth(gt_dataset([annotation]))
    with pytest.raises(ValueError, match="iou_types=\\('bbox',\\)"):
        CocoEvaluator(coco_gt)
    assert CocoEvaluator(coco_gt, iou_types=("bbox",)).iou_types == ("bbox",)


def test_segm_needs_a_mask_head():
    evaluator = CocoEvaluator(load_ground_truth(gt_dataset([gt_annotation(1, 1, 1, BOX_1)])))
    outputs = sam3_outputs(perfect_detections())
    del outputs["pred_masks"]
    with pytest.raises(ValueError, match="segmentation=true"):
        evaluator.update(outputs, SimpleNamespace(find_metadatas=[metadata(PAIRS)]))


def test_load_ground_truth_reads_the_file_unchanged(tmp_path):
    dataset = gt_dataset([gt_annotation(5, 1, 1, BOX_1), gt_annotation(9, 2, 2, BOX_2)])
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(dataset))
    assert load_ground_truth(path).dataset["annotations"] == dataset["annotations"]
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_ground_truth(tmp_path / "missing.json")


@pytest.mark.parametrize("defect", ["id 0", "repeated id", "no area", "no iscrowd"])
def test_load_ground_truth_refuses_a_raw_export(tmp_path, defect):
    """Ids >= 1 and areas are data/'s job (written once); evaluation refuses instead of repairing again."""
    first, second = gt_annotation(1, 1, 1, BOX_1), gt_annotation(2, 2, 2, BOX_2)
    if defect == "id 0":
        first["id"] = 0
    elif defect == "repeated id":
        second["id"] = 1
    else:
        del second["area" if defect == "no area" else "iscrowd"]
    path = tmp_path / "_annotations.coco.json"
    path.write_text(json.dumps(gt_dataset([first, second])))
    with pytest.raises(ValueError, match=r"_annotations.coco.json: annotation id .*CocoDataModule.annotation_file"):
        load_ground_truth(path)
