"""Torch datasets over split records: decode → masks → albumentations → queries → sam3 `Datapoint`.

Determinism: every random draw of an item (augmentation, negative sampling) comes from a generator seeded with
(seed, epoch, index), so batches do not depend on the number of workers or on which worker loads which item.
`EpochSampler` hands the epoch to the workers inside the sampled key.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Sequence

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from sam3_lora.data.coco import ImageRecord
from sam3_lora.data.images import CorruptImageError, read_image_rgb
from sam3_lora.data.masks import decode_mask
from sam3_lora.data.queries import (QuerySpec, build_datapoint, eval_chunks, plan_train_queries,
                                    with_eval_exemplars, with_train_exemplars)
from sam3_lora.data.transforms import TransformedSample, apply_transform

log = logging.getLogger(__name__)

# A run of this many unreadable images in a row is not bad luck: stop and point at check-data.
MAX_CONSECUTIVE_CORRUPT = 16


class SkipCounter:
    """Counts images skipped because they failed to decode, shared by the DataLoader worker processes."""

    def __init__(self) -> None:
        self._value = multiprocessing.get_context().Value("i", 0)

    def increment(self) -> None:
        """Count one skipped image."""
        with self._value.get_lock():
            self._value.value += 1

    @property
    def value(self) -> int:
        """Images skipped so far, over all workers."""
        return int(self._value.value)


@dataclass
class DatasetSettings:
    """What the datasets of one DataModule share.

    Attributes:
        phrases: every askable phrase, categories first (in `category_ids` order), then extra negative phrases.
        transform: the albumentations pipeline.
        with_masks: decode and transform instance masks.
        seed: base of every per-item seed.
        skipped: counter of corrupt images met while loading.
        exemplar_prob: training: chance that a positive query also carries one instance's box (queries.py).
        exemplar_text_prob: training: chance that such a query keeps its text (else box only, text "visual").
        eval_exemplars: evaluation: also ask every positive (image, category) with "box" and "text+box".
    """

    phrases: list[QuerySpec]
    transform: A.Compose
    with_masks: bool
    seed: int
    skipped: SkipCounter
    exemplar_prob: float = 0.0
    exemplar_text_prob: float = 0.5
    eval_exemplars: bool = False


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one item in one epoch (independent of workers)."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, index]))


def _split_key(key: int | tuple[int, int]) -> tuple[int, int]:
    return (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), 0)


def load_sample(record: ImageRecord, settings: DatasetSettings, seed: int) -> tuple[TransformedSample, list, list]:
    """Decode one image and its target instances and transform them together.

    Returns:
        (sample, category id per input object, has-mask flag per input object).

    Raises:
        CorruptImageError: the image cannot be decoded.
    """
    image = read_image_rgb(record.path, record.apply_exif)
    if image.shape[:2] != (record.height, record.width):
        raise CorruptImageError(f"{record.path}: decoded size {image.shape[1]}x{image.shape[0]} differs from the "
                                f"json's {record.width}x{record.height}")
    targets = record.targets
    has_mask = [t.segmentation is not None for t in targets]
    masks = None
    if settings.with_masks and any(has_mask):
        # box-only objects get an empty placeholder so that masks and boxes stay index-aligned
        masks = [decode_mask(t.segmentation, record.height, record.width) if m
                 else np.zeros((record.height, record.width), np.uint8) for t, m in zip(targets, has_mask)]
    sample = apply_transform(settings.transform, image, [t.bbox for t in targets], masks, seed)
    return sample, [t.category_id for t in targets], has_mask


class TrainDataset(Dataset):
    """One item per image; queries = positives + sampled negatives. Corrupt images are replaced by the next one."""

    def __init__(self, records: Sequence[ImageRecord], settings: DatasetSettings, num_negatives: int | None,
                 max_queries_per_image: int | None):
        self.records = list(records)
        self.settings = settings
        self.num_negatives = num_negatives
        self.max_queries = max_queries_per_image

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]):
        index, epoch = _split_key(key)
        for attempt in range(MAX_CONSECUTIVE_CORRUPT):
            candidate = (index + attempt) % len(self.records)
            try:
                item = self._item(candidate, epoch)
            except (CorruptImageError, FileNotFoundError) as err:
                self.settings.skipped.increment()
                log.warning("skipping image id %s: %s", self.records[candidate].image_id, err)
                continue
            if item is not None:
                return item
            # nothing to ask (every category is a crowd region here): sam3's collate cannot take a batch of
            # such images (max() of no queries), and one alone teaches nothing, so the next image stands in
            log.info("image id %s has no askable phrase (crowd regions only); using the next image",
                     self.records[candidate].image_id)
        raise RuntimeError(f"{MAX_CONSECUTIVE_CORRUPT} consecutive training images from index {index} failed to "
                           "load or had nothing to ask; run `sam3-lora check-data ROOT` to find them")

    def _item(self, index: int, epoch: int):
        record, rng = self.records[index], item_rng(self.settings.seed, epoch, index)
        sample, categories, has_mask = load_sample(record, self.settings, int(rng.integers(2**31)))
        positives = sorted({categories[k] for k in sample.kept})
        crowd = {i.category_id for i in record.instances if i.is_crowd}
        queries = plan_train_queries(positives, crowd, self.settings.phrases, rng, self.num_negatives,
                                     self.max_queries)
        queries = with_train_exemplars(queries, _kept_counts(sample, categories), rng, self.settings.exemplar_prob,
                                       self.settings.exemplar_text_prob)
        if not queries:
            return None
        return build_datapoint(sample, categories, has_mask, queries, record.image_id,
                               (record.height, record.width), index * len(self.settings.phrases))


class EvalDataset(Dataset):
    """One item per (image, chunk of categories); every category is asked. Deterministic (no augmentation).

    A corrupt image is counted and served as a black image, so its ground truth counts as missed instead of
    silently disappearing from the evaluation.
    """

    def __init__(self, records: Sequence[ImageRecord], settings: DatasetSettings, categories_per_chunk: int):
        self.records = list(records)
        self.settings = settings
        category_phrases = [q for q in settings.phrases if q.category_id >= 0]
        self.chunks = eval_chunks(category_phrases, categories_per_chunk)
        self.items = [(r, c) for r in range(len(self.records)) for c in range(len(self.chunks))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]):
        index, _ = _split_key(key)
        record_index, chunk_index = self.items[index]
        record = self.records[record_index]
        try:
            sample, categories, has_mask = load_sample(record, self.settings, seed=0)
        except (CorruptImageError, FileNotFoundError) as err:
            self.settings.skipped.increment()
            log.warning("image id %s unreadable, evaluated as a black image: %s", record.image_id, err)
            sample, categories, has_mask = self._black_sample(record), [], []
        crowd = {i.category_id for i in record.instances if i.is_crowd}
        queries = [QuerySpec(q.text, q.category_id, q.slot, q.category_id not in crowd)
                   for q in self.chunks[chunk_index]]
        if self.settings.eval_exemplars:
            queries = with_eval_exemplars(queries, _kept_counts(sample, categories))
        return build_datapoint(sample, categories, has_mask, queries, record.image_id,
                               (record.height, record.width), record_index * len(self.settings.phrases))

    def _black_sample(self, record: ImageRecord) -> TransformedSample:
        black = np.zeros((record.height, record.width, 3), np.uint8)
        return apply_transform(self.settings.transform, black, [], None, seed=0)


def _kept_counts(sample: TransformedSample, categories: Sequence[int]) -> Counter:
    """Category id → number of its instances still in the transformed frame."""
    return Counter(categories[k] for k in sample.kept)


class EpochSampler(Sampler):
    """Yields (index, epoch) keys, shuffled by (seed, epoch); Lightning calls `set_epoch` every epoch.

    Carrying the epoch in the key lets worker processes (which hold copies of the dataset) derive per-item
    seeds without shared state.
    """

    def __init__(self, num_items: int, seed: int, shuffle: bool = True):
        self.num_items, self.seed, self.shuffle, self.epoch = num_items, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentations to produce."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.num_items)
        return iter([(int(i), self.epoch) for i in order])

    def __len__(self) -> int:
        return self.num_items
