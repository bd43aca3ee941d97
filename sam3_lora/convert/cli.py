"""`sam3-lora convert {yolo,masks,voc} SRC OUT_ROOT`: argument parsing and the printed report."""

from __future__ import annotations

import argparse

FORMAT_HELP = {
    "yolo": ("ultralytics YOLO detection/segmentation labels",
             "SRC = data.yaml (or its folder): names, train/val/test image folders or .txt lists; labels/ next to "
             "images/, one object per line: 'class cx cy w h' or 'class x1 y1 x2 y2 ...' normalised to [0, 1]."),
    "masks": ("folders of mask PNGs (one per object, or label maps + classes.json)",
              "SRC/images/[split/]<stem>.jpg with SRC/masks/[split/]<stem>/<class>_<k>.png (one PNG per object) or "
              "SRC/masks/[split/]<stem>.png (label map, pixel = class value) + SRC/classes.json "
              "{\"classes\": {\"1\": \"cat\"}, \"background\": 0, \"ignore\": [255]}."),
    "voc": ("Pascal VOC: Annotations/*.xml boxes (+ SegmentationObject/*.png masks)",
            "SRC = the folder with Annotations/, JPEGImages/ and optionally SegmentationObject/ and "
            "ImageSets/{Main,Segmentation}/{train,val,test}.txt."),
}


def _ratios(text: str):
    from sam3_lora.convert.splits import SplitRatios

    try:
        return SplitRatios.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_convert_arguments(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `convert` command (one sub-command per format) to a `sam3-lora` sub-parser collection."""
    convert = subparsers.add_parser("convert", help="YOLO / mask PNG / Pascal VOC dataset -> Roboflow-layout COCO "
                                    "export (check-data ready)",
                                    description="Write OUT_ROOT/{train,valid,test}/_annotations.coco.json + images "
                                    "from another format; `sam3-lora convert FORMAT --help` shows its layout.")
    formats = convert.add_subparsers(dest="format", required=True)
    for name, (short, layout) in FORMAT_HELP.items():
        parser = formats.add_parser(name, help=short, description=f"{short}. {layout}")
        parser.add_argument("src")
        parser.add_argument("out_root", help="export to create: OUT_ROOT/{train,valid,test}/_annotations.coco.json")
        parser.add_argument("--split-ratios", type=_ratios, default=None, metavar="TRAIN,VALID[,TEST]",
                            help="shares for images without a source split (default 0.8,0.1,0.1); the source's own "
                            "splits are always kept")
        parser.add_argument("--split-seed", type=int, default=0, help="seed of the deterministic split order")
        if name == "voc":
            parser.add_argument("--image-sets", choices=["Main", "Segmentation"], default=None,
                                help="ImageSets sub-folder with the split files (default: Main, else Segmentation)")
            parser.add_argument("--difficult", choices=["crowd", "keep", "skip"], default="crowd",
                                help="objects marked difficult: crowd regions (default; ignored in evaluation, like "
                                "VOC's own), ordinary objects, or left out")
    convert.set_defaults(func=convert_main)
    return convert


def convert_main(args: argparse.Namespace) -> int:
    """Run the conversion and print what was written and skipped; 0 on success, 1 when nothing could be written."""
    from sam3_lora.convert import ConversionError, convert_dataset

    options = {"image_sets": args.image_sets, "difficult": args.difficult} if args.format == "voc" else {}
    try:
        result = convert_dataset(args.format, args.src, args.out_root, args.split_ratios, args.split_seed, **options)
    except ConversionError as err:
        print(f"convert {args.format}: {err}")
        return 1
    print(f"converted {args.format} dataset {args.src} -> {result.out_root}")
    print(f"  splits: {result.split_origin}")
    for split, counts in result.counts.items():
        print(f"  {split}: {counts['images']} images, {counts['annotations']} objects "
              f"({counts['box_only']} box-only, {counts['crowd']} crowd)")
    print(f"  categories: {', '.join(f'{i} {n}' for i, n in result.categories.items())}")
    lines = result.skipped.summary_lines()
    print(f"  skipped: {len(result.skipped.items)} item(s)" + (":" if lines else ""))
    for line in lines:
        print(f"    {line}")
    print(f"next: sam3-lora check-data {result.out_root}")
    return 0
