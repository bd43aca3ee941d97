"""Where a training step's peak memory is reached: the peak above the entry level, per component and phase.

`SavedTensorLedger` (sam3_lora/memory.py) counts what autograd keeps for backward; this meter catches the
transients that are freed again (an attention matrix, a softmax copy, a loss over full-resolution masks), which
is what sets the peak when little is kept. CPU: resident memory (Linux VmHWM, reset through
/proc/self/clear_refs); CUDA: the caching allocator's allocated bytes.

    meter = TransientPeaks({"ViT": sam3.backbone.vision_backbone.trunk, ...}, device)
    with meter.watching():
        out = model(batch)
        with meter.phase("loss"):
            loss = loss_fn(out, targets)
        with meter.phase("backward"):
            loss.backward()
    meter.rows()  # [(label, MB above entry, MB absolute peak), ...]
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch
from torch import nn


class MemoryProbe:
    """Current and peak memory of this process (CPU) or of the CUDA allocator, in bytes, with a peak reset."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:  # Linux: writing 5 to clear_refs resets VmHWM (peak RSS) to the current RSS
            Path("/proc/self/clear_refs").write_text("5")

    def current(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else self._status_kb("VmRSS") * 1024

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else self._status_kb("VmHWM") * 1024

    @staticmethod
    def _status_kb(field: str) -> int:
        return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


class TransientPeaks:
    """Peak memory above the entry level of each watched component's forward and of named phases.

    Components must not nest (a reset inside one would hide the outer one's earlier peak). The peak before the
    first component and between components is kept too, so `overall` is the step's true peak.
    """

    def __init__(self, components: dict[str, nn.Module], device: torch.device):
        self.components = components
        self.probe = MemoryProbe(device)
        self.above_entry: dict[str, int] = {}
        self.absolute: dict[str, int] = {}
        self.overall = 0
        self._entry = 0
        self._in_phase = False  # activation checkpointing re-runs component forwards inside backward
        self._handles: list = []

    @contextlib.contextmanager
    def watching(self):
        for label, module in self.components.items():
            self._handles.append(module.register_forward_pre_hook(lambda *_, label=label: self._component(label, True)))
            self._handles.append(module.register_forward_hook(lambda *_, label=label: self._component(label, False)))
        self.probe.reset_peak()
        try:
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self.overall = max(self.overall, self.probe.peak())

    @contextlib.contextmanager
    def phase(self, label: str):
        self._start()
        self._in_phase = True
        try:
            yield
        finally:
            self._in_phase = False
            self._stop(label)

    def _component(self, label: str, entering: bool) -> None:
        if not self._in_phase:
            self._start() if entering else self._stop(label)

    def _start(self) -> None:
        self.overall = max(self.overall, self.probe.peak())  # the peak reached before this component
        self.probe.reset_peak()
        self._entry = self.probe.current()

    def _stop(self, label: str) -> None:
        peak = self.probe.peak()
        self.overall = max(self.overall, peak)
        self.above_entry[label] = max(self.above_entry.get(label, 0), peak - self._entry)
        self.absolute[label] = max(self.absolute.get(label, 0), peak)
        self.probe.reset_peak()

    def rows(self) -> list[tuple[str, float, float]]:
        """(label, MB above entry, MB absolute peak) in the order the components first ran."""
        return [(label, self.above_entry[label] / 2**20, self.absolute[label] / 2**20) for label in self.above_entry]
