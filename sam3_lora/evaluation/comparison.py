"""Zero-shot vs fine-tuned: a side-by-side table of COCO numbers with per-class deltas."""

from __future__ import annotations

import re

from sam3_lora.evaluation.coco_eval import MISSING

_STAGE_PREFIX = re.compile(r"^(val|test|validate|zero_shot|fine_tuned)/")


def metric_name(key: str) -> str:
    """Strip a stage prefix (`val/`, `test/`) so numbers logged by different stages line up."""
    return _STAGE_PREFIX.sub("", key)


def comparison_rows(zero_shot: dict, fine_tuned: dict) -> list[tuple[str, float | None, float | None]]:
    """Align two metric dicts by name: summary numbers first (logged order), then per-class AP (sorted).

    Only COCO numbers take part (`{bbox,segm}_…`); losses and other scalars are left out. A value missing
    from one side, or COCO's -1 ("not measurable"), is None.
    """
    zero = {metric_name(k): float(v) for k, v in zero_shot.items() if _is_coco_metric(k)}
    tuned = {metric_name(k): float(v) for k, v in fine_tuned.items() if _is_coco_metric(k)}
    names = list(dict.fromkeys([*zero, *tuned]))
    summary = [n for n in names if "/" not in n]
    per_class = sorted(n for n in names if "/" in n)
    return [(n, _value(zero.get(n)), _value(tuned.get(n))) for n in summary + per_class]


def _is_coco_metric(key: str) -> bool:
    return metric_name(key).startswith(("bbox_", "segm_"))


def _value(value: float | None) -> float | None:
    return None if value is None or value == MISSING else value


def format_comparison(zero_shot: dict, fine_tuned: dict) -> str:
    """Render zero-shot and fine-tuned COCO numbers side by side with their difference.

    Args:
        zero_shot: metrics of the base model (keys like `test/bbox_mAP50`, `val/segm_AP/crack` or unprefixed).
        fine_tuned: metrics of the adapted model on the same split.

    Returns:
        A fixed-width table: one line per summary number, then one per class AP, each with the delta
        (fine-tuned − zero-shot); "n/a" where a side is missing or not measurable.
    """
    rows = comparison_rows(zero_shot, fine_tuned)
    if not rows:
        return "no COCO metrics to compare"
    width = max(len("metric"), *(len(name) for name, _, _ in rows))
    lines = [f"{'metric':<{width}}  {'zero-shot':>9}  {'fine-tuned':>10}  {'delta':>7}"]
    for name, zero, tuned in rows:
        delta = None if zero is None or tuned is None else tuned - zero
        lines.append(f"{name:<{width}}  {_fmt(zero):>9}  {_fmt(tuned):>10}  {_fmt(delta, signed=True):>7}")
    return "\n".join(lines)


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"
