"""LoRA on `nn.MultiheadAttention` means W + ΔW (sam3_lora.lora_mha), against a hand-made reference.

The reference is a plain `nn.MultiheadAttention` (or sam3's `MultiheadAttentionWrapper`) whose
`in_proj_weight` and `out_proj.weight` were set by hand to W + B·A·alpha/r, with random non-zero A and B.
PEFT 0.21's own layer gives W + 2ΔW on out_proj (PEFT PR #3774): these tests fail with it
(`lora_mha.register` replaced by the identity) and keep passing once PEFT is fixed.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.lora.layer import MultiheadAttention as PeftMultiheadAttention
from peft.utils import get_peft_model_state_dict
from sam3.model.model_misc import MultiheadAttentionWrapper
from torch import nn

from sam3_lora import lora_mha

EMBED, HEADS, LENGTH, MEMORY, BATCH = 16, 4, 5, 7, 3
RANK, ALPHA = 4, 8.0
SCALE = ALPHA / RANK
DROPOUT = 0.1  # attention dropout in training: both sides draw the same mask from the same seed
MHA_CLASSES = [nn.MultiheadAttention, MultiheadAttentionWrapper]
CASES = ["self", "cross_masked", "cross_weights_per_head"]


class Layer(nn.Module):
    """A toy DETR layer: the attention module is the LoRA target, as in sam3_lora.lora's presets."""

    def __init__(self, attention: nn.MultiheadAttention):
        super().__init__()
        self.self_attn = attention

    def forward(self, *args, **kwargs):
        return self.self_attn(*args, **kwargs)


def _base(cls=nn.MultiheadAttention, batch_first=False, dropout=0.0) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    return cls(EMBED, HEADS, dropout=dropout, batch_first=batch_first)


def _config() -> LoraConfig:
    return LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["self_attn"])


def _randomize_lora(model: nn.Module, seed: int = 1, std: float = 0.3) -> nn.Module:
    """lora_B starts at zero (identity): random non-zero A and B make every comparison bite."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(std * torch.randn(parameter.shape, generator=generator))
    return model


def _adapted(base: nn.MultiheadAttention, register=True) -> PeftModel:
    config = lora_mha.register(_config()) if register else _config()
    return _randomize_lora(get_peft_model(Layer(copy.deepcopy(base)), config))


def _attention(model: PeftModel) -> PeftMultiheadAttention:
    return model.base_model.model.self_attn


def _factors(model: PeftModel) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) of in_proj and out_proj, as stored under PEFT's names."""
    attention = _attention(model)
    out_proj = attention.base_layer.out_proj
    return {"in_proj": (attention.lora_A["default"].weight, attention.lora_B["default"].weight),
            "out_proj": (out_proj.lora_A["default"].weight, out_proj.lora_B["default"].weight)}


def _effective_weights(base: nn.MultiheadAttention, factors) -> dict[str, torch.Tensor]:
    """W + B·A·alpha/r, written out by hand (autograd flows to the factors when they require grad)."""
    (a_in, b_in), (a_out, b_out) = factors["in_proj"], factors["out_proj"]
    return {"in_proj_weight": base.in_proj_weight.detach() + (b_in @ a_in) * SCALE,
            "out_proj.weight": base.out_proj.weight.detach() + (b_out @ a_out) * SCALE}


def _reference(base: nn.MultiheadAttention, model: PeftModel) -> nn.MultiheadAttention:
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for name, weight in _effective_weights(base, _factors(model)).items():
            reference.get_parameter(name).copy_(weight)
    return reference


def _inputs(case: str, batch_first: bool, seed: int = 2) -> tuple[tuple, dict]:
    generator = torch.Generator().manual_seed(seed)

    def sequence(length):
        shape = (BATCH, length, EMBED) if batch_first else (length, BATCH, EMBED)
        return torch.randn(shape, generator=generator)

    query = sequence(LENGTH)
    if case == "self":
        return (query, query, query), {}
    memory = sequence(MEMORY)
    padding = torch.zeros(BATCH, MEMORY)
    padding[0, -2:] = float("-inf")  # float like attn_mask (torch deprecates mixing mask types)
    kwargs = {"key_padding_mask": padding, "attn_mask": 0.5 * torch.randn(LENGTH, MEMORY, generator=generator)}
    if case == "cross_weights_per_head":
        kwargs = {"need_weights": True, "average_attn_weights": False}
    return (query, memory + 1.0, memory), kwargs


