"""`sam3-lora predict-video` on a synthetic moving-shapes clip: sam3's own video model (detector + tracker) runs on
CPU at tiny dims through compat.video_inference_on_this_machine, writes per-frame JSON + an overlay GIF, and the
fine-tuned detector finds the shapes where they are.

Id consistency across frames needs a trained tracker. sam3 ships tracker weights only inside the full-size
sam3.pt and has no tracker training code (sam3/train/ trains the image model), so at tiny dims the tracker is
random: that test is GPU-marked and runs on the real sam3.pt (SAM3_CHECKPOINT=/path/to/sam3.pt).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from pycocotools import mask as mask_util

from sam3_lora import adapter, lora
from sam3_lora.cli import main
from sam3_lora.data.shapes_render import DrawnShape, background, paint, polygon_mask, shape_polygon
from sam3_lora.model import build_sam3
from sam3_lora.video import load_video_model, track_prompts
from sam3_lora.video_model import build_sam3_video
from tests.conftest import tiny_model_config

NUM_FRAMES = 8
# (category, start centre (x, y) in px at 112 px, velocity px/frame, radius px): translating, never overlapping
TRAJECTORIES = [("red circle", (28, 30), (5, 2), 15), ("blue square", (84, 80), (-4, -1), 15)]
MIN_FIRST_FRAME_IOU = 0.5  # the shipped tiny base finds source-style shapes (test bbox AP50 0.67, README)


def render_clip(out_dir, size=112, seed=0):
    """8 frames of shapes translating over a fixed source-style background; returns the true masks per frame."""
    rng = np.random.default_rng(seed)
    scale = size / 112
    canvas = background("source", size, size, rng)
    truth = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for t in range(NUM_FRAMES):
        image, masks = canvas.copy(), {}
        for category, (x, y), (dx, dy), radius in TRAJECTORIES:
            vertices = shape_polygon(category.split()[1], scale * (x + dx * t), scale * (y + dy * t), scale * radius, 0.0)
            masks[category] = polygon_mask(vertices, size, size)
            paint(image, DrawnShape(category, masks[category]), "source", rng)
        PILImage.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8)).save(out_dir / f"{t}.png")
        truth.append(masks)
    return truth


def _iou(a, b):
    return float((a & b).sum() / max((a | b).sum(), 1))


def _decode(obj):
    return mask_util.decode({"size": obj["segmentation"]["size"],
                             "counts": obj["segmentation"]["counts"].encode("ascii")}).astype(bool)


@pytest.fixture(scope="module")
def tiny_video_setup(tmp_path_factory):
    """The shipped tiny base (pretrained on source-style shapes) + a random tiny tracker as a full checkpoint,
    and a LoRA adapter on that base."""
    root = tmp_path_factory.mktemp("video")
    config = tiny_model_config(checkpoint="builtin:tiny")
    torch.manual_seed(0)
    full = build_sam3_video(config).state_dict()
    torch.save({"model": full}, root / "tiny_full.pt")
    model = lora.apply_lora(build_sam3(**config), rank=4, alpha=8, targets=["detr"])
    adapter.save_adapter(model, root / "adapter", config)
    return root, render_clip(root / "clip")


def test_predict_video_writes_frames_json_and_overlay_on_cpu(tiny_video_setup):
    root, _ = tiny_video_setup
    out = root / "out"
    assert main(["predict-video", str(root / "adapter"), str(root / "clip"), "--prompt", "red circle",
                 "--prompt", "blue square", "--base", str(root / "tiny_full.pt"), "--out", str(out),
                 "--device", "cpu"]) == 0
    files = sorted((out / "frames").glob("*.json"))
    assert len(files) == NUM_FRAMES
    for index, path in enumerate(files):
        frame = json.loads(path.read_text())
        assert frame["frame_index"] == index
        for obj in frame["objects"]:
            assert obj["prompt"] in {"red circle", "blue square"} and isinstance(obj["track_id"], int)
            assert _decode(obj).shape == (112, 112)
    gif = PILImage.open(out / "overlay.gif")
    assert gif.n_frames == NUM_FRAMES and gif.size == (112, 112)


def test_fine_tuned_detector_finds_the_shapes_on_the_prompted_frame(tiny_video_setup):
    root, truth = tiny_video_setup
    model, _ = load_video_model(root / "adapter", base=str(root / "tiny_full.pt"))
    frames = track_prompts(model, root / "clip", ["red circle", "blue square"])
    assert len(frames) == NUM_FRAMES
    for category, *_ in TRAJECTORIES:
        found = [o for o in frames[0] if o["prompt"] == category]
        assert found, f"no {category} on frame 0"
        assert max(_iou(_decode(o), truth[0][category]) for o in found) >= MIN_FIRST_FRAME_IOU


def test_adapter_whose_base_has_no_tracker_is_a_clear_error(tiny_video_setup):
    root, _ = tiny_video_setup
    with pytest.raises(ValueError, match="no tracker.* weights.*--base sam3.pt"):
        load_video_model(root / "adapter")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not os.environ.get("SAM3_CHECKPOINT"),
                    reason="needs CUDA and SAM3_CHECKPOINT=/path/to/sam3.pt (trained tracker weights)")
def test_ids_stay_the_same_across_frames_with_a_trained_tracker(tmp_path):
    truth = render_clip(tmp_path / "clip", size=1008)
    model, _ = load_video_model(os.environ["SAM3_CHECKPOINT"])
    frames = track_prompts(model.cuda(), tmp_path / "clip", [c for c, *_ in TRAJECTORIES])
    for category, *_ in TRAJECTORIES:
        ids = {o["track_id"] for frame in frames for o in frame if o["prompt"] == category}
        assert len(ids) == 1, f"{category}: track ids {ids} (one expected)"
        for t, frame in enumerate(frames):
            (obj,) = [o for o in frame if o["prompt"] == category]
            assert _iou(_decode(obj), truth[t][category]) >= 0.8, (category, t)
