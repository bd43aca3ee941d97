"""CocoDataModule: loaders of sam3 batches, determinism across workers, corrupt images, configs, tiny SAM3."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sam3_lora.data.datamodule import CocoDataModule
from sam3_lora.losses import build_sam3_loss
from sam3_lora.model import build_sam3
from tests.conftest import REPO, tiny_model_config
from tests.data_fixtures import SMALL_SHAPES, shapes_root  # noqa: F401 (fixture)

RESOLUTION = 112  # the tiny SAM3's input side


def _datamodule(root, **overrides) -> CocoDataModule:
    settings = {"root": str(root), "resolution": RESOLUTION, "batch_size": 4, "num_workers": 0,
                "num_negatives": 1, "persistent_workers": False, **overrides}
    dm = CocoDataModule(**settings)
    dm.setup()
    return dm


def _fingerprint(batch) -> tuple:
    targets = batch.find_targets[0]
    return (batch.img_batch.sum().item(), tuple(batch.find_text_batch), tuple(batch.find_inputs[0].text_ids.tolist()),
            tuple(targets.boxes.flatten().tolist()), tuple(batch.find_metadatas[0].original_image_id.tolist()))


def test_contract_properties(shapes_root):
    dm = _datamodule(shapes_root, prompts={2: "blue box"})
    assert dm.category_ids == [1, 2, 3]
    assert dm.category_names == {1: "red circle", 2: "blue box", 3: "green triangle"}
    assert dm.has_masks and dm.skipped_images == 0
    ground_truth = json.loads(dm.annotation_file("valid").read_text())
    assert [c["id"] for c in ground_truth["categories"]] == [1, 2, 3]
    assert min(a["id"] for a in ground_truth["annotations"]) == 1


def test_without_a_test_split_testing_uses_valid(shapes_root, tmp_path):
    root = shutil.copytree(shapes_root, tmp_path / "data", ignore=shutil.ignore_patterns("test"))
    dm = _datamodule(root)
    assert "test" not in dm.splits
    assert dm.annotation_file("test") == dm.annotation_file("valid")
    assert len(dm.test_dataloader().dataset) == len(dm.val_dataloader().dataset) == SMALL_SHAPES["num_valid"]


def test_train_batch_has_positives_and_the_sampled_negative(shapes_root):
    dm = _datamodule(shapes_root, num_negatives=1)
    batch = next(iter(dm.train_dataloader()))
    assert batch.img_batch.shape == (4, 3, RESOLUTION, RESOLUTION)
    records = {r.image_id: r for r in dm.splits["train"].records}
    meta, targets = batch.find_metadatas[0], batch.find_targets[0]
    for image in set(batch.find_inputs[0].img_ids.tolist()):
        rows = (batch.find_inputs[0].img_ids == image).nonzero().flatten().tolist()
        record = records[meta.original_image_id[rows[0]].item()]
        asked = {meta.original_category_id[r].item(): targets.num_boxes[r].item() for r in rows}
        positives = {c for c, n in asked.items() if n > 0}
        absent = {1, 2, 3} - {i.category_id for i in record.instances}  # crowd-only categories are never asked
        assert positives == {i.category_id for i in record.targets}
        assert len(asked) - len(positives) == min(1, len(absent))  # num_negatives=1, drawn from the absent ones
        assert set(asked) - positives <= absent
    assert set(batch.find_text_batch) <= {"red circle", "blue square", "green triangle"}


def test_eval_loader_asks_every_category_in_chunks_on_the_square_resized_image(shapes_root):
    dm = _datamodule(shapes_root, eval_categories_per_chunk=2, eval_batch_size=2)
    dataset = dm.val_dataloader().dataset
    assert len(dataset) == SMALL_SHAPES["num_valid"] * 2  # chunks [1, 2] and [3]
    asked = [(q.inference_metadata.original_image_id, q.inference_metadata.original_category_id)
             for i in range(len(dataset)) for q in dataset[i].find_queries]
    assert sorted(asked) == sorted((r.image_id, c) for r in dm.splits["valid"].records for c in (1, 2, 3))
    # normalised target boxes × original (W, H) are the ground truth's original-pixel boxes
    record = next(r for r in dm.splits["valid"].records if len(r.targets) == 1)
    point = dataset[dm.splits["valid"].records.index(record) * 2 + (record.targets[0].category_id == 3)]
    (query,) = [q for q in point.find_queries if q.object_ids_output]
    cx, cy, w, h = point.images[0].objects[query.object_ids_output[0]].bbox.tolist()
    x, y = (cx - w / 2) * record.width, (cy - h / 2) * record.height
    assert [x, y, w * record.width, h * record.height] == pytest.approx(record.targets[0].bbox, abs=0.01)


def test_two_workers_give_identical_batches_across_runs_and_epochs_differ(shapes_root):
    def epoch_batches(num_workers, epoch):
        loader = _datamodule(shapes_root, num_workers=num_workers, seed=5).train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [_fingerprint(b) for b in loader]

    first = epoch_batches(2, epoch=0)
    assert epoch_batches(2, epoch=0) == first
    assert epoch_batches(0, epoch=0) == first  # independent of the number of workers
    assert epoch_batches(0, epoch=1) != first


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header intact: passes setup, fails when decoded


def test_corrupt_image_met_mid_epoch_is_skipped_and_counted(shapes_root, tmp_path):
    root = shutil.copytree(shapes_root, tmp_path / "data")
    dm = _datamodule(root, num_workers=1)
    _truncate(dm.splits["train"].records[5].path)
    _truncate(dm.splits["valid"].records[1].path)
    seen = [i for batch in dm.train_dataloader() for i in batch.find_metadatas[0].original_image_id.tolist()]
    assert dm.skipped_images == 1  # counted across the worker process
    assert len(set(seen)) == SMALL_SHAPES["num_train"] - 1 and dm.splits["train"].records[5].image_id not in seen
    batches = list(dm.val_dataloader())  # evaluation keeps the image (black) so its ground truth counts as missed
    assert sum(b.img_batch.shape[0] for b in batches) == SMALL_SHAPES["num_valid"]
    assert dm.skipped_images == 2


def test_a_datamodule_batch_trains_the_tiny_sam3(shapes_root):
    # the shapes writer puts the empty image, RLE, box-only and crowd annotations at indices 0-4
    dm = _datamodule(shapes_root, num_negatives="all")
    loader = dm.train_dataloader()
    batch = loader.collate_fn([loader.dataset[(index, 0)] for index in range(6)])
    assert 0 in batch.find_targets[0].is_valid_segment.tolist()  # a box-only object is in the batch
    torch.manual_seed(0)
    model = build_sam3(**tiny_model_config()).train()
    out = model(batch)
    losses = build_sam3_loss(with_masks=dm.with_masks)(out, [model.back_convert(t) for t in batch.find_targets])
    losses["core_loss"].backward()
    assert torch.isfinite(losses["core_loss"]) and losses["core_loss"] > 0
    assert {"loss_mask", "loss_dice", "presence_loss", "loss_giou"} <= set(losses)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _compose(group_file: str, overrides: tuple = (), **data_overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name=None, overrides=[f"+data={group_file}", *overrides])
    OmegaConf.set_struct(cfg, False)
    cfg.model = {"resolution": RESOLUTION}
    cfg.data.update(data_overrides)
    return cfg


def test_coco_config_instantiates_the_datamodule(shapes_root):
    overrides = ('data.prompts={2:"blue box",3:"green wedge"}', "data.num_negatives=all")
    cfg = _compose("coco", overrides, root=str(shapes_root), num_workers=0)
    dm = instantiate(cfg.data)
    dm.setup()
    assert isinstance(dm, CocoDataModule) and dm.resolution == RESOLUTION and dm.category_ids == [1, 2, 3]
    assert dm.category_names == {1: "red circle", 2: "blue box", 3: "green wedge"} and dm.num_negatives is None


def test_shapes_config_generates_its_dataset_when_absent(tmp_path):
    cfg = _compose("shapes", root=str(tmp_path / "shapes_target"), num_workers=0)
    cfg.data.generate_shapes.update(num_train=4, num_valid=2, num_test=2, progress=False)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup()
    assert (tmp_path / "shapes_target" / "train" / "_annotations.coco.json").is_file()
    assert dm.category_names == {1: "red circle", 2: "blue square", 3: "green triangle"}
    assert next(iter(dm.val_dataloader())).img_batch.shape[-1] == RESOLUTION


_OPENCV_BUSY_PARENT = """
import sys, numpy as np, cv2
for _ in range(10):  # the parent uses OpenCV's thread pool (as the converters and transforms do)
    cv2.GaussianBlur(np.random.rand(1500, 1500).astype(np.float32), (15, 15), 0)
from sam3_lora.data.datamodule import CocoDataModule
dm = CocoDataModule(root=sys.argv[1], resolution=112, batch_size=4, num_workers=2, persistent_workers=False)
dm.setup("fit")
print(sum(1 for _ in dm.train_dataloader()))
"""


def test_workers_start_after_the_parent_used_opencv_threads(shapes_root):
    """Setting OpenCV's threads inside forked workers deadlocked when the parent had used its pool (tests hung)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _OPENCV_BUSY_PARENT, str(shapes_root)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) > 0
