"""Several adapters on one base (sam3_lora.predictor) vs one merged model per adapter: memory and time.

    python bench/multi_adapter.py --adapters 3 --images 8 --targets detr
    python bench/multi_adapter.py --adapters 3 --images 8 --targets vision,detr

Builds N LoRA adapters on the shipped tiny base (builtin:tiny, non-zero LoRA weights), writes M source-style
shapes images, then runs each mode in its own process (peak RSS is per process): "shared" loads one base with
all adapters and predicts every adapter's prompt on every image; "merged" loads one merged model per adapter
(`adapter.build_adapted_model` + `merge_adapter`, what `sam3-lora export` writes) and does the same.
Prints a table: load s, predict s, model tensor MB, peak RSS MB.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "red circle"


def _tensor_mb(model: torch.nn.Module) -> float:
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total / 2**20


def _tiny_config() -> dict:
    """`build_sam3` kwargs of conf/model/sam3_tiny.yaml on the shipped base, as `python train.py` composes them."""
    from hydra import compose, initialize_config_dir

    from sam3_lora.train import model_config_of

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return model_config_of(compose("train", overrides=["model=sam3_tiny", "model.checkpoint=builtin:tiny"]))


def _make_adapters(root: Path, count: int, targets: list[str]) -> list[Path]:
    from sam3_lora import adapter, lora
    from sam3_lora.model import build_sam3

    config = _tiny_config()
    dirs = []
    for index in range(count):
        torch.manual_seed(index)
        model = lora.apply_lora(build_sam3(**config), rank=16, alpha=32, targets=targets)
        with torch.no_grad():
            for _, parameter in lora.lora_parameters(model):
                parameter.add_(0.01 * torch.randn_like(parameter))
        dirs.append(adapter.save_adapter(model, root / f"adapter{index}", config))
    return dirs


def _run_mode(mode: str, adapter_dirs: list[str], images: list[str]) -> dict:
    from sam3_lora.adapter import build_adapted_model, merge_adapter
    from sam3_lora.predict import predict_datapoints, prompt_datapoint
    from sam3_lora.data.images import read_image_rgb
    from sam3_lora.data.transforms import eval_image_tensor
    from sam3_lora.predictor import Sam3Predictor

    torch.set_num_threads(2)
    start = time.perf_counter()
    if mode == "shared":
        predictor = Sam3Predictor("builtin:tiny", device="cpu")
        for index, path in enumerate(adapter_dirs):
            predictor.add_adapter(f"a{index}", path)
        loaded = time.perf_counter()
        predictor.predict(images, {f"a{i}": [PROMPT] for i in range(len(adapter_dirs))})
        megabytes = _tensor_mb(predictor.model)
    else:
        models = [merge_adapter(build_adapted_model(path)[0]).eval() for path in adapter_dirs]
        loaded = time.perf_counter()
        resolution = 112
        with torch.inference_mode():
            for model in models:
                for start_index in range(0, len(images), 4):
                    datapoints = []
                    for index, path in enumerate(images[start_index:start_index + 4], start=start_index):
                        image = read_image_rgb(Path(path))
                        datapoints.append(prompt_datapoint(eval_image_tensor(image, resolution), index,
                                                          image.shape[:2], [PROMPT]))
                    predict_datapoints(model, datapoints)
        megabytes = sum(_tensor_mb(m) for m in models)
    done = time.perf_counter()
    return {"mode": mode, "load_s": loaded - start, "predict_s": done - loaded, "tensor_mb": megabytes,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--targets", default="detr", help="comma-separated lora presets of every adapter")
    parser.add_argument("--mode", choices=["shared", "merged"], help=argparse.SUPPRESS)  # child process
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        setup = json.loads(Path(args.setup).read_text())
        print(json.dumps(_run_mode(args.mode, setup["adapters"], setup["images"])))
        return
    from sam3_lora.data.shapes import write_shapes_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs = _make_adapters(root, args.adapters, args.targets.split(","))
        write_shapes_dataset(root / "shapes", style="source", num_train=args.images, num_valid=1, num_test=1)
        images = sorted(str(p) for p in (root / "shapes" / "train").glob("*.jpg"))[:args.images]
        setup = root / "setup.json"
        setup.write_text(json.dumps({"adapters": [str(d) for d in dirs], "images": images}))
        print(f"{args.adapters} adapters (targets {args.targets}), {len(images)} images, tiny SAM3, CPU")
        print(f"{'mode':8} {'load s':>7} {'predict s':>9} {'tensor MB':>9} {'peak RSS MB':>11}")
        for mode in ("shared", "merged"):
            out = subprocess.run([sys.executable, __file__, "--mode", mode, "--setup", str(setup)], check=True,
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
            row = json.loads(out)
            print(f"{mode:8} {row['load_s']:7.2f} {row['predict_s']:9.2f} {row['tensor_mb']:9.1f} "
                  f"{row['peak_rss_mb']:11.0f}")


if __name__ == "__main__":
    main()
