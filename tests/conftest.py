"""Shared fixtures: the tiny SAM3 config and hand-built sam3 batches (no data pipeline needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sam3_lora import compat  # noqa: F401  (its import applies the CPU compat patches)
from sam3_lora import tiny_tracker
from sam3.train.data.collator import collate_fn_api
from sam3.train.data.sam3_image_dataset import Datapoint, FindQueryLoaded, Image, InferenceMetadata, Object

REPO = Path(__file__).resolve().parents[1]


def tiny_model_config(**overrides) -> dict:
    """`build_sam3` kwargs of conf/model/sam3_tiny.yaml (random init unless overridden)."""
    return {**tiny_tracker.tiny_model_config(REPO), "checkpoint": None, **overrides}


def _query(text: str, object_ids: list[int], image_id: int, category_id: int, size: int) -> FindQueryLoaded:
    meta = InferenceMetadata(coco_image_id=image_id, original_image_id=image_id, original_category_id=category_id,
                             original_size=(size, size), object_id=0, frame_index=0)
    return FindQueryLoaded(query_text=text, image_id=0, object_ids_output=object_ids, is_exhaustive=True,
                           inference_metadata=meta)


def make_batch(resolution: int = 112, num_images: int = 2, seed: int = 0, box: list | None = None):
    """A `BatchedDatapoint` of random images, each with one positive ("red circle") and one negative query."""
    generator = torch.Generator().manual_seed(seed)
    datapoints = []
    for index in range(num_images):
        cx, cy, w, h = box or [0.5, 0.5, 0.25, 0.3]
        mask = torch.zeros(resolution, resolution, dtype=torch.bool)
        x0, y0 = int((cx - w / 2) * resolution), int((cy - h / 2) * resolution)
        mask[y0:y0 + int(h * resolution), x0:x0 + int(w * resolution)] = True
        obj = Object(bbox=torch.tensor([cx, cy, w, h]), area=w * h, object_id=0, segment=mask)
        image = Image(data=torch.randn(3, resolution, resolution, generator=generator), objects=[obj],
                      size=(resolution, resolution))
        queries = [_query("red circle", [0], index, 1, resolution), _query("blue square", [], index, 2, resolution)]
        datapoints.append(Datapoint(find_queries=queries, images=[image]))
    return collate_fn_api(datapoints, "all", with_seg_masks=True)["all"]


def final_outputs(model, batch) -> dict:
    """Eval-mode predictions of the last stage/step as a dict of tensors."""
    model.eval()
    with torch.no_grad():
        out = model(batch)
    return {k: v for k, v in out.output[-1][-1].items() if isinstance(v, torch.Tensor)}


@pytest.fixture(autouse=True)
def one_torch_thread(request):
    """Run each test on one torch CPU thread; full-size (`slow`) and `gpu` tests keep torch's default.

    On 2 cores a second OpenMP thread stalls whenever another process is busy: a demo training step measured
    0.26 s on 1 thread and 8-13 s on 2 while one other process ran (tests/test_num_threads.py, README).
    """
    if request.node.get_closest_marker("slow") or request.node.get_closest_marker("gpu"):
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_config() -> dict:
    return tiny_model_config()


@pytest.fixture
def batch():
    return make_batch()
