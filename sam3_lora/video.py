"""`sam3-lora predict-video`: sam3's own video model (detector + tracker) with a fine-tuned detector.

Each text prompt runs through `Sam3VideoInference.add_prompt` on the first frame and `propagate_in_video`
(detect every frame, track with SAM3's memory tracker, associate detections to masklets). Output: one JSON per
frame (`frames/<index>.json`: objects with a track id that is stable across frames, score, box and RLE mask)
and `overlay.gif` with one colour per track.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image as PILImage
from pycocotools import mask as mask_util
from torch import nn

from sam3_lora import compat
from sam3_lora.adapter import read_adapter_dir
from sam3_lora.checkpoint_io import read_model_config, read_state_dict, resolve_checkpoint
from sam3_lora.predict import move_model
from sam3_lora.video_model import (TRACKER_PREFIX, build_sam3_video, merged_detector_state, split_full_state)
from sam3_lora.visualize import draw_detections

log = logging.getLogger(__name__)

FRAME_SUFFIXES = {".jpg", ".jpeg", ".png"}


def load_video_model(source: str | Path, base: str | None = None, **video_kwargs) -> tuple[nn.Module, dict]:
    """Build sam3's video model from a full checkpoint or from an adapter directory (+ a full base).

    Args:
        source: a full checkpoint (`sam3-lora export ADAPTER OUT.pt --base sam3.pt`, or sam3.pt itself), or an
            adapter directory.
        base: for an adapter: the full checkpoint whose tracker (and detector base) to use; default the adapter's
            own `model.checkpoint`, which must then hold `tracker.*` weights.
        video_kwargs: overrides of sam3's video heuristics (`build_sam3_video`).

    Returns:
        (the video model in eval mode with every weight loaded strictly, its image-model config).

    Raises:
        ValueError: the weights have no tracker (say which file and what to pass).
    """
    if Path(source).is_dir():
        _, model_config = read_adapter_dir(source)
        base = base or model_config.get("checkpoint")
        full = _full_state(base, f"the adapter's base (sam3_model_config.json checkpoint={base}); pass --base")
        image_state, others = split_full_state(full)
        merged, model_config = merged_detector_state(source, image_state, str(base))
        full = {**{"detector." + k: v for k, v in merged.items()}, **others}
    else:
        path = resolve_checkpoint(str(source))
        model_config = read_model_config(path)
        if model_config is None and compat.has_cuda() and not video_kwargs:
            return _sam3_video_model(path), {}
        full = _full_state(str(source), str(source))
    model = build_sam3_video({**(model_config or {}), "checkpoint": None}, **video_kwargs)
    model.load_state_dict(full, strict=True)
    return model.eval(), model_config


def _sam3_video_model(path: str) -> nn.Module:
    """A checkpoint without our model config has the official dims: sam3's own builder (CUDA only, it
    precomputes on "cuda" at construction) loads it with strict=True."""
    from sam3.model_builder import build_sam3_video_model

    return build_sam3_video_model(checkpoint_path=path, load_from_HF=False, bpe_path=compat.bpe_vocab_path()).eval()


def _full_state(checkpoint: str | None, what: str) -> dict:
    if checkpoint is None:
        raise ValueError(f"predict-video needs tracker weights and {what} names none: pass --base sam3.pt")
    state = read_state_dict(resolve_checkpoint(checkpoint))
    if not any(k.startswith(TRACKER_PREFIX) for k in state):
        raise ValueError(f"{what}: {checkpoint} has no tracker.* weights, so SAM3 cannot track with it. Pass a full "
                         "SAM3 checkpoint (sam3.pt, or `sam3-lora export ADAPTER OUT.pt --base sam3.pt`)")
    return state


def frame_paths(video: str | Path) -> list[Path] | None:
    """The frames of a frame folder in sam3's order (`<index>.<ext>` numerically), or None for a video file."""
    video = Path(video)
    if not video.is_dir():
        return None
    frames = [p for p in video.iterdir() if p.suffix.lower() in FRAME_SUFFIXES]
    if not frames:
        raise FileNotFoundError(f"no frames ({', '.join(sorted(FRAME_SUFFIXES))}) in {video}")
    try:
        return sorted(frames, key=lambda p: int(p.stem))
    except ValueError:
        return sorted(frames)


