"""PEFT's LoRA `Linear` with the low-rank update added in place: W·x + s·B·(A·x), no output-sized temporaries.

PEFT 0.21's `Linear.forward` computes `result + lora_B(lora_A(dropout(x))) * scaling`: three new tensors of
the layer's output size per adapted layer (B·A·x, its scaled copy, the sum), each a fresh allocation and a
pass over memory. With the default LoRA's 128 adapted ViT Linears that made unmerged inference 1.13× the base
at 504 px on CPU (README "Inference"). `LoraLinear` adds s·(A·x)·Bᵀ into the base output with one `addmm_`:
the same sum, the same autograd graph (a Linear's backward does not need its output, so updating it in place
is allowed), and a single N × r temporary.

Everything else goes through PEFT's own forward unchanged: active dropout, DoRA and other variants,
`adapter_names` mixed batches, LoRA bias, autocast and mixed dtypes (the bf16 base of `preset=lean`).
The module tree, parameter names and adapter files are PEFT's (`register` plugs it in through
`LoraConfig._register_custom_module`, like `lora_mha`).
"""

from __future__ import annotations

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLinear
from torch import nn


def register(config: LoraConfig) -> LoraConfig:
    """Make `config` adapt every `nn.Linear` target with `LoraLinear` (not saved in `adapter_config.json`)."""
    config._register_custom_module({nn.Linear: LoraLinear})
    return config


class LoraLinear(PeftLinear):
    """PEFT's LoRA Linear whose plain-LoRA forward accumulates into the base output with `addmm_`."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or not self._in_place_applies(x):
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        if not result.is_contiguous():
            result = result.contiguous()
        rows = result.view(-1, result.shape[-1])
        for name in self._active_lora_names():
            low_rank = self.lora_A[name](x)
            rows.addmm_(low_rank.reshape(-1, low_rank.shape[-1]), self.lora_B[name].weight.t(),
                        alpha=self.scaling[name])
        return result

    def _active_lora_names(self) -> list[str]:
        return [name for name in self.active_adapters if name in self.lora_A]

    def _in_place_applies(self, x: torch.Tensor) -> bool:
        """Plain LoRA, inactive dropout, one dtype throughout and no autocast: the case `addmm_` reproduces."""
        if self.disable_adapters or self.merged or torch.is_autocast_enabled(x.device.type):
            return False
        dtypes = {x.dtype, self.get_base_layer().weight.dtype}
        for name in self._active_lora_names():
            dropout = self.lora_dropout[name]
            if name in self.lora_variant or self.lora_B[name].bias is not None:
                return False
            if dropout.training and not isinstance(dropout, nn.Identity):
                return False
            dtypes |= {self.lora_A[name].weight.dtype, self.lora_B[name].weight.dtype}
        return len(dtypes) == 1
