"""What LoRA costs and saves: trainable %, adapter size, train-step time and peak memory, inference time.

    python bench/lora_cost.py                      # tiny SAM3 at 112 px (seconds)
    python bench/lora_cost.py --full --resolution 336 --steps 2   # the 840 M architecture, reduced resolution

Each measurement runs in its own subprocess so peak RSS (CPU) / peak CUDA memory belongs to that mode alone.
Modes: LoRA (rank 16, default preset vision+detr, heads fully trained), heads-only, full fine-tune.
Prints one Markdown table. Goals (issue #2): LoRA step <= 0.75 x full FT step, LoRA peak memory well under
full FT's, merged inference <= 1.01 x base, unmerged <= 1.05 x, adapter <= 1.5 % of base at rank 16.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEADS = ["dot_prod_scoring", "transformer.decoder.bbox_embed", "transformer.decoder.presence_token_head",
         "transformer.decoder.ref_point_head"]
TRAIN_MODES = {"lora": (["vision", "detr"], HEADS), "heads-only": ([], HEADS), "full FT": None}


def model_config(full: bool, resolution: int) -> dict:
    from omegaconf import OmegaConf

    merged = OmegaConf.load(REPO / "conf/model/sam3.yaml")
    if not full:
        merged = OmegaConf.merge(merged, OmegaConf.load(REPO / "conf/model/sam3_tiny.yaml"))
    config = OmegaConf.to_container(merged)
    config.pop("_target_")
    config.pop("defaults", None)
    config.update(checkpoint=None, resolution=resolution, vit_pretrain_size=min(resolution, config["vit_pretrain_size"]))
    if full:
        config["vit_global_blocks"] = [7, 15, 23, 31]
    return config


def make_model(config: dict, mode: str, rank: int):
    from sam3_lora.lora import apply_lora
    from sam3_lora.model import build_sam3

    model = build_sam3(**config)
    if mode == "full FT":
        return model
    targets, heads = TRAIN_MODES[mode]
    return apply_lora(model, rank=rank, alpha=2 * rank, targets=targets, modules_to_save=heads)


def _peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_train(args) -> dict:
    import torch

    import sam3_lora  # noqa: F401
    from sam3_lora.losses import build_sam3_loss
    from sam3_lora.module import inner_sam3
    from tests.conftest import make_batch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = model_config(args.full, args.resolution)
    model = make_model(config, args.mode, args.rank).to(device)
    sam3 = inner_sam3(model)
    sam3._device = None
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    loss_fn = build_sam3_loss(with_masks=True)
    batch = make_batch(args.resolution, num_images=args.images)
    batch = _to(batch, device)
    times = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(batch)
            loss = loss_fn(out, [sam3.back_convert(t) for t in batch.find_targets])["core_loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    total = sum(p.numel() for p in model.parameters())
    return {"step_s": sorted(times[args.warmup:])[len(times[args.warmup:]) // 2], "peak_mb": _peak_memory_mb(device),
            "trainable": sum(p.numel() for p in trainable), "total": total}


def worker_infer(args) -> dict:
    import torch

    import sam3_lora  # noqa: F401
    from sam3_lora.adapter import merge_adapter
    from tests.conftest import make_batch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = model_config(args.full, args.resolution)
    torch.manual_seed(0)
    model = make_model(config, "full FT" if args.mode == "base" else "lora", args.rank)
    if args.mode == "merged":  # what users deploy: the exported stock checkpoint, loaded into a fresh SAM3
        model = _reload_merged(merge_adapter(model), config)
    model = model.to(device).eval()
    batch = _to(make_batch(args.resolution, num_images=args.images), device)
    times = []
    with torch.no_grad():
        for _ in range(args.warmup + args.steps):
            start = time.perf_counter()
            model(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return {"infer_s": sorted(times[args.warmup:])[len(times[args.warmup:]) // 2]}


def _reload_merged(merged, config: dict):
    from sam3_lora.checkpoint_io import save_stock_checkpoint
    from sam3_lora.model import build_sam3

    with tempfile.TemporaryDirectory() as tmp:
        save_stock_checkpoint(merged.state_dict(), Path(tmp) / "merged.safetensors")
        del merged
        return build_sam3(**{**config, "checkpoint": str(Path(tmp) / "merged.safetensors")})


def _to(batch, device):
    from sam3.model.utils.misc import copy_data_to_device

    return copy_data_to_device(batch, device) if device.type == "cuda" else batch


def adapter_sizes(full: bool, resolution: int, rank: int) -> dict:
    import torch

    import sam3_lora  # noqa: F401
    from sam3_lora.checkpoint_io import save_stock_checkpoint
    from sam3_lora.adapter import save_adapter

    config = model_config(full, resolution)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(config, "lora", rank)
        save_adapter(model, Path(tmp) / "adapter", config)
        base = {k: v for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
        save_stock_checkpoint(base, Path(tmp) / "base.safetensors")
        del model, base
        adapter_mb = (Path(tmp) / "adapter/adapter_model.safetensors").stat().st_size / 2**20
        base_mb = (Path(tmp) / "base.safetensors").stat().st_size / 2**20
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"adapter_mb": adapter_mb, "base_mb": base_mb}


def _spawn(args, worker: str, mode: str) -> dict:
    command = [sys.executable, __file__, "--worker", worker, "--mode", mode, "--resolution", str(args.resolution),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--rank", str(args.rank),
               "--images", str(args.images)] + (["--full"] if args.full else [])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode:
        raise RuntimeError(f"{worker} {mode} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the 840 M SAM3 architecture (random init)")
    parser.add_argument("--resolution", type=int, default=None, help="input side (default 112 tiny / 336 full)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--images", type=int, default=2, help="images per batch (2 queries each)")
    parser.add_argument("--parts", default="train,infer,size", help="comma list of: train, infer, size")
    parser.add_argument("--worker", choices=["train", "infer"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.resolution = args.resolution or (336 if args.full else 112)
    if args.worker:
        worker = worker_train if args.worker == "train" else worker_infer
        print(json.dumps(worker(args)))
        return
    report(args)


def report(args) -> None:
    parts = set(args.parts.split(","))
    print(f"\n{'full' if args.full else 'tiny'} SAM3, {args.resolution} px, rank {args.rank}, "
          f"{args.images} images x 2 prompts, median of {args.steps} steps\n")
    if "train" in parts:
        print_train({mode: _spawn(args, "train", mode) for mode in TRAIN_MODES})
    if "infer" in parts:
        print_infer({mode: _spawn(args, "infer", mode) for mode in ("base", "unmerged", "merged")})
    if "size" in parts:
        sizes = adapter_sizes(args.full, args.resolution, args.rank)
        print(f"\n| adapter (rank {args.rank}, vision+detr + heads) | base checkpoint | adapter / base |\n|---:|---:|---:|")
        print(f"| {sizes['adapter_mb']:.2f} MB | {sizes['base_mb']:.1f} MB | "
              f"{100 * sizes['adapter_mb'] / sizes['base_mb']:.2f} % |")


def print_train(train: dict) -> None:
    full_ft = train["full FT"]
    print("| mode | trainable | trainable % | train step (s) | × full FT | peak memory (MB) | × full FT |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, r in train.items():
        print(f"| {mode} | {r['trainable']:,} | {100 * r['trainable'] / r['total']:.2f} | {r['step_s']:.3f} | "
              f"{r['step_s'] / full_ft['step_s']:.2f} | {r['peak_mb']:.0f} | {r['peak_mb'] / full_ft['peak_mb']:.2f} |")


def print_infer(infer: dict) -> None:
    base = infer["base"]["infer_s"]
    print("\n| inference | time (s) | × base |\n|---|---:|---:|")
    for mode, r in infer.items():
        print(f"| {mode} | {r['infer_s']:.4f} | {r['infer_s'] / base:.3f} |")


if __name__ == "__main__":
    main()
