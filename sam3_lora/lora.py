"""Everything about adapters: PEFT injection from SAM3 presets, stats, save/load, merge, export.

LoRA enters the model here and only here (at build time); the LightningModule receives a ready module.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from sam3_lora.checkpoint_io import atomic_path, save_stock_checkpoint
from sam3_lora.model import build_sam3, count_parameters, freeze

log = logging.getLogger(__name__)

MODEL_CONFIG_FILE = "sam3_model_config.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", MODEL_CONFIG_FILE)

# Full-name regexes over SAM3's real module names. Attention modules of the text encoder and the
# DETR are nn.MultiheadAttention: they are targeted as modules (PEFT adapts in_proj + out_proj);
# targeting their `.out_proj` would be a silent no-op because MHA never calls it (DESIGN §4).
PRESETS: dict[str, str] = {
    "vision": r"backbone\.vision_backbone\.trunk\.blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)",
    "text": r"backbone\.language_backbone\.encoder\.transformer\.resblocks\.\d+\.(attn|mlp\.c_fc|mlp\.c_proj)",
    "detr": r"transformer\.(encoder|decoder)\.layers\.\d+\.(self_attn|cross_attn_image|cross_attn|ca_text|linear1|linear2)",
    "heads": r"(dot_prod_scoring\.(prompt_mlp\.layers\.\d+|prompt_proj|hs_proj)"
             r"|transformer\.decoder\.(bbox_embed|presence_token_head|ref_point_head)\.layers\.\d+"
             r"|segmentation_head\.(mask_predictor\.mask_embed\.layers\.\d+|cross_attend_prompt))",
}
COMPONENTS = {
    "vision": "backbone.vision_backbone.", "text": "backbone.language_backbone.",
    "geometry": "geometry_encoder.", "detr_encoder": "transformer.encoder.",
    "detr_decoder": "transformer.decoder.", "mask_head": "segmentation_head.", "scoring": "dot_prod_scoring.",
}
_ADAPTABLE = (nn.Linear, nn.MultiheadAttention, nn.Conv2d, nn.Embedding)


def resolve_targets(targets: Sequence[str]) -> list[str]:
    """Expand preset names ("vision", "detr", ...) and keep other entries as full-name regexes."""
    if isinstance(targets, str):
        targets = [targets]
    return [PRESETS.get(t, t) for t in targets]


def match_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Module names the targets select, checking each target matches something adaptable.

    Raises:
        ValueError: a target matches nothing, matches a module PEFT cannot adapt, or matches the
            `out_proj` of a MultiheadAttention (never called: a silent no-op).
    """
    names = dict(model.named_modules())
    selected: list[str] = []
    for target, pattern in zip(targets, resolve_targets(targets)):
        hits = [n for n in names if re.fullmatch(pattern, n)]
        if not hits:
            raise ValueError(f"lora.targets entry {target!r} matches no module of this SAM3; "
                             f"presets: {sorted(PRESETS)}, or give a full-name regex")
        for name in hits:
            _check_adaptable(name, names)
        selected += [h for h in hits if h not in selected]
    return selected


def _check_adaptable(name: str, modules: dict[str, nn.Module]) -> None:
    parent = modules.get(name.rsplit(".", 1)[0]) if "." in name else None
    if name.endswith("out_proj") and isinstance(parent, nn.MultiheadAttention):
        raise ValueError(f"lora target {name!r} is the out_proj of a MultiheadAttention, which its parent never "
                         f"calls (LoRA there is a silent no-op); target {name.rsplit('.', 1)[0]!r} instead")
    if not isinstance(modules[name], _ADAPTABLE):
        raise ValueError(f"lora target {name!r} is a {type(modules[name]).__name__}, which PEFT LoRA cannot "
                         "adapt (Linear, MultiheadAttention, Conv2d, Embedding)")


def _modules_to_save_check(model: nn.Module, modules_to_save: Sequence[str]) -> None:
    names = [n for n, _ in model.named_modules()]
    for entry in modules_to_save:
        if not any(n == entry or n.endswith("." + entry) for n in names):
            raise ValueError(f"lora.modules_to_save entry {entry!r} matches no module of this SAM3")


