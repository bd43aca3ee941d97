"""Overlays, validation panels, the per-class chart and the zero-shot vs fine-tuned table."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from sam3_lora.evaluation import format_comparison
from sam3_lora.visualize import MASK_ALPHA, category_color, draw_detections, per_class_chart, validation_panel
from test_evaluation import BOX_1, PAIRS, metadata, perfect_detections, rle, box_mask, sam3_outputs

GREY = 100


def grey_image(height=48, width=64) -> np.ndarray:
    return np.full((height, width, 3), GREY, dtype=np.uint8)


def test_draw_detections_fills_masks_outlines_boxes_and_keeps_size():
    image = grey_image()
    detection = {"image_id": 1, "category_id": 3, "bbox": [20, 20, 20, 16], "score": 0.87,
                 "segmentation": rle(box_mask(20, 20, 20, 16, side=64)[:48])}
    drawn = draw_detections(image, [detection], {3: "crack"})
    assert drawn.shape == image.shape and drawn.dtype == np.uint8
    assert (image == GREY).all()  # input untouched
    expected = np.round((1 - MASK_ALPHA) * GREY + MASK_ALPHA * np.array(category_color(3)))
    assert drawn[30, 30].tolist() == expected.tolist()      # inside the mask, away from outline and label
    assert drawn[20, 30].tolist() == list(category_color(3))  # on the box outline
    assert drawn[45, 5].tolist() == [GREY] * 3               # outside everything


def test_draw_detections_rejects_a_mask_of_another_size():
    detection = {"image_id": 7, "category_id": 1, "bbox": [0, 0, 4, 4], "score": 0.5,
                 "segmentation": rle(box_mask(0, 0, 4, 4, side=32))}
    with pytest.raises(ValueError, match="image 7"):
        draw_detections(grey_image(), [detection])
    with pytest.raises(ValueError, match="uint8"):
        draw_detections(grey_image().astype(np.float32), [])


def test_validation_panel_draws_confident_detections_side_by_side():
    images = torch.zeros(2, 3, 64, 64)  # normalised 0 = mid grey (128)
    batch = SimpleNamespace(img_batch=images, find_inputs=[SimpleNamespace(img_ids=torch.tensor([0, 0, 1, 1]))],
                            find_metadatas=[metadata(PAIRS)])
    panel = validation_panel(batch, sam3_outputs(perfect_detections()), {1: "circle", 2: "square"}, threshold=0.5)
    assert panel.shape == (64, 128, 3)
    x, y, w, h = BOX_1
    assert panel[y + h // 2, x + w // 2].tolist() != [128, 128, 128]   # image 0: the 0.9 circle is drawn
    assert panel[y + h // 2, 64 + x + w // 2].tolist() == [128, 128, 128]  # image 1: its circle scored 0.04


def test_per_class_chart_writes_a_png(tmp_path):
    zero = {"test/bbox_AP/circle": 0.1, "test/bbox_AP/square": -1.0, "test/segm_AP/circle": 0.05}
    tuned = {"test/bbox_AP/circle": 0.6, "test/bbox_AP/square": 0.4, "test/segm_AP/circle": 0.5}
    path = per_class_chart(zero, tuned, tmp_path / "charts" / "per_class_ap.png")
    with PILImage.open(path) as picture:
        assert picture.format == "PNG"
        assert picture.size[0] >= 400 and picture.size[1] >= 2 * 250  # two panels: bbox and segm
    with pytest.raises(ValueError, match="no per-class AP"):
        per_class_chart({"test/bbox_mAP": 0.1}, {"test/bbox_mAP": 0.2}, tmp_path / "x.png")


def test_format_comparison_aligns_stages_and_shows_deltas():
    zero = {"val/bbox_mAP": 0.25, "val/bbox_AP/crack": 0.1, "val/bbox_AP/dent": -1.0, "val/loss": 3.0}
    tuned = {"test/bbox_mAP": 0.5, "test/bbox_AP/crack": 0.35, "test/bbox_AP/dent": 0.2}
    table = format_comparison(zero, tuned).splitlines()
    assert table[0].split() == ["metric", "zero-shot", "fine-tuned", "delta"]
    assert table[1].split() == ["bbox_mAP", "0.2500", "0.5000", "+0.2500"]
    assert table[2].split() == ["bbox_AP/crack", "0.1000", "0.3500", "+0.2500"]
    assert table[3].split() == ["bbox_AP/dent", "n/a", "0.2000", "n/a"]
    assert len(table) == 4  # the loss is not a COCO number
