"""Reading SAM3 base checkpoints strictly, writing stock-layout checkpoints, atomic file writes."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

log = logging.getLogger(__name__)

DETECTOR_PREFIX = "detector."
# RoPE tables: derived from the resolution, saved in sam3.pt for 1008 px (DESIGN §4).
ROPE_SUFFIX = "attn.freqs_cis"


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it into place only if the block succeeds.

    Works for files and directories, so a crash never leaves a half-written checkpoint or adapter.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent)) / final.name
    try:
        yield tmp
        if final.is_dir() and tmp.is_dir():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file (torch or safetensors) and unwrap a `{"model": ...}` wrapper."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict or {{'model': state_dict}}, got {type(state).__name__}")
    return state


def image_model_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the image model's keys: strip the stock `detector.` prefix, drop `tracker.*` keys.

    A state dict without any `detector.` key is taken as already unprefixed.
    """
    if any(key.startswith(DETECTOR_PREFIX) for key in state):
        return {key[len(DETECTOR_PREFIX):]: value for key, value in state.items() if key.startswith(DETECTOR_PREFIX)}
    return dict(state)


def load_base_weights(model: nn.Module, checkpoint: str) -> None:
    """Load SAM3 image-model weights strictly.

    RoPE tables whose shape differs from the model's (another resolution) are dropped so the
    model's own tables stand.

    Raises:
        RuntimeError: missing or unexpected keys, or shape mismatches, each listed by name.
    """
    from sam3_lora.model import resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    state = image_model_state(read_state_dict(path))
    own = model.state_dict()
    state = {
        k: v for k, v in state.items()
        if not (k.endswith(ROPE_SUFFIX) and k in own and own[k].shape != v.shape)
    }
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(state) - _derived_keys(own, state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected or mismatched:
        raise RuntimeError(_load_report(path, missing, unexpected, mismatched))
    model.load_state_dict(state, strict=False)
    log.info("loaded %d base tensors from %s", len(state), path)


def _derived_keys(own: dict, state: dict) -> set[str]:
    """Keys the model may compute itself: RoPE tables dropped for another resolution."""
    return {k for k in own if k.endswith(ROPE_SUFFIX) and k not in state}


def _load_report(path, missing, unexpected, mismatched) -> str:
    def block(title, items):
        shown = "\n    ".join(items[:20]) + (f"\n    ... and {len(items) - 20} more" if len(items) > 20 else "")
        return f"\n  {title} ({len(items)}):\n    {shown}" if items else ""

    return (
        f"{path} does not match the SAM3 image model built from model.* "
        "(check model.* sizes and that the file is a SAM3 image checkpoint with `detector.` keys):"
        + block("missing keys", missing) + block("unexpected keys", unexpected)
        + block("shape mismatches", mismatched)
    )


def stock_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Wrap an image-model state dict in the stock `{"model": {"detector.<name>": tensor}}` layout."""
    return {"model": {DETECTOR_PREFIX + k: v.detach().cpu().contiguous() for k, v in state.items()}}


def save_stock_checkpoint(state: dict[str, torch.Tensor], out: str | os.PathLike, extra: dict | None = None) -> None:
    """Write a stock-layout SAM3 checkpoint atomically (.pt via torch.save, .safetensors flat).

    `extra` entries (e.g. the model config) sit beside "model" in a .pt; sam3's loader ignores them.
    """
    payload = {**stock_checkpoint(state), **(extra or {})}
    with atomic_path(out) as tmp:
        if str(out).endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(payload["model"], str(tmp))
        else:
            torch.save(payload, tmp)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint writer that writes to a temporary file and renames it into place."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)
