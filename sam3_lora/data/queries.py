"""Text queries: which phrases to ask about an image, and the sam3 `Datapoint` that asks them.

One find-query per category. A positive query carries the image's (non-crowd) instances of its category; a
negative query (a category absent from the image, or an extra negative phrase) carries none and supervises only
the presence head. A category that appears in the image only as a crowd region is never asked in training:
as a positive it has no separable instance, as a negative it would punish correct detections. With crowd *and*
separate instances it is a positive marked non-exhaustive.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import numpy as np
import torch
from sam3.train.data.sam3_image_dataset import Datapoint, FindQueryLoaded, Image, InferenceMetadata, Object

from sam3_lora.data.transforms import TransformedSample

# original_category_id of an extra negative phrase (not a dataset category).
EXTRA_PHRASE_CATEGORY_ID = -1
# How a query asks: the phrase, a box exemplar of one instance (sam3's geometry encoder), or both.
PROMPT_TYPES = ("text", "box", "text+box")
# The text sam3 pairs with a box-only prompt (sam3_image_processor.py:138, filter_query_transforms.py:565).
VISUAL_PROMPT = "visual"


@dataclass(frozen=True)
class QuerySpec:
    """One phrase to ask about one image.

    Attributes:
        text: the prompt.
        category_id: the COCO category it stands for, or EXTRA_PHRASE_CATEGORY_ID.
        slot: position of the phrase in the dataset's phrase list (makes `coco_image_id` unique per query).
        exhaustive: every instance is annotated separately (False when the image also has a crowd region of it).
        prompt: one of PROMPT_TYPES; "box" and "text+box" carry the box of one instance of the category.
        exemplar: which of the category's kept instances (in object order) is the box exemplar.
    """

    text: str
    category_id: int
    slot: int
    exhaustive: bool = True
    prompt: str = "text"
    exemplar: int = 0


def with_train_exemplars(queries: Sequence[QuerySpec], instance_counts: Mapping[int, int], rng: np.random.Generator,
                         probability: float, text_probability: float) -> list[QuerySpec]:
    """Turn positive queries into box-exemplar queries, each with `probability` (drawn only when it is > 0).

    The exemplar is a random kept instance of the category; the query keeps its text with `text_probability`
    ("text+box"), else asks with the box alone ("box"). The exemplar instance stays a target.
    """
    if probability <= 0:
        return list(queries)
    out = []
    for q in queries:
        count = instance_counts.get(q.category_id, 0)
        if count and rng.random() < probability:
            prompt = "text+box" if rng.random() < text_probability else "box"
            q = replace(q, prompt=prompt, exemplar=int(rng.integers(count)))
        out.append(q)
    return out


def with_eval_exemplars(queries: Sequence[QuerySpec], instance_counts: Mapping[int, int]) -> list[QuerySpec]:
    """The text queries plus, for every positive one, a "box" and a "text+box" query on its first instance."""
    extra = [replace(q, prompt=prompt, exemplar=0) for prompt in PROMPT_TYPES[1:] for q in queries
             if instance_counts.get(q.category_id, 0)]
    return [*queries, *extra]


def resolve_prompts(categories: Mapping[int, str], prompts: Mapping | None) -> dict[int, str]:
    """Category id → prompt text: the category name unless `prompts` maps its id or name to a phrase.

    Raises:
        ValueError: a `prompts` key matches no category (the message lists the categories), or two categories end
            up with the same prompt (that phrase would be asked as a positive and a negative of one image).
    """
    texts = dict(categories)
    by_name = {name: i for i, name in categories.items()}
    for key, phrase in (prompts or {}).items():
        category_id = by_name.get(key) if key in by_name else _as_id(key)
        if category_id not in texts:
            raise ValueError(f"data.prompts key {key!r} is neither a category id nor a name; categories are "
                             f"{ {i: n for i, n in categories.items()} }")
        texts[category_id] = str(phrase)
    _refuse_shared_prompts(texts)
    return texts


class SharedPromptError(ValueError):
    """Two categories would be asked with the same phrase."""


def _refuse_shared_prompts(texts: Mapping[int, str]) -> None:
    ids_by_text: dict[str, list[int]] = {}
    for category_id, text in texts.items():
        ids_by_text.setdefault(text, []).append(category_id)
    shared = {text: ids for text, ids in ids_by_text.items() if len(ids) > 1}
    if shared:
        example = {ids[1]: f"{text} (2)" for text, ids in list(shared.items())[:1]}
        raise SharedPromptError(f"categories share a prompt: {shared} (prompt: category ids); one phrase would be asked "
                         "as a positive and as a negative of the same image. Tell them apart with data.prompts "
                         f"(e.g. data.prompts='{example}'), or merge the categories in the export")


def _as_id(key) -> int | None:
    if isinstance(key, int):
        return key
    return int(key) if isinstance(key, str) and key.lstrip("-").isdigit() else None


def plan_train_queries(positives: Sequence[int], crowd: set[int], phrases: Sequence[QuerySpec],
                       rng: np.random.Generator, num_negatives: int | None, max_queries: int | None) -> list[QuerySpec]:
    """Choose the queries of one training image.

    Args:
        positives: category ids with at least one instance still in the frame.
        crowd: category ids with a crowd region in the image.
        phrases: every askable phrase (categories in order, then extra negative phrases).
        rng: per-item generator (seeded from seed, epoch, index).
        num_negatives: negatives to sample (None = all). An image with no positive gets at least one, so pure
            negatives always teach "absent".
        max_queries: cap on queries per image (None = no cap); positives are subsampled when they alone exceed it.
    """
    positive_set = set(positives)
    pos = [q for q in phrases if q.category_id in positive_set]
    pos = [QuerySpec(q.text, q.category_id, q.slot, q.category_id not in crowd) for q in pos]
    candidates = [q for q in phrases if q.category_id not in positive_set and q.category_id not in crowd]
    if max_queries is not None and len(pos) > max_queries:
        return [pos[i] for i in sorted(rng.choice(len(pos), max_queries, replace=False))]
    wanted = len(candidates) if num_negatives is None else num_negatives
    wanted = max(wanted, 0 if pos else 1)
    if max_queries is not None:
        wanted = min(wanted, max_queries - len(pos))
    wanted = min(wanted, len(candidates))
    picked = rng.choice(len(candidates), wanted, replace=False) if wanted else []
    return pos + [candidates[i] for i in picked]


def eval_chunks(phrases: Sequence[QuerySpec], chunk_size: int) -> list[list[QuerySpec]]:
    """Every category phrase, split into chunks of at most `chunk_size` (one dataset item per image × chunk)."""
    if chunk_size < 1:
        raise ValueError(f"data.eval_categories_per_chunk must be >= 1, got {chunk_size}")
    return [list(phrases[i:i + chunk_size]) for i in range(0, len(phrases), chunk_size)]


def build_datapoint(sample: TransformedSample, object_categories: Sequence[int], object_has_mask: Sequence[bool],
                    queries: Sequence[QuerySpec], image_id: int, original_size: tuple[int, int],
                    coco_image_id_base: int) -> Datapoint:
    """Assemble the sam3 `Datapoint` of one image and its queries.

    Args:
        sample: the transformed image and its kept objects.
        object_categories: category id of every input object (indexed by `sample.kept`).
        object_has_mask: whether each input object has a segmentation (box-only objects get segment None).
        queries: what to ask.
        image_id: original COCO image id.
        original_size: (H, W) of the original image.
        coco_image_id_base: unique per image; `coco_image_id` = base + query slot (unique per query).
    """
    objects = [_object(sample, position, object_has_mask[k]) for position, k in enumerate(sample.kept)]
    kept_categories = [object_categories[k] for k in sample.kept]
    targets = {q.category_id: [i for i, c in enumerate(kept_categories) if c == q.category_id] for q in queries}
    find_queries = [
        FindQueryLoaded(
            query_text=VISUAL_PROMPT if q.prompt == "box" else q.text, image_id=0,
            object_ids_output=targets[q.category_id],
            is_exhaustive=q.exhaustive, query_processing_order=0,
            **_exemplar_box(sample, q, targets[q.category_id]),
            inference_metadata=InferenceMetadata(
                coco_image_id=coco_image_id_base + q.slot, original_image_id=image_id,
                original_category_id=q.category_id, original_size=original_size, object_id=0, frame_index=0),
        )
        for q in queries
    ]
    side = sample.image.shape[-1]
    return Datapoint(find_queries=find_queries, images=[Image(data=sample.image, objects=objects, size=(side, side))])


def _exemplar_box(sample: TransformedSample, query: QuerySpec, target_positions: Sequence[int]) -> dict:
    """`input_bbox` (1, 4) = the exemplar's transformed box, normalised cxcywh like every target box (what the
    geometry encoder reads, as `predict --box` feeds it); {} for a text query."""
    if query.prompt == "text":
        return {}
    if query.prompt not in PROMPT_TYPES:
        raise ValueError(f"query prompt type {query.prompt!r}: choose one of {PROMPT_TYPES}")
    if query.exemplar >= len(target_positions):
        raise ValueError(f"box exemplar {query.exemplar} of category {query.category_id} but only "
                         f"{len(target_positions)} of its instances are in the image")
    box = sample.boxes[target_positions[query.exemplar]].view(1, 4).clone()
    return {"input_bbox": box, "input_bbox_label": torch.ones(1, dtype=torch.long)}  # label 1 = positive


def _object(sample: TransformedSample, position: int, has_mask: bool) -> Object:
    box = sample.boxes[position]
    segment = sample.masks[position] if sample.masks is not None and has_mask else None
    side = sample.image.shape[-1]
    _, _, w, h = box.tolist()  # python floats: no torch kernels per object (see transforms.py)
    area = float(sample.mask_areas[position]) if segment is not None else w * h * side * side
    return Object(bbox=box, area=area, object_id=position, frame_index=0, segment=segment, is_crowd=False)