def _assert_same_attention(ours: tuple, reference: tuple, atol: float = 1e-6) -> None:
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-5, atol=atol)
    assert (ours[1] is None) == (reference[1] is None), "attention weights returned on one side only"
    if reference[1] is not None:
        torch.testing.assert_close(ours[1], reference[1], rtol=1e-5, atol=atol)


ALL_LAYOUTS = pytest.mark.parametrize("cls", MHA_CLASSES, ids=lambda c: c.__name__)
BATCH_FIRST = pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])


@ALL_LAYOUTS
@BATCH_FIRST
@pytest.mark.parametrize("case", CASES)
def test_training_forward_equals_hand_merged_reference(cls, batch_first, case):
    base = _base(cls, batch_first, dropout=DROPOUT)
    model = _adapted(base)
    reference = _reference(base, model).train()
    args, kwargs = _inputs(case, batch_first)
    model.train()
    torch.manual_seed(3)
    ours = _attention(model)(*args, **kwargs)
    torch.manual_seed(3)
    _assert_same_attention(ours, reference(*args, **kwargs))


@ALL_LAYOUTS
@BATCH_FIRST
@pytest.mark.parametrize("case", CASES)
def test_unmerged_inference_equals_hand_merged_reference(cls, batch_first, case):
    base = _base(cls, batch_first, dropout=DROPOUT)
    model = _adapted(base).eval()
    reference = _reference(base, model).eval()
    args, kwargs = _inputs(case, batch_first)
    with torch.no_grad():
        # the reference may take torch's fused inference path, which sums in another order
        _assert_same_attention(_attention(model)(*args, **kwargs), reference(*args, **kwargs), atol=1e-5)


