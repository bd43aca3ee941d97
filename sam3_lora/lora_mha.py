"""LoRA on `nn.MultiheadAttention` that means W + ΔW, computed functionally.

PEFT 0.21's `peft.tuners.lora.layer.MultiheadAttention` merges the adapter into `in_proj_weight` and
`out_proj.weight` before every forward and unmerges it after, and its `merge` adds out_proj's ΔW twice
(W + 2ΔW in training, unmerged inference and merged exports; `unmerge` subtracts twice, so round trips
hide it; upstream PEFT PR #3774). `LoraMultiheadAttention` keeps PEFT's module tree, parameter names and
adapter file format, but:

- forward computes W_in + B·A·s and W_out + B·A·s as new tensors and calls
  `F.multi_head_attention_forward` with them: no frozen tensor is written, no per-call merge/unmerge;
- `merge` writes W + ΔW exactly once into `in_proj_weight` and `out_proj.weight` (NaN check first with
  `safe_merge`), `unmerge` gives back the original tensors bit for bit.

It enters PEFT through `LoraConfig._register_custom_module` (`register`), so an adapter it saves is a
plain PEFT adapter. A plain PEFT load without `register` uses PEFT's own layer (and its out_proj bug).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora.layer import MultiheadAttention as PeftMultiheadAttention
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from sam3_lora import compat

log = logging.getLogger(__name__)


def register(config: LoraConfig) -> LoraConfig:
    """Make `config` adapt every `nn.MultiheadAttention` (and subclasses) with `LoraMultiheadAttention`.

    The registration is not saved in `adapter_config.json`: call this on every config a model is built
    or loaded with (`sam3_lora.lora` does, for training, predict, export and the Python API).
    """
    config._register_custom_module({nn.MultiheadAttention: LoraMultiheadAttention})
    return config


@functools.lru_cache(maxsize=None)
def _warn_dropout_not_applied(dropout: float) -> None:
    log.warning("lora.dropout=%s applies to Linear adapters only: MultiheadAttention adapters fold B·A into "
                "the projection weights (as PEFT's own MHA LoRA does), so their input is not dropped", dropout)


class LoraMultiheadAttention(PeftMultiheadAttention):
    """PEFT's MHA LoRA (same tree and keys) with a functional forward and an exact, single merge."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs) -> None:
        if config.lora_bias:
            raise ValueError("lora_bias=True is not supported on MultiheadAttention targets (sam3_lora.lora_mha); "
                             "set lora_bias=False")
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self._forced_kwargs = _forced_forward_kwargs(type(self.get_base_layer()))
        # adapter name -> (in_proj_weight, out_proj.weight) tensors from before `merge`, for an exact unmerge
        self._weights_before_merge: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if config.lora_dropout:
            _warn_dropout_not_applied(config.lora_dropout)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`nn.MultiheadAttention.forward` with weights W + Σ B·A·scale over the active adapters."""
        kwargs = dict(key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
                      average_attn_weights=average_attn_weights, is_causal=is_causal)
        base = self.get_base_layer()
        out_proj = base.out_proj
        if out_proj.merged_adapters != self.merged_adapters or out_proj.active_adapters != self.active_adapters:
            raise ValueError("the out_proj of a LoRA MultiheadAttention was merged, unmerged or switched on its own; "
                             "merge, unmerge and set adapters on the attention module (it keeps both together)")
        if self.disable_adapters and self.merged:
            self.unmerge()
        adapters = [a for a in self.active_adapters if a in self.lora_A]
        if self.disable_adapters or self.merged or not adapters:
            return base(query, key, value, **kwargs)
        in_weight = base.in_proj_weight + _linear_delta(self, adapters, base.in_proj_weight.dtype)
        out_weight = out_proj.base_layer.weight + _linear_delta(out_proj, adapters, out_proj.base_layer.weight.dtype)
        return self._attend(base, in_weight, out_weight, query, key, value, **{**kwargs, **self._forced_kwargs})

    @staticmethod
    def _attend(base: nn.MultiheadAttention, in_weight: torch.Tensor, out_weight: torch.Tensor,
                query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs):
        """The non-fast path of `nn.MultiheadAttention.forward` (torch/nn/modules/activation.py) with given weights."""
        transpose = base.batch_first and query.dim() == 3
        if transpose:
            query, key, value = _sequence_first(query, key, value)
        output, weights = F.multi_head_attention_forward(
            query, key, value, base.embed_dim, base.num_heads, in_weight, base.in_proj_bias, base.bias_k,
            base.bias_v, base.add_zero_attn, base.dropout, out_weight, base.out_proj.base_layer.bias,
            training=base.training, **kwargs)
        return (output.transpose(1, 0) if transpose else output), weights

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write W + ΔW once into `in_proj_weight` and `out_proj.weight` for each adapter.

        Args:
            safe_merge: check both merged weights are finite before writing either.
            adapter_names: adapters to merge; default the active ones.

        Raises:
            ValueError: with `safe_merge`, a merged weight is not finite (nothing was written).
        """
        out_proj = self.get_base_layer().out_proj
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.lora_A:
                continue
            in_param, out_param = self.get_base_layer().in_proj_weight, out_proj.base_layer.weight
            merged_in = in_param.data + _linear_delta(self, [name], in_param.dtype).detach()
            merged_out = out_param.data + _linear_delta(out_proj, [name], out_param.dtype).detach()
            if safe_merge and not (torch.isfinite(merged_in).all() and torch.isfinite(merged_out).all()):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            self._weights_before_merge[name] = (in_param.data, out_param.data)
            # `.data =` swaps the tensor a registered Parameter holds: the original stays untouched for unmerge
            in_param.data, out_param.data = merged_in, merged_out
            self.merged_adapters.append(name)
            out_proj.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Give back the weights from before `merge`, bit for bit (no subtraction)."""
        out_proj = self.get_base_layer().out_proj
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in out_proj.merged_adapters:
                out_proj.merged_adapters.remove(name)
            if name in self._weights_before_merge:
                in_weight, out_weight = self._weights_before_merge.pop(name)
                self.get_base_layer().in_proj_weight.data = in_weight
                out_proj.base_layer.weight.data = out_weight

    def _restore_weights(self) -> None:
        # PEFT's layer unregisters the frozen Parameters while merged and re-registers new ones on every
        # `state_dict()`/`named_modules()`; this layer never unregisters them, so there is nothing to restore.
        return None


def _linear_delta(layer, adapters: list[str], dtype: torch.dtype) -> torch.Tensor:
    """Σ B·A·scale of a PEFT LoRA layer's adapters (autograd flows to lora_A / lora_B)."""
    delta = None
    for name in adapters:
        term = (layer.lora_B[name].weight @ layer.lora_A[name].weight) * layer.scaling[name]
        delta = term if delta is None else delta + term
    return delta.to(dtype)


def _sequence_first(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """Transpose batch-first inputs, keeping `query is key is value` identities (the packed in-projection)."""
    if query is key and key is value:
        query = key = value = query.transpose(1, 0)
    elif key is value:
        query, key = query.transpose(1, 0), key.transpose(1, 0)
        value = key
    else:
        query, key, value = (x.transpose(1, 0) for x in (query, key, value))
    return query, key, value


def _forced_forward_kwargs(cls: type) -> dict:
    """Forward kwargs an `nn.MultiheadAttention` subclass forces in its own `forward`.

    Raises:
        TypeError: the subclass overrides `forward` in a way this layer does not know (it would be skipped).
    """
    if cls.forward is nn.MultiheadAttention.forward:
        return {}
    known = compat.mha_forced_forward_kwargs()
    if cls not in known:
        raise TypeError(f"{cls.__module__}.{cls.__name__} overrides MultiheadAttention.forward; sam3_lora.lora_mha "
                        "computes attention with F.multi_head_attention_forward and would skip that override. "
                        "Describe it in sam3_lora/compat.py: mha_forced_forward_kwargs")
    return dict(known[cls])
