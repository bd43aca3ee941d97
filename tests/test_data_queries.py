"""Text queries: positives carry their instances, negatives are sampled as configured, crowd is never a target."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sam3.train.data.collator import collate_fn_api

from sam3_lora.data.queries import (EXTRA_PHRASE_CATEGORY_ID, QuerySpec, build_datapoint, eval_chunks,
                                    plan_train_queries, resolve_prompts)
from sam3_lora.data.transforms import TransformedSample

CATEGORIES = {3: "cat", 5: "dog", 8: "bird", 13: "fish", 21: "horse"}
PHRASES = [QuerySpec(name, i, slot) for slot, (i, name) in enumerate(CATEGORIES.items())]


def _plan(positives, crowd=(), num_negatives=2, max_queries=None, seed=0, phrases=PHRASES):
    return plan_train_queries(positives, set(crowd), phrases, np.random.default_rng(seed), num_negatives,
                              max_queries)


def test_positives_plus_the_configured_number_of_distinct_absent_negatives():
    queries = _plan([5], num_negatives=2)
    assert [q.category_id for q in queries][0] == 5
    negatives = [q.category_id for q in queries[1:]]
    assert len(negatives) == 2 == len(set(negatives)) and 5 not in negatives


def test_negatives_are_sampled_not_fixed():
    seen = {q.category_id for seed in range(30) for q in _plan([5], num_negatives=1, seed=seed)[1:]}
    assert seen == {3, 8, 13, 21}


def test_all_negatives():
    assert sorted(q.category_id for q in _plan([5], num_negatives=None)) == sorted(CATEGORIES)


def test_an_image_without_positives_still_gets_one_negative():
    queries = _plan([], num_negatives=0)
    assert len(queries) == 1 and queries[0].category_id in CATEGORIES


def test_crowd_only_category_is_never_asked_and_crowd_with_instances_is_non_exhaustive():
    queries = _plan([5], crowd={5, 8}, num_negatives=None)
    assert 8 not in [q.category_id for q in queries]
    assert [(q.category_id, q.exhaustive) for q in queries if q.category_id == 5] == [(5, False)]


def test_max_queries_per_image_caps_positives_and_negatives():
    assert len(_plan([3, 5, 8, 13], num_negatives=None, max_queries=2)) == 2
    queries = _plan([3], num_negatives=None, max_queries=3)
    assert len(queries) == 3 and queries[0].category_id == 3


def test_extra_negative_phrases_join_the_negative_pool():
    phrases = PHRASES + [QuerySpec("unicorn", EXTRA_PHRASE_CATEGORY_ID, 5)]
    texts = {q.text for seed in range(40) for q in _plan([3, 5, 8, 13], num_negatives=1, seed=seed, phrases=phrases)}
    assert {"unicorn", "horse"} <= texts


def test_evaluation_asks_every_category_in_chunks():
    chunks = eval_chunks(PHRASES, 2)
    assert [len(c) for c in chunks] == [2, 2, 1]
    assert [q.category_id for c in chunks for q in c] == list(CATEGORIES)


def test_prompts_by_id_or_name_replace_category_names():
    texts = resolve_prompts(CATEGORIES, {5: "a dog", "bird": "small bird", "13": "goldfish"})
    assert texts == {3: "cat", 5: "a dog", 8: "small bird", 13: "goldfish", 21: "horse"}
    with pytest.raises(ValueError, match="'zebra'"):
        resolve_prompts(CATEGORIES, {"zebra": "striped horse"})


def test_datapoint_targets_metadata_and_box_only_objects():
    side = 16
    masks = torch.zeros(3, side, side, dtype=torch.bool)
    masks[0, :4, :4] = masks[2, 8:, 8:] = True
    sample = TransformedSample(image=torch.zeros(3, side, side), boxes=torch.tensor(
        [[0.1, 0.1, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2], [0.7, 0.7, 0.4, 0.4]]), masks=masks,
        mask_areas=masks.sum((1, 2)).numpy(), kept=[0, 2, 3])
    categories = [5, 99, 5, 3]            # input objects; object 1 left the frame
    has_mask = [True, True, False, True]  # input object 2 (kept position 1) is box-only
    queries = [QuerySpec("dog", 5, 1), QuerySpec("cat", 3, 0), QuerySpec("bird", 8, 2)]
    point = build_datapoint(sample, categories, has_mask, queries, image_id=77, original_size=(30, 40),
                            coco_image_id_base=100)
    assert [q.object_ids_output for q in point.find_queries] == [[0, 1], [2], []]
    meta = point.find_queries[0].inference_metadata
    assert (meta.original_image_id, meta.original_category_id, meta.original_size, meta.coco_image_id) == \
        (77, 5, (30, 40), 101)
    assert point.images[0].objects[1].segment is None
    batch = collate_fn_api([point], "all", with_seg_masks=True)["all"]
    assert batch.find_targets[0].is_valid_segment.tolist() == [1, 0, 1]
    assert batch.find_targets[0].num_boxes.tolist() == [2, 1, 0]
