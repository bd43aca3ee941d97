"""What `sam3-lora check-data ROOT` reports: every split validated the way training would, as text (cli.py prints it)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from sam3_lora.data.coco import CocoSplit, read_splits, resolve_split_paths


def category_table(split: CocoSplit) -> list[str]:
    """Rows 'id name | instances | with mask | box-only | crowd' for the split's kept categories."""
    counts: dict[str, Counter] = {k: Counter() for k in ("instances", "mask", "box", "crowd")}
    for record in split.records:
        for inst in record.instances:
            if inst.is_crowd:
                counts["crowd"][inst.category_id] += 1
                continue
            counts["instances"][inst.category_id] += 1
            counts["mask" if inst.segmentation is not None else "box"][inst.category_id] += 1
    width = max([len(f"{i} {n}") for i, n in split.categories.items()] + [len("category")])
    rows = [f"  {'category':<{width}} {'instances':>9} {'masks':>7} {'boxes-only':>10} {'crowd':>6}"]
    for category_id, name in split.categories.items():
        rows.append(f"  {f'{category_id} {name}':<{width}} {counts['instances'][category_id]:>9} "
                    f"{counts['mask'][category_id]:>7} {counts['box'][category_id]:>10} "
                    f"{counts['crowd'][category_id]:>6}")
    return rows


def split_summary(split: CocoSplit) -> str:
    """The printed block of one split: sizes, the category table, problems."""
    negatives = sum(1 for r in split.records if not r.targets)
    lines = [f"== {split.name}: {split.paths.annotation_file}"]
    if split.records or not split.report.fatal:
        lines.append(f"  images: {len(split.records)} ({negatives} without objects: pure negatives)")
        lines.extend(category_table(split))
    for category_id, name in split.dropped_categories.items():
        lines.append(f"  dropped category {category_id} '{name}': Roboflow's empty background category")
    counts = {s: len(split.report.of(s)) for s in ("fatal", "repaired", "warning")}
    lines.append(f"  problems: {counts['fatal']} fatal, {counts['repaired']} repaired, {counts['warning']} warnings")
    lines.extend(f"  {line}" for line in split.report.summary_lines())
    return "\n".join(lines)


def check_data(root: str | Path, drop_background_category: bool = True, decode_images: bool = True
               ) -> dict[str, CocoSplit]:
    """Validate a Roboflow-layout dataset the way training would (`read_splits`) and return its splits.

    Args:
        root: dataset root.
        drop_background_category: as `data.drop_background_category`.
        decode_images: decode every image fully (finds files corrupt past their header).
    """
    return read_splits(resolve_split_paths(Path(root)), drop_background_category, decode_images)


def check_data_report(splits: dict[str, CocoSplit]) -> tuple[str, bool]:
    """The check-data text (each split's summary, then a verdict) and whether training can use the data."""
    lines = [split_summary(split) for split in splits.values()]
    fatal = sum(len(s.report.fatal) for s in splits.values())
    repaired = sum(len(s.report.of("repaired")) for s in splits.values())
    if fatal:
        lines.append(f"FAILED: {fatal} fatal problem(s); training would stop. Fix them and rerun check-data.")
    else:
        lines.append(f"OK: {', '.join(splits)} usable ({repaired} annotation repair(s) will be applied automatically).")
    return "\n".join(lines), not fatal
