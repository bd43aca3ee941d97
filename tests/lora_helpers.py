"""Helpers shared by the LoRA and adapter tests: a LoRA-adapted tiny SAM3, non-identity adapters, output checks."""

from __future__ import annotations

import torch

from sam3_lora import lora
from sam3_lora.losses import build_sam3_loss
from sam3_lora.model import build_sam3


def adapted(config, targets=("vision", "detr"), rank=4, seed=0, modules_to_save=()):
    """A tiny SAM3 built with `seed`, LoRA-adapted (rank, alpha = 2 * rank)."""
    torch.manual_seed(seed)
    base = build_sam3(**config)
    return lora.apply_lora(base, rank=rank, alpha=2 * rank, targets=list(targets),
                           modules_to_save=list(modules_to_save))


def perturb_lora(model, seed=1):
    """lora_B starts at zero (identity); give every adapter a non-zero value to make tests bite."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in lora.lora_parameters(model):
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


def assert_same(a: dict, b: dict, atol=0.0):
    """Final predictions equal (exactly, or within `atol`)."""
    for key in ("pred_logits", "pred_boxes", "presence_logit_dec", "pred_masks"):
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0 if atol == 0 else 1e-5, msg=key)


def sam3_loss(model, batch):
    """SAM3's training loss of `model` on `batch` (train mode)."""
    model.train()
    out = model(batch)
    targets = [lora.base_sam3(model).back_convert(t) for t in batch.find_targets]
    return build_sam3_loss(with_masks=True)(out, targets)["core_loss"]
