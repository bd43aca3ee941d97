"""LoRA targets and injection: SAM3 presets, PEFT injection, adapter stats and parameter helpers.

LoRA enters the model here and only here: `inject_lora` is the one function that turns a base SAM3 into a
PEFT model, used at build time (`apply_lora`) and when an adapter is rebuilt (`sam3_lora.adapter`).
Adapter files, merging and export live in `sam3_lora.adapter`.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Sequence

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraModel
from torch import nn

from sam3_lora import lora_linear, lora_mha, memory
from sam3_lora.model import count_parameters, freeze

log = logging.getLogger(__name__)

# Full-name regexes over SAM3's real module names. Attention modules of the text encoder and the
# DETR are nn.MultiheadAttention: they are targeted as modules (PEFT adapts in_proj + out_proj);
# targeting their `.out_proj` would be a silent no-op because MHA never calls it (DESIGN §4).
VISION_LAYERS = r"attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2"  # the adapted layers of each ViT block
PRESETS: dict[str, str] = {
    "vision": rf"backbone\.vision_backbone\.trunk\.blocks\.\d+\.({VISION_LAYERS})",
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
    vision_last_blocks: int | None = None,
    frozen_dtype: str = "float32",
    keep_frozen: Sequence[str] = (),
) -> nn.Module:
    """Freeze the base SAM3 and inject LoRA adapters with PEFT.

    Args:
        model: the base SAM3 (weights already loaded: PEFT renames targeted keys).
        rank, alpha, dropout: LoRA hyper-parameters.
        targets: preset names and/or full-name regexes; empty = no adapters (heads-only training).
        modules_to_save: modules trained fully and saved with the adapter (e.g. the scoring head).
        vision_last_blocks: the "vision" preset adapts only the last N ViT blocks and the blocks before run
            without autograd (backward stops there); None = every block (`sam3_lora.memory`).
        frozen_dtype: storage of the frozen base: "float32", or "bfloat16" (needs bf16-mixed autocast).
        keep_frozen: full-name regexes of parameters that stay frozen (e.g. modules the graph never uses).

    Returns:
        A `PeftModel`; or, with no targets, the frozen base with `modules_to_save` trainable.
    """
    freeze(model)
    targets = list(targets)
    modules_to_save = list(modules_to_save)
    _modules_to_save_check(model, modules_to_save)
    memory_settings = {"vision_last_blocks": vision_last_blocks, "frozen_dtype": frozen_dtype,
                       "keep_frozen": list(keep_frozen)}
    if vision_last_blocks is not None:
        targets = memory.restrict_vision_targets(targets, len(memory.vision_blocks(model)), vision_last_blocks,
                                                 VISION_LAYERS)
    if not targets:
        return memory.apply_memory_settings(_train_modules_fully(model, modules_to_save), **memory_settings)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=match_targets(model, targets),
                        modules_to_save=modules_to_save or None, bias="none")
    peft_model = memory.apply_memory_settings(inject_lora(model, config), **memory_settings)
    log_adapter_summary(peft_model)
    return peft_model


def inject_lora(base: nn.Module, lora_config: LoraConfig, adapter_name: str = "default") -> PeftModel:
    """Freeze `base` and wrap it with PEFT's LoRA layers as `lora_config` says.

    The single place a PEFT model is created (training build and adapter rebuild), so every path gets
    the same layers for the same config. `nn.MultiheadAttention` targets get `lora_mha`'s layer, which
    means W + ΔW for in_proj and out_proj (PEFT 0.21's own layer counts out_proj's ΔW twice); `nn.Linear`
    targets get `lora_linear`'s, which adds the low-rank update in place (PEFT's values, fewer temporaries).
    Given a `PeftModel`, adds `adapter_name` beside its adapters (PEFT's `add_adapter`; several adapters
    on one base, `sam3_lora.predictor`).
    """
    if isinstance(base, PeftModel):
        base.add_adapter(adapter_name, _with_our_layers(lora_config))
        return base
    return get_peft_model(freeze(base), _with_our_layers(lora_config), adapter_name=adapter_name)


def _with_our_layers(lora_config: LoraConfig) -> LoraConfig:
    return lora_linear.register(lora_mha.register(lora_config))


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


def is_lora_parameter(name: str) -> bool:
    """Whether a parameter name belongs to a LoRA tensor (PEFT's `lora_` prefix: lora_A, lora_B, ...)."""
    return LoraModel.prefix in name


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable LoRA tensors (lora_A / lora_B, incl. MHA's)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and is_lora_parameter(n)]


def has_adapters(model: nn.Module) -> bool:
    """Whether `model` carries PEFT adapters (an `apply_lora` result with targets), i.e. has an adapter to save."""
    return isinstance(model, PeftModel)


def base_sam3(model: nn.Module) -> nn.Module:
    """The Sam3Image inside a PeftModel, or the model itself when it has no adapters."""
    return model.get_base_model() if has_adapters(model) else model
