"""Memory mechanisms for training SAM3 at 1008 px: early-stopping backward, a bf16 frozen base, glibc malloc
settings, and a per-module ledger of the activations autograd keeps for backward.

Each mechanism is a plain function over an `nn.Module`; `sam3_lora.lora.apply_lora` applies them from the
`lora.*` config keys and the bench reads the ledger (`bench/lora_cost.py --breakdown`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import re
from collections import defaultdict
from typing import Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

VISION_BLOCKS = "backbone.vision_backbone.trunk.blocks"
# glibc mallopt parameter numbers (malloc.h): M_TRIM_THRESHOLD, M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)
MALLOC_THRESHOLD_BYTES = 131072  # glibc's static default; fixing it stops the dynamic growth that hoards freed memory


# ----- early-stopping backward ----------------------------------------------------------------------------------
def vision_blocks(model: nn.Module) -> nn.ModuleList:
    """The ViT trunk's blocks of a SAM3 (or of a PEFT model around one)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.backbone.vision_backbone.trunk.blocks


def last_blocks_pattern(depth: int, last_n: int, layers: str) -> str:
    """Full-name regex of `layers` (e.g. `attn\\.qkv|mlp\\.fc1`) in the last `last_n` of `depth` ViT blocks.

    Raises:
        ValueError: `last_n` is not in 1..depth.
    """
    if not 1 <= last_n <= depth:
        raise ValueError(f"lora.vision_last_blocks={last_n}: must be between 1 and the ViT depth {depth} "
                         "(null = adapt every block)")
    indices = "|".join(str(i) for i in range(depth - last_n, depth))
    return rf"{VISION_BLOCKS.replace('.', chr(92) + '.')}\.({indices})\.({layers})"


def run_without_grad(module: nn.Module) -> nn.Module:
    """Make `module` always run under `torch.no_grad()`: autograd records nothing in it, so backward stops
    at its output and keeps none of its activations. Its parameters must be frozen.

    The wrapper is an instance attribute (`module.forward`), so state-dict keys and hooks are unchanged.

    Raises:
        ValueError: a parameter of `module` requires grad (it could never receive one).
    """
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(f"cannot run a module without autograd while it has trainable parameters: {trainable[:3]}")
    if not getattr(module.forward, "_sam3_lora_no_grad", False):
        forward = torch.no_grad()(module.forward)
        forward = functools.wraps(module.forward)(forward)
        forward._sam3_lora_no_grad = True
        module.forward = forward
    return module


def restrict_vision_targets(targets: list[str], depth: int, last_n: int | None, layers: str) -> list[str]:
    """Replace the "vision" preset in `targets` by its last `last_n` ViT blocks (None or >= depth: all blocks).

    Raises:
        ValueError: `last_n` < 1.
    """
    if last_n is None or last_n >= depth:
        if last_n is not None:
            log.info("lora.vision_last_blocks=%d covers the whole %d-block ViT: every block adapted", last_n, depth)
        return targets
    pattern = last_blocks_pattern(depth, last_n, layers)
    return [pattern if target == "vision" else target for target in targets]


def apply_memory_settings(model: nn.Module, vision_last_blocks: int | None = None, frozen_dtype: str = "float32",
                          keep_frozen: Sequence[str] = ()) -> nn.Module:
    """After LoRA injection: freeze `keep_frozen`, stop backward before the last N ViT blocks, cast the base.

    Args:
        model: the model `apply_lora` made (PEFT model or fully trained base).
        vision_last_blocks: blocks before the last N run without autograd (None: all blocks may train).
        frozen_dtype: "float32" (no cast) or "bfloat16"/"float16": storage of frozen parameters.
        keep_frozen: full-name regexes of parameters (base SAM3 names) that stay frozen.

    Raises:
        ValueError: unknown `frozen_dtype`; an early block has trainable parameters.
    """
    if frozen_dtype not in FROZEN_DTYPES:
        raise ValueError(f"lora.frozen_dtype={frozen_dtype!r}: choose one of {sorted(FROZEN_DTYPES)}")
    freeze_matching(model, keep_frozen)
    if vision_last_blocks is not None and vision_last_blocks < len(vision_blocks(model)):
        stop_backward_before_block(model, len(vision_blocks(model)) - vision_last_blocks)
    if FROZEN_DTYPES[frozen_dtype] != torch.float32:
        cast_frozen_parameters(model, FROZEN_DTYPES[frozen_dtype])
    return model


FROZEN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def base_name(name: str) -> str:
    """A parameter/module name as in the base SAM3: without PEFT's `base_model.model.` / `modules_to_save.default.`."""
    return name.replace("base_model.model.", "", 1).replace("modules_to_save.default.", "")


def freeze_matching(model: nn.Module, patterns: Sequence[str]) -> int:
    """Freeze parameters whose base-SAM3 name fully matches one of `patterns`. Returns how many.

    Raises:
        ValueError: a pattern matches no parameter (a typo would otherwise silently train it).
    """
    frozen = 0
    for pattern in patterns:
        hits = [p for n, p in model.named_parameters() if re.fullmatch(pattern, base_name(n))]
        if not hits:
            raise ValueError(f"lora.keep_frozen entry {pattern!r} matches no parameter of this SAM3")
        for parameter in hits:
            frozen += parameter.requires_grad
            parameter.requires_grad_(False)
    return frozen


