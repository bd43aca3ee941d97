"""Albumentations pipelines: image, masks and boxes stay consistent; boxes end as normalised cxcywh."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam3_lora.data.transforms import (apply_transform, build_eval_transform, build_train_transform,
                                       eval_image_tensor, train_sides)

WIDTH, HEIGHT = 400, 200
BOX = [20, 10, 80, 40]  # COCO xywh in the 400x200 original


def _box_mask(box, width=WIDTH, height=HEIGHT):
    mask = np.zeros((height, width), np.uint8)
    x, y, w, h = box
    mask[y:y + h, x:x + w] = 1
    return mask


def _white():
    return np.full((HEIGHT, WIDTH, 3), 255, np.uint8)


def test_eval_box_is_the_original_box_normalised_by_the_original_size():
    sample = apply_transform(build_eval_transform(112), _white(), [BOX], None, seed=0)
    expected = [(20 + 40) / WIDTH, (10 + 20) / HEIGHT, 80 / WIDTH, 40 / HEIGHT]  # cx, cy, w, h
    assert sample.image.shape == (3, 112, 112)
    assert sample.boxes[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_train_box_after_known_scale_flip_and_pad_equals_the_hand_computed_one():
    # R = 100, side fixed at 50 px, always flipped, no colour change: only the pad offset is random,
    # and it can be read back from the image (the pad is black = -1, the white image is +1).
    transform = build_train_transform(100, scale_range=(0.5, 0.5), hflip=1.0, color_jitter=0.0)
    sample = apply_transform(transform, _white(), [BOX], [_box_mask(BOX)], seed=7)
    rows, cols = np.nonzero(sample.image[0].numpy() > 0)
    top, left = rows.min(), cols.min()
    assert (rows.max() - top + 1, cols.max() - left + 1) == (50, 50)
    # scale x by 50/400, y by 50/200: x0 = 2.5, y0 = 2.5, w = h = 10; flip: x0 -> 50 - (2.5 + 10) = 37.5
    x0, y0, w, h = left + 37.5, top + 2.5, 10.0, 10.0
    expected = [(x0 + w / 2) / 100, (y0 + h / 2) / 100, w / 100, h / 100]
    assert sample.boxes[0].tolist() == pytest.approx(expected, abs=1e-5)
    mask_rows, mask_cols = np.nonzero(sample.masks[0].numpy())
    assert [mask_cols.min(), mask_rows.min(), mask_cols.max() + 1, mask_rows.max() + 1] == pytest.approx(
        [x0, y0, x0 + w, y0 + h], abs=1.0)


def test_objects_too_small_for_the_frame_are_dropped_with_their_masks():
    big, tiny, other = [0, 0, 200, 100], [399, 199, 1, 1], [300, 100, 100, 100]
    masks = [_box_mask(b) for b in (big, tiny, other)]
    sample = apply_transform(build_eval_transform(50), _white(), [big, tiny, other], masks, seed=0)
    assert sample.kept == [0, 2]
    assert sample.boxes.shape == (2, 4) and sample.masks.shape == (2, 50, 50)
    assert sample.masks[1][40, 45] and not sample.masks[1][10, 10]  # the second kept mask is `other`'s
    assert sample.mask_areas.tolist() == [int(sample.masks[0].sum()), int(sample.masks[1].sum())]


def test_eval_image_tensor_is_the_eval_pipeline_and_is_normalised():
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    image[:, WIDTH // 2:] = 255
    via_pipeline = apply_transform(build_eval_transform(64), image, [], None, seed=0).image
    direct = eval_image_tensor(image, 64)
    assert torch.equal(direct, via_pipeline)
    assert direct.dtype == torch.float32 and direct.min() == -1.0 and direct.max() == 1.0


def test_meta_training_sizes_at_1008_and_scaled_to_the_model_resolution():
    assert train_sides(1008, (0.476, 0.984)) == list(range(480, 993, 32))
    assert train_sides(112, (0.476, 0.984))[0] == 53 and train_sides(112, (0.476, 0.984))[-1] == 110


def test_every_augmentation_switched_off_is_the_eval_resize():
    image = np.random.default_rng(0).integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    plain = build_train_transform(64, scale_range=None, hflip=0.0, color_jitter=0.0)
    a = apply_transform(plain, image, [BOX], None, seed=3)
    b = apply_transform(build_eval_transform(64), image, [BOX], None, seed=0)
    assert torch.equal(a.image, b.image) and torch.equal(a.boxes, b.boxes)


def test_same_seed_same_sample_different_seed_different_sample():
    image = np.random.default_rng(0).integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    transform = build_train_transform(64)
    first, again = (apply_transform(transform, image, [BOX], [_box_mask(BOX)], seed=11) for _ in range(2))
    assert torch.equal(first.image, again.image) and torch.equal(first.masks, again.masks)
    others = [apply_transform(transform, image, [BOX], None, seed=s).boxes for s in range(12, 18)]
    assert any(not torch.equal(first.boxes, o) for o in others)


def test_invalid_scale_range_names_the_setting():
    with pytest.raises(ValueError, match="data.scale_range"):
        build_train_transform(112, scale_range=(0.8, 0.4))
