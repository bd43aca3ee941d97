"""`sam3-lora predict` on the shapes test split with a (briefly) trained tiny adapter."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from PIL import Image as PILImage
from pycocotools import mask as mask_util

from sam3_lora import adapter, lora
from sam3_lora.checkpoint_io import save_stock_checkpoint
from sam3_lora.data.datamodule import CocoDataModule
from sam3_lora.data.shapes import write_shapes_dataset
from sam3_lora.evaluation import final_predictions, predictions_to_coco
from sam3_lora.losses import build_sam3_loss
from sam3_lora.model import build_sam3
from sam3_lora.predict import find_images, predict_images
from sam3_lora.predict_cli import add_predict_arguments, parse_box, predict_main
from test_evaluation_model import NUM_QUERIES, tiny_config

TOPK = 5             # detections per (image, prompt) compared
TRAIN_STEPS = 3      # enough to move every adapter away from identity
SCORE_TOL = 1e-6     # batch composition differs between the two paths (float summation order)
BOX_TOL = 1e-2       # pixels
MIN_MASK_IOU = 0.98  # a few boundary pixels may flip on logits within float noise of the threshold


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> CocoDataModule:
    root = write_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", style="target", num_train=2,
                                num_valid=1, num_test=3, progress=False)
    datamodule = CocoDataModule(root=str(root), resolution=112, batch_size=2, eval_batch_size=2, num_workers=0,
                                scale_range=None, hflip=0.0, color_jitter=0.0)
    datamodule.setup()
    return datamodule


@pytest.fixture(scope="module")
def adapter_and_merged(shapes, tmp_path_factory) -> tuple[Path, Path, dict]:
    """An adapter trained a few steps on the shapes train split, its directory and its exported merged.pt."""
    folder = tmp_path_factory.mktemp("adapter")
    config = tiny_config()
    torch.manual_seed(0)
    save_stock_checkpoint(build_sam3(**config).state_dict(), folder / "base.pt")
    config = {**config, "checkpoint": str(folder / "base.pt")}
    model = lora.apply_lora(build_sam3(**config), rank=4, alpha=8, targets=["vision", "detr"])
    train(model, next(iter(shapes.train_dataloader())))
    adapter_dir = adapter.save_adapter(model, folder / "adapter", config)
    return adapter_dir, adapter.export_merged(adapter_dir, folder / "merged.pt"), config


def train(model, batch) -> None:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss_fn = build_sam3_loss(with_masks=True)
    for _ in range(TRAIN_STEPS):
        targets = [model.base_model.model.back_convert(t) for t in batch.find_targets]
        loss_fn(model(batch), targets)["core_loss"].backward()
        optimizer.step()
        optimizer.zero_grad()


def split_images(shapes) -> tuple[list[Path], dict[str, int]]:
    dataset = json.loads(shapes.annotation_file("test").read_text())
    folder = shapes.root / "test"
    images = sorted(dataset["images"], key=lambda i: i["id"])
    return [folder / i["file_name"] for i in images], {str(folder / i["file_name"]): i["id"] for i in images}


def run_predict(model, shapes, out_dir, **kwargs) -> list[dict]:
    paths, _ = split_images(shapes)
    prompts = [shapes.category_names[c] for c in shapes.category_ids]
    return predict_images(model, paths, prompts, 112, out_dir, threshold=0.0, topk=TOPK, progress=False, **kwargs)


def keyed(results: list[dict]) -> dict:
    """Results keyed by (image, category, rank within the query)."""
    groups: dict = {}
    for result in sorted(results, key=lambda r: -r["score"]):
        groups.setdefault((result["image_id"], result["category_id"]), []).append(result)
    return {(*key, rank): r for key, group in groups.items() for rank, r in enumerate(group)}


def assert_same_detections(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for key, mine in ours.items():
        other = theirs[key]
        assert mine["score"] == pytest.approx(other["score"], abs=SCORE_TOL), key
        assert mine["bbox"] == pytest.approx(other["bbox"], abs=BOX_TOL), key
        iou = mask_util.iou([_bytes(mine["segmentation"])], [_bytes(other["segmentation"])], [0])[0, 0]
        both_empty = mask_util.area(_bytes(mine["segmentation"])) == mask_util.area(_bytes(other["segmentation"])) == 0
        assert both_empty or iou >= MIN_MASK_IOU, (key, iou)


def _bytes(rle: dict) -> dict:
    return {"size": rle["size"], "counts": rle["counts"].encode("ascii")}


def test_predict_returns_the_evaluation_detections(adapter_and_merged, shapes, tmp_path):
    model, _ = adapter.load_model_for_inference(str(adapter_and_merged[0]))
    evaluated = []
    with torch.inference_mode():
        for batch in shapes.test_dataloader():
            evaluated += predictions_to_coco(final_predictions(model(batch)), batch.find_metadatas[0], topk=TOPK)
    predicted = run_predict(model, shapes, tmp_path)
    _, image_ids = split_images(shapes)
    name_to_id = {name: c for c, name in shapes.category_names.items()}
    for result in predicted:  # predict numbers prompts 1..n and images 0..n-1: map back to the split's ids
        result["image_id"] = image_ids[result["file_name"]]
        result["category_id"] = name_to_id[result["category_name"]]
    assert len(predicted) == 3 * len(shapes.category_ids) * TOPK
    assert_same_detections(keyed(predicted), keyed(evaluated))


def test_overlays_are_pngs_of_each_input_size_and_json_is_written(adapter_and_merged, shapes, tmp_path):
    model, _ = adapter.load_model_for_inference(str(adapter_and_merged[0]))
    returned = run_predict(model, shapes, tmp_path)
    assert json.loads((tmp_path / "predictions.json").read_text()) == returned
    paths, _ = split_images(shapes)
    for path in paths:
        with PILImage.open(path) as original, PILImage.open(tmp_path / f"{path.stem}.png") as overlay:
            assert overlay.format == "PNG"
            assert overlay.size == original.size
            assert overlay.mode == "RGB"
            assert not np.array_equal(np.asarray(overlay), np.asarray(original.convert("RGB")))  # something drawn


def test_adapter_dir_and_merged_checkpoint_predict_the_same(adapter_and_merged, shapes, tmp_path):
    adapter_dir, merged, config = adapter_and_merged
    loaded, _ = adapter.load_model_for_inference(str(adapter_dir))
    # predict runs the adapter merged (no per-call low-rank products): a plain SAM3 without PEFT layers
    assert not isinstance(loaded, PeftModel) and not any("lora_" in name for name, _ in loaded.named_parameters())
    from_adapter = run_predict(loaded, shapes, tmp_path / "a")
    from_merged = run_predict(adapter.load_model_for_inference(str(merged))[0], shapes, tmp_path / "m")
    assert_same_detections(keyed(from_adapter), keyed(from_merged))
    base = run_predict(adapter.load_model_for_inference(None, config)[0], shapes, tmp_path / "b")
    assert max(abs(a["score"] - b["score"]) for a, b in zip(from_adapter, base)) > 1e-3  # the adapter matters


def parse(argv: list[str]) -> argparse.Namespace:
    return add_predict_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_box_exemplar_prompt_runs_end_to_end(adapter_and_merged, shapes, tmp_path):
    adapter_dir = str(adapter_and_merged[0])
    paths, _ = split_images(shapes)
    folder = str(paths[0].parent)
    common = [adapter_dir, folder, "--prompt", "red circle", "--threshold", "0", "--batch-size", "2"]
    assert predict_main(parse([*common, "--out", str(tmp_path / "text")])) == 0
    assert predict_main(parse([*common, "--box", "10,12,30,25", "--out", str(tmp_path / "box")])) == 0
    assert predict_main(parse([adapter_dir, folder, "--box", "10,12,30,25", "--threshold", "0",
                               "--out", str(tmp_path / "box_only")])) == 0
    text = json.loads((tmp_path / "text" / "predictions.json").read_text())
    boxed = json.loads((tmp_path / "box" / "predictions.json").read_text())
    box_only = json.loads((tmp_path / "box_only" / "predictions.json").read_text())
    assert len(text) == len(boxed) == len(box_only) == 3 * NUM_QUERIES  # threshold 0 keeps every query
    assert {r["category_name"] for r in boxed} == {"red circle"}
    assert {r["category_name"] for r in box_only} == {"visual"}
    assert max(abs(a["score"] - b["score"]) for a, b in zip(text, boxed)) > 1e-4  # the exemplar changed scores
    assert len(list((tmp_path / "box").glob("*.png"))) == 3


def test_cli_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="give image files or folders"):
        predict_main(parse(["adapter_dir", "--prompt", "crack", "--out", str(tmp_path)]))
    with pytest.raises(ValueError, match="--prompt"):
        predict_main(parse(["--base", "image.png", "--out", str(tmp_path)]))
    with pytest.raises(ValueError, match="four comma-separated numbers"):
        parse_box("1,2,3")
    with pytest.raises(FileNotFoundError, match="no images"):
        find_images([tmp_path])
