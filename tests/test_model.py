"""SAM3 builder: official architecture parity, tiny size, strict loading, compat patches."""

from __future__ import annotations

import functools

import pytest
import torch

from sam3_lora import compat
from sam3_lora.checkpoint_io import resolve_checkpoint, save_stock_checkpoint
from sam3_lora.losses import build_sam3_loss
from sam3_lora.model import build_sam3, count_parameters
from tests.conftest import REPO, make_batch, tiny_model_config

TINY_MAX_PARAMETERS = 5_000_000  # issue #2: tiny SAM3 <= 5 M parameters


def official_config() -> dict:
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(OmegaConf.load(REPO / "conf/model/sam3.yaml"))
    config.pop("_target_")
    config["checkpoint"] = None
    return config


def _forcing_none(init, argument):
    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        kwargs[argument] = None
        init(self, *args, **kwargs)
    return wrapped


@pytest.mark.slow
def test_official_config_has_stock_keys_and_shapes(monkeypatch):
    """conf/model/sam3.yaml == sam3.model_builder.build_sam3_image_model, key for key, shape for shape."""
    from sam3.model import decoder, position_encoding
    from sam3.model_builder import build_sam3_image_model

    # the stock builder allocates on CUDA at construction; build it CPU-only the way compat does
    for cls, arg in ((position_encoding.PositionEmbeddingSine, "precompute_resolution"),
                     (decoder.TransformerDecoder, "resolution")):
        monkeypatch.setattr(cls, "__init__", _forcing_none(cls.__init__, arg))
    stock = build_sam3_image_model(bpe_path=compat.bpe_vocab_path(), device="cpu", eval_mode=False,
                                   checkpoint_path=None, load_from_HF=False)
    stock_shapes = {k: tuple(v.shape) for k, v in stock.state_dict().items()}
    del stock
    monkeypatch.undo()
    ours = build_sam3(**official_config())
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == stock_shapes
    assert 835e6 < count_parameters(ours)[1] < 845e6


def test_tiny_model_is_small_and_trains(tiny_config):
    model = build_sam3(**tiny_config)
    assert count_parameters(model)[1] <= TINY_MAX_PARAMETERS
    assert model.training and model.matcher is not None
    batch = make_batch()
    out = model(batch)
    losses = build_sam3_loss(with_masks=True)(out, [model.back_convert(t) for t in batch.find_targets])
    losses["core_loss"].backward()
    assert torch.isfinite(losses["core_loss"]) and {"loss_mask", "loss_dice", "presence_loss"} <= set(losses)


def test_random_init_text_parameters_are_initialised(tiny_config):
    text = build_sam3(**tiny_config).backbone.language_backbone.encoder
    assert torch.isfinite(text.positional_embedding).all() and text.positional_embedding.abs().max() < 1
    assert torch.isfinite(text.text_projection).all()


def test_segmentation_switch_removes_mask_head():
    assert build_sam3(**tiny_model_config(segmentation=False)).segmentation_head is None


def test_activation_checkpointing_switch_reaches_vit():
    on = build_sam3(**tiny_model_config(activation_checkpointing=True))
    off = build_sam3(**tiny_model_config(activation_checkpointing=False))
    assert on.backbone.vision_backbone.trunk.use_act_checkpoint and not off.backbone.vision_backbone.trunk.use_act_checkpoint
    assert on.geometry_encoder.use_act_ckpt and on.segmentation_head.act_ckpt and not off.segmentation_head.act_ckpt


def test_invalid_sizes_are_explained():
    with pytest.raises(ValueError, match="d_model 60 must be divisible by 8"):
        build_sam3(**tiny_model_config(d_model=60))


def test_strict_load_accepts_detector_prefix_and_model_wrapper(tiny_config, tmp_path):
    torch.manual_seed(0)
    source = build_sam3(**tiny_config)
    save_stock_checkpoint(source.state_dict(), tmp_path / "sam3.pt")
    loaded = build_sam3(**{**tiny_config, "checkpoint": str(tmp_path / "sam3.pt")})
    for key, value in source.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_strict_load_lists_missing_and_unexpected_keys(tiny_config, tmp_path):
    state = build_sam3(**tiny_config).state_dict()
    state.pop("dot_prod_scoring.hs_proj.weight")
    state["not.a.sam3.key"] = torch.zeros(1)
    save_stock_checkpoint(state, tmp_path / "broken.pt")
    with pytest.raises(RuntimeError, match=r"(?s)missing keys \(1\).*dot_prod_scoring.hs_proj.weight.*"
                                           r"unexpected keys \(1\).*not.a.sam3.key"):
        build_sam3(**{**tiny_config, "checkpoint": str(tmp_path / "broken.pt")})


