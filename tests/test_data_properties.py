"""Property-based tests (hypothesis) of the COCO reader and validator.

Any mutation of a valid export (dropped / renamed fields, wrong types, NaN / negative / huge numbers, unicode
names, out-of-image polygons, duplicate ids, missing / corrupt images) either passes (possibly with repairs and
warnings) or fails setup with a `DataValidationError` whose problems name the mutated field. Nothing else is ever
raised, and a dataset that passed setup iterates to the end of an epoch (train and evaluation loaders) and its
repaired ground truth loads for evaluation.

Examples are derandomized (the same each run, so CI never flakes); for a wider hunt run
`HYPOTHESIS_PROFILE=hunt pytest tests/test_data_properties.py` (random examples, many more of them).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sam3_lora.data.datamodule import CocoDataModule
from sam3_lora.data.report import DataValidationError
from sam3_lora.data.shapes import write_shapes_dataset
from sam3_lora.evaluation import load_ground_truth
from sam3_lora.train import run
from tests.train_helpers import compose_config

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("hunt", max_examples=600, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

RESOLUTION = 56  # model input side: small, the transforms are what is exercised
SECTIONS = {  # the fields of each list of a COCO export
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox", "segmentation", "area", "iscrowd"),
    "categories": ("id", "name", "supercategory"),
}
WEIRD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6), st.just([]), st.just({}), st.lists(st.floats(allow_nan=True, allow_infinity=True),
                                                                  max_size=6),
    st.dictionaries(st.sampled_from(["size", "counts", "x"]), st.one_of(st.integers(-5, 5), st.text(max_size=4)),
                    max_size=2),
)
BAD_NUMBERS = st.sampled_from([math.nan, math.inf, -math.inf, -1, -1e9, 0, 1e308, 10**30, 2**63])
NAMES = st.text(st.characters(exclude_categories=["Cs"]), min_size=0, max_size=12)  # any unicode but surrogates
FILE_NAMES = st.text(st.characters(exclude_categories=["Cs", "Cc"], exclude_characters="/\\"), min_size=1,
                     max_size=12).filter(lambda n: n not in (".", ".."))


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A valid export: empty image, RLE, box-only and crowd annotations among 6 images (the shapes writer)."""
    root = write_shapes_dataset(tmp_path_factory.mktemp("template") / "shapes", style="target", num_train=6,
                                num_valid=0, num_test=0, image_size=[40, 56], progress=False)
    return root / "train"


# ----- mutations: each changes the json dict (and the image folder) and returns the field names it touched ------
def _named(section: str, key: str) -> set[str]:
    """Field names an error about `key` of a `section` entry may name: a changed image or category id shows up in
    the annotations that referred to it."""
    references = {"images": "image_id", "categories": "category_id"}
    return {key, references[section]} if key == "id" and section in references else {key}


def _entry(data, draw, section: str):
    entries = data.get(section)
    if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
        return None
    index = draw(st.integers(0, len(entries) - 1))
    return entries[index] if isinstance(entries[index], dict) else None


def drop_field(data, images, draw):
    section = draw(st.sampled_from(sorted(SECTIONS)))
    entry, key = _entry(data, draw, section), draw(st.sampled_from(SECTIONS[section]))
    if entry is not None:
        entry.pop(key, None)
    return _named(section, key)


def rename_field(data, images, draw):
    section = draw(st.sampled_from(sorted(SECTIONS)))
    entry, key = _entry(data, draw, section), draw(st.sampled_from(SECTIONS[section]))
    if entry is not None and key in entry:
        entry[draw(st.sampled_from([key.upper(), key + "_", "x"]))] = entry.pop(key)
    return _named(section, key)


def wrong_value(data, images, draw):
    section = draw(st.sampled_from(sorted(SECTIONS)))
    entry, key = _entry(data, draw, section), draw(st.sampled_from(SECTIONS[section]))
    if entry is not None:
        entry[key] = draw(WEIRD_VALUES)
    return _named(section, key)


