"""SAM3's own training loss (matchers + loss terms) at Meta's fine-tuning weights (DESIGN §5)."""

from __future__ import annotations

from sam3.train.loss.loss_fns import Boxes, IABCEMdetr, Masks
from sam3.train.loss.sam3_loss import Sam3LossWrapper
from sam3.train.matcher import BinaryHungarianMatcherV2, BinaryOneToManyMatcher

from sam3_lora import compat  # noqa: F401  (its import switches sam3's focal loss to the torch path)


# Mask2Former's point sampling (sam3's `Masks` implements it): 3x oversampling, 75 % of the points where the
# prediction is most uncertain, the rest uniform.
OVERSAMPLE_RATIO = 3.0
IMPORTANCE_SAMPLE_RATIO = 0.75


def build_matcher() -> BinaryHungarianMatcherV2:
    """Meta's one-to-one Hungarian matcher (sam3/model_builder.py:_create_sam3_model), shared by the model
    (which matches inside its training forward) and the loss."""
    return BinaryHungarianMatcherV2(focal=True, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0,
                                    alpha=0.25, gamma=2, stable=False)


def build_sam3_loss(with_masks: bool, normalization: str = "local", mask_points: int | None = None) -> Sam3LossWrapper:
    """Build `Sam3LossWrapper` with Meta's matchers and weights.

    Args:
        with_masks: add the mask focal + dice terms (only when the model has a mask head and the data
            has masks).
        normalization: "global" all-reduces the box count (needs a process group: DDP), "local" otherwise.
        mask_points: compute the mask losses on this many sampled points per mask (sam3's
            `Masks(num_sample_points, oversample_ratio, importance_sample_ratio)`) instead of on every pixel of
            the predicted masks upsampled to the input size; None = full resolution (Meta's recipe).

    Returns:
        A loss module mapping (model outputs, back-converted targets) to a dict with `core_loss`.
    """
    terms = [
        IABCEMdetr(
            weight_dict={"loss_ce": 20.0, "presence_loss": 20.0},
            pos_weight=10.0, alpha=0.25, gamma=2, use_presence=True, pos_focal=False,
            pad_n_queries=None, pad_scale_pos=1.0,
        ),
        Boxes(weight_dict={"loss_bbox": 5.0, "loss_giou": 2.0}),
    ]
    if with_masks:
        if mask_points is not None and mask_points < 1:
            raise ValueError(f"module.mask_loss_points={mask_points}: give a positive number of points or null")
        sampling = {} if mask_points is None else {
            "num_sample_points": int(mask_points), "oversample_ratio": OVERSAMPLE_RATIO,
            "importance_sample_ratio": IMPORTANCE_SAMPLE_RATIO}
        terms.append(Masks(weight_dict={"loss_mask": 200.0, "loss_dice": 10.0},
                           focal_alpha=0.25, focal_gamma=2.0, compute_aux=False, **sampling))
    return Sam3LossWrapper(
        loss_fns_find=terms,
        normalization=normalization,
        matcher=build_matcher(),
        o2m_matcher=BinaryOneToManyMatcher(alpha=0.3, threshold=0.4, topk=4),
        o2m_weight=2.0,
        use_o2m_matcher_on_o2m_aux=False,
        normalize_by_valid_object_num=False,
        scale_by_find_batch_size=True,
    )
