"""DDP that is really DDP (2 CPU processes, gloo, through train.py): each rank sees its own share of the data, every
epoch a new order and new augmentations, and one DDP step equals one single-process step on the union batch up to
the factor sam3's loss puts there by design.

The exact relation (sam3/train/loss/sam3_loss.py, loss_fns.py): per rank, `core_loss` = sqrt(Q_r) x (terms), where
Q_r is the rank's number of queries (`scale_by_find_batch_size`, sam3_loss.py:178-181). The box/mask terms are sums
divided by num_boxes, which "global" normalisation averages over ranks (all-reduce / world size, sam3_loss.py:80-82),
so after DDP's gradient averaging they equal the single-process sum / N. loss_ce (weak loss, loss_fns.py:457) and
presence_loss (loss_fns.py:428-434) are means over the rank's own queries: with the same number of queries per rank,
the average of the ranks' means is the mean over the union. What remains is the sqrt factor:
    grad_DDP(W ranks x batch b) = grad_single(batch W*b) * sqrt(Q_r) / sqrt(W * Q_r) = grad_single / sqrt(W).
AdamW's update is invariant to that scale (up to eps), so training follows the single-process run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from sam3_lora.data.shapes import write_shapes_dataset
from sam3_lora.train import run
from tests.conftest import REPO
from tests.train_helpers import SMALL_RUN, compose_config

WORLD_SIZE = 2
NUM_TRAIN = 4           # 2 ranks x batch 2: one step per epoch, whose union batch is the whole split
EPOCHS = 3
# float32 sums in another order (per-rank vs whole-batch reductions, gloo all-reduce): measured max deviation
# 1.2e-6 of the largest gradient (3.6e-5 of 29.4); without the sqrt(2) factor the gradients are off by 41 %.
GRAD_RTOL = 1e-4


class RecordTraining(Callback):
    """Per rank: (image id, pixel hash) of every training image per epoch, and the gradients of global step 0."""

    def __init__(self, out_dir: str):
        self.out_dir, self.seen, self.queries = Path(out_dir), {}, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        ids = _image_ids(batch)
        images = [(ids[i], hashlib.sha1(batch.img_batch[i].numpy().tobytes()).hexdigest())
                  for i in range(len(batch.img_batch))]
        self.seen.setdefault(str(trainer.current_epoch), []).extend(images)
        self.queries = int(batch.find_targets[0].num_boxes.shape[0])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0:
            grads = {n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters() if p.grad is not None}
            self.out_dir.mkdir(parents=True, exist_ok=True)
            torch.save({"grads": grads, "queries": self.queries}, self.out_dir / f"grads{trainer.global_rank}.pt")

    def on_fit_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"seen{trainer.global_rank}.json").write_text(json.dumps(self.seen))


def _image_ids(batch) -> dict[int, int]:
    """Image index in the batch → COCO image id (through the queries that point at it)."""
    image_of_query = batch.find_inputs[0].img_ids.tolist()
    ids = batch.find_metadatas[0].original_image_id.tolist()
    return {image: int(image_id) for image, image_id in zip(image_of_query, ids)}


@pytest.fixture(scope="module")
def uncrowded_root(tmp_path_factory) -> Path:
    """Shapes with NUM_TRAIN training images without crowd regions: every image asks all 3 categories,
    exhaustively, so every rank has the same number of queries (the condition of the relation above)."""
    root = write_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", style="target", num_train=16,
                                num_valid=4, num_test=0, progress=False)
    annotation_file = root / "train" / "_annotations.coco.json"
    data = json.loads(annotation_file.read_text())
    crowded = {a["image_id"] for a in data["annotations"] if a.get("iscrowd")}
    annotated = {a["image_id"] for a in data["annotations"]}
    keep = [i for i in data["images"] if i["id"] not in crowded and i["id"] in annotated][:NUM_TRAIN]
    assert len(keep) == NUM_TRAIN
    kept_ids = {i["id"] for i in keep}
    data["images"] = keep
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in kept_ids]
    annotation_file.write_text(json.dumps(data))
    return root


COMMON = ["validate_before_fit=false", "test=false", "+trainer.limit_val_batches=0", "callbacks.model_checkpoint=null",
          "callbacks.last_checkpoint=null", "trainer.precision=32-true",
          "+callbacks.record._target_=tests.test_ddp.RecordTraining"]


@pytest.fixture(scope="module")
def ddp_run(uncrowded_root, tmp_path_factory) -> Path:
    """2 processes x batch 2, EPOCHS epochs, launched like a user would (torchrun train.py)."""
    out = tmp_path_factory.mktemp("ddp")
    overrides = [*SMALL_RUN, f"data.root={uncrowded_root}", *COMMON, "data.batch_size=2",
                 f"trainer.max_epochs={EPOCHS}",
                 "trainer=ddp", "trainer.accelerator=cpu", f"trainer.devices={WORLD_SIZE}",
                 f"hydra.run.dir={out / 'run'}", f"+callbacks.record.out_dir={out / 'record'}"]
    port = 29600 + os.getpid() % 300
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD_SIZE}",
                             f"--master_port={port}", "train.py", *overrides],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return out / "record"


def _seen(record: Path, rank: int) -> dict[int, list[tuple[int, str]]]:
    return {int(e): [tuple(x) for x in v] for e, v in json.loads((record / f"seen{rank}.json").read_text()).items()}


def test_each_rank_sees_its_own_share_and_every_epoch_is_new(ddp_run, uncrowded_root):
    train_ids = {i["id"] for i in json.loads((uncrowded_root / "train/_annotations.coco.json").read_text())["images"]}
    seen = {rank: _seen(ddp_run, rank) for rank in range(WORLD_SIZE)}
    shares = {epoch: tuple(tuple(i for i, _ in seen[rank][epoch]) for rank in range(WORLD_SIZE))
              for epoch in range(EPOCHS)}
    for epoch, (first, second) in shares.items():
        assert len(first) == len(second) == NUM_TRAIN // WORLD_SIZE
        assert not set(first) & set(second)  # no image twice in one epoch
        assert set(first) | set(second) == train_ids  # and none left out
    assert len(set(shares.values())) > 1  # the ranks' shares and order change between epochs ...
    pixels = {epoch: {i: h for rank in range(WORLD_SIZE) for i, h in seen[rank][epoch]} for epoch in range(EPOCHS)}
    for image_id in train_ids:  # ... and every image is augmented anew each epoch: our sampler got set_epoch
        assert len({pixels[epoch][image_id] for epoch in range(EPOCHS)}) == EPOCHS, image_id


def test_one_ddp_step_equals_a_single_process_step_on_the_union_batch_over_sqrt_world_size(
        ddp_run, uncrowded_root, tmp_path):
    # single process, batch 4 = the whole split = the union of the ranks' first batches, with the same per-item
    # augmentation and negatives (seeded by (seed, epoch 0, index)) and the same initial weights (seed)
    run(compose_config(uncrowded_root, tmp_path, [*COMMON, "data.batch_size=4", "trainer.max_steps=1",
                                                  f"+callbacks.record.out_dir={tmp_path / 'record'}"]))
    single = torch.load(tmp_path / "record/grads0.pt", weights_only=True)
    ranks = [torch.load(ddp_run / f"grads{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    assert [r["queries"] for r in ranks] == [single["queries"] // WORLD_SIZE] * WORLD_SIZE  # equal shares
    ddp = ranks[0]["grads"]
    assert ddp.keys() == single["grads"].keys() and ddp
    for name in ddp:  # DDP averaged the gradients: both ranks hold the same
        torch.testing.assert_close(ranks[1]["grads"][name], ddp[name], rtol=1e-6, atol=1e-9, msg=name)
    scale = max(float(g.abs().max()) for g in single["grads"].values())
    for name, grad in single["grads"].items():
        torch.testing.assert_close(ddp[name] * math.sqrt(WORLD_SIZE), grad, rtol=GRAD_RTOL,
                                   atol=GRAD_RTOL * scale, msg=name)
    norm = lambda grads: math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))  # noqa: E731
    assert norm(single["grads"]) / norm(ddp) == pytest.approx(math.sqrt(WORLD_SIZE), rel=GRAD_RTOL)
