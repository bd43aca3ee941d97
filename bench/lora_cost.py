"""What LoRA and the memory presets cost: peak memory, seconds per training step, trainable share; inference time.

    python bench/lora_cost.py                                   # tiny SAM3 at 112 px (seconds)
    python bench/lora_cost.py --model sam3 --resolution 504,1008 --modes full,lora,lean --steps 1 --warmup 0
    python bench/lora_cost.py --model sam3 --resolution 504 --modes lora,full --breakdown   # where activations go
    python bench/lora_cost.py --model sam3 --resolution 1008 --modes lean --peaks --steps 1 --warmup 0  # where the peak is

A mode is a list of Hydra overrides of conf/train.yaml (`full` is `lora=full`, `lean` is `preset=lean`, `lastN`
is `lora.vision_last_blocks=N`; see MODES), so the bench measures exactly what `python train.py <overrides>`
builds: the model, LoRA, the loss (incl. `module.mask_loss_points`), the optimiser groups and the precision.
Each mode runs in a fresh subprocess, so peak memory belongs to that mode alone: peak RSS on CPU (VmHWM, reset
after the model is built, so it is the training steps' peak), `torch.cuda.max_memory_allocated` on CUDA. On CPU
the RSS includes the imported libraries (about 0.9 GB: torch, Lightning, sam3), the same in every mode; "above
runtime" subtracts what the process held before building the model, which is what the GPU measure counts.
The batch is synthetic (bench/crowded_batch.py): `--images` images, `--prompts` prompts per image with
`--instances` instances each, masks at the input size; `data.max_queries_per_image` caps the prompts.
Before the timed steps the optimiser state is allocated (one AdamW step with zero gradients), so even
`--warmup 0 --steps 1` measures a steady-state step (full fine-tuning's 2 x 4 bytes per parameter included).
Workers apply the project's glibc malloc settings (`sam3_lora.memory.tune_glibc_malloc`, as train.py) unless
`--malloc default`.

`--parts infer` times no-grad forwards of the base, the unmerged default LoRA and the merged export (one process
each), then, in one process, pairs alternating forward by forward so the machine's drift between processes cancels
out of their ratios: the unmerged model with its adapters off (PEFT's `disable_adapter`) and on, then the base
and the merged export.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

MODES = {
    "full": ["lora=full"],
    "lora": [],
    "lean": ["preset=lean"],
    "bf16": ["lora.frozen_dtype=bfloat16", "trainer.precision=bf16-mixed"],
    "points": ["module.mask_loss_points=12544"],
    "caps": ["data.max_queries_per_image=2"],
    "no_ckpt": ["model.activation_checkpointing=false"],
    "ckpt": ["model.activation_checkpointing=true"],
    "fused": ["model.attention_dropout=0.0"],  # attention runs fused on CPU (no dropout on its probabilities)
    "full_fused": ["lora=full", "model.attention_dropout=0.0"],
}
LAST_N = re.compile(r"last(\d+)$")


def mode_overrides(mode: str) -> list[str]:
    """Hydra overrides of a mode name (`lastN` = LoRA in the last N ViT blocks only)."""
    match = LAST_N.match(mode)
    if match:
        return [f"lora.vision_last_blocks={match.group(1)}"]
    if mode not in MODES:
        raise SystemExit(f"unknown mode {mode!r}: choose from {sorted(MODES)} or lastN")
    return MODES[mode]


def compose_config(model: str, resolution: int, overrides: list[str], precision: str | None):
    from hydra import compose, initialize_config_dir

    import sam3_lora.resolvers  # noqa: F401  (registers the config resolvers)

    base = [f"model={model}", "model.checkpoint=null", f"model.resolution={resolution}",
            f"model.vit_pretrain_size={min(resolution, 336)}", "data=shapes", "data.max_queries_per_image=null"]
    base += [f"trainer.precision={precision}"] if precision else []
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=base + overrides)


def _allocate_optimizer_state(optimizer, parameters) -> None:
    import torch

    for parameter in parameters:
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def worker_train(args) -> dict:
    import torch

    from crowded_batch import crowded_batch
    from transient_peaks import MemoryProbe, TransientPeaks
    from sam3_lora.losses import build_sam3_loss
    from sam3_lora.memory import SavedTensorLedger, sam3_group, tune_glibc_malloc
    from sam3_lora.compat import clear_cached_devices
    from sam3_lora.lora import base_sam3
    from sam3_lora.module import parameter_groups
    from sam3_lora.train import build_model

    malloc = tune_glibc_malloc() if args.malloc == "tuned" else False
    cfg = compose_config(args.model, args.resolution, mode_overrides(args.mode), args.precision)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # before the model exists: on CPU the RSS of the imported libraries (torch, Lightning, sam3), in every mode
    runtime_mb = MemoryProbe(device).current() / 2**20
    torch.manual_seed(0)
    model = clear_cached_devices(build_model(cfg).to(device))
    sam3 = base_sam3(model)
    hp = cfg.module
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameter_groups(model, hp.lr, hp.head_lr or hp.lr, hp.weight_decay,
                                                   hp.component_lr, hp.vision_layer_decay))
    if not args.lazy_optimizer:
        _allocate_optimizer_state(optimizer, trainable)
    loss_fn = build_sam3_loss(with_masks=True, mask_points=hp.mask_loss_points)
    prompts = min(args.prompts, cfg.data.max_queries_per_image or args.prompts)
    batch = _to(crowded_batch(args.resolution, args.images, prompts, args.instances), device)
    autocast = "bf16" in str(cfg.trainer.precision)
    times, breakdown, peaks, first_step_peak_mb = [], None, None, 0.0
    probe = MemoryProbe(device)
    probe.reset_peak()
    for step in range(args.warmup + args.steps):
        ledger = SavedTensorLedger(model) if args.breakdown and step == 0 else contextlib.nullcontext()
        meter = TransientPeaks(sam3_components(sam3), device) if args.peaks and step == 0 else None
        phase = meter.phase if meter else (lambda label: contextlib.nullcontext())
        start = time.perf_counter()
        with meter.watching() if meter else contextlib.nullcontext():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast), ledger:
                out = model(batch)
                with phase("loss"):
                    loss = loss_fn(out, [sam3.back_convert(t) for t in batch.find_targets])["core_loss"]
            with phase("backward"):
                loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 0.1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if isinstance(ledger, SavedTensorLedger):
            breakdown = {k: round(v / 2**20) for k, v in ledger.by_group(sam3_group).items()}
        if meter is not None:
            peaks = [[label, round(above), round(absolute)] for label, above, absolute in meter.rows()]
            first_step_peak_mb = meter.overall / 2**20
        del out, loss
    total = sum(p.numel() for p in model.parameters())
    peak_mb = max(probe.peak() / 2**20, first_step_peak_mb)  # the meter resets the peak during the first step
    return {"step_s": _median(times[args.warmup:]), "peak_mb": peak_mb, "runtime_mb": runtime_mb,
            "trainable": sum(p.numel() for p in trainable), "total": total, "prompts": prompts,
            "malloc_tuned": malloc, "breakdown_mb": breakdown, "peaks_mb": peaks, "overrides": mode_overrides(args.mode)}


def worker_infer(args) -> dict:
    import torch

    from crowded_batch import crowded_batch
    from sam3_lora.adapter import merge_adapter
    from sam3_lora.memory import tune_glibc_malloc
    from sam3_lora.train import build_model

    tune_glibc_malloc() if args.malloc == "tuned" else None
    overrides = ["lora.targets=[]", "lora.modules_to_save=[]"] if args.mode == "base" else []
    cfg = compose_config(args.model, args.resolution, overrides, args.precision)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_model(cfg)
    if args.mode == "merged":  # what users deploy: the exported stock checkpoint, loaded into a fresh SAM3
        model = _reload_merged(merge_adapter(model), cfg)
    model = model.to(device).eval()
    batch = _to(crowded_batch(args.resolution, args.images, args.prompts, args.instances), device)
    if args.mode == "interleaved":  # pairs timed alternately in one process: the machine's drift cancels
        result = _alternate(lambda: _adapters_off(model, batch, device), lambda: _timed_forward(model, batch, device),
                            ("adapters_off", "unmerged"), args)
        base = build_model(compose_config(args.model, args.resolution, ["lora.targets=[]", "lora.modules_to_save=[]"],
                                          args.precision)).to(device).eval()
        merged = _reload_merged(merge_adapter(model), cfg).to(device).eval()
        return {**result, **_alternate(lambda: _timed_forward(base, batch, device),
                                       lambda: _timed_forward(merged, batch, device), ("base", "merged"), args)}
    times = [_timed_forward(model, batch, device) for _ in range(args.warmup + args.steps)]
    return {"infer_s": _median(times[args.warmup:])}


def _alternate(first, second, names: tuple[str, str], args) -> dict:
    """Median seconds of each of two timed callables, run in turns; the order flips every round, so neither
    always runs right after the other."""
    timed = dict(zip(names, (first, second)))
    times = {name: [] for name in names}
    for round_ in range(args.warmup + args.steps):
        for name in names if round_ % 2 == 0 else names[::-1]:
            times[name].append(timed[name]())
    return {name: _median(t[args.warmup:]) for name, t in times.items()}


def _adapters_off(model, batch, device) -> float:
    with model.disable_adapter():
        return _timed_forward(model, batch, device)


def _timed_forward(model, batch, device) -> float:
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        model(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _reload_merged(merged, cfg):
    from hydra.utils import instantiate

    from sam3_lora.checkpoint_io import save_stock_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        save_stock_checkpoint(merged.state_dict(), Path(tmp) / "merged.safetensors")
        del merged
        return instantiate(cfg.model, checkpoint=str(Path(tmp) / "merged.safetensors"))


def sam3_components(sam3) -> dict:
    """The non-nested parts of a Sam3Image whose forward peaks the bench reports, in the order they run."""
    backbone, transformer = sam3.backbone, sam3.transformer
    parts = {"ViT": backbone.vision_backbone.trunk,  # the neck's convs are a ModuleList (no forward of its own)
             "text encoder": backbone.language_backbone, "geometry encoder": sam3.geometry_encoder,
             "DETR encoder": transformer.encoder, "DETR decoder": transformer.decoder,
             "mask head": sam3.segmentation_head, "scoring": sam3.dot_prod_scoring}
    return {label: module for label, module in parts.items() if module is not None}


def _to(batch, device):
    from sam3.model.utils.misc import copy_data_to_device

    return copy_data_to_device(batch, device) if device.type == "cuda" else batch


def _spawn(args, worker: str, mode: str, resolution: int) -> dict:
    command = [sys.executable, __file__, "--worker", worker, "--mode", mode, "--resolution", str(resolution),
               "--model", args.model, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--images", str(args.images), "--prompts", str(args.prompts), "--instances", str(args.instances),
               "--malloc", args.malloc] + (["--breakdown"] if args.breakdown else []) \
        + (["--peaks"] if args.peaks else []) \
        + (["--lazy-optimizer"] if args.lazy_optimizer else []) \
        + (["--precision", args.precision] if args.precision else [])
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode:
        raise RuntimeError(f"{worker} {mode} at {resolution} px failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sam3_tiny", choices=["sam3", "sam3_tiny"],
                        help="conf/model choice: sam3 = the 840 M architecture (random init)")
    parser.add_argument("--resolution", default=None, help="comma list of input sides (default 112 tiny / 1008)")
    parser.add_argument("--modes", default="full,lora,lean", help=f"comma list of {sorted(MODES)} or lastN")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=4, help="prompts (find-queries) per image")
    parser.add_argument("--instances", type=int, default=10, help="instances per prompt")
    parser.add_argument("--precision", default=None, help="trainer.precision for every mode (e.g. bf16-mixed)")
    parser.add_argument("--malloc", default="tuned", choices=["tuned", "default"], help="glibc malloc thresholds")
    parser.add_argument("--lazy-optimizer", action="store_true",
                        help="do not allocate AdamW state before the steps: a first step's peak (less than steady state "
                             "by 8 bytes per trainable parameter when --warmup 0 --steps 1)")
    parser.add_argument("--breakdown", action="store_true", help="also report saved-for-backward MB per component")
    parser.add_argument("--peaks", action="store_true",
                        help="also report each component's transient peak above its entry level (first step)")
    parser.add_argument("--parts", default="train", help="comma list of: train, infer")
    parser.add_argument("--json", default=None,
                        help="write {mode: {step_s, peak_mb, trainable, runtime_mb}} (per resolution)")
    parser.add_argument("--worker", choices=["train", "infer"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.resolution = int(args.resolution)
        print(json.dumps((worker_train if args.worker == "train" else worker_infer)(args)))
        return
    report(args)


def report(args) -> None:
    parts = set(args.parts.split(","))
    resolutions = [int(r) for r in (args.resolution or ("112" if args.model == "sam3_tiny" else "1008")).split(",")]
    results = {}
    for resolution in resolutions:
        print(f"\n{args.model}, {resolution} px, {args.images} image(s) x {args.prompts} prompts x {args.instances} "
              f"instances, masks on, median of {args.steps} step(s) after {args.warmup} warm-up, malloc {args.malloc}"
              f"{', precision ' + args.precision if args.precision else ''}"
              f"{', AdamW state allocated lazily' if args.lazy_optimizer else ''}\n", flush=True)
        if "train" in parts:
            train = {}
            for mode in args.modes.split(","):
                train[mode] = _spawn(args, "train", mode, resolution)
                print(f"  {mode}: {train[mode]['step_s']:.2f} s/step, {train[mode]['peak_mb']:.0f} MB", flush=True)
            print_train(train, args.images)
            if args.breakdown:
                print_breakdown(train)
            if args.peaks:
                print_peaks(train)
            results[resolution] = train
        if "infer" in parts:
            print_infer({mode: _spawn(args, "infer", mode, resolution) for mode in ("base", "unmerged", "merged")})
            print_interleaved(_spawn(args, "infer", "interleaved", resolution))
    if args.json:
        flat = {r: {m: {k: v[k] for k in ("step_s", "peak_mb", "trainable", "runtime_mb")} for m, v in t.items()}
                for r, t in results.items()}
        Path(args.json).write_text(json.dumps(flat[resolutions[0]] if len(flat) == 1 else flat, indent=2))


def print_train(train: dict, images: int) -> None:
    reference = next((mode for mode in ("full", "full_fused") if mode in train), None)
    full = train.get(reference)
    if full:
        print(f"\n× full: ratios to `{reference}`")
    print("\n| mode | overrides | trainable | trainable % | s/step | images/s | × full | peak MB | × full "
          "| above runtime MB | × full |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode, r in train.items():
        time_ratio = f"{r['step_s'] / full['step_s']:.2f}" if full else "-"
        memory_ratio = f"{r['peak_mb'] / full['peak_mb']:.2f}" if full else "-"
        above = r["peak_mb"] - r["runtime_mb"]
        above_ratio = f"{above / (full['peak_mb'] - full['runtime_mb']):.3f}" if full else "-"
        print(f"| {mode} | `{' '.join(r['overrides']) or '(defaults)'}` | {r['trainable']:,} | "
              f"{100 * r['trainable'] / r['total']:.2f} | {r['step_s']:.2f} | {images / r['step_s']:.3f} | "
              f"{time_ratio} | {r['peak_mb']:.0f} | {memory_ratio} | {above:.0f} | {above_ratio} |")


def print_breakdown(train: dict) -> None:
    groups = sorted({g for r in train.values() for g in (r["breakdown_mb"] or {})},
                    key=lambda g: -max((r["breakdown_mb"] or {}).get(g, 0) for r in train.values()))
    print("\nsaved for backward at the end of forward + loss (MB; activation-checkpointed regions excluded):\n")
    print("| component | " + " | ".join(train) + " |\n|---|" + "---:|" * len(train))
    for group in groups:
        print(f"| {group} | " + " | ".join(str((r["breakdown_mb"] or {}).get(group, 0)) for r in train.values()) + " |")
    print("| **total** | " + " | ".join(str(sum((r["breakdown_mb"] or {}).values())) for r in train.values()) + " |")


def print_peaks(train: dict) -> None:
    print("\ntransient peak of the first step per component (MB above the level at its entry / absolute peak):\n")
    print("| component | " + " | ".join(train) + " |\n|---|" + "---:|" * len(train))
    labels = list(dict.fromkeys(label for r in train.values() for label, *_ in r["peaks_mb"] or []))
    for label in labels:
        cells = [next((f"{a:,} / {b:,}" for name, a, b in r["peaks_mb"] or [] if name == label), "-")
                 for r in train.values()]
        print(f"| {label} | " + " | ".join(cells) + " |")


def print_interleaved(result: dict) -> None:
    print("\none process, pairs alternating: the unmerged model with adapters off (PEFT's disable_adapter) and on; "
          "then the base and the merged export:\n")
    print("| pair | first (s) | second (s) | second / first |\n|---|---:|---:|---:|")
    for first, second in (("adapters_off", "unmerged"), ("base", "merged")):
        print(f"| {first} → {second} | {result[first]:.4f} | {result[second]:.4f} | "
              f"{result[second] / result[first]:.3f} |")


def print_infer(infer: dict) -> None:
    base = infer["base"]["infer_s"]
    print("\n| inference (no grad) | time (s) | × base |\n|---|---:|---:|")
    for mode, r in infer.items():
        print(f"| {mode} | {r['infer_s']:.4f} | {r['infer_s'] / base:.3f} |")


if __name__ == "__main__":
    main()
