"""Data pipeline throughput: images/s per worker (decode, masks, augmentation, query building, collate).

    python bench/data_throughput.py                       # 1008 px, ~10 instances per image
    python bench/data_throughput.py --resolution 112 --image-size 112 160 --objects 1 4   # the demo setting

Generates a synthetic shapes dataset (originals 800-1200 px by default) in a temporary folder, times each stage
in this process with one thread, then the real DataLoader with 1 and 2 workers. Prints a Markdown table.
Goal: >= 8 images/s per core at 1008 px, so a GPU is never starved.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

import sam3_lora  # noqa: F401  (CPU compat patches for sam3)
from sam3_lora.data.datamodule import CocoDataModule
from sam3_lora.data.dataset import item_rng
from sam3_lora.data.images import read_image_rgb
from sam3_lora.data.masks import decode_mask
from sam3_lora.data.queries import build_datapoint, plan_train_queries
from sam3_lora.data.shapes import write_shapes_dataset
from sam3_lora.data.transforms import apply_transform


def _stage_times(dm: CocoDataModule, count: int) -> dict[str, float]:
    """Seconds per image of each stage, run in this process."""
    dataset = dm.train_dataloader().dataset
    settings, totals = dataset.settings, dict.fromkeys(("decode", "masks", "augment", "queries", "collate"), 0.0)
    points = []
    for index in range(count):
        record, rng = dataset.records[index], item_rng(settings.seed, 0, index)
        start = time.perf_counter()
        image = read_image_rgb(record.path, record.apply_exif)
        decoded = time.perf_counter()
        targets = record.targets
        masks = [decode_mask(t.segmentation, record.height, record.width) if t.segmentation is not None
                 else np.zeros((record.height, record.width), np.uint8) for t in targets]
        masked = time.perf_counter()
        sample = apply_transform(settings.transform, image, [t.bbox for t in targets], masks or None, seed=index)
        augmented = time.perf_counter()
        categories = [t.category_id for t in targets]
        queries = plan_train_queries(sorted({categories[k] for k in sample.kept}), set(), settings.phrases, rng,
                                     dataset.num_negatives, dataset.max_queries)
        points.append(build_datapoint(sample, categories, [t.segmentation is not None for t in targets], queries,
                                      record.image_id, (record.height, record.width), 0))
        done = time.perf_counter()
        for key, seconds in zip(totals, (decoded - start, masked - decoded, augmented - masked, done - augmented)):
            totals[key] += seconds
    start = time.perf_counter()
    collate = dm.train_dataloader().collate_fn
    for first in range(0, count, dm.batch_size):
        collate(points[first:first + dm.batch_size])
    totals["collate"] = time.perf_counter() - start
    return {key: seconds / count for key, seconds in totals.items()}


def _loader_rate(root: Path, resolution: int, workers: int, batch_size: int, count: int) -> float:
    """Images/s of the real training DataLoader (after the first batch, which includes worker start-up)."""
    dm = CocoDataModule(root=str(root), resolution=resolution, batch_size=batch_size, num_workers=workers,
                        num_negatives=3, persistent_workers=False)
    dm.setup()
    iterator = iter(dm.train_dataloader())
    next(iterator)
    start, seen = time.perf_counter(), 0
    for batch in iterator:
        seen += batch.img_batch.shape[0]
        if seen >= count:
            break
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=1008)
    parser.add_argument("--image-size", type=int, nargs=2, default=(800, 1200), help="original side range")
    parser.add_argument("--objects", type=int, nargs=2, default=(9, 12), help="separate objects per image")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_shapes_dataset(Path(tmp) / "bench", seed=0, num_train=args.images, num_valid=2, num_test=0,
                                    image_size=tuple(args.image_size), objects_per_image=tuple(args.objects),
                                    progress=False)
        dm = CocoDataModule(root=str(root), resolution=args.resolution, batch_size=args.batch_size,
                            num_workers=0, num_negatives=3)
        dm.setup()
        instances = np.mean([len(r.targets) for r in dm.splits["train"].records])
        stages = _stage_times(dm, args.images)
        rates = {w: _loader_rate(root, args.resolution, w, args.batch_size, args.images) for w in (1, 2)}
    total = sum(stages.values())
    print(f"\nresolution {args.resolution}, originals {args.image_size[0]}-{args.image_size[1]} px, "
          f"{instances:.1f} instances/image, batch {args.batch_size}\n")
    print("| stage (1 thread) | ms / image |\n|---|---:|")
    for name, seconds in stages.items():
        print(f"| {name} | {seconds * 1000:.1f} |")
    print(f"| **total** | **{total * 1000:.1f}** (= {1 / total:.1f} images/s per core) |\n")
    print("| DataLoader workers | images/s | images/s per worker |\n|---:|---:|---:|")
    for workers, rate in rates.items():
        print(f"| {workers} | {rate:.1f} | {rate / workers:.1f} |")


if __name__ == "__main__":
    main()
