"""AP per prompt type: text, box exemplar, text + box exemplar (data.exemplar_prob / data.eval_exemplars).

The type of a query is read from the batch itself: a query with an input box is "box" when its text is sam3's
visual placeholder, else "text+box"; any other query is "text". Text queries go to the run's own evaluators
(unsuffixed keys, the checkpoint criterion). Once a batch holds exemplar queries, three more evaluations run,
each with keys suffixed `@type`: `@box`, `@text+box`, and `@text` = the text queries of the same positive
(image, category) pairs the exemplar queries ask (exemplars are only asked where an instance exists, so this is
the like-for-like text number).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Callable

import torch

from sam3_lora.data.queries import PROMPT_TYPES, VISUAL_PROMPT
from sam3_lora.evaluation.postprocess import final_predictions

# Prediction tensors the COCO conversion reads, all (Q, ...) per query.
_PER_QUERY_OUTPUTS = ("pred_logits", "pred_boxes", "pred_masks", "presence_logit_dec")


def query_prompt_types(batch) -> list[str]:
    """The prompt type (one of PROMPT_TYPES) of every query of a sam3 `BatchedDatapoint`."""
    find_input = batch.find_inputs[0]
    has_box = (~find_input.input_boxes_mask.bool()).any(dim=1).tolist()  # mask: True = padding
    texts = [batch.find_text_batch[i] for i in find_input.text_ids.tolist()]
    return [("box" if text == VISUAL_PROMPT else "text+box") if box else "text" for box, text in zip(has_box, texts)]


def select_queries(outputs: dict, batch, keep: list[int]):
    """(outputs, batch-like) restricted to the queries at positions `keep`, as `CocoEvaluator.update` reads them."""
    index = torch.tensor(keep, dtype=torch.long)
    selected = {k: v[index.to(v.device)] for k, v in outputs.items() if k in _PER_QUERY_OUTPUTS}
    metadata = batch.find_metadatas[0]
    count = len(metadata.original_image_id)
    fields = {}
    for field in dataclasses.fields(metadata):
        value = getattr(metadata, field.name)
        if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == count:
            value = value[index.to(value.device)]
        elif isinstance(value, list) and len(value) == count:
            value = [value[i] for i in keep]
        fields[field.name] = value
    return selected, SimpleNamespace(find_metadatas=[dataclasses.replace(metadata, **fields)])


class PromptTypeEvaluator:
    """Route each query to the evaluators of its prompt type (see the module docstring).

    Args:
        make_evaluators: builds a fresh list of `CocoEvaluator`s on the split's ground truth.
    """

    def __init__(self, make_evaluators: Callable[[], list]):
        self.make_evaluators = make_evaluators
        self.text = make_evaluators()
        self.by_type: dict[str, list] = {}

    def reset(self) -> None:
        """Start a new evaluation pass."""
        for evaluator in self.text:
            evaluator.reset()
        self.by_type = {}

    @torch.no_grad()
    def update(self, sam3_output, batch) -> None:
        """Feed one batch's queries to the evaluators of their type."""
        outputs = final_predictions(sam3_output)
        types = query_prompt_types(batch)
        self._feed(self.text, outputs, batch, [q for q, t in enumerate(types) if t == "text"], len(types))
        if all(t == "text" for t in types):
            return
        positive = batch.find_targets[0].num_boxes.tolist()
        groups = {t: [q for q, kind in enumerate(types) if kind == t] for t in PROMPT_TYPES[1:]}
        groups["text"] = [q for q, kind in enumerate(types) if kind == "text" and positive[q] > 0]
        for prompt_type, keep in groups.items():
            if prompt_type not in self.by_type:
                self.by_type[prompt_type] = self.make_evaluators()
            self._feed(self.by_type[prompt_type], outputs, batch, keep, len(types))

    @staticmethod
    def _feed(evaluators: list, outputs: dict, batch, keep: list[int], count: int) -> None:
        if not keep:
            return
        selected, shim = (outputs, batch) if len(keep) == count else select_queries(outputs, batch, keep)
        for evaluator in evaluators:
            evaluator.update(selected, shim)

    def compute(self) -> dict[str, float]:
        """The text evaluators' keys unchanged, plus `<summary key>@<type>` for every type seen in this pass."""
        metrics = {k: v for evaluator in self.text for k, v in evaluator.compute().items()}
        for prompt_type, evaluators in self.by_type.items():
            typed = {k: v for evaluator in evaluators for k, v in evaluator.compute().items() if "/" not in k}
            metrics.update({f"{k}@{prompt_type}": v for k, v in typed.items()})
        return metrics