@torch.inference_mode()
def track_prompts(model: nn.Module, video: str | Path, prompts: Sequence[str]) -> list[list[dict]]:
    """Run sam3's video inference for each prompt; per frame, every tracked object.

    Track ids are unique across prompts (prompt k's objects are numbered after prompt k-1's).

    Returns:
        frames[i] = [{"track_id", "prompt", "score", "bbox" (xywh px), "segmentation" (RLE)}, ...].
    """
    frames: dict[int, list[dict]] = {}
    next_id = 1
    with compat.video_inference_on_this_machine(model):
        state = model.init_state(resource_path=str(video), offload_video_to_cpu=not torch.cuda.is_available())
        for prompt in prompts:
            ids: dict[int, int] = {}
            model.add_prompt(state, frame_idx=0, text_str=prompt)
            for index, output in model.propagate_in_video(state, start_frame_idx=0,
                                                          max_frame_num_to_track=state["num_frames"]):
                for obj_id in output["out_obj_ids"].tolist():
                    if obj_id not in ids:
                        ids[obj_id], next_id = next_id, next_id + 1
                frames.setdefault(index, []).extend(_objects(output, ids, prompt))
    return [frames.get(i, []) for i in range(max(frames, default=-1) + 1)]


def _objects(output: dict, ids: dict[int, int], prompt: str) -> list[dict]:
    objects = []
    for obj_id, score, box, mask in zip(output["out_obj_ids"].tolist(), output["out_probs"].tolist(),
                                        output["out_boxes_xywh"].tolist(), output["out_binary_masks"]):
        rle = mask_util.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
        height, width = mask.shape
        objects.append({"track_id": ids[obj_id], "prompt": prompt, "score": float(score),
                        "bbox": [box[0] * width, box[1] * height, box[2] * width, box[3] * height],
                        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    return objects


def write_tracks(frames: list[list[dict]], out_dir: str | Path, images: list[np.ndarray] | None = None,
                 fps: float = 8.0) -> Path:
    """Write `frames/<index>.json` per frame and, given the frames' RGB images, `overlay.gif` (colour per track)."""
    out_dir = Path(out_dir)
    (out_dir / "frames").mkdir(parents=True, exist_ok=True)
    for index, objects in enumerate(frames):
        (out_dir / "frames" / f"{index:05d}.json").write_text(json.dumps({"frame_index": index, "objects": objects}))
    if images:
        overlays = [PILImage.fromarray(draw_detections(image, [_as_detection(o) for o in objects]))
                    for image, objects in zip(images, frames)]
        overlays[0].save(out_dir / "overlay.gif", save_all=True, append_images=overlays[1:],
                         duration=int(1000 / fps), loop=0)
    return out_dir


def _as_detection(obj: dict) -> dict:
    # draw_detections colours by category_id: the track id gives each track its own colour
    return {**obj, "category_id": obj["track_id"], "category_name": f"#{obj['track_id']} {obj['prompt']}"}


def read_frames(video: str | Path) -> list[np.ndarray]:
    """RGB frames of a frame folder or a video file (OpenCV), for the overlay."""
    paths = frame_paths(video)
    if paths is not None:
        return [np.asarray(PILImage.open(p).convert("RGB")) for p in paths]
    import cv2

    capture, images = cv2.VideoCapture(str(video)), []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        images.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    capture.release()
    if not images:
        raise FileNotFoundError(f"could not read frames from {video} (a video file OpenCV reads, or a frame folder)")
    return images


def predict_video_main(args) -> int:
    """`sam3-lora predict-video (ADAPTER_DIR | FULL.pt) VIDEO_OR_FRAME_FOLDER --prompt ... --out DIR`."""
    if not args.prompt:
        raise ValueError("sam3-lora predict-video: give at least one --prompt \"phrase\"")
    model, _ = load_video_model(args.source, base=args.base)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = move_model(model, device)
    frames = track_prompts(model, args.video, args.prompt)
    write_tracks(frames, args.out, read_frames(args.video))
    tracks = {o["track_id"] for objects in frames for o in objects}
    log.info("%d frames, %d tracks → %s", len(frames), len(tracks), args.out)
    return 0
