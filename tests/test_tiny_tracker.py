"""The tiny tracker's pretraining (sam3_lora.tiny_tracker) and the full tiny checkpoint it ships (`builtin:tiny`)."""

from __future__ import annotations

import torch

from sam3_lora import compat
from sam3_lora.checkpoint_io import read_state_dict, resolve_checkpoint
from sam3_lora.tiny_tracker import (ClipSampler, clip_loss, held_out_ious, pretrain_tracker,
                                   write_full_tiny_checkpoint)
from sam3_lora.video_model import build_sam3_video, split_full_state
from tests.conftest import tiny_model_config

MIN_HELD_OUT_IOU = 0.6  # mean IoU on held-out clips of 1 / 2 / 3 shapes: 0.911 / 0.877 / 0.719 measured (README)


def _dice(video, clip):
    with torch.no_grad(), compat.tensor_cuda_is_a_no_op():
        return float(clip_loss(video, *clip)["dice"])


def test_pretraining_learns_to_track_a_clip():
    """The loop learns: on one 4-frame clip of two shapes, the dice loss of frames 1-3 (predicted from memory)
    falls by over 30 % in 60 steps (0.93 -> 0.58 measured). Generalisation is what test_video checks with the
    shipped tracker, on a clip it never saw."""
    torch.manual_seed(0)
    video = build_sam3_video(tiny_model_config(checkpoint="builtin:tiny"))  # random tracker
    clip = ClipSampler(112, num_frames=4, max_speed=4.0, seed=123, objects=(2, 2))()
    before = _dice(video, clip)
    pretrain_tracker(video, steps=60, log_every=0, clips=lambda: clip)
    after = _dice(video, clip)
    assert before > 0.8 and after < 0.7 * before, (before, after)


def test_only_the_tracker_trains():
    torch.manual_seed(0)
    video = build_sam3_video(tiny_model_config(checkpoint="builtin:tiny"))
    detector = {k: v.clone() for k, v in video.detector.state_dict().items()}
    tracker = {k: v.clone() for k, v in video.tracker.state_dict().items()}
    pretrain_tracker(video, steps=2, log_every=0, clips=ClipSampler(112, num_frames=3, max_speed=4.0, seed=1))
    assert all(torch.equal(v, detector[k]) for k, v in video.detector.state_dict().items())
    assert any(not torch.equal(v, tracker[k]) for k, v in video.tracker.state_dict().items())


def test_full_tiny_checkpoint_keeps_the_image_model_and_adds_the_tracker(tmp_path):
    torch.manual_seed(1)
    video = build_sam3_video(tiny_model_config(checkpoint="builtin:tiny"))
    out = write_full_tiny_checkpoint(video, "builtin:tiny", tmp_path / "full.safetensors")
    written, base = read_state_dict(out), read_state_dict(resolve_checkpoint("builtin:tiny"))
    image_written, rest = split_full_state(written)
    assert image_written.keys() == split_full_state(base)[0].keys()
    assert all(torch.equal(v, base["detector." + k]) for k, v in image_written.items())
    assert any(k.startswith("tracker.") for k in rest)
    assert {v.dtype for k, v in rest.items() if v.is_floating_point()} == {torch.float16}  # the base's storage
    fresh = build_sam3_video(tiny_model_config())
    fresh.load_state_dict(written, strict=True)
    assert torch.equal(fresh.tracker.maskmem_tpos_enc, video.tracker.maskmem_tpos_enc.half().float())


def test_shipped_tiny_base_is_a_full_checkpoint_sam3s_video_model_loads_strictly():
    full = read_state_dict(resolve_checkpoint("builtin:tiny"))
    video = build_sam3_video(tiny_model_config())
    video.load_state_dict(full, strict=True)


def test_shipped_tracker_follows_held_out_clips():
    """`python -m sam3_lora.tiny_tracker --evaluate`: the shipped tracker on clips it never saw (README, Video)."""
    video = build_sam3_video(tiny_model_config())
    video.load_state_dict(read_state_dict(resolve_checkpoint("builtin:tiny")), strict=True)
    ious = held_out_ious(video.eval())
    assert min(ious.values()) >= MIN_HELD_OUT_IOU, ious
