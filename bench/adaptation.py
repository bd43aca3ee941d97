"""Adaptation study: what each way of fine-tuning gains on the demo's shift, and what it keeps.

    python bench/adaptation.py                       # every arm, seeds 0 1, --epochs 2 (see README for the budget)
    python bench/adaptation.py --arms full,lora --seeds 0 --epochs 1 --json out.json

The demo's domain shift: the shipped tiny SAM3 base (`builtin:tiny`, pretrained on the "source" shapes style)
adapted to the "target" style with the same step budget for every arm (`--epochs` of the demo's data and
batch; the demo itself trains 8 epochs). Every run is `python train.py experiment=demo <arm overrides>` in its
own subprocess, with retention on: `retention.data.root` = the source-style dataset.

Per arm (mean ± half the spread over seeds): target test bbox/segm mAP50; the share of full fine-tuning's
bbox-mAP50 gain over zero-shot it recovers; source-domain bbox mAP50 after adaptation (forgetting); the
negative-prompt false-positive rate (threshold `retention.fp_threshold`); trainable %; wall time of the whole
run (fit + test + retention). Zero-shot (the base, no training) is measured once: evaluation is seed-free.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

# Hydra overrides per arm on top of experiment=demo (demo LoRA: rank 8, alpha 16; alpha = 2 x rank throughout).
ARMS = {
    "full": ["lora=full", "module.lr=1e-3", "module.head_lr=1e-3"],  # every weight: a lower lr than the adapters' 4e-3
    "full_lr4e-3": ["lora=full"],  # full fine-tuning at the demo's (adapters') lr
    "heads": ["lora=none"],
    "lora": [],
    "detr": ["lora=detr"],
    "last1": ["lora.vision_last_blocks=1"],  # tiny ViT has 2 blocks: LoRA in the last one (H5's memory preset)
    "r4": ["lora.rank=4", "lora.alpha=8"],
    "r16": ["lora.rank=16", "lora.alpha=32"],
}
DEFAULT_ARM = "lora"
COLUMNS = ("bbox_mAP50", "segm_mAP50", "gain_share", "source_bbox_mAP50", "neg_fp_rate", "trainable_pct", "wall_s")


def _train(overrides: list[str], out: Path) -> dict:
    """Run train.py with `overrides` into `out`; return its metrics.json and the wall time."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *overrides, f"output_dir={out}",
                             f"hydra.run.dir={out}"], cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"train.py {' '.join(overrides)} failed:\n{result.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["wall_s"] = time.perf_counter() - start
    return metrics


def common_overrides(args) -> list[str]:
    """What every run shares: the demo, the budget, the data, retention on the source style, quiet output."""
    return ["experiment=demo", f"trainer.max_epochs={args.epochs}", f"trainer.check_val_every_n_epoch={args.epochs}",
            f"data.root={args.data_dir / 'shapes_target'}", f"retention.data.root={args.data_dir / 'shapes_source'}",
            "callbacks.progress_bar=null", "module.log_images_every_n_epochs=0", "logger=csv",
            *args.extra]


def trainable_percent(overrides: list[str]) -> float:
    """Trainable share of the model `train.py <overrides>` builds (composed with the real config)."""
    from hydra import compose, initialize_config_dir

    from sam3_lora.model import count_parameters
    from sam3_lora.train import build_model

    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose("train", overrides=overrides)
    trainable, total = count_parameters(build_model(cfg))
    return 100.0 * trainable / total


def run_arm(name: str, seed: int, args) -> dict:
    out = args.out / f"{name}_seed{seed}"
    metrics = _train([*common_overrides(args), *ARMS[name], f"seed={seed}", "validate_before_fit=false"], out)
    tested, kept = metrics["fine_tuned"], metrics["retention"]["fine_tuned"]
    return {"bbox_mAP50": tested["test/bbox_mAP50"], "segm_mAP50": tested.get("test/segm_mAP50", -1.0),
            "source_bbox_mAP50": kept["source/bbox_mAP50"], "neg_fp_rate": kept["neg_fp_rate"],
            "wall_s": metrics["wall_s"]}


