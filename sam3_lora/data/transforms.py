"""Albumentations pipelines: image, instance masks and boxes transformed together.

Train (Meta's RF100-VL recipe, scaled with the model resolution R): square resize to a random side in
[0.476 R, 0.984 R] (480–992 px in steps of 32 at R = 1008), horizontal flip, mild colour jitter, then pad to R×R
at a random position. Eval: square resize to R×R, no padding, so normalised boxes × original (W, H) are
original-image coordinates. The output image is (3, R, R) float normalised with mean = std = 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np
import torch

# Meta's sizes at 1008 px: 480..992 in steps of 32 (17 sides), expressed as fractions of the resolution.
META_SCALE_RANGE = (480 / 1008, 992 / 1008)
META_SCALE_STEPS = 17
# Smaller than this (in output pixels) an object has left the frame or cannot be learned: dropped.
MIN_BOX_SIDE_PX = 1.0


@dataclass
class TransformedSample:
    """The result of a pipeline on one image.

    Attributes:
        image: (3, R, R) float32, normalised to [-1, 1].
        boxes: (N, 4) float32 normalised cxcywh of the kept objects (sam3's target format).
        masks: (N, R, R) bool of the kept objects, or None when no masks were given.
        mask_areas: (N,) pixel count of each kept mask (None without masks).
        kept: indices (into the input object list) of the objects still in the frame, in output order.
    """

    image: torch.Tensor
    boxes: torch.Tensor
    masks: torch.Tensor | None
    mask_areas: np.ndarray | None
    kept: list[int]


def train_sides(resolution: int, scale_range: tuple[float, float]) -> list[int]:
    """The square sides a training image is resized to (Meta's 17 evenly spaced sizes, scaled to R)."""
    low, high = scale_range
    if not 0 < low <= high <= 1:
        raise ValueError(f"data.scale_range {list(scale_range)} must satisfy 0 < low <= high <= 1 "
                         "(fractions of model.resolution; Meta's recipe is [0.476, 0.984])")
    return sorted({max(1, round(resolution * f)) for f in np.linspace(low, high, META_SCALE_STEPS)})


def build_train_transform(resolution: int, scale_range: tuple[float, float] | None = META_SCALE_RANGE,
                          hflip: float = 0.5, color_jitter: float = 0.1) -> A.Compose:
    """Training pipeline; each augmentation is switched off by None / 0.

    Args:
        resolution: model input side R.
        scale_range: (low, high) fractions of R for the random square side, then random-position padding to R;
            None = plain resize to R×R.
        hflip: probability of a horizontal flip.
        color_jitter: strength s of brightness/contrast/saturation jitter in [1 - s, 1 + s] (applied with
            probability 0.8). Hue is never jittered: colour words are part of the prompts.
    """
    steps: list[A.BasicTransform] = []
    if scale_range is None:
        steps.append(A.Resize(resolution, resolution))
    else:
        steps.append(A.OneOf([A.Resize(s, s) for s in train_sides(resolution, scale_range)], p=1.0))
    if hflip > 0:
        steps.append(A.HorizontalFlip(p=hflip))
    if color_jitter > 0:
        s = color_jitter
        steps.append(A.ColorJitter(brightness=(1 - s, 1 + s), contrast=(1 - s, 1 + s),
                                   saturation=(1 - s, 1 + s), hue=(0.0, 0.0), p=0.8))
    if scale_range is not None:
        steps.append(A.PadIfNeeded(resolution, resolution, position="random", border_mode=cv2.BORDER_CONSTANT,
                                   fill=0, fill_mask=0))
    return _compose(steps)


def build_eval_transform(resolution: int) -> A.Compose:
    """Evaluation pipeline: square resize to R×R only."""
    return _compose([A.Resize(resolution, resolution)])


def _compose(steps: list) -> A.Compose:
    bbox_params = A.BboxParams(format="coco", label_fields=["object_index"], min_width=MIN_BOX_SIDE_PX,
                               min_height=MIN_BOX_SIDE_PX, clip=True)
    return A.Compose(steps, bbox_params=bbox_params)


def apply_transform(transform: A.Compose, image: np.ndarray, boxes: list, masks: list[np.ndarray] | None,
                    seed: int) -> TransformedSample:
    """Run a pipeline on one image and its objects, deterministically for a given seed.

    Args:
        transform: from `build_train_transform` / `build_eval_transform`.
        image: (H, W, 3) uint8 RGB.
        boxes: COCO [x, y, w, h] per object, original pixels.
        masks: (H, W) uint8 mask per object (same order as boxes), or None to skip masks.
        seed: drives every random choice of the pipeline.
    """
    transform.set_random_seed(seed)
    # one (N, H, W) array: albumentations then transforms all masks per op instead of stacking a list each time
    kwargs = {"masks": np.stack(masks)} if masks else {}
    out = transform(image=image, bboxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                    object_index=list(range(len(boxes))), **kwargs)
    kept = [int(i) for i in out["object_index"]]
    side = out["image"].shape[0]
    kept_masks = _kept_masks(out["masks"], kept, side) if masks else None
    return TransformedSample(
        image=image_to_tensor(out["image"]),
        boxes=_normalised_cxcywh(np.asarray(out["bboxes"], np.float32).reshape(-1, 4), side),
        masks=torch.from_numpy(kept_masks) if masks else None,
        mask_areas=np.count_nonzero(kept_masks.reshape(len(kept), -1), axis=1) if masks else None,
        kept=kept,
    )


# The per-item arithmetic below is numpy + zero-copy torch.from_numpy on purpose: with num_workers=0 it runs in
# the training process, where torch's multi-threaded kernels on small tensors are 10x slower than numpy when the
# cores are busy (measured: 28 ms vs 3 ms per 112 px item on 2 shared cores).
def _normalised_cxcywh(boxes_xywh: np.ndarray, side: int) -> torch.Tensor:
    x, y, w, h = boxes_xywh.T
    return torch.from_numpy((np.stack([x + w / 2, y + h / 2, w, h], axis=1) / np.float32(side)).astype(np.float32))


def _kept_masks(masks: np.ndarray, kept: list[int], side: int) -> np.ndarray:
    if not kept:
        return np.zeros((0, side, side), bool)
    # masks are 0/1 uint8 (pycocotools) and stay 0/1 under nearest resize, flips and zero padding: view as bool
    return np.ascontiguousarray(masks[kept]).view(bool)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """(R, R, 3) uint8 → (3, R, R) float32 normalised with mean = std = 0.5 (SAM3's input convention)."""
    chw = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
    chw *= np.float32(1 / 127.5)
    chw -= np.float32(1.0)
    return torch.from_numpy(chw)


def eval_image_tensor(image_rgb: np.ndarray, resolution: int) -> torch.Tensor:
    """The evaluation preprocessing of one image: square resize to R×R, normalised (3, R, R) float32.

    Args:
        image_rgb: (H, W, 3) uint8 RGB.
        resolution: model input side R.
    """
    # The same albumentations Resize as `build_eval_transform`, so predict sees what evaluation saw.
    return image_to_tensor(A.Resize(resolution, resolution)(image=image_rgb)["image"])
