"""SAM3 base checkpoints: resolving `model.checkpoint` (path, builtin, hub download), reading them strictly,
writing stock-layout checkpoints, atomic file writes."""

from __future__ import annotations

import contextlib
import json
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
# The video model's detector adds the SAM2 neck (sam3/model_builder.py:106); the image model has none.
SAM2_NECK_PREFIX = "backbone.vision_backbone.sam2_convs."
# RoPE tables: derived from the resolution, saved in sam3.pt for 1008 px (DESIGN §4).
ROPE_SUFFIX = "attn.freqs_cis"
# Where exported checkpoints keep the `build_sam3` kwargs they were built with (predict rebuilds from it).
MODEL_CONFIG_KEY = "model_config"
# Checkpoints shipped inside the package, addressed by name so adapter configs stay portable.
BUILTIN_CHECKPOINTS = {"builtin:tiny": Path(__file__).parent / "assets" / "sam3_tiny_shapes.safetensors"}


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final`; move it into place only if the block succeeds.

    A file is replaced by one `os.replace` (atomic). A directory cannot be swapped by one rename, so the old one
    is first renamed aside to `.NAME.previous`, the new one renamed in, then the old one deleted: at every
    instant a complete version exists, at `final` or (only between the two renames) at `.NAME.previous`, and
    `recover_interrupted_write` — run at the start of every write — puts it back. `final` stays a plain path
    (no symlink), so PEFT and users load `adapter/` as before.
    """
    final = Path(final)
    file_in_the_way = next((p for p in final.parents if p.exists() and not p.is_dir()), None)
    if file_in_the_way is not None:
        raise NotADirectoryError(f"cannot write {final}: {file_in_the_way} is a file, not a folder")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        recover_interrupted_write(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent)) / final.name
    except OSError as err:  # name the user's path, not the temporary one beside it
        raise type(err)(err.errno, f"cannot write in {final.parent} ({err.strerror})", str(final)) from err
    try:
        yield tmp
        _fsync_tree(tmp)  # contents on disk before the rename makes them visible (power loss, not only kills)
        if tmp.is_dir() and final.is_dir():
            _swap_directory(tmp, final)
        elif final.is_dir():  # os.replace would name the temporary path
            raise IsADirectoryError(f"{final} is a folder, and this output is a file: give a file path")
        elif tmp.is_dir() and final.exists():
            raise NotADirectoryError(f"{final} is a file, and this output is a folder: give a folder path")
        else:
            os.replace(tmp, final)
        _fsync_tree(final.parent, recursive=False)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def previous_version_path(final: str | os.PathLike) -> Path:
    """Where `atomic_path` keeps the previous version of a directory while swapping in a new one."""
    final = Path(final)
    return final.parent / f".{final.name}.previous"


def readable_version(final: str | os.PathLike) -> Path:
    """The complete version of a directory `atomic_path` writes, for readers: `final`, or the previous version
    when a writer was killed exactly between its two renames (readers never move anything: a live writer may be
    mid-swap; the next write repairs the folder)."""
    final, aside = Path(final), previous_version_path(final)
    if not final.exists() and aside.is_dir():
        log.warning("reading %s: %s is missing because a write was interrupted between its two renames (the next "
                    "write restores it; `mv %s %s` does it now)", aside, final, aside, final)
        return aside
    return final


def recover_interrupted_write(final: str | os.PathLike) -> None:
    """Repair what a process killed in the middle of `atomic_path`'s directory swap left behind.

    Rule: if `final` is missing but `.NAME.previous` exists, the kill fell between the two renames and the
    previous version is restored; if both exist, the new version was already in place and the stale previous
    copy is deleted. Temporary `.NAME.XXXXXXXX` folders of a killed writer hold partial output, never a version.
    """
    final, aside = Path(final), previous_version_path(final)
    if not aside.exists():
        return
    if final.exists():
        shutil.rmtree(aside)
        log.info("removed %s: a stale copy left by an interrupted write (%s is complete)", aside, final)
    else:
        os.replace(aside, final)
        log.warning("restored %s from %s: the previous write was interrupted between its two renames", final, aside)


def _swap_directory(new: Path, final: Path) -> None:
    aside = previous_version_path(final)
    os.replace(final, aside)
    try:
        os.replace(new, final)
    except BaseException:
        os.replace(aside, final)  # the rename in failed: the previous version goes back
        raise
    shutil.rmtree(aside)


def _fsync_tree(path: Path, recursive: bool = True) -> None:
    """Flush a file, or a directory (its entries and, if `recursive`, everything below), to disk."""
    paths = [path, *path.rglob("*")] if recursive and path.is_dir() else [path]
    for item in paths:
        try:
            fd = os.open(item, os.O_RDONLY)
        except OSError:  # directories cannot be opened on Windows; nothing to flush there
            continue
        try:
            with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories: best effort
                os.fsync(fd)
        finally:
            os.close(fd)


def resolve_checkpoint(checkpoint: str | None) -> str | None:
    """Turn `model.checkpoint` into a local file path (downloading for "hub"), or None.

    "builtin:tiny" names the pretrained tiny SAM3 shipped in the package (experiment=pretrain_tiny).

    Raises:
        FileNotFoundError: a local path that does not exist.
        RuntimeError: the hub is unreachable or the repository is gated for this account.
    """
    if checkpoint is None:
        return None
    if checkpoint == "hub":
        return _download_from_hub()
    if checkpoint in BUILTIN_CHECKPOINTS:
        return str(BUILTIN_CHECKPOINTS[checkpoint])
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"base checkpoint {checkpoint}: no such file. Give a local SAM3 checkpoint (sam3.pt) or transformers "
            "Sam3Model directory, or hub to download facebook/sam3 (train.py: model.checkpoint=...; "
            "sam3-lora predict/export: --checkpoint ...)"
        )
    return str(path)


def _download_from_hub() -> str:
    from sam3.model_builder import download_ckpt_from_hf

    try:
        return download_ckpt_from_hf()
    except Exception as err:  # huggingface_hub raises many types: connection, gated repo, auth
        raise RuntimeError(
            "base checkpoint 'hub': could not download facebook/sam3 "
            f"({type(err).__name__}: {err}). The repository is gated: accept its licence on "
            "huggingface.co, run `huggingface-cli login`, check the network, or download sam3.pt "
            "yourself and give its path instead of hub (train.py: model.checkpoint=/path/to/sam3.pt; "
            "sam3-lora predict/export/doctor: --checkpoint /path/to/sam3.pt)"
        ) from err


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file (torch or safetensors) and unwrap a `{"model": ...}` wrapper.

    A directory is read as a transformers `Sam3Model` export, its keys renamed to sam3's (`transformers_format`).
    """
    if Path(path).is_dir():
        return _read_transformers_dir(path)
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


def _read_transformers_dir(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from sam3_lora.transformers_format import is_transformers_dir, read_transformers_checkpoint

    if not is_transformers_dir(path):
        raise ValueError(f"{path} is a directory but not a transformers SAM3 export (its config.json must say "
                         "model_type sam3 or sam3_video): pass a checkpoint file or such a directory")
    return read_transformers_checkpoint(path)


def image_model_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the image model's keys: strip the stock `detector.` prefix, drop `tracker.*` keys.

    The stock sam3.pt is saved from the video model, whose detector also holds the SAM2 interactive
    neck (`backbone.vision_backbone.sam2_convs.*`, sam3/model_builder.py:106 `add_sam2_neck`); the image
    model never builds it, so those keys are dropped too.

    A state dict without any `detector.` key is taken as already unprefixed.
    """
    if any(key.startswith(DETECTOR_PREFIX) for key in state):
        state = {key[len(DETECTOR_PREFIX):]: value for key, value in state.items() if key.startswith(DETECTOR_PREFIX)}
    dropped = [key for key in state if key.startswith(SAM2_NECK_PREFIX)]
    if dropped:
        log.info("ignoring %d keys of the SAM2 interactive neck (%s*): the image model does not build it",
                 len(dropped), SAM2_NECK_PREFIX)
    return {key: value for key, value in state.items() if not key.startswith(SAM2_NECK_PREFIX)}


def load_base_weights(model: nn.Module, checkpoint: str) -> None:
    """Load SAM3 image-model weights strictly.

    RoPE tables whose shape differs from the model's (another resolution) are dropped so the
    model's own tables stand.

    Raises:
        RuntimeError: missing or unexpected keys, or shape mismatches, each listed by name.
    """
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


def save_stock_checkpoint(state: dict[str, torch.Tensor], out: str | os.PathLike,
                          model_config: dict | None = None) -> None:
    """Write a stock-layout SAM3 checkpoint atomically (.pt via torch.save, .safetensors flat).

    `model_config` (the `build_sam3` kwargs) sits beside "model" in a .pt, where sam3's loader ignores it,
    and in the metadata of a .safetensors file; `read_model_config` reads it back from either.
    """
    payload = stock_checkpoint(state)
    with atomic_path(out) as tmp:
        if str(out).endswith(".safetensors"):
            from safetensors.torch import save_file

            metadata = None if model_config is None else {MODEL_CONFIG_KEY: json.dumps(model_config, sort_keys=True)}
            save_file(payload["model"], str(tmp), metadata=metadata)
        else:
            torch.save(payload if model_config is None else {**payload, MODEL_CONFIG_KEY: model_config}, tmp)


def read_model_config(path: str | os.PathLike) -> dict | None:
    """The model config stored in a checkpoint by `save_stock_checkpoint`, or None if it has none."""
    if str(path).endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            stored = (handle.metadata() or {}).get(MODEL_CONFIG_KEY)
        return None if stored is None else json.loads(stored)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return payload.get(MODEL_CONFIG_KEY) if isinstance(payload, dict) else None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint writer that writes to a temporary file and renames it into place."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)