def bad_number(data, images, draw):
    """NaN / inf / negative / huge in a numeric field, a box coordinate or a polygon coordinate."""
    where = draw(st.sampled_from(["image_size", "bbox", "polygon", "id", "area"]))
    value = draw(BAD_NUMBERS)
    section = "annotations"
    if where == "image_size":
        section, key = "images", draw(st.sampled_from(["width", "height"]))
        entry = _entry(data, draw, section)
    elif where == "id":
        section = draw(st.sampled_from(sorted(SECTIONS)))
        entry, key = _entry(data, draw, section), draw(st.sampled_from(
            [k for k in SECTIONS[section] if k.endswith("id")]))
    else:
        entry, key = _entry(data, draw, "annotations"), {"bbox": "bbox", "polygon": "segmentation"}.get(where, "area")
    if entry is None:
        return _named(section, key)
    target = entry.get(key)
    if where == "bbox" and isinstance(target, list) and target:
        target[draw(st.integers(0, len(target) - 1))] = value
    elif where == "polygon" and isinstance(target, list) and target and isinstance(target[0], list) and target[0]:
        target[0][draw(st.integers(0, len(target[0]) - 1))] = value
    elif where not in ("bbox", "polygon"):
        entry[key] = value
    return _named(section, key)


def polygon_outside(data, images, draw):
    entry = _entry(data, draw, "annotations")
    if entry is not None:
        offset = draw(st.sampled_from([-1000.0, 1000.0, 1e7]))
        entry["segmentation"] = [[offset, offset, offset + 50, offset, offset + 50, offset + 50]]
    return {"segmentation", "bbox"}


def bad_rle(data, images, draw):
    """An RLE of the right size whose counts are garbage (a string, or run lengths that do not add up)."""
    entry = _entry(data, draw, "annotations")
    image = _entry(data, draw, "images")
    if entry is not None and image is not None:
        size = [image.get("height"), image.get("width")]
        counts = draw(st.one_of(st.text(max_size=12), st.lists(st.integers(-3, 10**6), max_size=6)))
        entry["image_id"], entry["segmentation"] = image.get("id"), {"size": size, "counts": counts}
    return {"segmentation", "image_id"}


def duplicate_id(data, images, draw):
    section = draw(st.sampled_from(sorted(SECTIONS)))
    first, second = _entry(data, draw, section), _entry(data, draw, section)
    if first is not None and second is not None and "id" in second:
        first["id"] = second["id"]
    return _named(section, "id")


def unicode_name(data, images, draw):
    """A unicode category name, or a unicode image file name (the file renamed too, or not)."""
    if draw(st.booleans()):
        entry = _entry(data, draw, "categories")
        if entry is not None:
            entry["name"] = draw(NAMES)
        return {"name"}
    entry = _entry(data, draw, "images")
    if entry is not None and isinstance(entry.get("file_name"), str) and (images / entry["file_name"]).is_file():
        new_name = draw(FILE_NAMES)
        if draw(st.booleans()) and not (images / new_name).exists():
            (images / entry["file_name"]).rename(images / new_name)
        entry["file_name"] = new_name
    return {"file_name"}


def break_image_file(data, images, draw):
    """Delete an image, replace it by garbage, or cut it after its header (found only when decoded)."""
    files = sorted(p for p in images.iterdir() if p.suffix == ".jpg")
    if files:
        file = files[draw(st.integers(0, len(files) - 1))]
        how = draw(st.sampled_from(["delete", "garbage", "truncate"]))
        if how == "delete":
            file.unlink()
        elif how == "garbage":
            file.write_bytes(draw(st.binary(max_size=64)))
        else:
            file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    return {"file_name"}


def break_top_level(data, images, draw):
    key = draw(st.sampled_from(["images", "annotations", "categories"]))
    if draw(st.booleans()):
        data.pop(key, None)
    else:
        data[key] = draw(WEIRD_VALUES)
    return {key}


MUTATIONS = [drop_field, rename_field, wrong_value, bad_number, polygon_outside, bad_rle, duplicate_id,
             unicode_name, break_image_file]


# ----- the property -----------------------------------------------------------------------------------------------
def _export(template: Path, tmp: Path) -> tuple[dict, Path]:
    split = tmp / "split"
    if split.exists():
        shutil.rmtree(split)
    shutil.copytree(template, split)
    return json.loads((split / "_annotations.coco.json").read_text()), split


def _datamodule(split: Path) -> CocoDataModule:
    # the mutated split serves as train and valid: both code paths (augmented training, chunked evaluation) run
    annotation_file = str(split / "_annotations.coco.json")
    return CocoDataModule(root=str(split.parent), resolution=RESOLUTION, batch_size=2, eval_batch_size=3,
                          num_workers=0, num_negatives="all", train_ann=annotation_file, valid_ann=annotation_file,
                          cache_dir=str(split.parent / "gt"), persistent_workers=False)


