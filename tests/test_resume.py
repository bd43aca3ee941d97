"""Kill-anywhere resume: a run SIGKILLed mid-epoch and resumed from last.ckpt ends where the uninterrupted run ends.

The killed run is a real `python train.py` process killed with SIGKILL right after an optimiser step that was not
checkpointed; the resumed and the uninterrupted runs are fresh `python train.py` processes too. Every batch each run trains on is
recorded (its images' pixel sum: augmentation; its query phrases: negatives), so the test also shows that the
resumed run starts at the saved step and neither replays nor skips a batch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from sam3_lora.data.shapes import write_shapes_dataset
from tests.conftest import REPO
from tests.train_helpers import SMALL_RUN, adapter_state, compose_config

STEP_EVERY = 2   # callbacks.last_checkpoint.every_n_train_steps
KILL_AT = 3      # SIGKILL after optimiser step 3: last.ckpt holds step 2, mid-epoch 0 (4 batches per epoch)
EPOCHS = 2
RESUME_TOLERANCE = 1e-6  # issue 9: the resumed adapter equals the uninterrupted one within this
# The comparison's own recipe, not the demo's: CPU kernels are not bitwise reproducible between a fresh process and
# one that trained before (gradients differ by up to ~2e-7 after resume on identical weights, data and optimiser state),
# and Adam amplifies that noise with the step size: at the demo's lr 4e-3 without scale augmentation the runs end
# 1e-3 apart, at this recipe within 1e-7.
RECIPE = ["module.lr=1e-3", "module.head_lr=1e-3", "data.scale_range=[0.476,0.984]"]


class RecordBatches(Callback):
    """Appends (epoch, batch_idx, global_step, image pixel sum, phrases) of every training batch to a JSON file."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        rows = json.loads(self.path.read_text()) if self.path.exists() else []
        rows.append([trainer.current_epoch, batch_idx, trainer.global_step,
                     round(float(batch.img_batch.double().sum()), 3), list(batch.find_text_batch)])
        self.path.write_text(json.dumps(rows))

    def on_fit_end(self, trainer, pl_module):
        torch.save(adapter_state(pl_module.model), self.path.with_suffix(".final.pt"))


class KillAtStep(Callback):
    """SIGKILLs its own process once `step` optimiser steps are done (no cleanup, no checkpoint of that step)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", style="target", num_train=16,
                                num_valid=4, num_test=4, progress=False)


def _overrides(record: Path) -> list[str]:
    return [*RECIPE, "validate_before_fit=false", "test=false", "seed=3", f"trainer.max_epochs={EPOCHS}",
            f"callbacks.last_checkpoint.every_n_train_steps={STEP_EVERY}",
            "+callbacks.record._target_=tests.test_resume.RecordBatches", f"+callbacks.record.path={record}"]


def _rows(path: Path) -> list:
    return json.loads(path.read_text())


def _train_py(shapes_root: Path, out: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    """`python train.py` in a fresh process: every run of the comparison starts from the same process state
    (in-process runs inherit whatever earlier tests left in torch/OpenCV globals)."""
    return subprocess.run(
        [sys.executable, "train.py", *SMALL_RUN, f"data.root={shapes_root}", f"output_dir={out}", *overrides],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(shapes_root, tmp_path_factory) -> Path:
    """Uninterrupted run in `full/`; killed-then-resumed run in `run/` (records kill.json, resume.json)."""
    root = tmp_path_factory.mktemp("resume")
    full = _train_py(shapes_root, root / "full", _overrides(root / "full.json"))
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _train_py(shapes_root, root / "run", [*_overrides(root / "kill.json"),
                                                   "+callbacks.kill._target_=tests.test_resume.KillAtStep",
                                                   f"+callbacks.kill.step={KILL_AT}"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = root / "run/checkpoints/last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == KILL_AT - 1
    resumed = _train_py(shapes_root, root / "run", [*_overrides(root / "resume.json"), f"ckpt_path={last}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return root


def test_step_checkpoint_override_composes_and_saves_every_n_steps(shapes_root, tmp_path):
    cfg = compose_config(shapes_root, tmp_path, [f"callbacks.last_checkpoint.every_n_train_steps={STEP_EVERY}"])
    from hydra.utils import instantiate

    callback = instantiate(cfg.callbacks.last_checkpoint)  # Lightning refuses every_n_epochs + every_n_train_steps
    assert (callback._every_n_train_steps, callback.every_n_epochs) == (STEP_EVERY, 0)
    default = instantiate(compose_config(shapes_root, tmp_path).callbacks.last_checkpoint)
    assert (default._every_n_train_steps, default.every_n_epochs) == (0, 1)


def test_killed_mid_epoch_and_resumed_ends_with_the_uninterrupted_adapter(runs):
    full = load_file(runs / "full/adapter/adapter_model.safetensors")
    resumed = load_file(runs / "run/adapter/adapter_model.safetensors")
    assert full.keys() == resumed.keys() and full
    for key, value in full.items():
        torch.testing.assert_close(resumed[key], value, atol=RESUME_TOLERANCE, rtol=0, msg=key)
    final_full = torch.load(runs / "full.final.pt", weights_only=True)
    final_resumed = torch.load(runs / "resume.final.pt", weights_only=True)
    for key, value in final_full.items():
        torch.testing.assert_close(final_resumed[key], value, atol=RESUME_TOLERANCE, rtol=0, msg=key)


def test_resume_continues_at_the_saved_step_with_the_same_batches(runs):
    full, killed, resumed = (_rows(runs / f"{name}.json") for name in ("full", "kill", "resume"))
    assert len(full) == EPOCHS * 4 and len(killed) == KILL_AT
    # the resumed run starts at the checkpointed step (a run that ignored ckpt_path would start at 0) ...
    assert resumed[0][:3] == [0, KILL_AT - 1, KILL_AT - 1]
    # ... and trains exactly the batches the uninterrupted run trained from there: same images, augmentation,
    # negatives; no consumed batch replayed, none skipped
    assert resumed == full[KILL_AT - 1:]
    assert killed == full[:KILL_AT]


class _Keys(torch.utils.data.Dataset):
    """Serves the sampler's (index, epoch) keys themselves."""

    def __len__(self):
        return 10

    def __getitem__(self, key):
        return tuple(key)


def _collate_keys(keys):
    return [list(k) for k in keys]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_position_resumes_the_same_epoch_with_workers(num_workers):
    from sam3_lora.data.dataset import EpochSampler
    from sam3_lora.data.resumable import LoaderPosition, ResumableDataLoader

    def loader(position):
        return ResumableDataLoader(_Keys(), batch_size=2, sampler=EpochSampler(10, seed=1), num_workers=num_workers,
                                   persistent_workers=num_workers > 0, collate_fn=_collate_keys, position=position)

    first = loader(LoaderPosition())
    batches = iter(first)  # Lightning calls iter() before set_epoch on a resumed run
    first.sampler.set_epoch(3)
    uninterrupted = list(batches)
    assert {epoch for batch in uninterrupted for _, epoch in batch} == {3}
    batches = iter(first)
    consumed = [next(batches), next(batches)]
    state = first.state_dict()
    assert state == {"epoch": 3, "batches": 2} and consumed == uninterrupted[:2]

    restored = LoaderPosition()
    restored.load_state_dict(state)
    resumed = loader(restored)
    batches = iter(resumed)
    resumed.sampler.set_epoch(3)
    assert list(batches) == uninterrupted[2:]  # the rest of epoch 3, nothing replayed
    resumed.sampler.set_epoch(4)
    assert len(list(resumed)) == 5  # the next epoch is whole again
