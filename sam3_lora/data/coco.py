"""Read one COCO split (Roboflow layout or explicit paths) into validated per-image records.

`read_split` = parse json → validate/repair (validation.py) → pycocotools index → `ImageRecord`s. The cleaned
json is the split's final ground truth, the only one evaluation reads: repairs applied, annotation ids ≥ 1, areas
filled, background category dropped, and (`read_splits`) an evaluation split's categories are train's.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from pycocotools.coco import COCO

from sam3_lora.data import validation
from sam3_lora.data.report import ValidationReport

log = logging.getLogger(__name__)

ROBOFLOW_ANNOTATION_FILE = "_annotations.coco.json"


@dataclass(frozen=True)
class SplitPaths:
    """Where one split lives: its annotation json and the folder its `file_name`s are relative to."""

    annotation_file: Path
    image_dir: Path

    @classmethod
    def roboflow(cls, root: str | Path, split: str) -> SplitPaths:
        """Roboflow's layout: ROOT/<split>/_annotations.coco.json next to the images."""
        folder = Path(root) / split
        return cls(folder / ROBOFLOW_ANNOTATION_FILE, folder)


@dataclass(frozen=True)
class Instance:
    """One annotation, repaired and ready to rasterise.

    Attributes:
        bbox: COCO [x, y, w, h] in original pixels, inside the image.
        segmentation: polygons or RLE (pycocotools formats), or None for a box-only annotation.
        is_crowd: COCO crowd region: never a training target, ignored regions in evaluation.
    """

    annotation_id: int
    category_id: int
    bbox: tuple[float, float, float, float]
    segmentation: list | dict | None
    is_crowd: bool


@dataclass(frozen=True)
class ImageRecord:
    """One image and its instances; `apply_exif` says whether the annotations refer to EXIF-rotated pixels."""

    image_id: int
    path: Path
    width: int
    height: int
    apply_exif: bool
    instances: tuple[Instance, ...]

    @property
    def targets(self) -> tuple[Instance, ...]:
        """The instances that are training targets (everything but crowd regions)."""
        return tuple(i for i in self.instances if not i.is_crowd)


