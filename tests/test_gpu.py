"""GPU smoke tests with the real SAM3 dimensions (run where CUDA exists; skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch

from sam3_lora import lora
from sam3_lora.losses import build_sam3_loss
from sam3_lora.model import build_sam3
from sam3_lora.module import inner_sam3
from tests.conftest import make_batch
from tests.test_model import official_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _to_cuda(batch):
    from sam3.model.utils.misc import copy_data_to_device

    return copy_data_to_device(batch, torch.device("cuda"))


@pytest.mark.parametrize("resolution", [1008])
def test_full_size_lora_step_bf16(resolution):
    """Full architecture, default preset, bf16 autocast: finite loss, every adapter gets a gradient."""
    config = {**official_config(), "resolution": resolution}
    model = lora.apply_lora(build_sam3(**config), rank=16, targets=["vision", "detr"],
                            modules_to_save=["dot_prod_scoring"]).cuda()
    inner_sam3(model)._device = None
    batch = _to_cuda(make_batch(resolution, num_images=1))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(batch)
        loss = build_sam3_loss(with_masks=True)(out, [inner_sam3(model).back_convert(t) for t in batch.find_targets])
    loss["core_loss"].backward()
    assert torch.isfinite(loss["core_loss"])
    assert all(p.grad is not None for _, p in lora.lora_parameters(model))
    assert torch.cuda.max_memory_allocated() < 40 * 2**30


def test_stock_builder_runs_unpatched_on_cuda():
    """On CUDA sam3's own builder constructs as shipped next to our patches."""
    from sam3.model_builder import build_sam3_image_model

    from sam3_lora import compat

    model = build_sam3_image_model(bpe_path=compat.bpe_vocab_path(), device="cuda", eval_mode=True,
                                   load_from_HF=False)
    assert next(model.parameters()).is_cuda


def test_lazy_caches_follow_the_device_of_first_forward():
    """compat keeps sam3's construction caches lazy: after .cuda() they are filled on the model's GPU."""
    from tests.conftest import tiny_model_config

    model = build_sam3(**tiny_model_config()).cuda().eval()
    inner_sam3(model)._device = None
    with torch.no_grad():
        model(_to_cuda(make_batch()))
    cache = model.backbone.vision_backbone.position_encoding.cache
    assert cache and all(t.is_cuda for t in cache.values())
