"""LoRA injection through PEFT on the tiny SAM3: identity at init, training touches only adapters, every
adapter gets a gradient. (Adapter files, merge and export: test_adapter.py.)"""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora.layer import MultiheadAttention as PeftMultiheadAttention

from sam3_lora import lora
from sam3_lora.lora_mha import LoraMultiheadAttention
from sam3_lora.model import build_sam3
from tests.conftest import final_outputs
from tests.lora_helpers import adapted, assert_same, perturb_lora, sam3_loss

PRESET_COMBINATIONS = [["vision"], ["text"], ["detr"], ["heads"], ["vision", "detr"]]


def test_adapted_model_equals_base_at_init(tiny_config, batch):
    torch.manual_seed(0)
    base = build_sam3(**tiny_config)
    expected = final_outputs(base, batch)
    model = lora.apply_lora(base, rank=4, targets=["vision", "text", "detr", "heads"])
    # lora_B = 0 makes every adapter an identity; LoRA MHA runs F.multi_head_attention_forward, never
    # torch's fused inference path, which reassociates float sums: differences stay ~1e-6 on outputs ~1.
    assert_same(final_outputs(model, batch), expected, atol=1e-5)


def test_one_step_changes_every_lora_tensor_and_no_frozen_tensor(tiny_config, batch):
    # PEFT 0.21's MHA layer writes merged weights into the frozen in_proj/out_proj on every forward; the
    # attention modules here must get sam3_lora.lora_mha's layer, which never writes them
    model = adapted(tiny_config, modules_to_save=["dot_prod_scoring"])
    attentions = [m for m in model.modules() if isinstance(m, PeftMultiheadAttention)]
    assert attentions and all(isinstance(m, LoraMultiheadAttention) for m in attentions)
    perturb_lora(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sam3_loss(model, batch).backward()
    optimizer.step()
    for name, parameter in model.named_parameters():
        changed = not torch.equal(before[name], parameter.detach())
        assert changed == parameter.requires_grad, f"{name}: changed={changed}, trainable={parameter.requires_grad}"
    assert lora.lora_parameters(model), "no LoRA tensors were created"


@pytest.mark.parametrize("targets", PRESET_COMBINATIONS, ids="+".join)
def test_every_adapter_tensor_receives_gradient(tiny_config, batch, targets):
    model = adapted(tiny_config, targets=targets)
    perturb_lora(model)
    sam3_loss(model, batch).backward()
    without = [n for n, p in lora.lora_parameters(model) if p.grad is None or not p.grad.abs().sum() > 0]
    assert not without, f"adapters without gradient for {targets}: {without}"


def test_lora_parameter_names_and_base_model_are_found_without_duck_typing(tiny_config):
    model = adapted(tiny_config, targets=["detr"], modules_to_save=["dot_prod_scoring"])
    names = [n for n, _ in lora.lora_parameters(model)]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert not any(lora.is_lora_parameter(n) for n, p in model.named_parameters() if "modules_to_save" in n)
    assert type(lora.base_sam3(model)).__name__ == "Sam3Image" and lora.has_adapters(model)
    plain = build_sam3(**tiny_config)
    assert lora.base_sam3(plain) is plain and not lora.has_adapters(plain)