def check_export(split: Path, data: dict, touched: set[str]) -> str:
    """Write `data`, set a DataModule up on it and run an epoch; return "passed" or "refused"."""
    (split / "_annotations.coco.json").write_text(json.dumps(data))  # NaN/Infinity as the JSON extensions
    datamodule = _datamodule(split)
    try:
        datamodule.setup("fit")
    except DataValidationError as err:
        named = [p for p in err.problems  # "field 'key'", or a list entry "images[3]"
                 if any(f"'{key}'" in p.message or f"{key}[" in p.message for key in touched)]
        assert named, f"no fatal problem names any of the fields {sorted(touched)}:\n{err}"
        return "refused"
    batches = sum(1 for _ in datamodule.train_dataloader()) + sum(1 for _ in datamodule.val_dataloader())
    assert batches >= 1
    load_ground_truth(datamodule.annotation_file("valid"))
    return "passed"


@settings(parent=PROFILE)
@given(data=st.data())
def test_any_mutation_passes_or_is_refused_naming_the_field(template, tmp_path, data):
    coco, split = _export(template, tmp_path)
    touched: set[str] = set()
    for mutation in data.draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3)):
        touched |= mutation(coco, split, data.draw)
    check_export(split, coco, touched)


@settings(parent=PROFILE)
@given(data=st.data())
def test_broken_top_level_is_refused_naming_the_list(template, tmp_path, data):
    coco, split = _export(template, tmp_path)
    touched = break_top_level(coco, split, data.draw)
    outcome = check_export(split, coco, touched)
    assert outcome == "refused" or "annotations" in touched  # a split of pure negatives may omit annotations


def test_the_unmutated_template_passes(template, tmp_path):
    coco, split = _export(template, tmp_path)
    assert check_export(split, coco, set()) == "passed"


# ----- what hypothesis found (each crashed before the fix), pinned ------------------------------------------------
def _first(data, section):
    return data[section][1]  # the second entry (the first image has no annotation)


FOUND = {
    "list as category_id (TypeError: unhashable)": (lambda d: _first(d, "annotations").update(category_id=[]),
                                                    "refused"),
    "list as image_id (TypeError: unhashable)": (lambda d: _first(d, "annotations").update(image_id=[]), "passed"),
    "list as annotation id (TypeError in renumbering)": (lambda d: _first(d, "annotations").update(id=[1]),
                                                         "passed"),
    "image id 10**30 (OverflowError in sam3's collate)": (lambda d: _first(d, "images").update(id=10**30),
                                                          "refused"),
    "string image id (TypeError sorting records)": (lambda d: _first(d, "images").update(id="a"), "refused"),
    "width 10**9 (rasterising polygons exhausts memory)": (lambda d: _first(d, "images").update(width=10**9),
                                                           "refused"),
    "polygon at 1e12 (pycocotools allocates per edge pixel)": (
        lambda d: _first(d, "annotations").update(segmentation=[[1e12, 0, 1e12, 5, 0, 5]]), "passed"),
    "undecodable RLE string (ValueError mid-epoch)": (
        lambda d: _first(d, "annotations").update(segmentation={"size": [_first(d, "images")["height"],
                                                                         _first(d, "images")["width"]],
                                                                "counts": "\x80"},
                                                  image_id=_first(d, "images")["id"]), "passed"),
    "empty images list (an epoch of zero batches)": (lambda d: d.update(images=[]), "refused"),
}


@pytest.mark.parametrize("case", sorted(FOUND))
def test_cases_hypothesis_found(template, tmp_path, case):
    mutate, expected = FOUND[case]
    coco, split = _export(template, tmp_path)
    mutate(coco)
    assert check_export(split, coco, {"id", "image_id", "category_id", "width", "images"}) == expected


def test_corrupt_training_images_are_skipped_and_counted_in_metrics_json(tmp_path):
    root = write_shapes_dataset(tmp_path / "shapes", style="target", num_train=8, num_valid=2, num_test=0,
                                progress=False)
    image = sorted((root / "train").glob("*.jpg"))[5]
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])  # header intact: passes setup, fails decoding
    run(compose_config(root, tmp_path / "out", ["validate_before_fit=false", "test=false", "trainer.max_epochs=2",
                                                "+trainer.limit_val_batches=0"]))
    training = json.loads((tmp_path / "out/metrics.json").read_text())["training"]
    assert training == {"skipped_images": 2, "skipped_steps": 0}  # met once per epoch, replaced by the next image