def test_other_resolution_drops_rope_tables(tiny_config, tmp_path):
    save_stock_checkpoint(build_sam3(**tiny_config).state_dict(), tmp_path / "112.pt")
    model = build_sam3(**{**tiny_config, "resolution": 224, "checkpoint": str(tmp_path / "112.pt")})
    global_block = model.backbone.vision_backbone.trunk.blocks[1]  # windowed blocks keep window-sized tables
    assert global_block.attn.freqs_cis.shape[0] == (224 // 14) ** 2


def test_missing_checkpoint_path_says_what_to_do():
    with pytest.raises(FileNotFoundError, match="no such file.*hub to download.*model.checkpoint=.*--checkpoint"):
        resolve_checkpoint("/nonexistent/sam3.pt")


def test_unreachable_hub_gives_clear_error(monkeypatch):
    import sam3.model_builder

    def offline():
        raise ConnectionError("no network")

    monkeypatch.setattr(sam3.model_builder, "download_ckpt_from_hf", offline)
    with pytest.raises(RuntimeError, match="could not download facebook/sam3.*huggingface-cli login"):
        resolve_checkpoint("hub")


def test_compat_clears_sam3_device_caches_but_not_lightnings(tiny_config):
    """sam3 caches `_device`; moving a wrapper never resets it (sam3/model/sam3_image.py:108-115)."""
    import lightning as L

    model = build_sam3(**{**tiny_config, "segmentation": True})
    stale = torch.device("meta")  # what a cache from a previous device looks like
    model._device = model.segmentation_head._device = stale
    wrapper = L.LightningModule()
    wrapper.model = model
    lightning_device = wrapper._device
    assert compat.clear_cached_devices(wrapper) is wrapper
    assert model.device == model.segmentation_head.device == torch.device("cpu")
    assert wrapper._device == lightning_device  # Lightning's own attribute of that name is left alone


def test_compat_pin_memory_and_focal_loss_paths():
    from sam3.train.loss import loss_fns

    assert loss_fns.sigmoid_focal_loss.keywords == {"triton": False}
    logits = torch.zeros(3, 1, requires_grad=True)
    loss = loss_fns.sigmoid_focal_loss(logits, torch.ones(3, 1), num_boxes=1, alpha=0.5, gamma=0.0)
    loss.backward()  # gamma=0 is the presence-loss setting that gives NaN with Triton (sam3 #575)
    assert torch.isfinite(logits.grad).all()
    if not compat.has_cuda():
        tensor = torch.ones(2)
        assert tensor.pin_memory() is tensor


def test_construction_caches_are_lazy(tiny_config):
    """No cache is allocated at construction (on CUDA it would be pinned to cuda:0, on CPU it fails)."""
    model = build_sam3(**tiny_config)
    assert model.transformer.decoder.compilable_cord_cache is None
    assert model.backbone.vision_backbone.position_encoding.cache == {}


def test_geometry_encoder_box_prompt_runs_on_cpu(tiny_config):
    """The geometry encoder's pin_memory path (box exemplars) works without CUDA."""
    model = build_sam3(**tiny_config)
    batch = make_batch()
    batch.find_inputs[0].input_boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2]] * 4]).float()
    batch.find_inputs[0].input_boxes_mask = torch.zeros(4, 1, dtype=torch.bool)
    batch.find_inputs[0].input_boxes_label = torch.ones(1, 4, dtype=torch.long)
    model.eval()
    with torch.no_grad():
        out = model(batch)
    assert out.output[-1][-1]["pred_logits"].shape[0] == 4


def test_bpe_vocab_is_found():
    assert compat.bpe_vocab_path().endswith("bpe_simple_vocab_16e6.txt.gz")
