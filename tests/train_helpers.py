"""Compose the real config (conf/train.yaml) shrunk for CPU tests, and read what a run wrote."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback

from tests.conftest import REPO

# A small shapes dataset and one-epoch CPU runs: every run takes seconds on 2 cores.
SMALL_RUN = [
    "experiment=demo", "model.checkpoint=null", "data.num_workers=0", "data.persistent_workers=false",
    "data.batch_size=4", "data.eval_batch_size=8", "trainer.max_epochs=1", "trainer.check_val_every_n_epoch=1", "callbacks.progress_bar=null",
    "module.warmup_steps=2", "module.log_images_every_n_epochs=0",
]


def compose_config(root: Path, out: Path, overrides: list[str] = ()):
    """The real training config with the demo experiment, a small dataset at `root`, output at `out`."""
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return compose("train", overrides=[*SMALL_RUN, f"data.root={root}", f"output_dir={out}", *overrides])


def adapter_state(model) -> dict[str, torch.Tensor]:
    """Trainable tensors of a model (LoRA + modules_to_save), detached copies."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class DumpTrainable(Callback):
    """Writes each rank's trainable tensors at the end of fit (used by the DDP test)."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_fit_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(adapter_state(pl_module.model), self.out_dir / f"rank{trainer.global_rank}.pt")


class StopAfterEpoch(Callback):
    """Simulates an interrupted run: stop once epoch `epoch` has been validated and checkpointed."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_validation_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True
