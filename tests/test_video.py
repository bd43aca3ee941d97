"""`sam3-lora predict-video` on a synthetic moving-shapes clip: sam3's own video model (detector + tracker) runs on
CPU at tiny dims through compat.video_inference_on_this_machine, writes per-frame JSON + an overlay GIF, finds the
shapes where they are and keeps one id per shape.

The tiny base (`builtin:tiny`) is a full checkpoint: the image model pretrained on source-style shapes
(experiment=pretrain_tiny) and a tracker pretrained on random moving-shapes clips (`sam3_lora.tiny_tracker`; sam3
ships tracker weights only inside the full-size sam3.pt). The clip below is not one of those: fixed trajectories,
rendered with its own seed.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image as PILImage
from pycocotools import mask as mask_util

from sam3_lora import adapter, lora
from sam3_lora.checkpoint_io import read_state_dict, resolve_checkpoint
from sam3_lora.cli import main
from sam3_lora.data.shapes_clip import Trajectory, render_clip, write_frames
from sam3_lora.model import build_sam3
from sam3_lora.video import load_video_model, track_prompts
from sam3_lora.video_model import split_full_state
from tests.conftest import tiny_model_config

NUM_FRAMES = 8
# translating at 4-5 px per frame at 112 px, never overlapping
TRAJECTORIES = [Trajectory("red circle", (28, 30), (5, 2), 15), Trajectory("blue square", (84, 80), (-4, -1), 15)]
CATEGORIES = [t.category for t in TRAJECTORIES]
MIN_FIRST_FRAME_IOU = 0.5  # the shipped tiny base finds source-style shapes (test bbox AP50 0.67, README)
MIN_TRACKED_IOU = 0.7      # every frame, against the true mask (0.82-0.96 when this test was written)


def render_test_clip(out_dir, size=112):
    """The clip's frames as `<index>.png` in `out_dir`; returns the true mask per frame and category."""
    scaled = [Trajectory(t.category, (t.start[0] * size / 112, t.start[1] * size / 112),
                         (t.velocity[0] * size / 112, t.velocity[1] * size / 112), t.radius * size / 112)
              for t in TRAJECTORIES]
    frames, masks = render_clip(scaled, NUM_FRAMES, size, "source", seed=0)
    write_frames(frames, out_dir)
    return [dict(zip(CATEGORIES, frame_masks)) for frame_masks in masks]


def _iou(a, b):
    return float((a & b).sum() / max((a | b).sum(), 1))


def _decode(obj):
    return mask_util.decode({"size": obj["segmentation"]["size"],
                             "counts": obj["segmentation"]["counts"].encode("ascii")}).astype(bool)


@pytest.fixture(scope="module")
def tiny_video_setup(tmp_path_factory):
    """A LoRA adapter on the shipped tiny base (whose checkpoint holds a tracker) and the rendered clip."""
    root = tmp_path_factory.mktemp("video")
    config = tiny_model_config(checkpoint="builtin:tiny")
    torch.manual_seed(0)
    model = lora.apply_lora(build_sam3(**config), rank=4, alpha=8, targets=["detr"])
    adapter.save_adapter(model, root / "adapter", config)
    return root, render_test_clip(root / "clip")


def test_predict_video_writes_frames_json_and_overlay_on_cpu(tiny_video_setup):
    root, _ = tiny_video_setup
    out = root / "out"
    assert main(["predict-video", str(root / "adapter"), str(root / "clip"), "--prompt", "red circle",
                 "--prompt", "blue square", "--out", str(out),
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
    model, _ = load_video_model(root / "adapter")
    frames = track_prompts(model, root / "clip", CATEGORIES)
    assert len(frames) == NUM_FRAMES
    for category in CATEGORIES:
        found = [o for o in frames[0] if o["prompt"] == category]
        assert found, f"no {category} on frame 0"
        assert max(_iou(_decode(o), truth[0][category]) for o in found) >= MIN_FIRST_FRAME_IOU


def test_ids_stay_the_same_across_frames_and_masks_follow_the_shapes(tiny_video_setup):
    root, truth = tiny_video_setup
    model, _ = load_video_model(root / "adapter")
    frames = track_prompts(model, root / "clip", CATEGORIES)
    _assert_one_track_per_shape(frames, truth, MIN_TRACKED_IOU)


def _assert_one_track_per_shape(frames, truth, min_iou):
    for category in CATEGORIES:
        ids = {o["track_id"] for frame in frames for o in frame if o["prompt"] == category}
        assert len(ids) == 1, f"{category}: track ids {ids} (one expected)"
        for t, frame in enumerate(frames):
            found = [o for o in frame if o["prompt"] == category]
            assert len(found) == 1, f"{category}, frame {t}: {len(found)} objects"
            assert _iou(_decode(found[0]), truth[t][category]) >= min_iou, (category, t)


def test_adapter_whose_base_has_no_tracker_is_a_clear_error(tiny_video_setup, tmp_path):
    root, _ = tiny_video_setup
    image_only, _ = split_full_state(read_state_dict(resolve_checkpoint("builtin:tiny")))
    torch.save({"model": {"detector." + k: v for k, v in image_only.items()}}, tmp_path / "image_only.pt")
    with pytest.raises(ValueError, match="no tracker.* weights.*--base sam3.pt"):
        load_video_model(root / "adapter", base=str(tmp_path / "image_only.pt"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not os.environ.get("SAM3_CHECKPOINT"),
                    reason="needs CUDA and SAM3_CHECKPOINT=/path/to/sam3.pt (the real detector and tracker)")
def test_ids_stay_the_same_across_frames_with_the_real_sam3(tmp_path):
    truth = render_test_clip(tmp_path / "clip", size=1008)
    model, _ = load_video_model(os.environ["SAM3_CHECKPOINT"])
    frames = track_prompts(model.cuda(), tmp_path / "clip", CATEGORIES)
    _assert_one_track_per_shape(frames, truth, 0.8)
