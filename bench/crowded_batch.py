"""A realistic training batch for the benches: images with several prompts, each with many instances and masks.

    batch = crowded_batch(resolution=1008, images=1, prompts=4, instances=10)

Built with sam3's own `Datapoint` classes and `collate_fn_api`, like the data pipeline's output, without
reading files: the bench measures the model, not data loading.
"""

from __future__ import annotations

import torch

import sam3_lora  # noqa: F401  (applies the CPU compat patches)
from sam3.train.data.collator import collate_fn_api
from sam3.train.data.sam3_image_dataset import Datapoint, FindQueryLoaded, Image, InferenceMetadata, Object


def _objects(resolution: int, count: int, first_id: int, generator: torch.Generator) -> list[Object]:
    """`count` box-shaped instances at random places, 5-20 % of the side, with full-resolution masks."""
    objects = []
    for index in range(count):
        w, h = (0.05 + 0.15 * torch.rand(2, generator=generator)).tolist()
        cx, cy = (w / 2 + (1 - w) * torch.rand(1, generator=generator)).item(), \
            (h / 2 + (1 - h) * torch.rand(1, generator=generator)).item()
        mask = torch.zeros(resolution, resolution, dtype=torch.bool)
        x0, y0 = int((cx - w / 2) * resolution), int((cy - h / 2) * resolution)
        mask[y0:y0 + max(1, int(h * resolution)), x0:x0 + max(1, int(w * resolution))] = True
        objects.append(Object(bbox=torch.tensor([cx, cy, w, h]), area=w * h, object_id=first_id + index,
                              segment=mask))
    return objects


def _query(text: str, object_ids: list[int], image_id: int, category_id: int, size: int) -> FindQueryLoaded:
    meta = InferenceMetadata(coco_image_id=image_id, original_image_id=image_id, original_category_id=category_id,
                             original_size=(size, size), object_id=0, frame_index=0)
    return FindQueryLoaded(query_text=text, image_id=0, object_ids_output=object_ids, is_exhaustive=True,
                           inference_metadata=meta)


PHRASES = ("red circle", "blue square", "green triangle", "yellow star", "purple hexagon", "orange ring",
           "white cross", "black oval")


def crowded_batch(resolution: int, images: int = 1, prompts: int = 4, instances: int = 10, seed: int = 0):
    """A sam3 `BatchedDatapoint`: `images` random images, each with `prompts` phrases of `instances` objects.

    Args:
        resolution: image side in pixels (masks at the same size, as the training pipeline makes them).
        images: images in the batch.
        prompts: find-queries per image (each a different phrase, all positive).
        instances: objects per prompt (with masks).
        seed: random seed for pixels and boxes.
    """
    if prompts > len(PHRASES):
        raise ValueError(f"at most {len(PHRASES)} prompts per image, got {prompts}")
    generator = torch.Generator().manual_seed(seed)
    datapoints = []
    for image_index in range(images):
        objects, queries = [], []
        for prompt in range(prompts):
            ids = list(range(len(objects), len(objects) + instances))
            objects += _objects(resolution, instances, len(objects), generator)
            queries.append(_query(PHRASES[prompt], ids, image_index, prompt + 1, resolution))
        image = Image(data=torch.randn(3, resolution, resolution, generator=generator), objects=objects,
                      size=(resolution, resolution))
        datapoints.append(Datapoint(find_queries=queries, images=[image]))
    return collate_fn_api(datapoints, "all", with_seg_masks=True)["all"]
