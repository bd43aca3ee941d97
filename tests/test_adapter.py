"""Adapter directories on the tiny SAM3: merge/save/load/export reproduce outputs, exports carry the model
config, broken adapters fail clearly."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from sam3_lora import adapter, lora
from sam3_lora.checkpoint_io import read_model_config, save_stock_checkpoint
from sam3_lora.model import build_sam3
from tests.conftest import final_outputs, tiny_model_config
from tests.lora_helpers import adapted, assert_same, perturb_lora


def test_merged_equals_unmerged(tiny_config, batch):
    model = adapted(tiny_config, targets=["vision", "text", "detr", "heads"])
    perturb_lora(model)
    unmerged = final_outputs(model, batch)
    merged = adapter.merge_adapter(model)
    assert not any(lora.is_lora_parameter(n) for n, _ in merged.named_parameters())
    assert set(merged.state_dict()) == set(build_sam3(**tiny_config).state_dict())
    assert_same(final_outputs(merged, batch), unmerged, atol=1e-5)


@pytest.fixture
def config_with_base_file(tiny_config, tmp_path):
    """Tiny config whose base weights come from a file, so a rebuild gets the same base."""
    torch.manual_seed(0)
    save_stock_checkpoint(build_sam3(**tiny_config).state_dict(), tmp_path / "base.pt")
    return {**tiny_config, "checkpoint": str(tmp_path / "base.pt")}


def test_save_then_load_into_fresh_model_reproduces_outputs(config_with_base_file, batch, tmp_path):
    model = adapted(config_with_base_file, modules_to_save=["dot_prod_scoring"])
    perturb_lora(model)
    expected = final_outputs(model, batch)
    adapter.save_adapter(model, tmp_path / "adapter", config_with_base_file)
    assert set(adapter.ADAPTER_FILES) <= {p.name for p in (tmp_path / "adapter").iterdir()}
    fresh = adapted(config_with_base_file, modules_to_save=["dot_prod_scoring"], seed=123)
    assert not torch.equal(final_outputs(fresh, batch)["pred_logits"], expected["pred_logits"])
    adapter.load_adapter(fresh, tmp_path / "adapter", config_with_base_file)
    assert_same(final_outputs(fresh, batch), expected)
    rebuilt, model_config = adapter.build_adapted_model(tmp_path / "adapter")
    assert model_config == config_with_base_file
    assert_same(final_outputs(rebuilt, batch), expected)


def test_export_loads_through_stock_detector_prefix(config_with_base_file, tiny_config, batch, tmp_path):
    from sam3.model_builder import _load_checkpoint

    model = adapted(config_with_base_file)
    perturb_lora(model)
    expected = final_outputs(model, batch)
    adapter.save_adapter(model, tmp_path / "adapter", config_with_base_file)
    out = adapter.export_merged(tmp_path / "adapter", tmp_path / "merged.pt")
    stored = torch.load(out, weights_only=True)["model"]
    assert all(k.startswith("detector.") for k in stored)
    fresh = build_sam3(**tiny_config)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        _load_checkpoint(fresh, str(out))  # sam3's own loader prints missing keys, if any
    assert "missing" not in printed.getvalue(), printed.getvalue()
    assert_same(final_outputs(fresh, batch), expected, atol=1e-5)
    strict = build_sam3(**{**tiny_config, "checkpoint": str(out)})
    assert_same(final_outputs(strict, batch), expected, atol=1e-5)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_stock_export_records_the_model_config_for_predict(tiny_config, batch, tmp_path, suffix):
    """Both export formats rebuild without --model-config (load_model_for_inference reads the stored one)."""
    model = adapted(tiny_config)
    perturb_lora(model)
    expected = final_outputs(model, batch)
    out = adapter.export_stock_checkpoint(model, tiny_config, tmp_path / f"merged{suffix}")
    assert read_model_config(out) == tiny_config
    rebuilt, config = adapter.load_model_for_inference(str(out))
    assert config == {**tiny_config, "checkpoint": str(out)}
    assert_same(final_outputs(rebuilt, batch), expected, atol=1e-5)


@pytest.fixture
def saved_adapter(tiny_config, tmp_path):
    return adapter.save_adapter(adapted(tiny_config, rank=4), tmp_path / "adapter", tiny_config)


def test_adapter_dir_missing_file_is_named(saved_adapter, tiny_config):
    (saved_adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        adapter.load_adapter(adapted(tiny_config), saved_adapter, tiny_config)


def test_adapter_with_other_rank_says_rank(saved_adapter, tiny_config):
    with pytest.raises(ValueError, match=r"r: adapter 4 vs model 8"):
        adapter.load_adapter(adapted(tiny_config, rank=8), saved_adapter, tiny_config)


def test_adapter_with_other_targets_says_targets(saved_adapter, tiny_config):
    with pytest.raises(ValueError, match="targets"):
        adapter.load_adapter(adapted(tiny_config, targets=["vision"]), saved_adapter, tiny_config)


def test_adapter_for_other_base_dims_says_which(saved_adapter):
    other = tiny_model_config(d_model=32, ffn_dim=128)
    with pytest.raises(ValueError, match=r"model.d_model: adapter 64 vs model 32"):
        adapter.load_adapter(adapted(other), saved_adapter, other)


def test_corrupted_tensor_shapes_are_listed(saved_adapter, tiny_config):
    from safetensors.torch import load_file, save_file

    path = saved_adapter / "adapter_model.safetensors"
    weights = load_file(str(path))
    key = next(k for k in weights if "lora_A" in k)
    weights[key] = torch.zeros(2, 2)
    save_file(weights, str(path))
    with pytest.raises(ValueError, match="adapter \\(2, 2\\) vs model"):
        adapter.load_adapter(adapted(tiny_config), saved_adapter, tiny_config)


def test_build_adapted_model_needs_no_run_config(saved_adapter):
    model, _ = adapter.build_adapted_model(saved_adapter)
    assert lora.adapter_summary(model)["adapted_modules"]["vision"] == 2 * 4


def test_adapter_readers_use_the_previous_version_left_by_a_kill_between_renames(config_with_base_file, batch,
                                                                                 tmp_path, caplog):
    from sam3_lora.checkpoint_io import previous_version_path
    from sam3_lora.predictor import Sam3Predictor

    model = adapted(config_with_base_file)
    perturb_lora(model)
    expected = final_outputs(model, batch)
    out = adapter.save_adapter(model, tmp_path / "adapter", config_with_base_file)
    out.rename(previous_version_path(out))  # what a kill between atomic_path's two renames leaves (test_atomic)
    rebuilt, _ = adapter.build_adapted_model(out)
    assert_same(final_outputs(rebuilt, batch), expected)
    assert "interrupted between its two renames" in caplog.text
    predictor = Sam3Predictor(config_with_base_file["checkpoint"], device="cpu").add_adapter("only", out)
    assert predictor.adapters == {"only": previous_version_path(out)}
    assert not out.exists()  # readers never move a folder a live writer may be swapping
