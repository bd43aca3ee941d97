"""`sam3-lora convert` on small hand-written sources: skip reports, layouts, class tables, VOC options, splits."""

from __future__ import annotations

import json
import random
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam3_lora.cli import main
from sam3_lora.convert import ConversionError, SplitRatios, convert_dataset
from sam3_lora.convert.common import SourceImage
from sam3_lora.convert.masks import class_of_mask_file
from sam3_lora.convert.splits import assign_splits
from sam3_lora.data.coco import ROBOFLOW_ANNOTATION_FILE, read_splits, resolve_split_paths
from sam3_lora.data.masks import decode_mask
from tests.data_fixtures import write_image

W, H = 64, 48


def exported(root: Path) -> dict:
    """split → the written COCO dict."""
    return {p.parent.name: json.loads(p.read_text()) for p in root.glob(f"*/{ROBOFLOW_ANNOTATION_FILE}")}


def write_label(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def write_png(path: Path, values: np.ndarray, palette: bool = False) -> None:
    """Save an array as PNG; `palette`: a palette image whose indices are the values (as VOC's masks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(values)
    if palette:  # distinct colours: Pillow re-indexes a palette PNG whose colours repeat
        image = image.convert("P")
        image.putpalette([v for i in range(256) for v in (i, 255 - i, (i * 7) % 256)])
    image.save(path)


# ---------------------------------------------------------------- YOLO


def test_yolo_reports_every_skipped_line_and_image(tmp_path, capsys):
    src = tmp_path / "yolo"
    (src / "data.yaml").parent.mkdir()
    (src / "data.yaml").write_text("train: images/train\nval: images/val\nnames: {0: cat, 1: dog}\n")
    write_image(src / "images/train/a.jpg", W, H)
    write_label(src / "labels/train/a.txt", [
        "0 0.5 0.5 0.25 0.5",              # box → kept
        "1 0.1 0.1 0.4 0.1 0.4 0.5",       # triangle → kept
        "7 0.5 0.5 0.1 0.1",               # class 7 not in names
        "0 0.1 0.1 0.2 0.2 0.3 0.3",       # collinear: covers no pixel
        "0 0.5 0.5",                       # too few numbers
        "1 0.5 0.5 1.5 0.2",               # not normalised
        "x 0.5 0.5 0.1 0.1",               # not a number
        "nan 0.5 0.5 0.1 0.1",             # not finite
        "",
    ])
    (src / "images/train/broken.jpg").write_bytes(b"not an image")
    write_image(src / "images/val/c.jpg", W, H)  # no label file: a background image
    result = convert_dataset("yolo", src, tmp_path / "out")
    assert result.skipped.counts() == {"malformed_line": 3, "unknown_class": 1, "empty_polygon": 1,
                                       "coordinates_out_of_range": 1, "unreadable_image": 1}
    unknown = [s for s in result.skipped.items if s.kind == "unknown_class"][0]
    assert unknown.where.endswith("labels/train/a.txt:3") and "class id 7" in unknown.reason
    assert result.counts["train"]["images"] == 1 and result.counts["train"]["annotations"] == 2
    assert result.counts["valid"] == {"images": 1, "annotations": 0, "box_only": 0, "crowd": 0}
    assert result.categories == {1: "cat", 2: "dog"}
    train = exported(tmp_path / "out")["train"]
    box, triangle = train["annotations"]
    assert box["bbox"] == [24.0, 12.0, 16.0, 24.0] and box["segmentation"] == []
    assert triangle["bbox"] == pytest.approx([6.4, 4.8, 19.2, 19.2]) and triangle["category_id"] == 2
    assert "test" not in exported(tmp_path / "out")  # the source has no test split

    assert main(["convert", "yolo", str(src), str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out
    assert "skipped: 7 item(s)" in printed and "malformed_line x3" in printed and "labels/train/a.txt:3" in printed
    assert main(["check-data", str(tmp_path / "cli")]) == 0


def test_yolo_roboflow_paths_one_level_too_high_are_found(tmp_path):
    src = tmp_path / "rf"
    (src / "data.yaml").parent.mkdir()
    (src / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\nnc: 1\nnames: ['hard hat']\n")
    for split in ("train", "valid"):
        write_image(src / split / "images" / f"{split}.jpg", W, H)
        write_label(src / split / "labels" / f"{split}.txt", ["0 0.5 0.5 0.5 0.5"])
    result = convert_dataset("yolo", src / "data.yaml", tmp_path / "out")
    assert result.split_origin == "splits from the source (train/valid)"
    assert {s: c["annotations"] for s, c in result.counts.items()} == {"train": 1, "valid": 1}


def test_yolo_txt_list_without_val_is_split_by_ratios(tmp_path):
    src = tmp_path / "list"
    for i in range(10):
        write_image(src / "images" / f"im{i}.jpg", W, H)
        write_label(src / "labels" / f"im{i}.txt", ["0 0.5 0.5 0.2 0.2"])
    (src / "train.txt").write_text("".join(f"./images/im{i}.jpg\n" for i in range(10)))
    (src / "data.yaml").write_text("path: .\ntrain: train.txt\nnames: [cat]\n")
    result = convert_dataset("yolo", src, tmp_path / "out")
    assert {s: c["images"] for s, c in result.counts.items()} == {"train": 8, "valid": 1, "test": 1}
    assert "10 image(s) split by ratios 0.8/0.1/0.1 (seed 0)" in result.split_origin


def test_yolo_errors_name_the_problem(tmp_path, capsys):
    src = tmp_path / "pose"
    src.mkdir()
    (src / "data.yaml").write_text("train: images\nnames: [person]\nkpt_shape: [17, 3]\n")
    assert main(["convert", "yolo", str(src), str(tmp_path / "out")]) == 1
    assert "pose (keypoint) dataset" in capsys.readouterr().out
    (src / "data.yaml").write_text("train: missing_folder\nnames: [person]\n")
    with pytest.raises(ConversionError, match="field 'train' = 'missing_folder'"):
        convert_dataset("yolo", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- mask PNGs


def test_label_maps_give_one_object_per_region_with_exact_masks(tmp_path):
    src = tmp_path / "maps"
    write_image(src / "images/a.png", 40, 30)
    write_image(src / "images/b.png", 40, 30)  # no mask: a background image
    labels = np.zeros((30, 40), np.uint8)
    labels[2:8, 2:8] = 1      # cat
    labels[2:8, 20:28] = 1    # a second, separate cat
    labels[15:25, 5:15] = 2   # dog
    labels[0:2, :] = 255      # ignore (void)
    labels[28:30, 30:40] = 7  # a value the table does not know
    write_png(src / "masks/a.png", labels)
    (src / "classes.json").write_text(json.dumps({"classes": ["cat", "dog"], "ignore": [255]}))
    result = convert_dataset("masks", src, tmp_path / "out")
    assert result.categories == {1: "cat", 2: "dog"}
    assert result.skipped.counts() == {"unknown_class": 1}
    assert "pixel value 7 (20 px)" in result.skipped.items[0].reason
    records = [r for s in read_splits(resolve_split_paths(tmp_path / "out")).values() for r in s.records]
    (record,) = [r for r in records if r.path.name == "a.png"]
    masks = {(i.category_id, tuple(i.bbox)): decode_mask(i.segmentation, 30, 40) for i in record.instances}
    assert set(masks) == {(1, (2.0, 2.0, 6.0, 6.0)), (1, (20.0, 2.0, 8.0, 6.0)), (2, (5.0, 15.0, 10.0, 10.0))}
    np.testing.assert_array_equal(masks[(2, (5.0, 15.0, 10.0, 10.0))], labels == 2)
    assert main(["check-data", str(tmp_path / "out")]) == 0


def test_instance_pngs_skip_unknown_mismatched_and_empty_masks(tmp_path):
    src = tmp_path / "inst"
    write_image(src / "images/train/a.png", 40, 30)
    write_image(src / "images/valid/b.png", 40, 30)
    cat = np.zeros((30, 40), np.uint8)
    cat[5:10, 5:15] = 200
    write_png(src / "masks/train/a/cat_0.png", cat)
    write_png(src / "masks/train/a/bird_0.png", cat)                       # not in classes.json
    write_png(src / "masks/train/a/dog_1.png", np.full((20, 20), 255, np.uint8))  # wrong size
    write_png(src / "masks/train/a/dog_2.png", np.zeros((30, 40), np.uint8))      # empty
    (src / "classes.json").write_text(json.dumps({"classes": {"1": "cat", "2": "dog"}}))
    result = convert_dataset("masks", src, tmp_path / "out")
    assert result.skipped.counts() == {"unknown_class": 1, "mask_size_mismatch": 1, "empty_mask": 1}
    assert result.categories == {1: "cat", 2: "dog"}  # the table fixes the categories, used or not
    assert result.counts["train"]["annotations"] == 1 and result.counts["valid"]["images"] == 1
    assert exported(tmp_path / "out")["train"]["annotations"][0]["bbox"] == [5.0, 5.0, 10.0, 5.0]


def test_mask_file_names_give_the_class():
    assert class_of_mask_file(Path("hard_hat_2.png")) == "hard_hat"
    assert class_of_mask_file(Path("red circle_10.png")) == "red circle"
    assert class_of_mask_file(Path("cat.png")) == "cat"


def test_label_maps_need_a_class_table(tmp_path):
    write_image(tmp_path / "src/images/a.png", 8, 8)
    write_png(tmp_path / "src/masks/a.png", np.ones((8, 8), np.uint8))
    with pytest.raises(ConversionError, match="needs classes.json"):
        convert_dataset("masks", tmp_path / "src", tmp_path / "out")


# ---------------------------------------------------------------- splits


def source_images(names: list[str], split: str | None = None) -> list[SourceImage]:
    return [SourceImage(Path("/src") / n, n, 8, 8, split) for n in names]


def assigned(images: list[SourceImage], **kwargs) -> dict[str, list[str]]:
    splits, _ = assign_splits(images, kwargs.pop("ratios", SplitRatios()), kwargs.pop("seed", 0))
    return {s: [i.key for i in images] for s, images in splits.items()}


def test_made_splits_follow_the_ratios_and_depend_only_on_names_and_seed():
    names = [f"img{i:03d}.jpg" for i in range(40)]
    reference = assigned(source_images(names))
    assert {s: len(v) for s, v in reference.items()} == {"train": 32, "valid": 4, "test": 4}
    shuffled = names[:]
    random.Random(1).shuffle(shuffled)
    assert assigned(source_images(shuffled)) == reference  # listing order does not matter
    assert assigned(source_images(names), seed=1)["valid"] != reference["valid"]
    grown = assigned(source_images(names + ["img999.jpg"]))
    moved = sum(1 for s in ("valid", "test") for n in reference[s] if n not in grown[s])
    assert moved <= 2  # adding an image moves at most the images at the two cuts
    assert {s: len(v) for s, v in assigned(source_images(names), ratios=SplitRatios(1, 1, 0)).items()} == \
        {"train": 20, "valid": 20, "test": 0}


def test_source_splits_are_kept_and_valid_is_carved_from_train_when_missing():
    images = source_images([f"t{i}" for i in range(10)], "train") + source_images(["x1", "x2"], "test")
    splits = assigned(images)
    assert splits["test"] == ["x1", "x2"] and len(splits["valid"]) == 1 and len(splits["train"]) == 9
    kept = source_images(["a", "b"], "train") + source_images(["c"], "valid")
    assert assigned(kept) == {"train": ["a", "b"], "valid": ["c"], "test": []}


def test_split_ratios_are_validated(tmp_path, capsys):
    assert SplitRatios.parse("0.7,0.3") == SplitRatios(0.7, 0.3, 0.0)
    for bad in ("0.8", "a,b,c", "1,0,0", "1,-1,1"):
        with pytest.raises(ValueError):
            SplitRatios.parse(bad)
    with pytest.raises(SystemExit):
        main(["convert", "masks", str(tmp_path), str(tmp_path / "out"), "--split-ratios", "1,0"])


def test_flat_mask_folder_is_split_deterministically_through_the_cli(tmp_path, capsys):
    src = tmp_path / "flat"
    for i in range(12):
        write_image(src / f"images/im{i:02d}.png", 16, 16)
        mask = np.zeros((16, 16), np.uint8)
        mask[2:6, 2:6] = 1
        write_png(src / f"masks/im{i:02d}/cat_0.png", mask)
    args = ["--split-ratios", "0.5,0.5", "--split-seed", "3"]
    assert main(["convert", "masks", str(src), str(tmp_path / "one"), *args]) == 0
    assert main(["convert", "masks", str(src), str(tmp_path / "two"), *args]) == 0
    assert "12 image(s) split by ratios 0.5/0.5 (seed 3) into 6 train/6 valid" in capsys.readouterr().out
    one, two = exported(tmp_path / "one"), exported(tmp_path / "two")
    assert set(one) == {"train", "valid"} and one == two
    assert main(["convert", "masks", str(src), str(tmp_path / "one")]) == 1  # never overwrites
    assert "already exists" in capsys.readouterr().out


# ---------------------------------------------------------------- Pascal VOC

VOC_COLOURS = {1: (128, 0, 0), 2: (0, 128, 0), 4: (0, 0, 128), 255: (224, 224, 192)}  # VOC's colour map


def voc_xml(path: Path, objects: list[tuple], size: tuple[int, int] = (40, 30)) -> None:
    """objects: (name, (xmin, ymin, xmax, ymax) or None, difficult)."""
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = f"{path.stem}.jpg"
    size_element = ET.SubElement(root, "size")
    ET.SubElement(size_element, "width").text = str(size[0])
    ET.SubElement(size_element, "height").text = str(size[1])
    for name, box, difficult in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "difficult").text = str(difficult)
        if box:
            bndbox = ET.SubElement(obj, "bndbox")
            for key, value in zip(("xmin", "ymin", "xmax", "ymax"), box):
                ET.SubElement(bndbox, key).text = str(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path)


def object_map() -> np.ndarray:
    indices = np.zeros((30, 40), np.uint8)
    indices[1:11, 1:11] = 1     # object 1 (cat), box 2..11 in VOC's 1-based pixels
    indices[0, 0:12] = 255      # void border
    indices[15:25, 20:30] = 2   # object 2 (dog)
    indices[26:29, 35:39] = 4   # region 4: the xml has no object 4
    return indices


def write_voc(src: Path, rgb_masks: bool = False) -> Path:
    voc_xml(src / "Annotations/a.xml", [("cat", (2, 2, 11, 11), 0), ("dog", (21, 16, 30, 25), 1),
                                        ("bird", None, 0)])
    voc_xml(src / "Annotations/b.xml", [("cat", (5, 5, 20, 20), 0)])
    voc_xml(src / "Annotations/c.xml", [("cat", (5, 5, 20, 20), 0)])  # in no ImageSets file
    voc_xml(src / "Annotations/d.xml", [("dog", (1, 1, 40, 30), 0)])
    for stem in "abcd":
        write_image(src / f"JPEGImages/{stem}.jpg", 40, 30)
    indices = object_map()
    if rgb_masks:
        rgb = np.zeros((30, 40, 3), np.uint8)
        for index, colour in VOC_COLOURS.items():
            rgb[indices == index] = colour
        write_png(src / "SegmentationObject/a.png", rgb)
    else:
        write_png(src / "SegmentationObject/a.png", indices, palette=True)
    (src / "ImageSets/Main").mkdir(parents=True)
    (src / "ImageSets/Main/trainval.txt").write_text("a\nb\n")
    (src / "ImageSets/Main/test.txt").write_text("d\n")
    return src


@pytest.mark.parametrize("rgb_masks", [False, True])
def test_voc_boxes_masks_difficult_and_skips(tmp_path, rgb_masks):
    result = convert_dataset("voc", write_voc(tmp_path / "voc", rgb_masks), tmp_path / "out")
    assert result.skipped.counts() == {"not_in_image_sets": 1, "invalid_object": 1, "mask_without_object": 1}
    assert result.categories == {1: "cat", 2: "dog"}
    assert "2 image(s) split by ratios 0.8/0.1 (seed 0) into 1 train/1 valid" in result.split_origin
    assert result.counts["test"]["images"] == 1  # the source's test split is kept
    records = {r.path.stem: r for s in read_splits(resolve_split_paths(tmp_path / "out")).values()
               for r in s.records}
    cat, dog = records["a"].instances
    assert cat.bbox == (1.0, 1.0, 10.0, 10.0) and not cat.is_crowd  # 1-based inclusive 2..11 → [1, 11)
    np.testing.assert_array_equal(decode_mask(cat.segmentation, 30, 40), object_map() == 1)
    assert dog.is_crowd and dog.bbox == (20.0, 15.0, 10.0, 10.0)
    assert records["d"].instances[0].bbox == (0.0, 0.0, 40.0, 30.0)
    assert records["b"].instances[0].segmentation is None  # no object map: box-only
    assert main(["check-data", str(tmp_path / "out")]) == 0


@pytest.mark.parametrize(("policy", "crowd", "objects"), [("keep", 0, 2), ("skip", 0, 1), ("crowd", 1, 2)])
def test_voc_difficult_policy(tmp_path, policy, crowd, objects):
    result = convert_dataset("voc", write_voc(tmp_path / "voc"), tmp_path / "out", difficult=policy)
    anns = [a for d in exported(tmp_path / "out").values() for img in d["images"] if img["file_name"] == "a.jpg"
            for a in d["annotations"] if a["image_id"] == img["id"]]
    assert len(anns) == objects and sum(a["iscrowd"] for a in anns) == crowd
    assert result.skipped.counts()["difficult"] == (policy == "skip")


def test_voc_train_val_files_are_kept_and_image_sets_option_is_checked(tmp_path):
    src = write_voc(tmp_path / "voc")
    (src / "ImageSets/Segmentation").mkdir()
    (src / "ImageSets/Segmentation/train.txt").write_text("a\nc\n")
    (src / "ImageSets/Segmentation/val.txt").write_text("b\n")
    result = convert_dataset("voc", src, tmp_path / "out", image_sets="Segmentation")
    assert result.split_origin == "splits from the source (train/valid)"
    assert {s: c["images"] for s, c in result.counts.items()} == {"train": 2, "valid": 1}
    assert result.skipped.counts()["not_in_image_sets"] == 1  # d.xml
    with pytest.raises(ConversionError, match="has none of train.txt"):
        convert_dataset("voc", src, tmp_path / "out2", image_sets="Missing")
