"""LoRA through PEFT on the tiny SAM3: identity at init, training touches only adapters, every
adapter gets a gradient, merge/save/load/export reproduce outputs, broken adapters fail clearly."""

from __future__ import annotations

import io
import contextlib
import shutil

import pytest
import torch

from sam3_lora import lora
from sam3_lora.losses import build_sam3_loss
from sam3_lora.model import build_sam3
from tests.conftest import final_outputs, tiny_model_config

PRESET_COMBINATIONS = [["vision"], ["text"], ["detr"], ["heads"], ["vision", "detr"]]


def _adapted(config, targets=("vision", "detr"), rank=4, seed=0, modules_to_save=()):
    torch.manual_seed(seed)
    base = build_sam3(**config)
    return lora.apply_lora(base, rank=rank, alpha=2 * rank, targets=list(targets),
                           modules_to_save=list(modules_to_save), model_config=config)


def _perturb_lora(model, seed=1):
    """lora_B starts at zero (identity); give every adapter a non-zero value to make tests bite."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in lora.lora_parameters(model):
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


def _assert_same(a: dict, b: dict, atol=0.0):
    for key in ("pred_logits", "pred_boxes", "presence_logit_dec", "pred_masks"):
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0 if atol == 0 else 1e-5, msg=key)


def _train_step(model, batch, lr=1e-2):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss_fn = build_sam3_loss(with_masks=True)
    out = model(batch)
    targets = [model.base_model.model.back_convert(t) for t in batch.find_targets]
    loss_fn(out, targets)["core_loss"].backward()
    optimizer.step()


def test_adapted_model_equals_base_at_init(tiny_config, batch):
    torch.manual_seed(0)
    base = build_sam3(**tiny_config)
    expected = final_outputs(base, batch)
    adapted = lora.apply_lora(base, rank=4, targets=["vision", "text", "detr", "heads"], model_config=tiny_config)
    # lora_B = 0 makes every adapter an identity; PEFT runs MHA through its own (non fused) path,
    # which reassociates float sums: differences stay ~1e-6 on outputs of magnitude ~1.
    _assert_same(final_outputs(adapted, batch), expected, atol=1e-5)


def test_one_step_changes_every_lora_tensor_and_no_frozen_tensor(tiny_config, batch):
    model = _adapted(tiny_config, modules_to_save=["dot_prod_scoring"])
    _perturb_lora(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_step(model, batch)
    for name, parameter in model.named_parameters():
        changed = not torch.equal(before[name], parameter.detach())
        assert changed == parameter.requires_grad, f"{name}: changed={changed}, trainable={parameter.requires_grad}"
    assert lora.lora_parameters(model), "no LoRA tensors were created"


@pytest.mark.parametrize("targets", PRESET_COMBINATIONS, ids="+".join)
def test_every_adapter_tensor_receives_gradient(tiny_config, batch, targets):
    model = _adapted(tiny_config, targets=targets)
    _perturb_lora(model)
    model.train()
    out = model(batch)
    targets_ = [model.base_model.model.back_convert(t) for t in batch.find_targets]
    build_sam3_loss(with_masks=True)(out, targets_)["core_loss"].backward()
    without = [n for n, p in lora.lora_parameters(model) if p.grad is None or not p.grad.abs().sum() > 0]
    assert not without, f"adapters without gradient for {targets}: {without}"


def test_merged_equals_unmerged(tiny_config, batch):
    model = _adapted(tiny_config, targets=["vision", "text", "detr", "heads"])
    _perturb_lora(model)
    unmerged = final_outputs(model, batch)
    merged = lora.merge_adapter(model)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert set(merged.state_dict()) == set(build_sam3(**tiny_config).state_dict())
    _assert_same(final_outputs(merged, batch), unmerged, atol=1e-5)


@pytest.fixture
def config_with_base_file(tiny_config, tmp_path):
    """Tiny config whose base weights come from a file, so a rebuild gets the same base."""
    from sam3_lora.checkpoint_io import save_stock_checkpoint

    torch.manual_seed(0)
    save_stock_checkpoint(build_sam3(**tiny_config).state_dict(), tmp_path / "base.pt")
    return {**tiny_config, "checkpoint": str(tmp_path / "base.pt")}


def test_save_then_load_into_fresh_model_reproduces_outputs(config_with_base_file, batch, tmp_path):
    model = _adapted(config_with_base_file, modules_to_save=["dot_prod_scoring"])
    _perturb_lora(model)
    expected = final_outputs(model, batch)
    lora.save_adapter(model, tmp_path / "adapter")
    assert set(lora.ADAPTER_FILES) <= {p.name for p in (tmp_path / "adapter").iterdir()}
    fresh = _adapted(config_with_base_file, modules_to_save=["dot_prod_scoring"], seed=123)
    assert not torch.equal(final_outputs(fresh, batch)["pred_logits"], expected["pred_logits"])
    lora.load_adapter(fresh, tmp_path / "adapter")
    _assert_same(final_outputs(fresh, batch), expected)
    _assert_same(final_outputs(lora.build_adapted_model(tmp_path / "adapter"), batch), expected)


def test_export_loads_through_stock_detector_prefix(config_with_base_file, tiny_config, batch, tmp_path):
    from sam3.model_builder import _load_checkpoint

    model = _adapted(config_with_base_file)
    _perturb_lora(model)
    expected = final_outputs(model, batch)
    lora.save_adapter(model, tmp_path / "adapter")
    out = lora.export_merged(tmp_path / "adapter", tmp_path / "merged.pt")
    stored = torch.load(out, weights_only=True)["model"]
    assert all(k.startswith("detector.") for k in stored)
    fresh = build_sam3(**tiny_config)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        _load_checkpoint(fresh, str(out))  # sam3's own loader prints missing keys, if any
    assert "missing" not in printed.getvalue(), printed.getvalue()
    _assert_same(final_outputs(fresh, batch), expected, atol=1e-5)
    strict = build_sam3(**{**tiny_config, "checkpoint": str(out)})
    _assert_same(final_outputs(strict, batch), expected, atol=1e-5)


@pytest.fixture
def saved_adapter(tiny_config, tmp_path):
    model = _adapted(tiny_config, rank=4)
    return lora.save_adapter(model, tmp_path / "adapter")


def test_adapter_dir_missing_file_is_named(saved_adapter, tiny_config):
    (saved_adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        lora.load_adapter(_adapted(tiny_config), saved_adapter)


def test_adapter_with_other_rank_says_rank(saved_adapter, tiny_config):
    with pytest.raises(ValueError, match=r"r: adapter 4 vs model 8"):
        lora.load_adapter(_adapted(tiny_config, rank=8), saved_adapter)


def test_adapter_with_other_targets_says_targets(saved_adapter, tiny_config):
    with pytest.raises(ValueError, match="targets"):
        lora.load_adapter(_adapted(tiny_config, targets=["vision"]), saved_adapter)


def test_adapter_for_other_base_dims_says_which(saved_adapter, tmp_path):
    other = tiny_model_config(d_model=32, ffn_dim=128)
    with pytest.raises(ValueError, match=r"model.d_model: adapter 64 vs model 32"):
        lora.load_adapter(_adapted(other), saved_adapter)


def test_corrupted_tensor_shapes_are_listed(saved_adapter, tiny_config):
    from safetensors.torch import load_file, save_file

    path = saved_adapter / "adapter_model.safetensors"
    weights = load_file(str(path))
    key = next(k for k in weights if "lora_A" in k)
    weights[key] = torch.zeros(2, 2)
    save_file(weights, str(path))
    with pytest.raises(ValueError, match="adapter \\(2, 2\\) vs model"):
        lora.load_adapter(_adapted(tiny_config), saved_adapter)


def test_build_adapted_model_needs_no_run_config(saved_adapter):
    model = lora.build_adapted_model(saved_adapter)
    assert lora.adapter_summary(model)["adapted_modules"]["vision"] == 2 * 4