@ALL_LAYOUTS
@BATCH_FIRST
def test_gradients_of_lora_factors_equal_autograd_through_hand_merged_weights(cls, batch_first):
    base = _base(cls, batch_first)
    model = _adapted(base).train()
    args, kwargs = _inputs("cross_masked", batch_first)
    probe = torch.randn(_attention(model)(*args, **kwargs)[0].shape, generator=torch.Generator().manual_seed(4))
    (_attention(model)(*args, **kwargs)[0] * probe).sum().backward()

    leaves = {k: tuple(t.detach().clone().requires_grad_(True) for t in pair) for k, pair in _factors(model).items()}
    output = torch.func.functional_call(base, _effective_weights(base, leaves), args, kwargs)[0]
    (output * probe).sum().backward()
    for projection, pair in _factors(model).items():
        for factor, ours, expected in zip("AB", pair, leaves[projection]):
            assert ours.grad is not None and ours.grad.abs().sum() > 0, f"{projection} lora_{factor}: no gradient"
            torch.testing.assert_close(ours.grad, expected.grad, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{projection} lora_{factor}: {m}")


@ALL_LAYOUTS
def test_frozen_weights_stay_bit_identical_through_forward_and_backward(cls):
    model = _adapted(_base(cls, dropout=DROPOUT)).train()
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert len(frozen) == 4, sorted(frozen)  # in_proj weight/bias, out_proj weight/bias
    before = {n: (p.detach().clone(), p.data_ptr()) for n, p in frozen.items()}
    args, kwargs = _inputs("cross_masked", batch_first=False)
    for _ in range(2):
        _attention(model)(*args, **kwargs)[0].sum().backward()
    after = dict(model.named_parameters())
    for name, (values, pointer) in before.items():
        assert after[name] is frozen[name], f"{name}: the Parameter object was replaced"
        assert after[name].data_ptr() == pointer and torch.equal(after[name], values), f"{name} was written"
        assert after[name].grad is None, f"{name} received a gradient"


@ALL_LAYOUTS
@BATCH_FIRST
def test_merge_and_unload_writes_w_plus_delta_once(cls, batch_first):
    base = _base(cls, batch_first)
    model = _adapted(base)
    reference = _reference(base, model).eval()
    merged = model.merge_and_unload(safe_merge=True).self_attn
    assert type(merged) is cls
    torch.testing.assert_close(merged.in_proj_weight, reference.in_proj_weight, rtol=0, atol=1e-7)
    torch.testing.assert_close(merged.out_proj.weight, reference.out_proj.weight, rtol=0, atol=1e-7)
    args, kwargs = _inputs("cross_masked", batch_first)
    with torch.no_grad():
        _assert_same_attention(merged.eval()(*args, **kwargs), reference(*args, **kwargs))


def test_merge_then_unmerge_gives_back_the_frozen_weights_bit_for_bit():
    base = _base()
    model = _adapted(base)
    attention = _attention(model)
    frozen = {n: (p, p.detach().clone()) for n, p in model.named_parameters() if not p.requires_grad}
    reference = _reference(base, model).eval()
    args, kwargs = _inputs("self", batch_first=False)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT walks into out_proj too and warns it is already (un)merged
        model.merge_adapter()
        assert attention.merged and attention.base_layer.out_proj.merged
        with torch.no_grad():
            _assert_same_attention(attention(*args, **kwargs), reference(*args, **kwargs))
        torch.testing.assert_close(attention.base_layer.out_proj.weight, reference.out_proj.weight, rtol=0, atol=1e-7)
        model.unmerge_adapter()
    assert not attention.merged and not attention.base_layer.out_proj.merged
    for name, (parameter, values) in frozen.items():
        assert dict(model.named_parameters())[name] is parameter and torch.equal(parameter, values), name
    with torch.no_grad():
        _assert_same_attention(attention(*args, **kwargs), reference(*args, **kwargs))


def test_several_adapters_mean_the_sum_of_the_active_deltas():
    base = _base()
    model = _adapted(base)
    model.add_adapter("other", lora_mha.register(_config()))
    _randomize_lora(model, seed=7)  # both adapters get new non-zero factors
    attention = _attention(model)
    deltas = {}
    for name in ("default", "other"):
        layers = {"in_proj": attention, "out_proj": attention.base_layer.out_proj}
        deltas[name] = {k: (layer.lora_B[name].weight @ layer.lora_A[name].weight).detach() * SCALE
                        for k, layer in layers.items()}
    args, kwargs = _inputs("cross_masked", batch_first=False)
    for active in (["other"], ["default", "other"]):
        model.base_model.set_adapter(active)
        reference = copy.deepcopy(base)
        with torch.no_grad():
            for name in active:
                reference.in_proj_weight += deltas[name]["in_proj"]
                reference.out_proj.weight += deltas[name]["out_proj"]
        with torch.no_grad():  # W + (Δ1 + Δ2) vs (W + Δ1) + Δ2: float sums in another order
            _assert_same_attention(attention.eval()(*args, **kwargs), reference.eval()(*args, **kwargs), atol=1e-5)


def test_disabled_adapter_gives_the_base_attention():
    base = _base().eval()
    model = _adapted(base).eval()
    args, kwargs = _inputs("cross_masked", batch_first=False)
    with torch.no_grad(), model.disable_adapter():
        _assert_same_attention(_attention(model)(*args, **kwargs), base(*args, **kwargs), atol=0)


def test_safe_merge_refuses_a_non_finite_adapter_and_writes_nothing():
    model = _adapted(_base())
    attention = _attention(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    with torch.no_grad():
        attention.base_layer.out_proj.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected"):
        attention.merge(safe_merge=True)
    assert not attention.merged and not attention.base_layer.out_proj.merged
    for name, parameter in model.named_parameters():
        if name in before:
            assert torch.equal(parameter, before[name]), f"{name} was written by a refused merge"


@ALL_LAYOUTS
def test_register_routes_multihead_attention_and_subclasses_to_our_layer(cls):
    model = _adapted(_base(cls))
    assert type(_attention(model)) is lora_mha.LoraMultiheadAttention
    assert type(_attention(model).get_base_layer()) is cls


def test_unknown_forward_override_is_refused():
    class Custom(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    with pytest.raises(TypeError, match="overrides MultiheadAttention.forward"):
        _adapted(Custom(EMBED, HEADS))


def test_lora_bias_is_refused_and_dropout_is_said_to_skip_attention(caplog):
    with pytest.raises(ValueError, match="lora_bias=True is not supported"):
        get_peft_model(Layer(_base()), lora_mha.register(LoraConfig(r=RANK, target_modules=["self_attn"],
                                                                    lora_bias=True)))
    config = lora_mha.register(LoraConfig(r=RANK, target_modules=["self_attn"], lora_dropout=0.125))
    with caplog.at_level("WARNING", logger="sam3_lora.lora_mha"):
        get_peft_model(Layer(_base()), config)
    assert "lora.dropout=0.125 applies to Linear adapters only" in caplog.text


def test_adapter_files_are_plain_peft_in_both_directions(tmp_path):
    base = _base()
    ours = _adapted(base)
    ours.save_pretrained(str(tmp_path / "ours"))
    assert "custom" not in json.dumps(json.loads((tmp_path / "ours" / "adapter_config.json").read_text()))

    # a plain PEFT install (no registration) places every tensor of our adapter
    plain = PeftModel.from_pretrained(Layer(copy.deepcopy(base)), str(tmp_path / "ours"))
    assert type(_attention(plain)) is PeftMultiheadAttention
    _assert_same_state(get_peft_model_state_dict(plain), get_peft_model_state_dict(ours))

    # an adapter written by plain PEFT (e.g. before this layer existed) loads into ours under the same names
    stock = _adapted(base, register=False)
    stock.save_pretrained(str(tmp_path / "stock"))
    config = lora_mha.register(LoraConfig.from_pretrained(str(tmp_path / "stock")))
    loaded = PeftModel.from_pretrained(Layer(copy.deepcopy(base)), str(tmp_path / "stock"), config=config)
    assert isinstance(_attention(loaded), lora_mha.LoraMultiheadAttention)
    _assert_same_state(get_peft_model_state_dict(loaded), get_peft_model_state_dict(stock))


def _assert_same_state(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    assert any(".out_proj.lora_A" in k for k in expected) and any(".self_attn.lora_B" in k for k in expected)
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), key


def test_stock_peft_mha_merge_is_a_known_behaviour():
    """Informative, not a pin: says when PEFT's own layer stops double-counting out_proj (PR #3774)."""
    base = _base()
    stock = _adapted(base, register=False)
    once = _effective_weights(base, _factors(stock))["out_proj.weight"]
    twice = 2 * once - base.out_proj.weight.detach()
    merged = stock.merge_and_unload(safe_merge=True).self_attn.out_proj.weight.detach()
    if torch.allclose(merged, once, rtol=0, atol=1e-6):
        warnings.warn("PEFT's MultiheadAttention LoRA now merges out_proj once (PR #3774 landed): the README note "
                      "about plain-PEFT loads can go", stacklevel=1)
    else:
        torch.testing.assert_close(merged, twice, rtol=0, atol=1e-6,
                                   msg=lambda m: f"PEFT's MHA merge is neither W + ΔW nor W + 2ΔW: {m}")


# --- tiny SAM3 end to end: every loading path of sam3_lora uses the layer ---------------------------------------


def _hand_merged_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """Base weight + B·A·alpha/r of every LoRA layer, by hand, under the plain SAM3's parameter names."""
    state = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base_name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        base = module.get_base_layer()
        weight_name = "in_proj_weight" if isinstance(base, nn.MultiheadAttention) else "weight"
        delta = (module.lora_B["default"].weight @ module.lora_A["default"].weight) * module.scaling["default"]
        state[f"{base_name}.{weight_name}"] = getattr(base, weight_name).detach() + delta.detach()
    return state


def test_tiny_sam3_detr_lora_unmerged_merged_export_and_hand_reference_agree(tiny_config, batch, tmp_path):
    from sam3_lora import adapter, lora
    from sam3_lora.checkpoint_io import save_stock_checkpoint
    from sam3_lora.model import build_sam3
    from tests.conftest import final_outputs
    from tests.lora_helpers import assert_same

    torch.manual_seed(0)
    save_stock_checkpoint(build_sam3(**tiny_config).state_dict(), tmp_path / "base.pt")
    config = {**tiny_config, "checkpoint": str(tmp_path / "base.pt")}
    model = _randomize_lora(lora.apply_lora(build_sam3(**config), rank=RANK, alpha=ALPHA, targets=["detr"]), seed=5, std=0.05)
    attentions = [m for m in model.modules() if isinstance(m, PeftMultiheadAttention)]
    assert attentions and all(isinstance(m, lora_mha.LoraMultiheadAttention) for m in attentions)
    hand = _hand_merged_state(model)
    assert any(k.endswith("out_proj.weight") for k in hand) and any(k.endswith("in_proj_weight") for k in hand)

    reference = build_sam3(**config)
    assert set(hand) <= set(reference.state_dict())
    reference.load_state_dict({**reference.state_dict(), **hand})
    expected = final_outputs(reference, batch)
    assert_same(final_outputs(model, batch), expected, atol=1e-5)  # unmerged, as trained

    adapter.save_adapter(model, tmp_path / "adapter", config)
    rebuilt, _ = adapter.build_adapted_model(tmp_path / "adapter")  # predict's and the Python API's path
    assert_same(final_outputs(rebuilt, batch), expected, atol=1e-5)
    adapter.export_merged(tmp_path / "adapter", tmp_path / "merged.pt")  # `sam3-lora export`
    exported = build_sam3(**{**tiny_config, "checkpoint": str(tmp_path / "merged.pt")})
    assert_same(final_outputs(exported, batch), expected, atol=1e-5)
