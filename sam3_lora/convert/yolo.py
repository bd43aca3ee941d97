"""YOLO (ultralytics) detection and segmentation datasets → converter records.

Layout (ultralytics' own): a `data.yaml` with `names` (a list, or {id: name}) and `train` / `val` / `test`, each an
image folder (searched recursively), a .txt file listing image paths (relative lines: from the .txt's folder), or a
list of those; relative entries are taken from `path` (itself relative to the yaml), default the yaml's folder.
Roboflow's `../train/images` entries, which point one level above the yaml, fall back to `train/images` as
ultralytics does. Labels: the image path with its last `images` folder replaced by `labels` and the extension by
`.txt`. One object per line, normalised to [0, 1]:
`class cx cy w h` (a box) or `class x1 y1 x2 y2 ...` (a polygon, ≥ 3 points); both kinds may mix in one file.
An image without a label file is a background image: kept, with no objects (ultralytics does the same).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import yaml

from sam3_lora.convert.common import (IMAGE_SUFFIXES, Annotation, ConversionError, SkipItem, SkipReport,
                                      SourceDataset, SourceImage, annotation_size, clip_box, open_image,
                                      relative_name)
from sam3_lora.data import masks

log = logging.getLogger(__name__)

YAML_SPLITS = {"train": "train", "val": "valid", "valid": "valid", "test": "test"}
# Normalised coordinates this far outside [0, 1] are rounding noise and clipped; further out, the object is skipped.
COORDINATE_TOLERANCE = 0.01


def read_yolo(src: str | Path, skipped: SkipReport) -> SourceDataset:
    """Read a YOLO dataset (see the module docstring).

    Args:
        src: the data.yaml, or the folder holding it.
        skipped: receives every line / image that cannot be converted.

    Raises:
        ConversionError: no readable data.yaml, no `names`, a pose dataset, or a split path that does not exist.
    """
    yaml_path = find_data_yaml(Path(src))
    config = _load_yaml(yaml_path)
    names = class_names(config, yaml_path)
    if "kpt_shape" in config:
        raise ConversionError(f"{yaml_path} describes a pose (keypoint) dataset ('kpt_shape'); only detection and "
                              "segmentation labels can be converted")
    base = _dataset_base(config, yaml_path)
    images = []
    for key, split in YAML_SPLITS.items():
        if config.get(key):
            for path in split_images(config[key], base, key, yaml_path):
                image = _read_image(path, base, split, names, yaml_path, skipped)
                if image is not None:
                    images.append(image)
    if not any(config.get(key) for key in YAML_SPLITS):
        raise ConversionError(f"{yaml_path} has none of the keys train/val/test pointing at images")
    unlabelled = sum(1 for i in images if not label_file(i.path).is_file())
    log.info("%s: %d images, %d of them without a label file (kept as background images)", yaml_path,
             len(images), unlabelled)
    return SourceDataset([names[i] for i in sorted(names)], images)


def find_data_yaml(src: Path) -> Path:
    """`src` itself if it is a file, else SRC/data.yaml, else the only *.yaml / *.yml in SRC."""
    if src.is_file():
        return src
    if (src / "data.yaml").is_file():
        return src / "data.yaml"
    found = sorted([*src.glob("*.yaml"), *src.glob("*.yml")])
    if len(found) == 1:
        return found[0]
    raise ConversionError(f"no data.yaml in {src} (found {[p.name for p in found]}); pass the yaml file itself")


def _load_yaml(path: Path) -> dict:
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConversionError(f"cannot read {path}: {err}") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path} is not a YAML mapping with 'names' and 'train'/'val'/'test'")
    return config


def class_names(config: dict, yaml_path: Path) -> dict[int, str]:
    """`names` as {class id: name}, from a list (id = position) or a mapping."""
    names = config.get("names")
    if isinstance(names, list) and names:
        return {i: str(n) for i, n in enumerate(names)}
    if isinstance(names, dict) and names:
        try:
            return {int(i): str(n) for i, n in names.items()}
        except (TypeError, ValueError):
            pass
    raise ConversionError(f"{yaml_path} field 'names' must be a list of class names or a mapping "
                          f"{{class id: name}}, got {names!r}")


def _dataset_base(config: dict, yaml_path: Path) -> Path:
    base = Path(str(config.get("path") or "."))
    return base if base.is_absolute() else (yaml_path.parent / base).resolve()


def split_images(entry: str | list, base: Path, key: str, yaml_path: Path) -> list[Path]:
    """Image files of one split entry (folder, .txt list, or a list of them), sorted.

    Raises:
        ConversionError: a path in the entry does not exist.
    """
    images: list[Path] = []
    for item in entry if isinstance(entry, list) else [entry]:
        path = _resolve(str(item), base)
        if path.is_dir():
            images += [p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        elif path.is_file() and path.suffix == ".txt":
            images += _listed_images(path)
        else:
            raise ConversionError(f"{yaml_path} field '{key}' = {item!r}: {path} is neither an image folder nor a "
                                  ".txt list of images")
    return sorted(images)


def _resolve(item: str, base: Path) -> Path:
    path = Path(item) if Path(item).is_absolute() else base / item
    if not path.exists() and item.startswith("../"):  # Roboflow's exports: paths one level too high
        path = base / item[3:]
    return path.resolve()


def _listed_images(txt: Path) -> list[Path]:
    lines = [line.strip() for line in txt.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [Path(line) if Path(line).is_absolute() else (txt.parent / line).resolve() for line in lines]


def label_file(image: Path) -> Path:
    """ultralytics' rule: the last `images` folder → `labels`, the extension → `.txt`."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _read_image(path: Path, base: Path, split: str, names: dict[int, str], yaml_path: Path,
                skipped: SkipReport) -> SourceImage | None:
    key, label = relative_name(path, base), label_file(path)
    where = relative_name(label, base)
    try:
        width, height = annotation_size(open_image(path))
        lines = label.read_text(encoding="utf-8").splitlines() if label.is_file() else []
    except SkipItem as skip:
        skipped.add(skip.kind, key, skip.reason)
        return None
    except (OSError, UnicodeDecodeError) as err:
        skipped.add("unreadable_label", where, f"cannot read the label file ({err}); image skipped")
        return None
    annotations = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                annotations.append(parse_label_line(line, names, width, height, yaml_path))
            except SkipItem as skip:
                skipped.add(skip.kind, f"{where}:{number}", skip.reason)
    return SourceImage(path, key, width, height, split, annotations)


