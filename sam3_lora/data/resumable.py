"""`ResumableDataLoader`: a training DataLoader whose position inside an epoch survives a kill.

The dataset derives every random draw from (seed, epoch, index), so "where we were" is just (epoch, batches handed
out). That position lives in a `LoaderPosition` shared by the loader and `CocoDataModule`, whose `state_dict`
Lightning writes into every checkpoint and whose `load_state_dict` it calls before it builds the training loader.
On resume the loader skips that many index batches without loading them; the remaining batches, with their
augmentation and negatives, are those of the uninterrupted run.

Why not only Lightning's Stateful-DataLoader hook (lightning/pytorch/loops/fit_loop.py `_load_combined_loader_states`):
Lightning 2.6 builds the training loader early when `configure_optimizers` asks for
`trainer.estimated_stepping_batches` (our schedules do), before the checkpoint's loop state is read, and then
never hands the saved loader state to it. The datamodule path does not depend on that ordering. The position
object is an `__init__` argument so that Lightning's re-instantiation of the loader under DDP (sampler replaced
by a `DistributedSamplerWrapper`) keeps it; skipping works on the resulting batch sampler, so each rank skips
its own consumed batches.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterator

from torch.utils.data import DataLoader


@dataclass
class LoaderPosition:
    """Where a training loader is: the epoch it serves, the batches it handed out, and a restored position.

    Attributes:
        epoch: the sampler epoch of the current (or last) iteration.
        batches: batches handed out in that epoch.
        restored: (epoch, batches) from a checkpoint, applied once by the next iteration of that epoch.
    """

    epoch: int = 0
    batches: int = 0
    restored: tuple[int, int] | None = None

    def state_dict(self) -> dict[str, int]:
        """The position as plain ints (checkpoints load with `weights_only=True`)."""
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next iteration of epoch `state["epoch"]` start after its first `state["batches"]` batches."""
        self.restored = (int(state["epoch"]), int(state["batches"]))


class _SkipFirstBatches:
    """The loader's batch sampler, minus the batches a resumed epoch must not hand out again."""

    def __init__(self, loader: "ResumableDataLoader", batches):
        self.loader, self.batches = loader, batches

    def __iter__(self) -> Iterator:
        return itertools.islice(iter(self.batches), self.loader._skip_now, None)

    def __len__(self) -> int:
        return len(self.batches)


class ResumableDataLoader(DataLoader):
    """A `DataLoader` (same arguments, plus `position`) that records and restores its place in an epoch.

    Batches are counted where Lightning receives them (Lightning does not prefetch from a sized loader), so
    worker prefetching does not count. `len()` stays the full epoch, as Lightning's progress counters expect.
    """

    _skip_now: int = 0

    def __init__(self, *args: Any, position: LoaderPosition | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.position = position if position is not None else LoaderPosition()

    def state_dict(self) -> dict[str, int]:
        """The shared position (also Lightning's Stateful-loader protocol)."""
        return self.position.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by `state_dict`."""
        self.position.load_state_dict(state)

    def __iter__(self) -> Iterator:
        # A generator: the worker iterator is created at the first `next()`. Lightning calls `iter()` before
        # `set_epoch` on a resumed run, so creating it eagerly would prefetch the wrong epoch's indices.
        return self._batches()

    def _batches(self) -> Iterator:
        position = self.position
        position.epoch = self._sampler_epoch()
        restored, position.restored = position.restored, None
        skip = min(restored[1], len(self)) if restored and restored[0] == position.epoch else 0
        position.batches = self._skip_now = skip
        try:  # torch draws index iterators once or twice while creating its iterator (multi-worker `_reset`)
            batches = super().__iter__()
        finally:
            self._skip_now = 0
        for batch in batches:
            position.batches += 1
            yield batch

    def _sampler_epoch(self) -> int:
        for sampler in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            if sampler is not None and hasattr(sampler, "epoch"):
                return int(sampler.epoch)
        return 0

    @property
    def _index_sampler(self):
        # torch's DataLoader iterators draw their indices from `_index_sampler` (torch/utils/data/dataloader.py,
        # `_BaseDataLoaderIter.__init__` and `_reset`); wrapping it lets a resumed epoch skip batches unloaded.
        return _SkipFirstBatches(self, super()._index_sampler)
