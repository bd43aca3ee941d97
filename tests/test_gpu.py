"""GPU tests with the real SAM3 dimensions (run where CUDA exists; skipped elsewhere): `pytest -m gpu`.

bench/gpu_check.sh runs them together with the 1008 px bench and a 50-step training run.
"""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from sam3_lora.compat import clear_cached_devices
from sam3_lora.lora import base_sam3
from sam3_lora.losses import build_sam3_loss
from sam3_lora.model import build_sam3
from tests.conftest import REPO, make_batch, tiny_model_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
# Meta's recipe trains at 1008 px with batch 1 on 80 GB GPUs; the default LoRA with 1 image x 2 prompts must
# stay far below that (a 40 GB card is the target of the lean preset).
LORA_1008_PEAK_LIMIT_GB = 40


def _to_cuda(batch):
    from sam3.model.utils.misc import copy_data_to_device

    return copy_data_to_device(batch, torch.device("cuda"))


def _full_size(overrides: list[str]):
    """The real-size model as train.py builds it (random init) for these overrides, on the GPU."""
    from sam3_lora.train import build_model

    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose("train", overrides=["model=sam3", "model.checkpoint=null", *overrides])
    torch.manual_seed(0)
    return clear_cached_devices(build_model(cfg).cuda()), cfg


def _step(model, mask_points=None) -> torch.Tensor:
    batch = _to_cuda(make_batch(1008, num_images=1))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(batch)
        loss = build_sam3_loss(with_masks=True, mask_points=mask_points)(
            out, [base_sam3(model).back_convert(t) for t in batch.find_targets])["core_loss"]
    loss.backward()
    return loss


def _lora_b(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n}


def test_full_size_lora_step_bf16_gives_every_adapter_a_real_gradient():
    """Default preset at 1008 px, bf16 autocast: finite loss, every lora_B gradient finite and non-zero.

    (lora_A gradients are exactly zero on the first step: B starts at zero.)
    """
    model, _ = _full_size([])
    torch.cuda.reset_peak_memory_stats()
    loss = _step(model)
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in _lora_b(model).items()}
    assert grads and all(g is not None for g in grads.values())
    zero = [n for n, g in grads.items() if not torch.isfinite(g).all() or g.abs().sum() == 0]
    assert not zero, f"adapters without a usable gradient: {zero[:5]}"
    assert torch.cuda.max_memory_allocated() < LORA_1008_PEAK_LIMIT_GB * 2**30


def test_lean_preset_uses_less_memory_than_default_lora_and_learns():
    peaks = {}
    for name, overrides in (("lora", []), ("lean", ["preset=lean"])):
        model, cfg = _full_size(overrides)
        torch.cuda.reset_peak_memory_stats()
        loss = _step(model, cfg.module.mask_loss_points)
        peaks[name] = torch.cuda.max_memory_allocated()
        assert torch.isfinite(loss)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in _lora_b(model).values()), name
        if name == "lean":
            frozen = [p for p in model.parameters() if not p.requires_grad and p.ndim == 2]
            assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
        del model, loss
        torch.cuda.empty_cache()
    assert peaks["lean"] < peaks["lora"], peaks


def test_bf16_mixed_inference_outputs_are_finite_at_1008():
    model, _ = _full_size([])
    model.eval()
    batch = _to_cuda(make_batch(1008, num_images=1))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(batch).output[-1][-1]
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        assert torch.isfinite(out[key].float()).all(), key
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()


def test_stock_builder_runs_unpatched_on_cuda():
    """On CUDA sam3's own builder constructs as shipped next to our patches."""
    from sam3.model_builder import build_sam3_image_model

    from sam3_lora import compat

    model = build_sam3_image_model(bpe_path=compat.bpe_vocab_path(), device="cuda", eval_mode=True,
                                   load_from_HF=False)
    assert next(model.parameters()).is_cuda


def test_lazy_caches_follow_the_device_of_first_forward():
    """compat keeps sam3's construction caches lazy: after .cuda() they are filled on the model's GPU."""
    model = clear_cached_devices(build_sam3(**tiny_model_config()).cuda().eval())
    with torch.no_grad():
        model(_to_cuda(make_batch()))
    cache = model.backbone.vision_backbone.position_encoding.cache
    assert cache and all(t.is_cuda for t in cache.values())
