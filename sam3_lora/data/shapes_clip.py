"""Synthetic video clips: shapes translating over a fixed background, with every object's true mask per frame.

Used to pretrain the tiny tracker (`sam3_lora.tiny_tracker`) and to test `sam3-lora predict-video`. Shapes are
drawn in list order (later ones cover earlier ones); each frame's masks are the visible parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from sam3_lora.data.shapes_render import (COLOURS, RADIUS_RANGE, SHAPES, DrawnShape, background, paint,
                                          polygon_mask, shape_polygon)


@dataclass(frozen=True)
class Trajectory:
    """One shape moving at constant velocity: centre (x, y) px at frame 0, px per frame, radius px."""

    category: str
    start: tuple[float, float]
    velocity: tuple[float, float]
    radius: float
    angle: float = 0.0

    def centre(self, frame: int) -> tuple[float, float]:
        return self.start[0] + self.velocity[0] * frame, self.start[1] + self.velocity[1] * frame


def render_clip(trajectories: list[Trajectory], num_frames: int, size: int, style: str = "source",
                seed: int = 0) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """(frames as uint8 (size, size, 3), per frame the visible bool mask of each trajectory, in order)."""
    rng = np.random.default_rng(seed)
    canvas = background(style, size, size, rng)
    frames, masks = [], []
    for frame in range(num_frames):
        image = canvas.copy()
        full = [polygon_mask(shape_polygon(t.category.split()[1], *t.centre(frame), t.radius, t.angle), size, size)
                for t in trajectories]
        for index, (t, mask) in enumerate(zip(trajectories, full)):
            # the same generator state every frame: a shape keeps its colour jitter (and hatching) over the clip
            paint(image, DrawnShape(t.category, mask), style, np.random.default_rng([seed, index]))
        frames.append(np.clip(np.rint(image), 0, 255).astype(np.uint8))
        masks.append(_visible(full))
    return frames, masks


def _visible(full: list[np.ndarray]) -> list[np.ndarray]:
    covered = np.zeros_like(full[0])
    visible = []
    for mask in reversed(full):
        visible.append(mask & ~covered)
        covered |= mask
    return visible[::-1]


def random_trajectories(rng: np.random.Generator, size: int, count: int, num_frames: int,
                        max_speed: float, style: str = "source") -> list[Trajectory]:
    """`count` shapes of distinct categories that stay inside the frame for `num_frames` frames."""
    low, high = RADIUS_RANGE[style]
    names = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    trajectories = []
    for index in rng.choice(len(names), size=count, replace=False):
        radius = rng.uniform(low, high) * size
        lo, hi = radius, size - radius
        start = rng.uniform(lo, hi, size=2)
        end = np.clip(start + rng.uniform(-max_speed, max_speed, size=2) * (num_frames - 1), lo, hi)
        velocity = (end - start) / max(num_frames - 1, 1)
        trajectories.append(Trajectory(names[index], (float(start[0]), float(start[1])),
                                       (float(velocity[0]), float(velocity[1])), float(radius),
                                       float(rng.uniform(0, 2 * np.pi))))
    return trajectories


def write_frames(frames: list[np.ndarray], out_dir: str | Path) -> Path:
    """Save frames as `<index>.png` (the frame-folder layout `predict-video` reads)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for index, frame in enumerate(frames):
        PILImage.fromarray(frame).save(out_dir / f"{index}.png")
    return out_dir