def apply_lora(
    model: nn.Module,
    rank: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.0,
    targets: Sequence[str] = ("vision", "detr"),
    modules_to_save: Sequence[str] = (),
    model_config: dict | None = None,
) -> nn.Module:
    """Freeze the base SAM3 and inject LoRA adapters with PEFT.

    Args:
        model: the base SAM3 (weights already loaded: PEFT renames targeted keys).
        rank, alpha, dropout: LoRA hyper-parameters.
        targets: preset names and/or full-name regexes; empty = no adapters (heads-only training).
        modules_to_save: modules trained fully and saved with the adapter (e.g. the scoring head).
        model_config: the `build_sam3` kwargs, stored in the adapter directory so it rebuilds alone.

    Returns:
        A `PeftModel` whose `.model_config` holds `model_config`; or, with no targets, the frozen base
        with `modules_to_save` trainable.
    """
    freeze(model)
    targets = list(targets)
    modules_to_save = list(modules_to_save)
    _modules_to_save_check(model, modules_to_save)
    if not targets:
        return _train_modules_fully(model, modules_to_save)
    selected = match_targets(model, targets)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=selected,
                        modules_to_save=modules_to_save or None, bias="none")
    peft_model = get_peft_model(model, config)
    peft_model.model_config = dict(model_config or {})
    log_adapter_summary(peft_model)
    return peft_model


def _train_modules_fully(model: nn.Module, modules_to_save: list[str]) -> nn.Module:
    for name, module in model.named_modules():
        if any(name == m or name.endswith("." + m) for m in modules_to_save):
            for parameter in module.parameters():
                parameter.requires_grad_(True)
    return model


def adapter_summary(model: nn.Module) -> dict:
    """Adapted modules per component, trainable and total parameter counts."""
    per_component: Counter = Counter()
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "base_layer" not in name:
            inner = name.split("base_model.model.", 1)[-1]
            component = next((c for c, p in COMPONENTS.items() if inner.startswith(p)), "other")
            per_component[component] += 1
    trainable, total = count_parameters(model)
    return {"adapted_modules": dict(per_component), "trainable": trainable, "total": total,
            "trainable_percent": 100.0 * trainable / max(total, 1)}


def log_adapter_summary(model: nn.Module) -> dict:
    """Log `adapter_summary` at start-up and return it."""
    summary = adapter_summary(model)
    log.info("LoRA modules per component: %s", summary["adapted_modules"] or "none")
    log.info("trainable parameters: %d of %d (%.3f%%)", summary["trainable"], summary["total"],
             summary["trainable_percent"])
    return summary


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable LoRA tensors (lora_A / lora_B, incl. MHA's)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]


def save_adapter(model: PeftModel, out_dir: str | Path) -> Path:
    """Write a self-describing adapter directory atomically.

    Contents: PEFT's `adapter_config.json` + `adapter_model.safetensors` (PEFT key names, incl.
    modules_to_save) and `sam3_model_config.json` (the `build_sam3` kwargs of the base).
    """
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / MODEL_CONFIG_FILE).write_text(json.dumps(model.model_config, indent=2, sort_keys=True))
    return out_dir


def read_adapter_dir(adapter_dir: str | Path) -> tuple[dict, dict]:
    """Return (adapter_config, model_config) of an adapter directory, checking its files exist.

    Raises:
        FileNotFoundError: a file of the adapter directory is missing.
    """
    adapter_dir = Path(adapter_dir)
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


def _describe_differences(model: PeftModel, adapter_config: dict, model_config: dict, weights: dict,
                          expected: dict) -> list[str]:
    ours = model.peft_config["default"]
    differences = [f"{key}: adapter {adapter_config.get(key)} vs model {getattr(ours, key)}"
                   for key in ("r", "lora_alpha") if adapter_config.get(key) != getattr(ours, key)]
    theirs, mine = _adapted_module_names(weights), _adapted_module_names(expected)
    if theirs != mine:
        differences.append(f"targets (adapted modules): only in adapter {sorted(theirs - mine)[:5]}, "
                           f"only in model {sorted(mine - theirs)[:5]}")
    if set(adapter_config.get("modules_to_save") or []) != set(ours.modules_to_save or []):
        differences.append(f"modules_to_save: adapter {adapter_config.get('modules_to_save')} vs model {ours.modules_to_save}")
    for key in sorted(set(model_config) | set(model.model_config)):
        if key != "checkpoint" and model_config.get(key) != model.model_config.get(key):
            differences.append(f"model.{key}: adapter {model_config.get(key)} vs model {model.model_config.get(key)}")
    return differences


