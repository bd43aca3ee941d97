"""Memory presets and the full fine-tune recipe: each test proves the mechanism, not only that it runs.

Tiny SAM3 (2 ViT blocks) on CPU; the measured effects at real size are in bench/lora_cost.py and the README.
"""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from sam3_lora import memory
from sam3_lora.losses import build_sam3_loss
from sam3_lora.model import build_sam3, freeze
from sam3_lora.lora import base_sam3
from sam3_lora.module import parameter_groups
from tests.conftest import REPO, make_batch, tiny_model_config

HEADS = ["dot_prod_scoring", "transformer.decoder.bbox_embed"]
# bf16 has 8 mantissa bits (relative step 2^-8 = 0.4 %). Measured on the tiny model (seeds 0, 1): max |boxes -
# fp32| 0.003-0.004 and |logits - fp32| 0.004-0.005 with the bf16 base, vs 0.000 and 0.003-0.004 for bf16 autocast
# over fp32 weights; the tolerances leave 4-5x headroom for other seeds and machines.
BF16_BOX_TOLERANCE = 0.02
BF16_LOGIT_TOLERANCE = 0.025


def _losses(model, batch, loss_fn, autocast: bool = False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(batch)
        return loss_fn(out, [base_sam3(model).back_convert(t) for t in batch.find_targets])


# ----- component learning rates (lora=full) ---------------------------------------------------------------------
def test_component_lrs_follow_meta_recipe_with_layer_decay():
    model = build_sam3(**tiny_model_config())  # every parameter trainable: full fine-tuning
    groups = parameter_groups(model, lr=2e-4, head_lr=8e-5, weight_decay=0.1,
                              component_lr={"vision": 2.5e-5, "text": 5e-6}, vision_layer_decay=0.9)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    trunk = model.backbone.vision_backbone.trunk  # 2 blocks: num_layers 3 in sam3's rule
    assert lr_of[id(trunk.blocks[1].attn.qkv.weight)] == pytest.approx(2.5e-5 * 0.9)
    assert lr_of[id(trunk.blocks[0].attn.qkv.weight)] == pytest.approx(2.5e-5 * 0.9**2)
    assert lr_of[id(trunk.patch_embed.proj.weight)] == pytest.approx(2.5e-5 * 0.9**3)
    assert lr_of[id(model.backbone.vision_backbone.convs[0].conv_1x1.weight)] == pytest.approx(2.5e-5)
    text = model.backbone.language_backbone.encoder.transformer.resblocks[0].mlp.c_fc.weight
    assert lr_of[id(text)] == pytest.approx(5e-6)
    assert lr_of[id(model.transformer.decoder.bbox_embed.layers[0].weight)] == pytest.approx(8e-5)
    assert len(lr_of) == sum(1 for p in model.parameters())  # every parameter in exactly one group


def test_component_lr_rejects_unknown_component():
    model = build_sam3(**tiny_model_config())
    with pytest.raises(ValueError, match="module.component_lr has unknown components \\['detr'\\]"):
        parameter_groups(model, 2e-4, 8e-5, 0.1, component_lr={"detr": 1e-4})


# ----- point-sampled mask loss ----------------------------------------------------------------------------------
def _spy_mask_loss(monkeypatch):
    """Record the point coordinates sam3's Masks samples and every full-resolution upsampling it does."""
    from sam3.train.loss import loss_fns

    calls = {"points": [], "interpolate": 0}
    real_sample, real_interpolate = loss_fns.point_sample, loss_fns.interpolate

    def point_sample(inputs, coords, **kwargs):
        calls["points"].append(tuple(coords.shape))
        return real_sample(inputs, coords, **kwargs)

    def interpolate(*args, **kwargs):
        calls["interpolate"] += 1
        return real_interpolate(*args, **kwargs)

    monkeypatch.setattr(loss_fns, "point_sample", point_sample)
    monkeypatch.setattr(loss_fns, "interpolate", interpolate)
    return calls


def test_mask_loss_sees_sampled_points_not_full_masks(monkeypatch):
    points = 64
    calls = _spy_mask_loss(monkeypatch)
    torch.manual_seed(0)
    model = build_sam3(**tiny_model_config())
    losses = _losses(model, make_batch(), build_sam3_loss(with_masks=True, mask_points=points))
    losses["loss_mask"].backward()
    assert calls["interpolate"] == 0  # no mask is upsampled to the input size
    assert calls["points"] and all(shape[1] == points and shape[2] == 2 for shape in calls["points"])
    assert model.segmentation_head.mask_predictor.mask_embed.layers[0].weight.grad.abs().sum() > 0


def test_full_resolution_mask_loss_upsamples_and_samples_nothing(monkeypatch):
    calls = _spy_mask_loss(monkeypatch)
    _losses(build_sam3(**tiny_model_config()), make_batch(), build_sam3_loss(with_masks=True))
    assert calls["interpolate"] > 0 and not calls["points"]


def test_mask_points_must_be_positive():
    with pytest.raises(ValueError, match="module.mask_loss_points=0"):
        build_sam3_loss(with_masks=True, mask_points=0)


# ----- early-stopping backward ----------------------------------------------------------------------------------
def test_frozen_early_blocks_build_no_autograd_graph():
    """Even with an input that requires grad, block 0 records nothing: backward stops at block 1."""
    model = build_sam3(**tiny_model_config())
    freeze(model)
    blocks = memory.vision_blocks(model)
    memory.stop_backward_before_block(model, first_trained=1)
    x = torch.randn(1, 8, 8, 96, requires_grad=True)  # 112 px / patch 14
    early, late = blocks[0](x), blocks[1](x)
    assert early.grad_fn is None and not early.requires_grad
    assert late.grad_fn is not None  # the same input through an unwrapped block does build a graph
    assert set(model.state_dict()) == set(build_sam3(**tiny_model_config()).state_dict())  # keys unchanged


def test_run_without_grad_refuses_trainable_module():
    model = build_sam3(**tiny_model_config())
    with pytest.raises(ValueError, match="trainable parameters"):
        memory.run_without_grad(memory.vision_blocks(model)[0])


def test_last_blocks_pattern_selects_only_late_blocks():
    pattern = memory.last_blocks_pattern(depth=32, last_n=8, layers=r"attn\.qkv")
    import re

    assert re.fullmatch(pattern, "backbone.vision_backbone.trunk.blocks.24.attn.qkv")
    assert not re.fullmatch(pattern, "backbone.vision_backbone.trunk.blocks.23.attn.qkv")
    with pytest.raises(ValueError, match="lora.vision_last_blocks=33"):
        memory.last_blocks_pattern(depth=32, last_n=33, layers="x")


# ----- frozen base in bf16 --------------------------------------------------------------------------------------
def test_bf16_frozen_base_keeps_rope_complex_and_matches_fp32():
    torch.manual_seed(0)
    reference = build_sam3(**tiny_model_config()).eval()
    model = build_sam3(**tiny_model_config()).eval()
    model.load_state_dict(reference.state_dict())
    freeze(model)
    head = model.transformer.decoder.bbox_embed
    for parameter in head.parameters():
        parameter.requires_grad_(True)
    cast = memory.cast_frozen_parameters(model, torch.bfloat16)
    norms = sum(p.numel() for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm))
                for p in m.parameters(recurse=False))
    assert cast == sum(p.numel() for p in model.parameters() if not p.requires_grad) - norms
    assert all(p.dtype == torch.float32 for p in head.parameters())
    assert model.backbone.vision_backbone.trunk.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    rope = [b for n, b in model.named_buffers() if n.endswith("freqs_cis")]
    assert rope and all(b.dtype == torch.complex64 for b in rope)
    batch = make_batch()
    with torch.no_grad():
        expected = reference(batch).output[-1][-1]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual = model(batch).output[-1][-1]
    boxes, logits = actual["pred_boxes"].float(), actual["pred_logits"].float()
    assert (boxes - expected["pred_boxes"]).abs().max() < BF16_BOX_TOLERANCE
    assert (logits - expected["pred_logits"]).abs().max() < BF16_LOGIT_TOLERANCE


