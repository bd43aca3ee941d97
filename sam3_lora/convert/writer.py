"""Write converted images as a Roboflow-layout COCO export: OUT_ROOT/<split>/_annotations.coco.json + the images.

Category ids are 1..N in the source's class order (no Roboflow background category: nothing to drop); image and
annotation ids start at 1 per split; images are copied under their own file name (a clash within a split gets a
numeric suffix). The export is written to a temporary sibling folder and renamed, so a failed conversion never
leaves a half-written dataset at OUT_ROOT.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from sam3_lora.convert.common import Annotation, ConversionError, SkipReport, SourceDataset, SourceImage
from sam3_lora.convert.splits import SPLITS, SplitRatios, assign_splits
from sam3_lora.data import masks
from sam3_lora.data.coco import ROBOFLOW_ANNOTATION_FILE

log = logging.getLogger(__name__)


@dataclass
class ConversionResult:
    """What a conversion wrote and what it left out.

    Attributes:
        out_root: the written dataset (Roboflow layout).
        categories: category id → name, as written.
        counts: split → {"images": n, "annotations": n, "box_only": n, "crowd": n} for every written split.
        split_origin: where the splits came from (the source's, or made by ratios and seed).
        skipped: every item that was not converted, with the reason.
    """

    out_root: Path
    categories: dict[int, str]
    counts: dict[str, dict[str, int]]
    split_origin: str
    skipped: SkipReport = field(default_factory=SkipReport)


def write_export(dataset: SourceDataset, out_root: str | Path, ratios: SplitRatios, seed: int,
                 skipped: SkipReport) -> ConversionResult:
    """Assign splits and write the export.

    Args:
        dataset: what a format reader produced.
        out_root: folder to create; must not exist.
        ratios / seed: used for images without a source split (see splits.py).
        skipped: the reader's skip report (returned in the result).

    Raises:
        ConversionError: `out_root` exists, or the train split would be empty.
    """
    out_root = Path(out_root)
    if out_root.exists():
        raise ConversionError(f"{out_root} already exists; delete it or choose another folder")
    splits, origin = assign_splits(dataset.images, ratios, seed)
    if not splits["train"]:
        raise ConversionError(f"no image to put in train ({origin}; {len(skipped.items)} item(s) skipped); see the "
                              "skip report and the expected layout in the README")
    category_ids = {name: i for i, name in enumerate(dataset.categories, start=1)}
    tmp = out_root.with_name(f".{out_root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        counts = {name: _write_split(splits[name], tmp / name, category_ids) for name in SPLITS
                  if splits[name] or name != "test"}  # valid is written even when empty: check-data expects it
        out_root.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written export behind
        raise
    log.info("wrote %s (%s)", out_root, origin)
    return ConversionResult(out_root, {i: n for n, i in category_ids.items()}, counts, origin, skipped)


def _write_split(images: list[SourceImage], folder: Path, category_ids: dict[str, int]) -> dict[str, int]:
    folder.mkdir(parents=True)
    coco: dict = {"info": {"description": "converted by sam3-lora convert"},
                  "categories": [{"id": i, "name": n, "supercategory": "object"} for n, i in category_ids.items()],
                  "images": [], "annotations": []}
    used_names: set[str] = set()
    for image_id, image in enumerate(images, start=1):
        file_name = _unique_name(image.path, used_names)
        shutil.copy2(image.path, folder / file_name)
        coco["images"].append({"id": image_id, "file_name": file_name, "width": image.width,
                               "height": image.height})
        for ann in image.annotations:
            coco["annotations"].append(_coco_annotation(len(coco["annotations"]) + 1, image_id, ann, image,
                                                        category_ids))
    (folder / ROBOFLOW_ANNOTATION_FILE).write_text(json.dumps(coco), encoding="utf-8")
    anns = coco["annotations"]
    return {"images": len(images), "annotations": len(anns),
            "box_only": sum(1 for a in anns if not a["segmentation"]), "crowd": sum(a["iscrowd"] for a in anns)}


def _unique_name(path: Path, used: set[str]) -> str:
    name, suffix = path.name, 1
    while name.lower() in used:  # lower(): case-insensitive file systems would merge them
        name = f"{path.stem}_{suffix}{path.suffix}"
        suffix += 1
    used.add(name.lower())
    return name


def _coco_annotation(ann_id: int, image_id: int, ann: Annotation, image: SourceImage,
                     category_ids: dict[str, int]) -> dict:
    if ann.segmentation:
        area = masks.segmentation_area(ann.segmentation, image.height, image.width)
    else:
        area = ann.bbox[2] * ann.bbox[3]
    return {"id": ann_id, "image_id": image_id, "category_id": category_ids[ann.category],
            "bbox": [round(float(v), 3) for v in ann.bbox], "area": float(area),
            "segmentation": ann.segmentation or [], "iscrowd": int(ann.is_crowd)}
