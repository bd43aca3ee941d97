"""`sam3-lora` console script: predict, export, check-data, make-shapes, doctor."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import sam3_lora
from sam3_lora.entry import expected_failure, failure_message, silence_known_warnings


def _export(args: argparse.Namespace) -> int:
    from sam3_lora.predict_cli import adapter_base_checkpoint

    if args.checkpoint is not None and args.base is not None:
        raise ValueError("sam3-lora export: --base already names the base the adapter is merged into; drop "
                         "--checkpoint")
    base_checkpoint = adapter_base_checkpoint(args.adapter_dir, args.checkpoint, "export") if args.base is None \
        else None
    if args.format == "transformers":
        from sam3_lora.transformers_format import export_transformers

        if args.base is not None:
            raise ValueError("export --base writes a full sam3 checkpoint (tracker included); transformers' "
                             "Sam3Model is the image model only: drop --base or --format transformers")

        out = export_transformers(args.adapter_dir, args.out, base_checkpoint)
        print(f"wrote transformers Sam3Model directory {out} (Sam3Model / Sam3Processor.from_pretrained load it)")
        return 0
    if args.base is not None:
        from sam3_lora.video_model import export_full_checkpoint

        out = export_full_checkpoint(args.adapter_dir, args.out, args.base, image_only=args.image_only)
        print(f"wrote full SAM3 checkpoint {out} (merged detector.* + the base's tracker.*; "
              "build_sam3_video_model(checkpoint_path=...) loads it strictly)")
        return 0
    if args.image_only:
        raise ValueError("sam3-lora export: --image-only only applies with --base FULL.pt")
    if Path(args.out).is_dir():  # found now, not after minutes of merging
        raise IsADirectoryError(f"sam3-lora export: {args.out} is a folder; the stock checkpoint is a file: give a "
                                f"path such as {Path(args.out) / 'sam3_lora.pt'}")
    from sam3_lora.adapter import export_merged

    out = export_merged(args.adapter_dir, args.out, base_checkpoint)
    print(f"wrote stock SAM3 checkpoint {out} (keys detector.*; build_sam3_image_model(checkpoint_path=...) loads it)")
    return 0


def _check_data(args: argparse.Namespace) -> int:
    from sam3_lora.data.check import check_data, check_data_report

    text, usable = check_data_report(check_data(args.root, drop_background_category=not args.keep_background_category,
                                                decode_images=not args.headers_only))
    print(text)
    return 0 if usable else 1


def _make_shapes(args: argparse.Namespace) -> int:
    from sam3_lora.data.shapes import write_shapes_dataset

    root = write_shapes_dataset(args.out_dir, style=args.style, seed=args.seed, num_train=args.num_train,
                                num_valid=args.num_valid, num_test=args.num_test)  # refuses an existing folder
    print(f"wrote {args.num_train}/{args.num_valid}/{args.num_test} train/valid/test images ({args.style} style, "
          f"seed {args.seed}) to {root}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from sam3_lora.predict_cli import predict_main

    return predict_main(args)


def _predict_video(args: argparse.Namespace) -> int:
    from sam3_lora.video import predict_video_main

    return predict_video_main(args)


def _doctor(args: argparse.Namespace) -> int:
    from sam3_lora.doctor import doctor_report, run_checks

    text, passed = doctor_report(run_checks(None if args.checkpoint == "none" else args.checkpoint, args.download))
    print(text)
    return 0 if passed else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sam3-lora", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {sam3_lora.__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of a failure (accepted anywhere on the command line)")
    commands = parser.add_subparsers(dest="command", required=True)

    from sam3_lora.predict_cli import add_predict_arguments

    predict = commands.add_parser("predict", help="images + text prompts -> predictions.json and PNG overlays")
    add_predict_arguments(predict).set_defaults(func=_predict)

    video = commands.add_parser("predict-video", help="video or frame folder + prompts -> tracked masks per frame "
                                                      "(JSON, RLE) and an overlay GIF, with sam3's video model")
    video.add_argument("source", help="adapter directory, or full checkpoint (export ... --base sam3.pt)")
    video.add_argument("video", help="video file, or folder of frames named <index>.jpg/.png")
    video.add_argument("--prompt", action="append", default=[], help="noun phrase to track (repeatable)")
    video.add_argument("--base", default=None,
                       help="adapter only: full SAM3 checkpoint with tracker.* weights (default: the adapter's base)")
    video.add_argument("--out", required=True, help="output folder: frames/<index>.json and overlay.gif")
    video.add_argument("--device", default=None, help="cuda, cpu (default: cuda when available)")
    video.set_defaults(func=_predict_video)

    export = commands.add_parser("export", help="adapter directory -> merged stock SAM3 checkpoint")
    export.add_argument("adapter_dir")
    export.add_argument("out", help="output .pt ({'model': {'detector.<name>': tensor}}) or, with --format "
                                    "transformers, a directory")
    export.add_argument("--format", choices=["sam3", "transformers"], default="sam3",
                        help="sam3: stock checkpoint; transformers: Sam3Model directory ([transformers] extra)")
    export.add_argument("--base", default=None,
                        help="full SAM3 checkpoint (path | hub | builtin:tiny): write a full checkpoint, the adapter "
                             "merged into this base's detector and its tracker.* weights copied (video model)")
    export.add_argument("--checkpoint", default=None,
                        help="the adapter's base SAM3 weights (path | hub | builtin:tiny) when they moved since "
                             "training (default: the path stored in the adapter)")
    export.add_argument("--image-only", action="store_true",
                        help="with --base: accept a base without tracker.* weights (image model only)")
    export.set_defaults(func=_export)

    check = commands.add_parser("check-data", help="validate a COCO/Roboflow dataset; exit 1 on fatal problems")
    check.add_argument("root")
    check.add_argument("--keep-background-category", action="store_true",
                       help="keep Roboflow's empty category 0 (default: dropped, as in training)")
    check.add_argument("--headers-only", action="store_true", help="read image headers only (faster)")
    check.set_defaults(func=_check_data)

    shapes = commands.add_parser("make-shapes", help="write the synthetic shapes dataset (Roboflow layout)")
    shapes.add_argument("out_dir")
    shapes.add_argument("--style", choices=["source", "target"], default="source")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--num-train", type=int, default=300)
    shapes.add_argument("--num-valid", type=int, default=50)
    shapes.add_argument("--num-test", type=int, default=50)
    shapes.set_defaults(func=_make_shapes)

    doctor = commands.add_parser("doctor", help="check what a run needs (torch, CUDA/bf16, sam3, vocabulary, weights)")
    doctor.add_argument("--checkpoint", default="hub", help="model.checkpoint to resolve: path | hub | none")
    doctor.add_argument("--download", action="store_true", help="with --checkpoint hub: download sam3.pt (3.4 GB) "
                        "if not cached; without it only the local cache is checked")
    doctor.set_defaults(func=_doctor)

    from sam3_lora.convert.cli import add_convert_arguments

    add_convert_arguments(commands)  # `convert {yolo,masks,voc} SRC OUT_ROOT`
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `sam3-lora`; return the exit code. Expected failures print one message (traceback with --debug)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # argparse would take it only before the sub-command
    argv = [arg for arg in argv if arg != "--debug"]
    silence_known_warnings()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # lightning/__init__.py gives "lightning" its own console handler: stop there, or the root prints it again
    logging.getLogger("lightning").propagate = False
    try:
        return _run(argv)
    except Exception as err:
        reported = None if debug else expected_failure(err)
        if reported is None:
            raise
        print(f"error: {failure_message(reported)}\n(run with --debug for the traceback)", file=sys.stderr)
        return 1


def _run(argv: list[str]) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "paths", None), list) and not any(e.startswith("-") for e in extra):
        # `predict BASE --adapter ... IMAGES`: argparse ends a positional list at the first option
        args.paths += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