# ----- the config choices: lora=full, lora.vision_last_blocks, lora.frozen_dtype, preset=lean ----------------------
# Parameters the stock graph never uses (DESIGN §4), frozen by lora=full so plain DDP works; tiny-model count.
UNUSED_PARAMETERS_TINY = 113_025


def _compose(overrides: list[str]):
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return compose("train", overrides=["model=sam3_tiny", "data=shapes", *overrides])


def _train_step(model, precision: str = "32-true"):
    batch = make_batch()
    loss = _losses(model, batch, build_sam3_loss(with_masks=True), autocast="bf16" in precision)["core_loss"]
    loss.backward()
    return loss


def test_lora_full_trains_every_used_parameter_at_meta_learning_rates():
    from sam3_lora.train import build_model

    cfg = _compose(["lora=full"])
    model = build_model(cfg)
    _train_step(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in trainable.values()) == total - UNUSED_PARAMETERS_TINY
    assert not any("lora_" in n for n in trainable)
    assert all(p.grad is not None for p in trainable.values())  # plain DDP: no unused trainable parameter
    hp = cfg.module
    groups = parameter_groups(model, hp.lr, hp.head_lr, hp.weight_decay, hp.component_lr, hp.vision_layer_decay)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    blocks = model.backbone.vision_backbone.trunk.blocks
    assert lr_of[id(blocks[-1].mlp.fc1.weight)] == pytest.approx(2.5e-5 * 0.9)
    text = model.backbone.language_backbone.encoder.transformer.resblocks[0].attn.in_proj_weight
    assert lr_of[id(text)] == pytest.approx(5e-6)
    assert lr_of[id(model.transformer.encoder.layers[0].linear1.weight)] == pytest.approx(8e-5)