def load_adapter(model: PeftModel, adapter_dir: str | Path) -> PeftModel:
    """Load adapter weights into a LoRA model built with the same settings, strictly.

    Raises:
        FileNotFoundError: the directory lacks a file.
        ValueError: rank, alpha, targets, modules_to_save, base dims or tensor shapes differ (listed).
    """
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter_config, model_config = read_adapter_dir(adapter_dir)
    weights = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    expected = {k: v.shape for k, v in _peft_state(model).items()}
    differences = _describe_differences(model, adapter_config, model_config, weights, expected)
    differences += _shape_differences(weights, expected)
    if differences:
        raise ValueError(f"adapter {adapter_dir} does not fit this model:\n  " + "\n  ".join(differences))
    result = set_peft_model_state_dict(model, weights)
    if result.unexpected_keys:
        raise ValueError(f"adapter {adapter_dir} has tensors this model lacks: {result.unexpected_keys[:10]}")
    return model


def _peft_state(model: PeftModel) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def _shape_differences(weights: dict, expected: dict) -> list[str]:
    problems = [f"missing tensor {k}" for k in sorted(set(expected) - set(weights))][:10]
    problems += [f"unexpected tensor {k}" for k in sorted(set(weights) - set(expected))][:10]
    problems += [f"{k}: adapter {tuple(weights[k].shape)} vs model {tuple(shape)}"
                 for k, shape in expected.items() if k in weights and weights[k].shape != shape][:10]
    return problems


def build_adapted_model(adapter_dir: str | Path) -> PeftModel:
    """Rebuild base SAM3 from the directory's model config, inject its LoRA config, load strictly."""
    _, model_config = read_adapter_dir(adapter_dir)
    base = freeze(build_sam3(**model_config))
    model = get_peft_model(base, LoraConfig.from_pretrained(str(adapter_dir)))
    model.model_config = dict(model_config)
    return load_adapter(model, adapter_dir)


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold LoRA into the base weights: a plain SAM3 without PEFT modules (NaN-checked by PEFT)."""
    if isinstance(model, PeftModel):
        return model.merge_and_unload(safe_merge=True)
    return model


def export_merged(adapter_dir: str | Path, out_path: str | Path) -> Path:
    """Write a stock SAM3 checkpoint `{"model": {"detector.<name>": t}, "model_config": {...}}`.

    `sam3.model_builder.build_sam3_image_model(checkpoint_path=out_path)` reads the `model` entry.
    """
    model = build_adapted_model(adapter_dir)
    merged = merge_adapter(model)
    _, model_config = read_adapter_dir(adapter_dir)
    save_stock_checkpoint(merged.state_dict(), out_path, extra={"model_config": model_config})
    return Path(out_path)


def load_model_for_inference(source: str | None, model_config: dict | None = None) -> tuple[nn.Module, dict]:
    """Build an eval-mode SAM3 from an adapter directory, an exported `.pt`, or the base config.

    Args:
        source: adapter directory, exported/merged checkpoint file, or None for the base model.
        model_config: `build_sam3` kwargs for None or for a `.pt` without a stored model config.

    Returns:
        (model in eval mode, the model config it was built with).
    """
    if source is not None and Path(source).is_dir():
        model = build_adapted_model(source)
        return model.eval(), dict(model.model_config)
    config = dict(model_config or {})
    if source is not None:
        stored = torch.load(source, map_location="cpu", weights_only=True).get("model_config")
        config = {**(stored or config), "checkpoint": str(source)}
    return build_sam3(**config).eval(), config
