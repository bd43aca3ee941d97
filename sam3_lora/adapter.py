"""Adapter directories and what is made from them: save, strict load, merge, stock export, inference loading.

An adapter directory is PEFT's `adapter_config.json` + `adapter_model.safetensors` plus `sam3_model_config.json`
(the `build_sam3` kwargs of its base), so it rebuilds without the run's Hydra config. The model config always
travels as an explicit argument; nothing is attached to the PEFT model.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from peft import LoraConfig, PeftModel
from torch import nn

from sam3_lora.checkpoint_io import atomic_path, read_model_config, readable_version, save_stock_checkpoint
from sam3_lora.lora import inject_lora
from sam3_lora.model import build_sam3

log = logging.getLogger(__name__)

MODEL_CONFIG_FILE = "sam3_model_config.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", MODEL_CONFIG_FILE)


def save_adapter(model: PeftModel, out_dir: str | Path, model_config: dict) -> Path:
    """Write a self-describing adapter directory atomically.

    Args:
        model: the LoRA-adapted SAM3.
        out_dir: the directory to write (replaced if it exists).
        model_config: the `build_sam3` kwargs of the base, stored as `sam3_model_config.json`.

    Returns:
        `out_dir` as a Path.
    """
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / MODEL_CONFIG_FILE).write_text(json.dumps(model_config, indent=2, sort_keys=True))
    return out_dir


def read_adapter_dir(adapter_dir: str | Path) -> tuple[dict, dict]:
    """Return (adapter_config, model_config) of an adapter directory, checking its files exist.

    Raises:
        FileNotFoundError: a file of the adapter directory is missing.
    """
    adapter_dir = readable_version(adapter_dir)
    missing = [f for f in ADAPTER_FILES if not (adapter_dir / f).exists()]
    if missing:
        raise FileNotFoundError(f"{adapter_dir} is not a complete sam3-lora adapter directory: missing "
                                f"{', '.join(missing)} (expected {', '.join(ADAPTER_FILES)})")
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    model_config = json.loads((adapter_dir / MODEL_CONFIG_FILE).read_text())
    return adapter_config, model_config


def _adapted_module_names(keys) -> set[str]:
    """Names of LoRA-adapted modules found in PEFT state-dict keys (`<module>.lora_A.weight`, ...)."""
    return {re.sub(r"^base_model\.model\.", "", k.split(".lora_")[0]) for k in keys if ".lora_" in k}


def _config_differences(model: PeftModel, adapter_config: dict, stored: dict, ours: dict) -> list[str]:
    peft_config = model.peft_config["default"]
    differences = [f"{key}: adapter {adapter_config.get(key)} vs model {getattr(peft_config, key)}"
                   for key in ("r", "lora_alpha") if adapter_config.get(key) != getattr(peft_config, key)]
    if set(adapter_config.get("modules_to_save") or []) != set(peft_config.modules_to_save or []):
        differences.append(f"modules_to_save: adapter {adapter_config.get('modules_to_save')} "
                           f"vs model {peft_config.modules_to_save}")
    differences += [f"model.{key}: adapter {stored.get(key)} vs model {ours.get(key)}"
                    for key in sorted(set(stored) | set(ours))
                    if key != "checkpoint" and stored.get(key) != ours.get(key)]
    return differences


def _weight_differences(weights: dict, expected: dict) -> list[str]:
    theirs, mine = _adapted_module_names(weights), _adapted_module_names(expected)
    problems = []
    if theirs != mine:
        problems.append(f"targets (adapted modules): only in adapter {sorted(theirs - mine)[:5]}, "
                        f"only in model {sorted(mine - theirs)[:5]}")
    problems += [f"missing tensor {k}" for k in sorted(set(expected) - set(weights))][:10]
    problems += [f"unexpected tensor {k}" for k in sorted(set(weights) - set(expected))][:10]
    problems += [f"{k}: adapter {tuple(weights[k].shape)} vs model {tuple(shape)}"
                 for k, shape in expected.items() if k in weights and weights[k].shape != shape][:10]
    return problems


def load_adapter(model: PeftModel, adapter_dir: str | Path, model_config: dict) -> PeftModel:
    """Load adapter weights into a LoRA model built with the same settings, strictly.

    Args:
        model: a PEFT model built like the adapter's (rank, alpha, targets, modules_to_save).
        adapter_dir: the adapter directory.
        model_config: the `build_sam3` kwargs `model` was built with, compared with the stored ones
            (except `checkpoint`, which may legitimately point elsewhere).

    Raises:
        FileNotFoundError: the directory lacks a file.
        ValueError: rank, alpha, targets, modules_to_save, base dims or tensor shapes differ (listed).
    """
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter_dir = readable_version(adapter_dir)
    adapter_config, stored_config = read_adapter_dir(adapter_dir)
    weights = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    expected = {k: v.shape for k, v in get_peft_model_state_dict(model).items()}
    differences = _config_differences(model, adapter_config, stored_config, model_config)
    differences += _weight_differences(weights, expected)
    if differences:
        raise ValueError(f"adapter {adapter_dir} does not fit this model:\n  " + "\n  ".join(differences))
    result = set_peft_model_state_dict(model, weights)
    if result.unexpected_keys:
        raise ValueError(f"adapter {adapter_dir} has tensors this model lacks: {result.unexpected_keys[:10]}")
    return model


def build_adapted_model(adapter_dir: str | Path, base_checkpoint: str | None = None) -> tuple[PeftModel, dict]:
    """Rebuild the base SAM3 from the directory's model config, inject its LoRA config, load strictly.

    Args:
        adapter_dir: the adapter directory.
        base_checkpoint: replaces the stored base `checkpoint` (a path, "hub", "builtin:tiny"), e.g. when the
            base file was moved since training; None keeps the stored one.

    Returns:
        (the adapted model, the model config it was built with).
    """
    adapter_dir = readable_version(adapter_dir)
    _, model_config = read_adapter_dir(adapter_dir)
    if base_checkpoint is not None:
        model_config = {**model_config, "checkpoint": base_checkpoint}
    model = inject_lora(build_sam3(**model_config), LoraConfig.from_pretrained(str(adapter_dir)))
    return load_adapter(model, adapter_dir, model_config), model_config


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold LoRA into the base weights: a plain SAM3 without PEFT modules (NaN-checked by PEFT)."""
    if isinstance(model, PeftModel):
        return model.merge_and_unload(safe_merge=True)
    return model


