"""Draw one synthetic shapes image: textured background, coloured shapes with occlusion, visible masks.

Two styles with the same categories: "source" (filled shapes on light gradient/noise backgrounds, larger) and
"target" (hatched, outlined shapes on dark striped backgrounds, smaller) — a domain shift for the LoRA demo.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

COLOURS = {
    "red": (215, 40, 40), "blue": (40, 80, 220), "green": (40, 165, 60),
    "yellow": (225, 195, 30), "purple": (145, 60, 185), "orange": (240, 130, 30),
}
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond")
STYLES = ("source", "target")
# Shape radius as a fraction of the image's shorter side, per style.
RADIUS_RANGE = {"source": (0.10, 0.22), "target": (0.09, 0.18)}
# An object less visible than this (fraction of its own area) is not drawn: it would be an unfair target.
MIN_VISIBLE_FRACTION = 0.35
_SUBPIXEL_BITS = 4  # cv2.fillPoly fixed-point precision


@dataclass
class DrawnShape:
    """A shape placed in an image. `visible` is the part not covered by shapes drawn after it."""

    category: str
    full: np.ndarray
    visible: np.ndarray | None = None
    is_crowd: bool = False


def parse_category(name: str) -> tuple[str, str]:
    """"red circle" → ("red", "circle").

    Raises:
        ValueError: unknown colour or shape (the message lists the known ones).
    """
    parts = name.split()
    if len(parts) != 2 or parts[0] not in COLOURS or parts[1] not in SHAPES:
        raise ValueError(f"shapes category {name!r} must be '<colour> <shape>' with colour in {sorted(COLOURS)} "
                         f"and shape in {list(SHAPES)}")
    return parts[0], parts[1]


def shape_polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """Vertices (K, 2) of a shape centred at (cx, cy); circles are 32-gons."""
    counts = {"circle": 32, "square": 4, "triangle": 3, "star": 10, "hexagon": 6, "diamond": 4}
    k = counts[shape]
    theta = angle + np.arange(k) * 2 * np.pi / k
    r = np.full(k, radius)
    if shape == "star":
        r[1::2] *= 0.45
    if shape == "diamond":
        r[1::2] *= 0.6
    if shape == "square":
        theta += np.pi / 4
    return np.stack([cx + r * np.cos(theta), cy + r * np.sin(theta)], axis=1)


def polygon_mask(vertices: np.ndarray, height: int, width: int) -> np.ndarray:
    """Rasterise a polygon to a (H, W) bool mask."""
    mask = np.zeros((height, width), np.uint8)
    points = np.round(vertices * (1 << _SUBPIXEL_BITS)).astype(np.int32)
    cv2.fillPoly(mask, [points], 1, lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
    return mask.astype(bool)


def background(style: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A float (H, W, 3) textured background: light gradient + noise (source) or dark stripes + noise (target)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    direction = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(direction) * xx / width + np.sin(direction) * yy / height)[..., None]
    if style == "source":
        base = rng.uniform(195, 245, size=3)
        image = base + 25 * ramp + rng.normal(0, 6, (height, width, 3))
    else:
        base = rng.uniform(20, 70, size=3)
        period = rng.uniform(5, 12)
        stripes = np.sin((np.cos(direction) * xx + np.sin(direction) * yy) * 2 * np.pi / period)[..., None]
        image = base + 18 * stripes + 15 * ramp + rng.normal(0, 10, (height, width, 3))
    return image.astype(np.float32)


def paint(image: np.ndarray, shape: DrawnShape, style: str, rng: np.random.Generator) -> None:
    """Paint a shape onto the float image in place (filled for source; hatched + outlined for target)."""
    colour = np.asarray(COLOURS[shape.category.split()[0]], np.float32) + rng.normal(0, 8, 3)
    if style == "source":
        image[shape.full] = colour
        return
    height, width = shape.full.shape
    yy, xx = np.mgrid[0:height, 0:width]
    angle = rng.uniform(0, np.pi)
    hatch = ((np.cos(angle) * xx + np.sin(angle) * yy) % 4) < 2
    outline = shape.full & ~cv2.erode(shape.full.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    image[shape.full & (hatch | outline)] = colour


def place_shapes(categories: list[str], style: str, height: int, width: int,
                 rng: np.random.Generator) -> list[DrawnShape]:
    """Random shapes in z-order (first = bottom), keeping only those visible enough; sets `visible`."""
    low, high = RADIUS_RANGE[style]
    shapes = []
    for category in categories:
        radius = rng.uniform(low, high) * min(height, width)
        cx, cy = rng.uniform(0.3 * radius, width - 0.3 * radius), rng.uniform(0.3 * radius, height - 0.3 * radius)
        vertices = shape_polygon(parse_category(category)[1], cx, cy, radius, rng.uniform(0, 2 * np.pi))
        shapes.append(DrawnShape(category, polygon_mask(vertices, height, width)))
    return keep_visible(shapes)


def keep_visible(shapes: list[DrawnShape]) -> list[DrawnShape]:
    """Top-down: drop shapes mostly hidden by kept shapes above them; fill `visible` of the kept ones."""
    if not shapes:
        return []
    covered = np.zeros_like(shapes[0].full)
    kept = []
    for shape in reversed(shapes):
        visible = shape.full & ~covered
        if shape.full.sum() and visible.sum() >= MIN_VISIBLE_FRACTION * shape.full.sum() and visible.sum() >= 12:
            shape.visible = visible
            covered |= shape.full
            kept.append(shape)
    return kept[::-1]


def crowd_cluster(category: str, style: str, height: int, width: int, rng: np.random.Generator) -> DrawnShape:
    """Several small shapes of one category close together, as one crowd region."""
    side = min(height, width)
    cx, cy = rng.uniform(0.25 * width, 0.75 * width), rng.uniform(0.25 * height, 0.75 * height)
    union = np.zeros((height, width), bool)
    for _ in range(int(rng.integers(4, 7))):
        x, y = cx + rng.uniform(-0.12, 0.12) * side, cy + rng.uniform(-0.12, 0.12) * side
        vertices = shape_polygon(parse_category(category)[1], x, y, rng.uniform(0.04, 0.06) * side,
                                 rng.uniform(0, 2 * np.pi))
        union |= polygon_mask(vertices, height, width)
    return DrawnShape(category, union, is_crowd=True)


def render(shapes: list[DrawnShape], style: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Background + shapes in z-order → (H, W, 3) uint8 RGB."""
    image = background(style, height, width, rng)
    for shape in shapes:
        paint(image, shape, style, rng)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
