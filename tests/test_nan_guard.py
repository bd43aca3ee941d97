"""NaN/inf guard: a non-finite loss or gradient skips the optimiser step (weights and AdamW state untouched),
is counted (`train/skipped_steps`, metrics.json), K in a row stop the run with an error naming the step and the
loss terms, and non-finite weights never reach a checkpoint or adapter/."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file
from torch import nn

from sam3_lora.callbacks import NanGuard, NonFiniteTrainingError, NonFiniteWeightsError, require_finite
from sam3_lora.data.shapes import write_shapes_dataset
from sam3_lora.train import run
from tests.train_helpers import adapter_state, compose_config

SMALL_SHAPES = {"num_train": 16, "num_valid": 4, "num_test": 4, "progress": False}
FAST = ["validate_before_fit=false", "test=false", "+trainer.limit_val_batches=0"]  # 4 training steps of 4 images


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", style="target", **SMALL_SHAPES)


# ----- callbacks the tests add through the config (+callbacks.x._target_=...) ------------------------------------
class PoisonBatches(Callback):
    """Fills the images of the batches at `steps` (global step) with NaN; records what those steps changed."""

    def __init__(self, steps: list[int], out_dir: str):
        self.steps, self.out_dir, self.records = set(steps), Path(out_dir), {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = adapter_state(pl_module.model)
        self._adam_steps = _adam_steps(trainer)
        if trainer.global_step in self.steps:
            batch.img_batch.fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        after = adapter_state(pl_module.model)
        change = max(float((after[k] - self._before[k]).abs().max()) for k in after)
        self.records[trainer.global_step - 1] = {"max_change": change, "adam_steps": [self._adam_steps,
                                                                                     _adam_steps(trainer)]}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "steps.json").write_text(json.dumps(self.records))


class PoisonWeights(Callback):
    """Writes NaN into one trainable tensor at the end of the training epoch (before last.ckpt is saved) or at
    the end of fit (before adapter/ is written)."""

    def __init__(self, when: str):
        self.when = when

    def _poison(self, pl_module):
        next(p for p in pl_module.model.parameters() if p.requires_grad).data[0] = float("nan")

    def on_train_epoch_end(self, trainer, pl_module):
        if self.when == "epoch_end":
            self._poison(pl_module)

    def on_fit_end(self, trainer, pl_module):
        if self.when == "fit_end":
            self._poison(pl_module)


def _adam_steps(trainer) -> float:
    states = trainer.optimizers[0].state.values() if trainer.optimizers else []
    return max((float(s["step"]) for s in states if "step" in s), default=0.0)


def _run(root, out, *overrides):
    return run(compose_config(root, out, [*FAST, *overrides]))


def _poison_batches(out, steps) -> list[str]:
    return ["+callbacks.poison._target_=tests.test_nan_guard.PoisonBatches", f"+callbacks.poison.steps={steps}",
            f"+callbacks.poison.out_dir={out / 'poison'}"]


# ----- through train.run on the tiny SAM3 -------------------------------------------------------------------------
def test_nan_batch_skips_its_step_and_is_counted(shapes_root, tmp_path):
    _run(shapes_root, tmp_path, *_poison_batches(tmp_path, [1]), "logger=csv", "trainer.log_every_n_steps=1")
    steps = {int(k): v for k, v in json.loads((tmp_path / "poison/steps.json").read_text()).items()}
    assert sorted(steps) == [0, 1, 2, 3]
    assert steps[1]["max_change"] == 0.0  # the NaN step left every trainable tensor as it was
    assert steps[1]["adam_steps"][0] == steps[1]["adam_steps"][1] == 1.0  # ... and AdamW's state too
    assert steps[2]["max_change"] > 0 and steps[2]["adam_steps"] == [1.0, 2.0]  # training goes on
    assert json.loads((tmp_path / "metrics.json").read_text())["training"]["skipped_steps"] == 1
    logged = [float(r["train/skipped_steps"]) for r in csv.DictReader(open(tmp_path / "csv/metrics.csv"))
              if r.get("train/skipped_steps")]
    assert logged == [0.0, 1.0, 1.0, 1.0]
    adapter = load_file(str(tmp_path / "adapter/adapter_model.safetensors"))
    assert adapter and all(torch.isfinite(v).all() for v in adapter.values())


def test_k_consecutive_nan_steps_stop_the_run_naming_step_and_loss_terms(shapes_root, tmp_path):
    with pytest.raises(NonFiniteTrainingError) as caught:
        _run(shapes_root, tmp_path, *_poison_batches(tmp_path, [1, 2, 3]), "callbacks.nan_guard.max_consecutive=2")
    message = str(caught.value)
    assert "2 optimiser steps in a row" in message and "global step 2 (epoch 0, batch 2)" in message
    assert "core_loss=nan" in message and "loss_giou=nan" in message
    assert not (tmp_path / "adapter").exists()


def test_non_finite_weights_never_reach_last_ckpt(shapes_root, tmp_path):
    with pytest.raises(NonFiniteWeightsError, match="last.ckpt"):
        _run(shapes_root, tmp_path, "+callbacks.poison._target_=tests.test_nan_guard.PoisonWeights",
             "+callbacks.poison.when=epoch_end")
    assert not (tmp_path / "checkpoints/last.ckpt").exists()


def test_non_finite_weights_never_reach_the_adapter(shapes_root, tmp_path):
    with pytest.raises(NonFiniteWeightsError, match="adapter"):
        # without checkpoints run() exports the weights as they are (with one, it reloads the finite best)
        _run(shapes_root, tmp_path, "callbacks.model_checkpoint=null", "callbacks.last_checkpoint=null",
             "+trainer.enable_checkpointing=false", "+trainer.limit_train_batches=1",
             "+callbacks.poison._target_=tests.test_nan_guard.PoisonWeights",
             "+callbacks.poison.when=fit_end")
    assert not (tmp_path / "adapter").exists()


# ----- the callback's mechanics on a toy module (milliseconds) ----------------------------------------------------
class ToyModule(L.LightningModule):
    """Regression on random data; `bad_grad_steps` / `bad_loss_steps` make a step's gradient / loss inf."""

    def __init__(self, bad_grad_steps=(), bad_loss_steps=()):
        super().__init__()
        self.layer = nn.Linear(3, 1)
        self.bad_grad_steps, self.bad_loss_steps = set(bad_grad_steps), set(bad_loss_steps)
        self.weights_at: dict[int, torch.Tensor] = {}
        self.last_loss_terms = {}

    def training_step(self, batch, batch_idx):
        self.weights_at[self.global_step] = self.layer.weight.detach().clone()
        loss = (self.layer(batch[0]) - batch[1]).pow(2).mean()
        if self.global_step in self.bad_loss_steps:
            loss = loss * float("inf")
        self.last_loss_terms = {"core_loss": loss.detach(), "loss_bbox": loss.detach() / 2}
        return loss

    def on_after_backward(self):
        if self.global_step in self.bad_grad_steps:
            self.layer.weight.grad[0, 0] = float("inf")

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=0.1, weight_decay=0.5)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(8, 3, generator=torch.Generator().manual_seed(0)),
                                              torch.randn(8, 1, generator=torch.Generator().manual_seed(1)))
        return torch.utils.data.DataLoader(data, batch_size=2)