def export_stock_checkpoint(model: nn.Module, model_config: dict, out_path: str | Path) -> Path:
    """Merge `model`'s adapters and write a stock SAM3 checkpoint that also records its model config.

    `.pt`: `{"model": {"detector.<name>": t}, "model_config": {...}}`; `.safetensors`: the flat `detector.*`
    tensors with the model config in the file's metadata. `sam3.model_builder.build_sam3_image_model(
    checkpoint_path=...)` loads either. Used by `sam3-lora export` and by training's `export_stock_checkpoint`.
    """
    save_stock_checkpoint(merge_adapter(model).state_dict(), out_path, model_config=model_config)
    return Path(out_path)


def export_merged(adapter_dir: str | Path, out_path: str | Path, base_checkpoint: str | None = None) -> Path:
    """Rebuild an adapter directory's model (on `base_checkpoint` when given, else the stored base) and write it
    as a stock SAM3 checkpoint (`export_stock_checkpoint`)."""
    model, model_config = build_adapted_model(adapter_dir, base_checkpoint)
    return export_stock_checkpoint(model, model_config, out_path)


def load_model_for_inference(source: str | None, model_config: dict | None = None,
                             base_checkpoint: str | None = None) -> tuple[nn.Module, dict]:
    """Build an eval-mode SAM3 from an adapter directory, an exported checkpoint, or the base config.

    Args:
        source: adapter directory, exported/merged checkpoint file, or None for the base model.
        model_config: `build_sam3` kwargs for None or for a checkpoint without a stored model config.
        base_checkpoint: for an adapter directory, the base to build on instead of the stored one.

    Returns:
        (model in eval mode — a plain SAM3, an adapter merged into it —, the model config it was built with).
    """
    if source is not None and Path(source).is_dir():
        model, config = build_adapted_model(source, base_checkpoint)
        # merged: the adapted weights computed once, not a low-rank product per adapted layer per call (CPU at
        # 504 px, one process: unmerged 1.02-1.03x the base's time, merged 0.97x; README "Inference")
        return merge_adapter(model).eval(), config
    config = dict(model_config or {})
    if source is not None:
        config = {**(read_model_config(source) or config), "checkpoint": str(source)}
    return build_sam3(**config).eval(), config
