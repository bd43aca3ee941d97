"""LoRA on `nn.Linear` adds s·B·A·x into the base output in place (sam3_lora.lora_linear).

The reference is written by hand: W·x + b + Σ s·(x·Aᵀ)·Bᵀ over the active adapters, with random non-zero A and
B, for values and for gradients. Cases the in-place path does not cover must give PEFT's own forward exactly.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLinear
from torch import nn

from sam3_lora import lora
from sam3_lora.lora_linear import LoraLinear
from sam3_lora.lora_mha import LoraMultiheadAttention
from tests import lora_helpers

IN, OUT, TOKENS, BATCH = 12, 20, 7, 3
RANK, ALPHA = 4, 8.0


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(IN, OUT)

    def forward(self, x):
        return self.proj(x)


def _adapted(dropout=0.0, seed=0) -> tuple[nn.Module, LoraLinear]:
    torch.manual_seed(seed)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=["proj"])
    model = lora.inject_lora(Block(), config)
    layer = model.base_model.model.proj
    _randomise(layer, "default")
    return model, layer


def _randomise(layer, name):
    with torch.no_grad():
        layer.lora_A[name].weight.normal_()
        layer.lora_B[name].weight.normal_()


def _reference(layer, x, names):
    """W·x + b + Σ s·(x·Aᵀ)·Bᵀ from detached copies; the copies are leaves, for gradients."""
    base = layer.get_base_layer()
    weights = {n: (layer.lora_A[n].weight.detach().clone().requires_grad_(),
                   layer.lora_B[n].weight.detach().clone().requires_grad_()) for n in names}
    out = x @ base.weight.T + base.bias
    for n, (a, b) in weights.items():
        out = out + (x @ a.T) @ b.T * (ALPHA / RANK)
    return out, weights


def test_linear_targets_get_the_in_place_layer_on_sam3(tiny_config):
    model = lora_helpers.adapted(tiny_config)
    # out_proj inside an adapted MultiheadAttention is PEFT's holder of its A, B: lora_mha folds them into weights
    inside_attention = {id(m) for mha in model.modules() if isinstance(mha, LoraMultiheadAttention)
                        for m in mha.modules()}
    layers = [m for m in model.modules() if isinstance(m, PeftLinear) and id(m) not in inside_attention]
    assert layers and all(isinstance(m, LoraLinear) for m in layers)


def test_training_forward_and_gradients_equal_the_hand_made_reference():
    model, layer = _adapted()
    model.train()
    x = torch.randn(BATCH, TOKENS, IN, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out = model(x)
    expected, weights = _reference(layer, x_ref, ["default"])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    gradient = torch.randn_like(out)
    out.backward(gradient)
    expected.backward(gradient)
    a, b = weights["default"]
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, a.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, b.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)


def test_several_active_adapters_add_up():
    model, layer = _adapted()
    layer.update_layer("second", RANK, lora_alpha=ALPHA, config=LoraConfig(r=RANK, lora_alpha=ALPHA))
    _randomise(layer, "second")
    layer.set_adapter(["default", "second"])
    x = torch.randn(BATCH, TOKENS, IN)
    with torch.no_grad():
        expected, _ = _reference(layer, x, ["default", "second"])
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_inference_adds_into_the_base_output_without_output_sized_temporaries():
    """PEFT's forward computes B·A·x, scales it and adds it: aten::mul and aten::add on N × OUT tensors."""
    model, layer = _adapted()
    model.eval()
    x = torch.randn(BATCH, TOKENS, IN)
    with torch.no_grad(), torch.profiler.profile() as profile:
        out = model(x)
    ops = {event.name for event in profile.events()}
    assert "aten::addmm_" in ops
    assert not ops & {"aten::add", "aten::mul"}, ops
    with torch.no_grad():
        torch.testing.assert_close(out, PeftLinear.forward(layer, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["active_dropout", "autocast", "disabled"])
def test_other_cases_run_peft_forward_unchanged(case):
    model, layer = _adapted(dropout=0.5 if case == "active_dropout" else 0.0)
    model.train(case == "active_dropout")
    x = torch.randn(BATCH, TOKENS, IN)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=case == "autocast"):
        if case == "disabled":
            layer.enable_adapters(False)
        torch.manual_seed(7)
        ours = model(x)
        torch.manual_seed(7)
        peft = PeftLinear.forward(layer, x)
    assert torch.equal(ours, peft)
    if case == "disabled":
        assert torch.equal(ours, layer.get_base_layer()(x))
