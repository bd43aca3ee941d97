"""`sam3-lora predict`: images + noun-phrase prompts (+ optional box exemplars) → COCO results + PNG overlays.

Each batch of images goes through the image backbone once; every prompt of an image is a find-query on that
image (sam3's `collate_fn_api` batching), post-processed exactly as evaluation does
(`evaluation.predictions_to_coco`), then thresholded for the user.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image as PILImage
from rich.progress import track
from sam3.model.utils.misc import copy_data_to_device
from sam3.train.data.collator import collate_fn_api
from sam3.train.data.sam3_image_dataset import Datapoint, FindQueryLoaded, Image, InferenceMetadata
from torch import nn

from sam3_lora import compat
from sam3_lora.data.images import CorruptImageError, read_image_rgb
from sam3_lora.data.transforms import eval_image_tensor
from sam3_lora.evaluation.postprocess import final_predictions, predictions_to_coco
from sam3_lora.visualize import draw_detections

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
BOX_ONLY_PROMPT = "visual"  # the text sam3 pairs with exemplar boxes when no phrase is given
PREDICTIONS_FILE = "predictions.json"


def find_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand files and folders (their images, sorted, not recursive) into a list of image paths.

    Raises:
        FileNotFoundError: an input does not exist, or no image was found.
    """
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"predict input {item} does not exist")
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {[str(i) for i in inputs]}")
    return paths


def exemplar_boxes(boxes: Sequence[Sequence[float]], height: int, width: int) -> torch.Tensor:
    """Pixel xywh boxes → the normalised cxcywh (n, 4) tensor sam3's geometry encoder reads."""
    xywh = torch.tensor(boxes, dtype=torch.float32).view(-1, 4)
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    cxcywh = torch.cat([xywh[:, :2] + xywh[:, 2:] / 2, xywh[:, 2:]], dim=1) / scale
    return cxcywh.clamp(0, 1)


def prompt_datapoint(image: torch.Tensor, image_index: int, original_size: tuple[int, int], prompts: Sequence[str],
                    boxes: Sequence[Sequence[float]] | None = None) -> Datapoint:
    """One image and one find-query per prompt (category id = prompt position + 1), boxes as exemplars.

    Args:
        image: (3, R, R) model input from `eval_image_tensor`.
        image_index: the id the results will carry.
        original_size: (H, W) of the image file.
        prompts: noun phrases.
        boxes: positive exemplar boxes (pixel xywh), given to every query; None for text only.
    """
    exemplars = exemplar_boxes(boxes, *original_size) if boxes else None
    labels = None if exemplars is None else torch.ones(len(exemplars), dtype=torch.long)  # 1 = positive
    queries = [
        FindQueryLoaded(
            query_text=prompt, image_id=0, object_ids_output=[], is_exhaustive=True,
            input_bbox=exemplars, input_bbox_label=labels,
            inference_metadata=InferenceMetadata(
                coco_image_id=image_index, original_image_id=image_index, original_category_id=position + 1,
                original_size=tuple(original_size), object_id=0, frame_index=0),
        )
        for position, prompt in enumerate(prompts)
    ]
    side = image.shape[-1]
    return Datapoint(find_queries=queries, images=[Image(data=image, objects=[], size=(side, side))])


@torch.inference_mode()
def predict_datapoints(model: nn.Module, datapoints: list[Datapoint], topk: int = 100) -> list[dict]:
    """Run the model once on a list of datapoints and return all their COCO results (unthresholded)."""
    batch = collate_fn_api(datapoints, "all", with_seg_masks=False)["all"]
    batch = copy_data_to_device(batch, _device(model), non_blocking=True)
    outputs = final_predictions(model(batch))
    return predictions_to_coco(outputs, batch.find_metadatas[0], topk=topk, with_masks="pred_masks" in outputs)


