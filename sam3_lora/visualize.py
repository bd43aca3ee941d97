"""Pictures: detection overlays (predict's PNGs, TensorBoard validation panels) and the per-class AP chart."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont
from pycocotools import mask as mask_util

from sam3_lora.evaluation.postprocess import final_predictions, predictions_to_coco
from sam3_lora.evaluation.comparison import comparison_rows

PALETTE = [tuple(int(255 * c) for c in colormaps["tab10"](i)[:3]) for i in range(10)]
MASK_ALPHA = 0.45


def category_color(category_id: int) -> tuple[int, int, int]:
    """A stable RGB colour per category id (tab10)."""
    return PALETTE[int(category_id) % len(PALETTE)]


def draw_detections(
    image_rgb: np.ndarray,
    detections: list[dict],
    category_names: dict[int, str] | None = None,
    mask_alpha: float = MASK_ALPHA,
) -> np.ndarray:
    """Draw COCO detections on an image: filled masks, box outlines and "name score" labels.

    Args:
        image_rgb: (H, W, 3) uint8 image the detections' coordinates refer to.
        detections: COCO results (`bbox` xywh, `score`, `category_id`, optional RLE `segmentation`),
            drawn lowest score first so the most confident ends on top.
        category_names: category id → label text (default: the id itself, or a result's `category_name`).
        mask_alpha: opacity of the mask fill.

    Returns:
        A new (H, W, 3) uint8 RGB image of the same size.

    Raises:
        ValueError: the image is not (H, W, 3) uint8, or a mask's size differs from the image's.
    """
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(f"draw_detections needs an (H, W, 3) uint8 RGB image, got {image_rgb.shape} {image_rgb.dtype}")
    ordered = sorted(detections, key=lambda d: d["score"])
    canvas = _blend_masks(image_rgb, ordered, mask_alpha)
    picture = PILImage.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    height, width = image_rgb.shape[:2]
    line = max(1, round(min(height, width) / 200))
    font = ImageFont.load_default(size=max(10, round(min(height, width) / 40)))
    for detection in ordered:
        _draw_box_and_label(draw, detection, _label(detection, category_names), line, font)
    return np.asarray(picture)


def _blend_masks(image_rgb: np.ndarray, detections: list[dict], alpha: float) -> np.ndarray:
    canvas = image_rgb.astype(np.float32)
    for detection in detections:
        if "segmentation" not in detection:
            continue
        mask = mask_util.decode(_rle_bytes(detection["segmentation"])).astype(bool)
        if mask.shape != image_rgb.shape[:2]:
            raise ValueError(f"mask of size {mask.shape} does not fit image of size {image_rgb.shape[:2]} "
                             f"(image {detection.get('image_id')}): draw on the image the results refer to")
        color = np.array(category_color(detection["category_id"]), dtype=np.float32)
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * color
    return canvas.round().clip(0, 255).astype(np.uint8)


def _rle_bytes(rle: dict) -> dict:
    counts = rle["counts"]
    return {"size": rle["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def _label(detection: dict, category_names: dict[int, str] | None) -> str:
    name = (category_names or {}).get(detection["category_id"])
    name = name or detection.get("category_name") or str(detection["category_id"])
    return f"{name} {detection['score']:.2f}"


def _draw_box_and_label(draw: ImageDraw.ImageDraw, detection: dict, text: str, line: int, font) -> None:
    x, y, w, h = detection["bbox"]
    color = category_color(detection["category_id"])
    draw.rectangle([x, y, x + w, y + h], outline=color, width=line)
    left, top, right, bottom = draw.textbbox((x, y), text, font=font)
    shift = min(bottom - top + 2, y)  # above the box when there is room, inside it otherwise
    draw.rectangle([left, top - shift, right + 2, bottom - shift], fill=color)
    draw.text((x + 1, y - shift), text, fill=(255, 255, 255), font=font)


def tensor_to_rgb(image: torch.Tensor) -> np.ndarray:
    """A (3, H, W) model input normalised with mean = std = 0.5 → (H, W, 3) uint8 RGB."""
    pixels = ((image.detach().float().cpu() * 0.5 + 0.5).clamp(0, 1) * 255).round()
    return pixels.to(torch.uint8).permute(1, 2, 0).numpy()


def validation_panel(
    batch,
    sam3_output,
    category_names: dict[int, str] | None = None,
    threshold: float = 0.5,
    max_images: int = 4,
) -> np.ndarray:
    """Side-by-side overlays of a validation batch's first images, for TensorBoard (`dataformats="HWC"`).

    Detections come from the same post-processing as evaluation, in the model's input coordinates, keeping
    those scored at least `threshold`.

    Args:
        batch: the sam3 `BatchedDatapoint` (normalised `img_batch`, per-query `find_inputs[0].img_ids`).
        sam3_output: the model's eval-mode output for the batch (or its final dict).
        category_names: original category id → name.
        threshold: minimum score drawn.
        max_images: images in the panel.

    Returns:
        (R, R × n, 3) uint8 RGB.
    """
    images = batch.img_batch[:max_images]
    metadata = batch.find_metadatas[0]
    input_size = torch.tensor(images.shape[-2:]).repeat(len(metadata.original_size), 1)
    display = SimpleNamespace(original_image_id=batch.find_inputs[0].img_ids.cpu(),
                              original_category_id=metadata.original_category_id.cpu(), original_size=input_size)
    by_image = defaultdict(list)
    for detection in predictions_to_coco(final_predictions(sam3_output), display):
        if detection["score"] >= threshold:
            by_image[detection["image_id"]].append(detection)
    overlays = [draw_detections(tensor_to_rgb(image), by_image[i], category_names) for i, image in enumerate(images)]
    return np.concatenate(overlays, axis=1)


def per_class_chart(zero_shot: dict, fine_tuned: dict, out_png: str | Path) -> Path:
    """Write a bar chart of per-class AP, zero-shot vs fine-tuned, one panel per IoU type.

    Args:
        zero_shot: metrics of the base model (`{bbox,segm}_AP/<name>` keys, any `val/`/`test/` prefix).
        fine_tuned: metrics of the adapted model on the same split.
        out_png: file to write.

    Returns:
        The PNG's path.

    Raises:
        ValueError: neither dict holds a per-class AP.
    """
    panels = defaultdict(list)
    for name, zero, tuned in comparison_rows(zero_shot, fine_tuned):
        if "_AP/" in name:
            iou_type, category = name.split("_AP/", 1)
            panels[iou_type].append((category, zero, tuned))
    if not panels:
        raise ValueError("per_class_chart: no per-class AP (`bbox_AP/<name>`, `segm_AP/<name>`) in the metrics")
    figure = _chart(panels)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure).print_png(str(out_png))
    return out_png


def _chart(panels: dict[str, list]) -> Figure:
    most = max(len(rows) for rows in panels.values())
    figure = Figure(figsize=(max(4.0, 0.7 * most + 1.5), 2.6 * len(panels)), dpi=100, layout="constrained")
    for axes, (iou_type, rows) in zip(figure.subplots(len(panels), 1, squeeze=False)[:, 0], sorted(panels.items())):
        x = np.arange(len(rows))
        for offset, side, label in ((-0.2, 1, "zero-shot"), (0.2, 2, "fine-tuned")):
            values = [np.nan if row[side] is None else row[side] for row in rows]
            axes.bar(x + offset, values, width=0.4, label=label)
        crowded = most > 6
        axes.set_xticks(x, [row[0] for row in rows], rotation=30 if crowded else 0, ha="right" if crowded else "center")
        axes.set_ylim(0, 1)
        axes.set_ylabel(f"{iou_type} AP")
        axes.legend(fontsize="small")
    return figure
