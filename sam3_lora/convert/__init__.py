"""Convert the datasets users have (YOLO, mask PNG folders, Pascal VOC) into a Roboflow-layout COCO export.

`convert_dataset("yolo" | "masks" | "voc", SRC, OUT_ROOT)` reads the source (yolo.py, masks.py, voc.py: each
module's docstring states its layout), keeps or makes the splits (splits.py) and writes
OUT_ROOT/{train,valid,test}/_annotations.coco.json + images (writer.py). The result lists what was written and
every item that was skipped, with the reason. `sam3-lora convert` (cli.py) prints it.
"""

from __future__ import annotations

from pathlib import Path

from sam3_lora.convert.common import ConversionError, SkipReport, SourceDataset
from sam3_lora.convert.masks import read_masks
from sam3_lora.convert.splits import SplitRatios
from sam3_lora.convert.voc import read_voc
from sam3_lora.convert.writer import ConversionResult, write_export
from sam3_lora.convert.yolo import read_yolo

FORMATS = ("yolo", "masks", "voc")

__all__ = ["FORMATS", "ConversionError", "ConversionResult", "SplitRatios", "convert_dataset", "read_source"]


def read_source(fmt: str, src: str | Path, skipped: SkipReport, **options) -> SourceDataset:
    """Read a source dataset of format `fmt` ("yolo", "masks" or "voc") with that format's reader.

    `options` go to the reader (voc: `image_sets`, `difficult`).

    Raises:
        ConversionError: unknown format, or a source that cannot be read at all.
    """
    readers = {"yolo": read_yolo, "masks": read_masks, "voc": read_voc}
    if fmt not in readers:
        raise ConversionError(f"format {fmt!r} must be one of {FORMATS}")
    if not Path(src).exists():
        raise ConversionError(f"source {src} not found")
    return readers[fmt](Path(src), skipped, **options)


def convert_dataset(fmt: str, src: str | Path, out_root: str | Path, ratios: SplitRatios | None = None,
                    seed: int = 0, **options) -> ConversionResult:
    """Convert a dataset into a Roboflow-layout COCO export that `sam3-lora check-data` accepts.

    Args:
        fmt: "yolo", "masks" or "voc".
        src: the source (yolo: data.yaml or its folder; masks: the folder with images/ and masks/; voc: the folder
            with Annotations/).
        out_root: the export to create (must not exist).
        ratios: train/valid/test shares for images without a source split (default 0.8/0.1/0.1).
        seed: seed of the deterministic split order.
        **options: format-specific reader options (voc: `image_sets`, `difficult`).

    Returns:
        What was written (per split counts, categories, split origin) and the skip report.

    Raises:
        ConversionError: the source cannot be read, `out_root` exists, or nothing is left for train.
    """
    skipped = SkipReport()
    dataset = read_source(fmt, src, skipped, **options)
    return write_export(dataset, out_root, ratios or SplitRatios(), seed, skipped)
