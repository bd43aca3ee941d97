"""Pretrain the tiny SAM3's tracker on synthetic moving-shapes clips, so `predict-video` can be tested at tiny dims.

sam3 ships tracker weights only inside the full-size sam3.pt and has no tracker training loop (sam3/train/ trains
the image model). This trains sam3's own `Sam3TrackerPredictor` (as `video_model.build_tracker` builds it) the way
SAM2 trains its tracker: the first frame of a clip enters as a mask prompt (as sam3's video inference hands a new
detection to the tracker, `add_new_mask`), each later frame is predicted from memory by `track_step`, and sam3's
focal, dice and IoU losses (sam3/train/loss/loss_fns.py) plus a BCE on the object score supervise every frame.
The detector (image model and its SAM2 neck) stays frozen; clips are rendered fresh every step
(`sam3_lora.data.shapes_clip`).

The tracker runs in eval mode with gradients on: it then learns exactly the code path video inference runs
(no dropout; sam3's training-only branches read attributes its `__init__` never sets,
`teacher_force_obj_scores_for_mem` and `prob_to_dropout_spatial_mem`, sam3/model/sam3_tracker_base.py:334,686).

    python -m sam3_lora.tiny_tracker --out sam3_lora/assets/sam3_tiny_shapes.safetensors   # 2500 steps
    python -m sam3_lora.tiny_tracker --evaluate   # the shipped tracker's IoU on held-out clips

writes the tracker (`tracker.*`) and the SAM2-neck keys next to the tiny image model's, so `builtin:tiny` becomes a
full checkpoint in sam3.pt's layout.
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from sam3.train.loss.loss_fns import dice_loss, iou_loss, sigmoid_focal_loss
from torch import nn

from sam3_lora import compat
from sam3_lora.checkpoint_io import atomic_path, read_state_dict, resolve_checkpoint
from sam3_lora.data.shapes_clip import random_trajectories, render_clip
from sam3_lora.video_model import build_sam3_video, split_full_state

log = logging.getLogger(__name__)

# SAM2's tracker loss weights (mask focal 20, dice 1, IoU 1, object score 1)
LOSS_WEIGHTS = {"focal": 20.0, "dice": 1.0, "iou": 1.0, "object": 1.0}
TINY_MODEL_YAMLS = ("conf/model/sam3.yaml", "conf/model/sam3_tiny.yaml")


def tiny_model_config(repo: Path = Path(__file__).resolve().parents[1]) -> dict:
    """`build_sam3` kwargs of conf/model/sam3_tiny.yaml with the shipped tiny weights (a source checkout; the
    tests take their tiny config from here too)."""
    from omegaconf import OmegaConf

    paths = [repo / p for p in TINY_MODEL_YAMLS]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing} not found: run sam3_lora.tiny_tracker from a source checkout")
    config = OmegaConf.to_container(OmegaConf.merge(*[OmegaConf.load(p) for p in paths]))
    for key in ("_target_", "defaults"):
        config.pop(key, None)
    return {**config, "checkpoint": "builtin:tiny"}


class ClipSampler:
    """Random clips: `objects` (low, high) shapes translating at up to `max_speed` px per frame, source or target
    style. Two or more shapes per clip make the tracker tell them apart, not just segment the salient one."""

    def __init__(self, size: int, num_frames: int, max_speed: float, seed: int, objects: tuple[int, int] = (2, 3),
                 styles: tuple[str, ...] = ("source", "target")):
        self.size, self.num_frames, self.max_speed = size, num_frames, max_speed
        self.objects, self.styles = objects, styles
        self.rng = np.random.default_rng(seed)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(frames (T, 3, S, S) normalised like sam3's video inference, masks (T, K, 1, S, S) float)."""
        style = str(self.rng.choice(self.styles))
        count = int(self.rng.integers(self.objects[0], self.objects[1] + 1))
        trajectories = random_trajectories(self.rng, self.size, count, self.num_frames,
                                           float(self.rng.uniform(0, self.max_speed)), style)
        frames, masks = render_clip(trajectories, self.num_frames, self.size, style, int(self.rng.integers(1 << 31)))
        images = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255
        return (images - 0.5) / 0.5, torch.from_numpy(np.stack(masks)).float()[:, :, None]


