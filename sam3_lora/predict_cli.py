"""`sam3-lora predict`'s arguments and glue: checks the arguments first, then loads the model and prints a summary.

Only argparse and the standard library at import time, so `sam3-lora --help` does not import torch; the model
code (`sam3_lora.predict`, `sam3_lora.adapter`) is imported when a prediction really runs.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path


def parse_box(text: str) -> tuple[float, float, float, float]:
    """Parse an exemplar box "x,y,w,h" (pixels of the original image, COCO xywh).

    Raises:
        ValueError: not four numbers, or a non-positive width/height.
    """
    try:
        x, y, w, h = (float(v) for v in text.split(","))
    except ValueError as err:
        raise ValueError(f"--box {text!r}: expected four comma-separated numbers x,y,w,h in pixels") from err
    if w <= 0 or h <= 0:
        raise ValueError(f"--box {text!r}: width and height must be positive")
    return x, y, w, h


def parse_threshold(text: str) -> float:
    """Parse `--threshold`: a score in [0, 1] (scores are sigmoid(logit) x sigmoid(presence)).

    Raises:
        ValueError: not a number, or outside [0, 1].
    """
    try:
        value = float(text)
    except ValueError as err:
        raise ValueError(f"--threshold {text!r}: expected a number in [0, 1]") from err
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"--threshold {text}: scores lie in [0, 1]; give a threshold in that range (e.g. 0.5)")
    return value


def _argparse_type(parse):
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as err:  # argparse shows an ArgumentTypeError's own message
            raise argparse.ArgumentTypeError(str(err)) from err

    return convert


def add_predict_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register `sam3-lora predict`'s arguments on a (sub)parser."""
    parser.add_argument("paths", nargs="+", metavar="SOURCE IMAGES",
                        help="an adapter directory or exported .pt (omit with --base), then image files or folders")
    parser.add_argument("--base", action="store_true",
                        help="predict with the base model (no adapter): --checkpoint and --model-config define it")
    parser.add_argument("--prompt", action="append", default=[],
                        help="noun phrase to find (repeatable); with --adapter: NAME:phrase")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="several adapters on one base (repeatable): the first path is then the BASE "
                             "(path | hub | builtin:tiny) and each --prompt names its adapter")
    parser.add_argument("--box", action="append", default=[], type=_argparse_type(parse_box), metavar="X,Y,W,H",
                        help="positive exemplar box in image pixels (repeatable), through SAM3's geometry encoder")
    parser.add_argument("--out", required=True, help="output folder for predictions.json and PNG overlays")
    parser.add_argument("--threshold", type=_argparse_type(parse_threshold), default=0.5,
                        help="minimum score kept and drawn, in [0, 1]")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--checkpoint", default=None,
                        help="the base SAM3 weights: a path, 'hub' (facebook/sam3) or 'none' (random init). With "
                             "--base it defines the model (default hub); with an adapter directory it replaces the "
                             "base path the adapter stored (when that base file was moved)")
    parser.add_argument("--model-config", default=None,
                        help="JSON file of build_sam3 kwargs for --base or a .pt without a stored config")
    return parser


def predict_main(args: argparse.Namespace) -> int:
    """Run `sam3-lora predict` from parsed arguments; print detections per prompt; return the exit code (0).

    Raises:
        ValueError: no image path after the source, neither --prompt nor --box, an empty prompt, or
            --checkpoint with a merged .pt source.
        FileNotFoundError: an input is missing, or the adapter's stored base checkpoint is (pass --checkpoint).
    """
    _check_prompts(args)
    if args.adapter:
        from sam3_lora.predictor import multi_adapter_main

        return multi_adapter_main(args)
    source, inputs = (None, args.paths) if args.base else (args.paths[0], args.paths[1:])
    if not inputs:
        raise ValueError("sam3-lora predict: give image files or folders after the adapter directory / .pt "
                         "(or use --base to predict with the base model)")
    if not args.prompt and not args.box:
        raise ValueError("sam3-lora predict: give at least one --prompt \"phrase\" or --box x,y,w,h")

    import torch

    from sam3_lora.adapter import load_model_for_inference
    from sam3_lora.predict import find_images, move_model, predict_images

    image_paths = find_images(inputs)
    base_checkpoint = adapter_base_checkpoint(source, args.checkpoint) if source is not None else None
    model, config = load_model_for_inference(source, _model_config(args), base_checkpoint=base_checkpoint)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = move_model(model, device).eval()
    kept = predict_images(model, image_paths, args.prompt, config.get("resolution", 1008), args.out,
                          threshold=args.threshold, boxes=args.box or None, batch_size=args.batch_size)
    print(detections_summary(kept, args.prompt, len(image_paths), args.threshold, Path(args.out)))
    return 0


def detections_summary(kept: list[dict], prompts: list[str], num_images: int, threshold: float, out: Path) -> str:
    """The printed report: detections written per prompt (0 included) and where."""
    per_prompt = Counter(result["category_name"] for result in kept)
    names = prompts or sorted(per_prompt)  # box-only prompts carry sam3's own phrase
    lines = [f"wrote {len(kept)} detections (score >= {threshold}) on {num_images} images to {out}:"]
    lines += [f"  {name!r}: {per_prompt[name]}" for name in names]
    return "\n".join(lines)


def _check_prompts(args: argparse.Namespace) -> None:
    empty = [prompt for prompt in args.prompt if not prompt.strip()]
    if empty:
        raise ValueError(f"sam3-lora predict: --prompt {empty[0]!r} is empty; give a noun phrase such as "
                         "--prompt \"crack\" (or exemplar boxes with --box)")


def adapter_base_checkpoint(source: str, checkpoint: str | None, command: str = "predict") -> str | None:
    """The base checkpoint to build an adapter directory on: --checkpoint, or None for the stored one.

    Raises:
        ValueError: --checkpoint given with a merged .pt (it has no separate base).
        FileNotFoundError: the stored base path is gone and no --checkpoint replaces it.
    """
    if not Path(source).is_dir():
        if checkpoint is not None:
            raise ValueError(f"sam3-lora {command}: {source} is a merged checkpoint (no separate base): drop "
                             "--checkpoint, or pass an adapter directory")
        return None
    if checkpoint is not None and checkpoint.lower() == "none":
        raise ValueError(f"sam3-lora {command}: --checkpoint none (random init) cannot carry an adapter; give the "
                         "base checkpoint it was trained on")
    if checkpoint is not None:
        return checkpoint
    from sam3_lora.adapter import read_adapter_dir
    from sam3_lora.checkpoint_io import BUILTIN_CHECKPOINTS

    stored = read_adapter_dir(source)[1].get("checkpoint")
    if stored not in (None, "hub", *BUILTIN_CHECKPOINTS) and not Path(stored).expanduser().exists():
        raise FileNotFoundError(f"{source} was trained on the base checkpoint {stored}, which no longer exists: "
                                "if it moved, pass its new path with --checkpoint PATH (or --checkpoint hub)")
    return None


def _model_config(args: argparse.Namespace) -> dict:
    config = json.loads(Path(args.model_config).read_text()) if args.model_config else {}
    if args.base:
        checkpoint = args.checkpoint or config.get("checkpoint", "hub")
        config["checkpoint"] = None if str(checkpoint).lower() == "none" else checkpoint
    return config