def _fit(module: ToyModule, guard: NanGuard, steps: int = 4) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[guard])
    trainer.fit(module)
    return trainer


def test_inf_gradient_skips_adamw_and_weight_decay_but_not_the_schedule():
    module, guard = ToyModule(bad_grad_steps={1}), NanGuard(max_consecutive=3)
    trainer = _fit(module, guard)
    assert torch.equal(module.weights_at[1], module.weights_at[2])  # no update, no decoupled weight decay
    assert not torch.equal(module.weights_at[2], module.weights_at[3])
    optimizer = trainer.optimizers[0]
    assert all(float(state["step"]) == 3 for state in optimizer.state.values())  # AdamW saw 3 of 4 steps
    assert trainer.global_step == 4 and trainer.lr_scheduler_configs[0].scheduler.last_epoch == 4
    assert guard.skipped_steps == 1 and guard.consecutive == 0
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_consecutive_bad_steps_raise_with_step_and_terms_and_counters_restart():
    with pytest.raises(NonFiniteTrainingError, match=r"global step 2 .*core_loss=inf, loss_bbox=inf"):
        _fit(ToyModule(bad_loss_steps={1, 2}), NanGuard(max_consecutive=2))
    guard = NanGuard(max_consecutive=2)
    _fit(ToyModule(bad_loss_steps={0, 2}), guard, steps=4)  # not in a row: no error
    assert guard.skipped_steps == 2
    restored = NanGuard(max_consecutive=2)
    restored.load_state_dict(guard.state_dict())
    assert restored.skipped_steps == 2


def test_require_finite_names_the_tensor_and_the_destination():
    require_finite({"a": torch.ones(2), "steps": torch.tensor([3])}, "adapter/")
    with pytest.raises(NonFiniteWeightsError, match=r"refusing to write adapter/: 1 tensor\(s\) .*\(b\)"):
        require_finite({"a": torch.ones(2), "b": torch.tensor([1.0, float("inf")])}, "adapter/")
    with pytest.raises(ValueError, match="max_consecutive"):
        NanGuard(max_consecutive=0)