def frame_features(tracker: nn.Module, sam2_out: dict, frame: int, objects: int):
    """The tracker's inputs for one frame, as sam3/model/sam3_video_base.py:380-391 builds them, per object."""
    decoder = tracker.sam_mask_decoder
    levels = sam2_out["backbone_fpn"]
    fpn = [decoder.conv_s0(levels[0][frame:frame + 1]), decoder.conv_s1(levels[1][frame:frame + 1]),
           levels[2][frame:frame + 1]]
    backbone_out = {"backbone_fpn": [x.expand(objects, -1, -1, -1) for x in fpn],
                    "vision_pos_enc": [p[frame:frame + 1].expand(objects, -1, -1, -1)
                                       for p in sam2_out["vision_pos_enc"]]}
    _, feats, pos_embeds, sizes = tracker._prepare_backbone_features(backbone_out)
    return feats, pos_embeds, sizes


def frame_loss(out: dict, target: torch.Tensor) -> dict:
    """SAM2-style per-frame losses of one `track_step` output against the (K, 1, S, S) true masks."""
    logits = out["pred_masks_high_res"]
    objects = target.shape[0]
    present = (target.flatten(1).amax(1, keepdim=True) > 0).float()
    return {
        "focal": sigmoid_focal_loss(logits.flatten(1), target.flatten(1), objects, triton=False),
        "dice": dice_loss(logits.flatten(1), target.flatten(1), objects),
        "iou": iou_loss(logits, target, out["iou_score"][:, None], objects),
        "object": F.binary_cross_entropy_with_logits(out["object_score_logits"], present),
    }


def track_clip(video: nn.Module, images: torch.Tensor, masks: torch.Tensor) -> Iterator[tuple[int, dict]]:
    """Track every object of a clip from its true first-frame mask: (frame, `track_step` output) for frames 1..T-1."""
    tracker = video.tracker
    with torch.no_grad():
        sam2_out = video.detector.backbone.forward_image(images)["sam2_backbone_out"]
    num_frames, objects = masks.shape[:2]
    memory = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    for frame in range(num_frames):
        feats, pos_embeds, sizes = frame_features(tracker, sam2_out, frame, objects)
        out = tracker.track_step(
            frame_idx=frame, is_init_cond_frame=frame == 0, current_vision_feats=feats,
            current_vision_pos_embeds=pos_embeds, feat_sizes=sizes,
            image=images[frame:frame + 1].expand(objects, -1, -1, -1), point_inputs=None,
            mask_inputs=masks[0] if frame == 0 else None, output_dict=memory, num_frames=num_frames)
        memory["cond_frame_outputs" if frame == 0 else "non_cond_frame_outputs"][frame] = out
        if frame:
            yield frame, out


def clip_loss(video: nn.Module, images: torch.Tensor, masks: torch.Tensor) -> dict:
    """The weighted losses of frames 1..T-1 of `track_clip`, averaged over frames."""
    totals = {name: images.new_zeros(()) for name in LOSS_WEIGHTS}
    for frame, out in track_clip(video, images, masks):
        for name, value in frame_loss(out, masks[frame]).items():
            totals[name] = totals[name] + value / (masks.shape[0] - 1)
    totals["total"] = sum(LOSS_WEIGHTS[name] * totals[name] for name in LOSS_WEIGHTS)
    return totals


def mean_tracked_iou(video: nn.Module, images: torch.Tensor, masks: torch.Tensor) -> float:
    """Mean IoU of the tracked masks (logit > 0) with the true ones over frames 1..T-1 and every object."""
    ious = []
    with torch.no_grad(), compat.tensor_cuda_is_a_no_op():
        for frame, out in track_clip(video, images, masks):
            predicted, true = out["pred_masks_high_res"].flatten(1) > 0, masks[frame].flatten(1) > 0
            ious.append((predicted & true).sum(1) / (predicted | true).sum(1).clamp(min=1))
    return float(torch.cat(ious).mean())