def zero_shot(args) -> dict:
    metrics = _train([*common_overrides(args), "train=false"], args.out / "zero_shot")
    tested, kept = metrics["zero_shot"], metrics["retention"]["zero_shot"]
    return {"bbox_mAP50": tested["test/bbox_mAP50"], "segm_mAP50": tested.get("test/segm_mAP50", -1.0),
            "source_bbox_mAP50": kept["source/bbox_mAP50"], "neg_fp_rate": kept["neg_fp_rate"],
            "gain_share": 0.0, "trainable_pct": 0.0, "wall_s": metrics["wall_s"]}


def summarize(runs: dict[str, list[dict]], base: dict, trainable: dict[str, float]) -> dict[str, dict]:
    """Mean and half-spread per arm and column; gain share = (arm - zero-shot) / (full - zero-shot) per seed."""
    full = [r["bbox_mAP50"] for r in runs.get("full", [])]
    summary = {"zero_shot": {k: (v, 0.0) for k, v in base.items()}}
    for name, seeds in runs.items():
        for index, run in enumerate(seeds):
            full_gain = (full[index] if index < len(full) else float("nan")) - base["bbox_mAP50"]
            run["gain_share"] = (run["bbox_mAP50"] - base["bbox_mAP50"]) / full_gain if full_gain > 0 else float("nan")
            run["trainable_pct"] = trainable[name]
        summary[name] = {c: _mean_spread([r[c] for r in seeds]) for c in COLUMNS}
    return summary


def _mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (max(values) - min(values)) / 2


def markdown(summary: dict[str, dict]) -> str:
    """The study table: one row per arm, `mean ± half-spread` cells."""
    header = ["arm", "bbox mAP50", "segm mAP50", "gain recovered", "source bbox mAP50", "neg FP rate",
              "trainable %", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in summary.items():
        cells = [_cell(row[c], pct=c in ("gain_share",), digits=1 if c in ("wall_s",) else 3)
                 for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: tuple[float, float], pct: bool, digits: int) -> str:
    mean, spread = value
    if mean != mean:  # NaN: full fine-tuning gained nothing (or was not run), no share to recover
        return "n/a"
    if pct:
        return f"{100 * mean:.0f}% ± {100 * spread:.0f}"
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {list(ARMS)} (full is needed "
                        "for the gain share)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the demo data per run (the demo: 8)")
    parser.add_argument("--num-train", type=int, default=300, help="target training images (the demo's 300)")
    parser.add_argument("--num-eval", type=int, default=50, help="target valid/test images each (the demo's 50)")
    parser.add_argument("--data-dir", type=Path, default=REPO / "data/adaptation",
                        help="shapes_target/ and shapes_source/ are generated here unless present")
    parser.add_argument("--out", type=Path, default=REPO / "outputs/adaptation")
    parser.add_argument("--jobs", type=int, default=1, help="train.py runs at the same time (wall times then "
                        "include the contention)")
    parser.add_argument("--json", type=Path, help="also write the per-run numbers and the summary here")
    parser.add_argument("extra", nargs="*", help="more Hydra overrides for every run, e.g. data.num_workers=0")
    args = parser.parse_args(argv)
    arms = args.arms.split(",")
    unknown = set(arms) - set(ARMS)
    if unknown:
        parser.error(f"unknown arms {sorted(unknown)}; choose from {list(ARMS)}")
    _generate_data(args)
    base = zero_shot(args)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each run is its own train.py process
        futures = {(name, seed): pool.submit(run_arm, name, seed, args) for name in arms for seed in args.seeds}
        runs = {name: [futures[(name, seed)].result() for seed in args.seeds] for name in arms}
    trainable = {name: trainable_percent([*common_overrides(args), *ARMS[name]]) for name in arms}
    summary = summarize(runs, base, trainable)
    print(f"{len(args.seeds)} seeds {args.seeds}, {args.epochs} epochs x {args.num_train} target images "
          f"(batch 8), {args.jobs} run(s) at a time, mean ± half-spread; gain recovered = bbox mAP50 gain / "
          "full fine-tuning's")
    print(markdown(summary))
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "zero_shot": base, "summary": summary}, indent=2))
    return 0


def _generate_data(args) -> None:
    """Target- and source-style shapes datasets (the demo's generator settings, these sizes) unless present."""
    from sam3_lora.data.shapes import write_shapes_dataset

    for style in ("target", "source"):
        root = args.data_dir / f"shapes_{style}"
        if not root.exists():
            write_shapes_dataset(root, style=style, num_train=args.num_train, num_valid=args.num_eval,
                                 num_test=args.num_eval, progress=False)


if __name__ == "__main__":
    sys.exit(main())