def predict_images(
    model: nn.Module,
    image_paths: Sequence[str | Path],
    prompts: Sequence[str],
    resolution: int,
    out_dir: str | Path,
    threshold: float = 0.5,
    boxes: Sequence[Sequence[float]] | None = None,
    batch_size: int = 4,
    topk: int = 100,
    progress: bool = True,
) -> list[dict]:
    """Predict every prompt on every image; write `predictions.json` and one PNG overlay per image.

    Args:
        model: SAM3 in eval mode (base, adapted or merged), on the device to run on.
        image_paths: image files.
        prompts: noun phrases; result `category_id` is the prompt's position + 1, `category_name` the phrase.
            May be empty when `boxes` are given (sam3's box-only prompt).
        resolution: the model's input side.
        out_dir: folder for `predictions.json` and `<image stem>.png` overlays (created).
        threshold: minimum score kept in the file and drawn.
        boxes: positive exemplar boxes (pixel xywh of each image) for SAM3's geometry encoder.
        batch_size: images per forward pass.
        topk: detections considered per (image, prompt) before thresholding.
        progress: show a progress bar.

    Returns:
        The kept COCO results, each with `file_name` and `category_name` added.

    Raises:
        ValueError: neither prompts nor boxes were given.
    """
    if not prompts and not boxes:
        raise ValueError("predict needs at least one --prompt or --box")
    prompts = list(prompts) or [BOX_ONLY_PROMPT]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    overlay_names = _overlay_names(image_paths)
    kept, unreadable = [], []  # unreadable: paths skipped with a warning, the rest still predicted
    starts = range(0, len(image_paths), batch_size)
    for start in track(starts, description="predict", disable=not progress):
        chunk = list(enumerate(image_paths[start:start + batch_size], start=start))
        kept += _predict_chunk(model, chunk, prompts, resolution, out_dir, overlay_names, threshold, boxes, topk,
                               unreadable)
    (out_dir / PREDICTIONS_FILE).write_text(json.dumps(kept))
    if unreadable:
        log.warning("%d unreadable image(s) skipped (no predictions, no overlay): %s", len(unreadable), unreadable[:5])
    log.info("%d images, %d detections with score >= %s → %s", len(image_paths), len(kept), threshold, out_dir)
    return kept


def _predict_chunk(model, chunk, prompts, resolution, out_dir, overlay_names, threshold, boxes, topk,
                   unreadable: list[str]) -> list[dict]:
    images = _read_images(chunk, unreadable)
    chunk = [(index, path) for index, path in chunk if index in images]
    if not chunk:
        return []
    paths = dict(chunk)
    datapoints = [prompt_datapoint(eval_image_tensor(images[i], resolution), i, images[i].shape[:2], prompts, boxes)
                  for i, _ in chunk]
    by_image: dict[int, list[dict]] = {index: [] for index, _ in chunk}
    for result in predict_datapoints(model, datapoints, topk):
        if result["score"] >= threshold:
            result["file_name"] = str(paths[result["image_id"]])
            result["category_name"] = prompts[result["category_id"] - 1]
            by_image[result["image_id"]].append(result)
    for index, _ in chunk:
        overlay = draw_detections(images[index], by_image[index])
        PILImage.fromarray(overlay).save(out_dir / overlay_names[index])
    return [result for index, _ in chunk for result in by_image[index]]


def _read_images(chunk, unreadable: list[str]) -> dict:
    """Decode a chunk's images; an unreadable one is logged and added to `unreadable` instead of aborting the run."""
    images = {}
    for index, path in chunk:
        try:
            images[index] = read_image_rgb(Path(path))
        except (CorruptImageError, FileNotFoundError) as err:
            log.warning("skipping unreadable image %s: %s", path, err)
            unreadable.append(str(path))
    return images


def _overlay_names(image_paths: Sequence[str | Path]) -> list[str]:
    names, seen = [], set()
    for index, path in enumerate(image_paths):
        name = f"{Path(path).stem}.png"
        if name in seen or name == PREDICTIONS_FILE:
            name = f"{Path(path).stem}_{index}.png"
        seen.add(name)
        names.append(name)
    return names


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def move_model(model: nn.Module, device: str | torch.device) -> nn.Module:
    """Move a (possibly PEFT-wrapped) SAM3 and reset the device `Sam3Image` caches (DESIGN §4)."""
    return compat.clear_cached_devices(model.to(device))