def parse_label_line(line: str, names: dict[int, str], width: int, height: int, yaml_path: Path) -> Annotation:
    """One label line → an object in pixel coordinates.

    Raises:
        SkipItem: "malformed_line", "unknown_class", "coordinates_out_of_range", "empty_box" or "empty_polygon".
    """
    fields = line.split()
    try:
        values = [float(v) for v in fields]
    except ValueError:
        raise SkipItem("malformed_line", f"non-numeric value in {line.strip()!r}") from None
    if not np.isfinite(values).all():
        raise SkipItem("malformed_line", f"non-finite value in {line.strip()!r}")
    class_id, coords = values[0], np.array(values[1:])
    if class_id != int(class_id) or int(class_id) not in names:
        raise SkipItem("unknown_class", f"class id {fields[0]} is not in {yaml_path.name} names (ids "
                       f"{min(names)}..{max(names)})")
    if len(coords) != 4 and (len(coords) < 6 or len(coords) % 2):
        raise SkipItem("malformed_line", f"{len(coords)} numbers after the class id; expected 4 (cx cy w h) or an "
                       "even number ≥ 6 (polygon x y pairs)")
    if coords.min() < -COORDINATE_TOLERANCE or coords.max() > 1 + COORDINATE_TOLERANCE:
        raise SkipItem("coordinates_out_of_range", f"coordinates {coords.min():g}..{coords.max():g} are not "
                       "normalised to [0, 1]")
    category = names[int(class_id)]
    if len(coords) == 4:
        cx, cy, w, h = coords * [width, height, width, height]
        return Annotation(category, clip_box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, width, height))
    return _polygon_annotation(category, np.clip(coords, 0, 1).reshape(-1, 2) * [width, height], width, height)


def _polygon_annotation(category: str, points: np.ndarray, width: int, height: int) -> Annotation:
    polygon = [round(float(v), 3) for v in points.reshape(-1)]
    if masks.segmentation_area([polygon], height, width) == 0:
        raise SkipItem("empty_polygon", f"polygon of {len(points)} points covers no pixel")
    x0, y0 = points.min(axis=0)
    x1, y1 = points.max(axis=0)
    # The box of the polygon's points, as ultralytics derives boxes from segments (segments2boxes).
    return Annotation(category, (float(x0), float(y0), float(x1 - x0), float(y1 - y0)), [polygon])