@dataclass
class CocoSplit:
    """A validated split.

    Attributes:
        categories: kept category id → name, in id order (Roboflow's empty background category dropped).
        records: one per usable image, including images without annotations (pure negatives).
        report: everything found while reading, with severities.
        clean_dataset: the final ground truth (what `write_clean_json` writes and evaluation loads).
        dropped_categories: id → name of the background categories that were dropped.
    """

    name: str
    paths: SplitPaths
    categories: dict[int, str]
    records: list[ImageRecord]
    report: ValidationReport
    clean_dataset: dict = field(repr=False)
    dropped_categories: dict[int, str] = field(default_factory=dict)

    def write_clean_json(self, path: Path) -> Path:
        """Write the final ground truth (what evaluation loads, unchanged) and return the path."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.clean_dataset), encoding="utf-8")
        return path


def resolve_split_paths(root: str | Path, explicit: dict[str, tuple[str | None, str | None]] | None = None
                        ) -> dict[str, SplitPaths]:
    """Paths of train, valid and (when present or given) test: Roboflow layout unless overridden.

    Args:
        root: dataset root (Roboflow layout).
        explicit: split → (annotation file or None, image folder or None); an annotation file without an image
            folder means the images sit next to it.
    """
    paths = {}
    for name in ("train", "valid", "test"):
        ann, images = (explicit or {}).get(name, (None, None))
        default = SplitPaths.roboflow(root, name)
        annotation_file = Path(ann) if ann else default.annotation_file
        image_dir = Path(images) if images else (annotation_file.parent if ann else default.image_dir)
        paths[name] = SplitPaths(annotation_file, image_dir)
    if not (explicit or {}).get("test", (None, None))[0] and not paths["test"].annotation_file.exists():
        del paths["test"]  # test is optional in the Roboflow layout
    return paths


def read_splits(paths: dict[str, SplitPaths], drop_background_category: bool = True,
                decode_images: bool = False) -> dict[str, CocoSplit]:
    """Read every split; evaluation splits must use train's categories and get them as ground truth.

    See `read_split`; `check_same_categories` reports conflicts, `_use_train_categories` sets the categories.
    """
    splits = {name: read_split(p, name, drop_background_category, decode_images) for name, p in paths.items()}
    for name, split in splits.items():
        if name != "train" and "train" in splits and not split.report.fatal:
            check_same_categories(splits["train"], split)
            _use_train_categories(split, splits["train"])
    return splits


def _use_train_categories(split: CocoSplit, train: CocoSplit) -> None:
    """Make the split's ground-truth categories exactly train's, the categories that are queried.

    A category only this split lists (never annotated, or `check_same_categories` reported it) is not evaluated;
    a train category this split lacks is still evaluated (COCO reports -1 for it when it has no ground truth).
    """
    own = {c["id"]: c for c in split.clean_dataset["categories"]}
    split.clean_dataset["categories"] = [own.get(i, {"id": i, "name": name}) for i, name in train.categories.items()]


def read_split(paths: SplitPaths, name: str, drop_background_category: bool = True,
               decode_images: bool = False) -> CocoSplit:
    """Read, validate and repair one split. Never raises for data problems: they are in `split.report`.

    Args:
        paths: annotation json + image folder.
        name: split name used in messages ("train", "valid", "test").
        drop_background_category: drop Roboflow's empty category with supercategory "none".
        decode_images: fully decode every image while checking (else only headers are read).

    Returns:
        The split; when `split.report.fatal` is non-empty its records are not trustworthy.
    """
    report = ValidationReport()
    data = validation.load_annotation_json(paths.annotation_file, report)
    if data is None:
        return CocoSplit(name, paths, {}, [], report, {})
    file = paths.annotation_file
    images = validation.index_images(data["images"], file, report)
    categories = validation.index_categories(data["categories"], file, report)
    annotations = validation.clean_annotations(data["annotations"], images, categories, file, report)
    kept = _drop_background(categories, annotations) if drop_background_category else categories
    dropped = {i: c["name"] for i, c in categories.items() if i not in kept}
    categories = kept
    validation.warn_unused_categories(categories, annotations, file, report)
    apply_exif = validation.check_image_files(images, paths.image_dir, file, report, decode_images)
    clean = {**data, "images": list(images.values()), "annotations": annotations,
             "categories": [categories[i] for i in sorted(categories)]}
    records = _records(clean, apply_exif, paths.image_dir)
    _log_report(name, report)
    return CocoSplit(name, paths, {i: categories[i]["name"] for i in sorted(categories)}, records, report, clean,
                     dropped)


def _drop_background(categories: dict[int, dict], annotations: list[dict]) -> dict[int, dict]:
    dropped = validation.background_categories(categories, annotations)
    for category_id in dropped:
        log.info("dropping category id %s ('%s'): Roboflow's empty background category (supercategory 'none')",
                 category_id, categories[category_id]["name"])
    return {i: c for i, c in categories.items() if i not in dropped}


def _records(clean: dict, apply_exif: dict[int, bool], image_dir: Path) -> list[ImageRecord]:
    index = _coco_index(clean)
    records = []
    for image_id in sorted(apply_exif):
        image = index.imgs[image_id]
        instances = tuple(_instance(a) for a in index.imgToAnns[image_id])
        records.append(ImageRecord(image_id, image_dir / image["file_name"], image["width"], image["height"],
                                   apply_exif[image_id], instances))
    return records


def _coco_index(clean: dict) -> COCO:
    coco = COCO()
    coco.dataset = clean
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        coco.createIndex()
    return coco


def _instance(ann: dict) -> Instance:
    return Instance(ann["id"], ann["category_id"], tuple(ann["bbox"]), ann["segmentation"] or None,
                    bool(ann["iscrowd"]))


def _log_report(name: str, report: ValidationReport) -> None:
    counts = {s: len(report.of(s)) for s in ("fatal", "repaired", "warning")}
    if any(counts.values()):
        log.warning("split '%s': %d fatal, %d repaired, %d warning(s)\n%s", name, counts["fatal"],
                    counts["repaired"], counts["warning"], "\n".join(report.summary_lines()))


def check_same_categories(train: CocoSplit, other: CocoSplit) -> None:
    """Queries come from train's categories: an evaluation split must use the same ids for the same names.

    Adds fatal problems to `other.report` for categories whose name differs from train's, and for annotations
    of categories that train does not have (they could never be predicted).
    """
    file = other.paths.annotation_file
    for category_id, name in other.categories.items():
        if category_id in train.categories and train.categories[category_id] != name:
            other.report.add("fatal", "category_mismatch", file, f"category id {category_id} field 'name' is "
                             f"'{name}' here but '{train.categories[category_id]}' in train; use one id per name")
    unknown = {i.category_id for r in other.records for i in r.instances} - set(train.categories)
    for category_id in sorted(unknown):
        other.report.add("fatal", "category_mismatch", file, f"category id {category_id} "
                         f"('{other.categories.get(category_id)}') is annotated here but not in train's "
                         f"categories {train.categories}; every evaluated category must be trained")
