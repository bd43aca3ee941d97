"""Pascal VOC (XML boxes, optional SegmentationObject masks) → converter records.

Layout (a VOC20xx folder, or a tool's VOC export):

    SRC/Annotations/<id>.xml          <filename>, <size>, and per <object>: <name>, <bndbox> (1-based inclusive
                                      pixel corners xmin ymin xmax ymax), <difficult>
    SRC/JPEGImages/<filename>         the images
    SRC/SegmentationObject/<id>.png   optional instance masks: pixel k = the k-th <object> of the xml, 0 background,
                                      255 the void border (no object); palette or single-channel (RGB in VOC's
                                      colour map is read too)
    SRC/ImageSets/{Main,Segmentation}/{train,val,test,trainval}.txt   optional splits (one id per line)

Boxes become COCO [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1] (the convention detectron2 uses: a box
from 1 to W covers the whole image). Objects with a SegmentationObject region get that mask, the others stay
box-only. SegmentationClass PNGs are not read: they give a class per pixel, which the xml already gives per object,
and cannot separate touching objects. `difficult` objects become crowd regions by default (VOC's own evaluation
ignores them, as COCOeval ignores crowd regions). Splits: train.txt / val.txt / test.txt are kept; a trainval.txt
without train/val is split by the ratios; with set files, xmls in none of them are skipped.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from sam3_lora.convert.common import (IMAGE_SUFFIXES, Annotation, ConversionError, SkipItem, SkipReport,
                                      SourceDataset, SourceImage, annotation_size, clip_box, mask_annotation,
                                      open_image, read_png_values)

VOID = 255
DIFFICULT_POLICIES = ("crowd", "keep", "skip")
SET_SPLITS = {"train": "train", "val": "valid", "test": "test", "trainval": None}


def read_voc(src: str | Path, skipped: SkipReport, image_sets: str | None = None,
             difficult: str = "crowd") -> SourceDataset:
    """Read a VOC dataset (see the module docstring).

    Args:
        src: the folder holding Annotations/ and JPEGImages/.
        skipped: receives every object / image that cannot be converted.
        image_sets: "Main" or "Segmentation" (ImageSets sub-folder giving the splits); None = Main if it has set
            files, else Segmentation, else no source splits.
        difficult: "crowd" (iscrowd 1), "keep" (an ordinary object) or "skip" (left out, reported).

    Raises:
        ConversionError: no Annotations/ folder, an unknown policy, or image_sets naming a folder without set files.
    """
    src = Path(src)
    if not (src / "Annotations").is_dir():
        raise ConversionError(f"{src / 'Annotations'} not found; pass the VOC folder that holds Annotations/ and "
                              "JPEGImages/ (e.g. VOCdevkit/VOC2012)")
    if difficult not in DIFFICULT_POLICIES:
        raise ConversionError(f"difficult={difficult!r} must be one of {DIFFICULT_POLICIES}")
    splits = read_image_sets(src, image_sets)
    images = []
    for xml in sorted((src / "Annotations").glob("*.xml")):
        if splits is not None and xml.stem not in splits:
            skipped.add("not_in_image_sets", xml, "the image id is in none of the ImageSets split files")
            continue
        try:
            images.append(_read_image(src, xml, splits.get(xml.stem) if splits else None, difficult, skipped))
        except SkipItem as skip:
            skipped.add(skip.kind, xml, skip.reason)
    for image_id in sorted(set(splits or {}) - {x.stem for x in (src / "Annotations").glob("*.xml")}):
        skipped.add("missing_annotation", src / "Annotations" / f"{image_id}.xml", "listed in ImageSets, no xml")
    return SourceDataset(sorted({a.category for image in images for a in image.annotations}), images)


def read_image_sets(src: Path, which: str | None) -> dict[str, str | None] | None:
    """Image id → split from ImageSets/<which>/{train,val,test,trainval}.txt; None when there are no set files.

    train/val/test win over trainval (which only unions train and val); ids only in trainval get split None.
    """
    candidates = [which] if which else ["Main", "Segmentation"]
    for name in candidates:
        folder = src / "ImageSets" / name
        files = {s: folder / f"{s}.txt" for s in SET_SPLITS if (folder / f"{s}.txt").is_file()}
        if files:
            splits: dict[str, str | None] = {}
            for set_name in ("trainval", "train", "val", "test"):  # later sets override trainval
                if set_name in files and not (set_name == "trainval" and {"train", "val"} <= set(files)):
                    for line in files[set_name].read_text(encoding="utf-8").split():
                        splits[line] = SET_SPLITS[set_name]
            return splits
    if which:
        raise ConversionError(f"{src / 'ImageSets' / which} has none of train.txt, val.txt, test.txt, trainval.txt")
    return None


def _read_image(src: Path, xml: Path, split: str | None, difficult: str, skipped: SkipReport) -> SourceImage:
    try:
        root = ET.parse(xml).getroot()
    except (ET.ParseError, OSError) as err:
        raise SkipItem("unreadable_xml", f"cannot parse ({err})") from None
    path = _image_file(src, xml.stem, root.findtext("filename"))
    width, height = annotation_size(open_image(path), _stated_size(root))
    object_masks = _object_masks(src / "SegmentationObject" / f"{xml.stem}.png", width, height, skipped)
    annotations = []
    for index, obj in enumerate(root.findall("object"), start=1):
        try:
            annotation = _object(obj, width, height, object_masks.pop(index, None), difficult)
        except SkipItem as skip:
            skipped.add(skip.kind, f"{xml} object {index}", skip.reason)
            continue
        annotations.append(annotation)
    for index in sorted(object_masks):
        skipped.add("mask_without_object", src / "SegmentationObject" / f"{xml.stem}.png",
                    f"region {index} has no <object> number {index} in the xml")
    return SourceImage(path, f"JPEGImages/{path.name}", width, height, split, annotations)


def _image_file(src: Path, image_id: str, filename: str | None) -> Path:
    folder = src / "JPEGImages"
    if filename and (folder / filename).is_file():
        return folder / filename
    found = sorted(p for p in folder.glob(f"{image_id}.*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise SkipItem("missing_image", f"no image {folder / (filename or image_id + '.jpg')}")
    return found[0]


def _stated_size(root: ET.Element) -> tuple[int, int] | None:
    try:
        width, height = int(float(root.findtext("size/width"))), int(float(root.findtext("size/height")))
    except (TypeError, ValueError):
        return None
    return (width, height) if width > 0 and height > 0 else None  # some tools write 0 x 0


def _object_masks(file: Path, width: int, height: int, skipped: SkipReport) -> dict[int, np.ndarray]:
    if not file.is_file():
        return {}
    try:
        values = read_png_values(file)
        indices = values if values.ndim == 2 else voc_colour_indices(values)
    except SkipItem as skip:
        skipped.add(skip.kind, file, f"{skip.reason}; the image's objects are kept box-only")
        return {}
    if indices.shape != (height, width):
        skipped.add("mask_size_mismatch", file, f"mask is {indices.shape[1]}x{indices.shape[0]}, the image "
                    f"{width}x{height}; the image's objects are kept box-only")
        return {}
    return {int(k): indices == k for k in np.unique(indices) if k not in (0, VOID)}


def voc_colour_indices(rgb: np.ndarray) -> np.ndarray:
    """An RGB mask drawn in VOC's colour map → palette indices.

    Raises:
        SkipItem: "unknown_mask_colour" when a colour is not in VOC's map.
    """
    codes = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    lookup = {code: index for index, code in enumerate(_voc_colour_codes())}
    unique, inverse = np.unique(codes, return_inverse=True)
    unknown = [f"#{int(c):06x}" for c in unique if int(c) not in lookup]
    if unknown:
        raise SkipItem("unknown_mask_colour", f"colours {unknown[:5]} are not in VOC's colour map")
    return np.array([lookup[int(c)] for c in unique])[inverse].reshape(codes.shape)


def _voc_colour_codes() -> list[int]:
    """VOC's colour map (devkit `labelcolormap`): index bits spread over R, G, B from the high bit down."""
    codes = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= (c & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        codes.append((r << 16) | (g << 8) | b)
    return codes


def _object(obj: ET.Element, width: int, height: int, mask: np.ndarray | None, difficult: str) -> Annotation:
    name = (obj.findtext("name") or "").strip()
    if not name:
        raise SkipItem("invalid_object", "<object> without a <name>")
    is_difficult = (obj.findtext("difficult") or "0").strip() in ("1", "true")
    if is_difficult and difficult == "skip":
        raise SkipItem("difficult", f"'{name}' is marked difficult (--difficult skip)")
    try:
        x0, y0, x1, y1 = (float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
    except (TypeError, ValueError):
        raise SkipItem("invalid_object", f"'{name}' has no numeric <bndbox> xmin/ymin/xmax/ymax") from None
    bbox = clip_box(x0 - 1, y0 - 1, x1, y1, width, height)
    crowd = is_difficult and difficult == "crowd"
    if mask is None:
        return Annotation(name, bbox, None, crowd)
    return Annotation(name, bbox, mask_annotation(name, mask).segmentation, crowd)