def test_vision_last_blocks_adapts_late_blocks_and_backward_never_enters_early_ones():
    from sam3_lora.train import build_model

    model = build_model(_compose(["lora.vision_last_blocks=1"]))
    blocks = memory.vision_blocks(model)
    assert not any("lora_" in n for n, _ in blocks[0].named_parameters())
    assert any("lora_" in n for n, _ in blocks[1].named_parameters())
    outputs = {}
    blocks[0].register_forward_hook(lambda module, args, output: outputs.setdefault("early", output))
    _train_step(model)
    assert outputs["early"].grad_fn is None and not outputs["early"].requires_grad  # no graph: backward stops here
    late = [p for n, p in blocks[1].named_parameters() if "lora_B" in n]
    assert late and all(p.grad is not None and p.grad.abs().sum() > 0 for p in late)


def test_vision_last_blocks_default_adapts_every_block():
    from sam3_lora.train import build_model

    model = build_model(_compose([]))
    assert all(any("lora_" in n for n, _ in block.named_parameters()) for block in memory.vision_blocks(model))


def test_keep_frozen_rejects_a_pattern_that_matches_nothing():
    from sam3_lora.lora import apply_lora

    with pytest.raises(ValueError, match="lora.keep_frozen entry 'no_such_module'"):
        apply_lora(build_sam3(**tiny_model_config()), targets=[], modules_to_save=["backbone"],
                   keep_frozen=["no_such_module"])


def test_preset_lean_composes_with_overrides_and_learns():
    from sam3_lora.train import build_model

    cfg = _compose(["preset=lean", "lora.rank=4", "model.activation_checkpointing=false"])
    assert cfg.lora.rank == 4 and cfg.model.activation_checkpointing is False  # command line wins
    assert cfg.lora.frozen_dtype == "bfloat16" and cfg.module.mask_loss_points == 12544
    assert cfg.trainer.precision == "bf16-mixed" and cfg.lora.vision_last_blocks == 8
    assert cfg.model.attention_dropout == 0.0
    model = build_model(cfg)  # 8 >= the tiny ViT's 2 blocks: every block adapted
    lora_tensors = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora_tensors and all(p.dtype == torch.float32 for p in lora_tensors)
    assert memory.vision_blocks(model)[0].attn.qkv.base_layer.weight.dtype == torch.bfloat16
    loss = _train_step(model, cfg.trainer.precision)
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_bf16_base_refuses_full_precision_training():
    from sam3_lora.module import _check_precision
    from sam3_lora.train import build_model

    model = build_model(_compose(["lora.frozen_dtype=bfloat16"]))
    with pytest.raises(ValueError, match="trainer.precision=bf16-mixed"):
        _check_precision(model, "32-true")
    _check_precision(model, "bf16-mixed")


def test_glibc_malloc_tuning_applies_unless_the_environment_decides(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    import platform

    assert memory.tune_glibc_malloc() == (platform.libc_ver()[0] == "glibc")  # mallopt returned success
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert memory.tune_glibc_malloc() is False  # the user's environment wins


# ----- attention dropout (model.attention_dropout) ---------------------------------------------------------------
def _unmasked_math_attention(model) -> int:
    """Calls of the unfused (math) attention path without an attention mask in one training step of `model`.

    Masked calls are the DETR decoder's cross-attention with its box relative-position bias (a dense bias the fused
    CPU kernel does not take, queries x image tokens: small); unmasked ones are the image-token attention."""
    from torch.profiler import profile

    loss_fn = build_sam3_loss(with_masks=True)
    with profile(record_shapes=True) as prof:
        _losses(model, make_batch(), loss_fn)["core_loss"].backward()
    math = [e for e in prof.events() if e.name == "aten::_scaled_dot_product_attention_math"]
    return sum(1 for e in math if len(e.input_shapes) < 4 or not e.input_shapes[3])


@pytest.mark.parametrize("attention_dropout", [None, 0.0])
def test_attention_dropout_zero_runs_attention_fused_and_keeps_residual_dropout(attention_dropout):
    torch.manual_seed(0)
    model = build_sam3(**tiny_model_config(dropout=0.1, attention_dropout=attention_dropout))
    attentions = [m for m in model.transformer.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert attentions and {m.dropout for m in attentions} == {0.1 if attention_dropout is None else 0.0}
    assert model.transformer.encoder.layers[0].dropout1.p == 0.1  # residual dropout stays Meta's
    # dropout on the probabilities sends CPU attention to the math path (batch x heads x L^2 kept: 10 GB for the
    # DETR encoder's self-attention at 1008 px); without it no unmasked attention runs unfused
    unfused = _unmasked_math_attention(model)
    assert (unfused > 0) == (attention_dropout is None), unfused


def test_attention_dropout_out_of_range_is_an_error():
    with pytest.raises(ValueError, match=r"model.attention_dropout=1.0 must be in \[0, 1\)"):
        build_sam3(**tiny_model_config(attention_dropout=1.0))