def stop_backward_before_block(model: nn.Module, first_trained: int) -> int:
    """Run ViT blocks `[0, first_trained)` without autograd (they must be frozen). Returns how many."""
    blocks = vision_blocks(model)
    for block in list(blocks)[:first_trained]:
        run_without_grad(block)
    log.info("ViT blocks 0..%d run without autograd: backward stops at block %d", first_trained - 1, first_trained)
    return first_trained


# ----- frozen base in bf16 -------------------------------------------------------------------------------------
def cast_frozen_parameters(model: nn.Module, dtype: torch.dtype) -> int:
    """Store every frozen floating-point parameter in `dtype`; trainable ones (LoRA, heads) stay as they are.

    Buffers are left alone, in particular the ViT's complex RoPE tables (`freqs_cis`): `.to(bfloat16)` would
    drop their imaginary part (DESIGN §4). Normalisation layers stay fp32 (a few KB): CPU autocast runs
    `layer_norm` in the input's dtype and rejects an fp32 input with bf16 weights (sam3's residual MLPs add
    an fp32 input back before their norm). Forward then needs autocast (`trainer.precision=bf16-mixed`).

    Returns:
        The number of parameters cast.
    """
    norms = {id(p) for m in model.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False)}
    cast = 0
    for parameter in model.parameters():
        if (not parameter.requires_grad and parameter.is_floating_point() and parameter.dtype != dtype
                and id(parameter) not in norms):
            parameter.data = parameter.data.to(dtype)
            cast += parameter.numel()
    log.info("frozen base stored in %s: %d parameters", dtype, cast)
    return cast


def frozen_low_precision(model: nn.Module) -> bool:
    """True when some frozen parameter is stored in bf16/fp16 (the forward then needs autocast)."""
    return any(not p.requires_grad and p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters())


# ----- glibc malloc ---------------------------------------------------------------------------------------------
def tune_glibc_malloc(threshold: int = MALLOC_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap and trim thresholds so freed activation memory returns to the OS.

    glibc raises its mmap threshold each time a large block is freed, after which big activations come
    from the heap and are never given back: peak RSS of a lean 1008 px CPU step 6,772 MB by default, 5,656 MB
    with the thresholds fixed (README, Memory presets), paid in system time (more mmap/munmap). Same as the environment
    variables `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_`, which win when set.

    Returns:
        True when applied; False on a non-glibc C library or when the environment already sets them.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # musl, macOS, Windows: no mallopt
        log.debug("no glibc mallopt in %s: malloc thresholds left as they are", name)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold))


# ----- where activations go -------------------------------------------------------------------------------------
class SavedTensorLedger:
    """Bytes that autograd saves for backward, attributed to the innermost module running when saved.

    Use as a context manager around forward + loss; each storage is counted once, parameters never (they
    are not activations). Tensors saved inside an activation-checkpointed region are not kept (they are
    recomputed in backward), so they do not appear here.

        with SavedTensorLedger(model) as ledger:
            loss = loss_fn(model(batch), targets)
        ledger.by_group(component_of)
    """

    def __init__(self, model: nn.Module, outside: str = "loss/other"):
        self.model = model
        self.outside = outside
        self.bytes: dict[str, int] = defaultdict(int)
        self._stack: list[str] = []
        self._seen: set[int] = set()
        self._handles: list = []
        self._hooks = None

    def __enter__(self) -> "SavedTensorLedger":
        self._seen = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        for name, module in self.model.named_modules():
            self._handles.append(module.register_forward_pre_hook(functools.partial(self._enter, name)))
            self._handles.append(module.register_forward_hook(self._leave))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _enter(self, name: str, module, args) -> None:
        self._stack.append(name)

    def _leave(self, module, args, output) -> None:
        if self._stack:
            self._stack.pop()

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._seen and storage.device.type != "meta":
            self._seen.add(storage.data_ptr())
            self.bytes[self._stack[-1] if self._stack else self.outside] += storage.nbytes()
        return tensor

    def by_group(self, group_of) -> dict[str, int]:
        """Bytes summed by `group_of(module_name)`, largest first."""
        groups: dict[str, int] = defaultdict(int)
        for name, size in self.bytes.items():
            groups[group_of(name)] += size
        return dict(sorted(groups.items(), key=lambda item: -item[1]))

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


SAM3_GROUPS = (
    ("ViT block ", VISION_BLOCKS + "."), ("ViT trunk, outside blocks", "backbone.vision_backbone.trunk"),
    ("neck", "backbone.vision_backbone"), ("text encoder", "backbone.language_backbone"),
    ("geometry encoder", "geometry_encoder"), ("DETR encoder", "transformer.encoder"),
    ("DETR decoder", "transformer.decoder"), ("mask head", "segmentation_head"),
    ("scoring", "dot_prod_scoring"),
)


def sam3_group(name: str, per_block: bool = False) -> str:
    """Component of a SAM3 module name (PEFT prefixes removed): ViT blocks, neck, DETR, mask head, ...

    Module names outside the model (the loss) keep their ledger label.
    """
    inner = base_name(name).removeprefix("base_model.model")
    for label, prefix in SAM3_GROUPS:
        if inner.startswith(prefix):
            if label == "ViT block ":
                return label + inner[len(prefix):].split(".")[0] if per_block else "ViT blocks"
            return label
    return "Sam3Image (top level)" if inner == "" else inner