def held_out_ious(video: nn.Module, clips_per_count: int = 4, seed: int = 999) -> dict[int, float]:
    """Mean tracked IoU on source-style clips of 1, 2 and 3 shapes at up to 5 px per frame (another seed than
    training's): {shapes: IoU}."""
    size = video.tracker.image_size
    def clip(count: int, index: int):
        return ClipSampler(size, 8, 5.0, seed + index, (count, count), styles=("source",))()

    return {count: float(np.mean([mean_tracked_iou(video, *clip(count, i)) for i in range(clips_per_count)]))
            for count in (1, 2, 3)}


def tracker_parameters(video: nn.Module) -> list[nn.Parameter]:
    """Freeze everything but the tracker; return the tracker's parameters."""
    video.requires_grad_(False)
    return list(video.tracker.requires_grad_(True).parameters())


def pretrain_tracker(video: nn.Module, steps: int, lr: float = 1e-3, seed: int = 0, log_every: int = 50,
                     clips: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
    """Train `video.tracker` on `steps` clips (AdamW, cosine decay to 0).

    `clips` returns (frames, masks) as `ClipSampler` does; default: 8-frame clips of 2-3 shapes at up to 6 px
    per frame, at the tracker's image size.
    """
    torch.manual_seed(seed)
    video.eval()
    optimizer = torch.optim.AdamW(tracker_parameters(video), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    sampler = clips or ClipSampler(video.tracker.image_size, num_frames=8, max_speed=6.0, seed=seed)
    for step in range(steps):
        with compat.tensor_cuda_is_a_no_op():
            losses = clip_loss(video, *sampler())
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(video.tracker.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            log.info("step %d/%d %s", step + 1, steps, {k: round(float(v.detach()), 4) for k, v in losses.items()})


def write_full_tiny_checkpoint(video: nn.Module, base: str, out: str | Path) -> Path:
    """The base's image-model keys unchanged + this video model's tracker and SAM2-neck keys, atomically.

    Real-valued tracker tensors are stored in the base's storage dtype (fp16 for the shipped tiny base: the
    package stays small); the model loads them into its fp32 parameters.
    """
    from safetensors.torch import save_file

    image_state, _ = split_full_state(read_state_dict(resolve_checkpoint(base)))
    storage = Counter(v.dtype for v in image_state.values() if v.is_floating_point()).most_common(1)[0][0]
    _, video_only = split_full_state(video.state_dict())
    video_only = {k: v.to(storage) if v.is_floating_point() else v for k, v in video_only.items()}
    state = {**{"detector." + k: v for k, v in image_state.items()}, **video_only}
    with atomic_path(out) as tmp:
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp))
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2500)  # the shipped tracker: 14 min on one core
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="where to write the full tiny checkpoint (.safetensors)")
    parser.add_argument("--evaluate", action="store_true",
                        help="no training: print the shipped tracker's mean IoU on held-out clips of 1, 2, 3 shapes")
    args = parser.parse_args(argv)
    if not args.evaluate and not args.out:
        parser.error("--out is required to train (or pass --evaluate)")
    # force: sam3 configures logging when imported
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    torch.set_num_threads(1)
    config = tiny_model_config()
    if args.evaluate:
        return _print_evaluation(config)
    video = build_sam3_video(config)
    pretrain_tracker(video, args.steps, lr=args.lr, seed=args.seed)
    log.info("wrote %s", write_full_tiny_checkpoint(video, config["checkpoint"], args.out))
    return 0


def _print_evaluation(config: dict) -> int:
    video = build_sam3_video({**config, "checkpoint": None})
    video.load_state_dict(read_state_dict(resolve_checkpoint(config["checkpoint"])), strict=True)
    ious = held_out_ious(video.eval())
    print("| shapes per clip | mean IoU, frames 1-7 (4 clips) |\n|---:|---:|")
    for count, iou in ious.items():
        print(f"| {count} | {iou:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
