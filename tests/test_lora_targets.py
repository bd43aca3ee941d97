"""Target resolution on toy modules named like SAM3's (milliseconds, no sam3 model)."""

from __future__ import annotations

import pytest
from torch import nn

from sam3_lora import lora


class ToyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)


class ToyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.norm1 = ToyAttention(), nn.LayerNorm(8)
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)


class ToyDecoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(8, 2)
        self.linear1, self.linear2 = nn.Linear(8, 16), nn.Linear(16, 8)


def toy_sam3() -> nn.Module:
    root = nn.Module()
    root.backbone = nn.Module()
    root.backbone.vision_backbone = nn.Module()
    root.backbone.vision_backbone.trunk = nn.Module()
    root.backbone.vision_backbone.trunk.blocks = nn.ModuleList([ToyBlock(), ToyBlock()])
    root.transformer = nn.Module()
    root.transformer.decoder = nn.Module()
    root.transformer.decoder.layers = nn.ModuleList([ToyDecoderLayer()])
    return root


def test_presets_select_sam3_names():
    names = lora.match_targets(toy_sam3(), ["vision", "detr"])
    assert len([n for n in names if "trunk" in n]) == 2 * 4
    assert "transformer.decoder.layers.0.self_attn" in names
    assert not any(n.endswith("out_proj") for n in names)


def test_regex_targets_are_full_name_matches():
    names = lora.match_targets(toy_sam3(), [r".*blocks\.0\.attn\.qkv"])
    assert names == ["backbone.vision_backbone.trunk.blocks.0.attn.qkv"]


def test_target_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match="'text' matches no module"):
        lora.match_targets(toy_sam3(), ["text"])


def test_mha_out_proj_target_is_refused_as_silent_noop():
    with pytest.raises(ValueError, match="out_proj of a MultiheadAttention"):
        lora.match_targets(toy_sam3(), [r".*self_attn\.out_proj"])


def test_unadaptable_module_is_named():
    with pytest.raises(ValueError, match="LayerNorm, which PEFT LoRA cannot adapt"):
        lora.match_targets(toy_sam3(), [r".*blocks\.0\.norm1"])


def test_unknown_modules_to_save_is_an_error():
    with pytest.raises(ValueError, match="modules_to_save entry 'scoring_head'"):
        lora.apply_lora(toy_sam3(), targets=["vision"], modules_to_save=["scoring_head"])
