"""Under DDP (2 CPU processes, gloo) results of all ranks are gathered and evaluated once, like one process."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sam3_lora.evaluation import CocoEvaluator, load_ground_truth
from test_evaluation import BOX_1, BOX_2, PAIRS, gt_annotation, gt_dataset, metadata, perfect_detections, sam3_outputs

# Each rank sees two of the four queries; rank 1 also repeats rank 0's first query, as a DistributedSampler
# padding the last batch would.
RANK_QUERIES = {0: [0, 2], 1: [1, 3, 0]}


def evaluator() -> CocoEvaluator:
    dataset = gt_dataset([gt_annotation(1, 1, 1, BOX_1), gt_annotation(2, 2, 2, BOX_2)])
    return CocoEvaluator(load_ground_truth(dataset))


def update(evaluator_: CocoEvaluator, queries: list[int]) -> None:
    detections = perfect_detections()
    detections[2][0] = detections[1][0] | {"logit": 3.0}  # a confident false positive: AP(cat1) = 0.5
    outputs = sam3_outputs([detections[q] for q in queries])
    evaluator_.update(outputs, SimpleNamespace(find_metadatas=[metadata([PAIRS[q] for q in queries])]))


def worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        evaluator_ = evaluator()
        update(evaluator_, RANK_QUERIES[rank])
        metrics = evaluator_.compute()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump(metrics, handle)
    finally:
        dist.destroy_process_group()


def test_ddp_gathers_all_ranks_and_matches_single_process(tmp_path):
    single = evaluator()
    update(single, [0, 1, 2, 3])
    expected = single.compute()
    assert expected["bbox_AP/cat1"] == pytest.approx(0.5, abs=1e-6)
    port = 29500 + os.getpid() % 1000
    mp.spawn(worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        metrics = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert metrics == pytest.approx(expected, abs=1e-9)
    assert torch.distributed.is_initialized() is False
