"""`sam3-lora check-data ROOT`: validate every split the way training would and print a per-split summary."""

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


def check_data_main(root: str, train_ann: str | None = None, train_images: str | None = None,
                    valid_ann: str | None = None, valid_images: str | None = None, test_ann: str | None = None,
                    test_images: str | None = None, drop_background_category: bool = True,
                    decode_images: bool = True) -> int:
    """Validate a dataset (Roboflow layout under `root`, or explicit split paths) and print the summary.

    Args:
        root: dataset root.
        train_ann ... test_images: explicit split paths (see `resolve_split_paths`).
        drop_background_category: as `data.drop_background_category`.
        decode_images: decode every image fully (finds files corrupt past their header).

    Returns:
        0 when no split has a fatal problem, else 1.
    """
    explicit = {"train": (train_ann, train_images), "valid": (valid_ann, valid_images),
                "test": (test_ann, test_images)}
    splits = read_splits(resolve_split_paths(Path(root), explicit), drop_background_category, decode_images)
    for split in splits.values():
        print(split_summary(split))
    fatal = sum(len(s.report.fatal) for s in splits.values())
    repaired = sum(len(s.report.of("repaired")) for s in splits.values())
    if fatal:
        print(f"FAILED: {fatal} fatal problem(s); training would stop. Fix them and rerun check-data.")
        return 1
    print(f"OK: {', '.join(splits)} usable ({repaired} annotation repair(s) will be applied automatically).")
    return 0
