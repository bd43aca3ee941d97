"""The only place that adapts sam3 0.1.4 to machines without CUDA (and to known sam3 bugs).

Each adaptation names the line it works around. On a CUDA machine pinning and post-processing are
untouched; the focal-loss switch (sam3 issue #575) and lazy construction-time caches apply everywhere.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Iterator

import torch

_APPLIED = False


def has_cuda() -> bool:
    """Whether a CUDA device is usable in this process."""
    return torch.cuda.is_available()


# sam3/model/position_encoding.py:47 (`PositionEmbeddingSine(precompute_resolution=...)`) and
# sam3/model/decoder.py:281 (`TransformerDecoder(resolution=..., stride=...)`) allocate on "cuda" in `__init__`:
# that fails without CUDA, and with CUDA it pins the caches to cuda:0, which `.to()` never moves (plain
# attributes) — wrong for DDP ranks on other GPUs and for CPU runs on GPU machines. None is functionally
# equivalent: both caches fill lazily on the device of the first forward, after Lightning placed the model.
CONSTRUCTION_CACHE_RESOLUTION = None


def _patch_pin_memory() -> None:
    """sam3/model/geometry_encoders.py:659 calls `Tensor.pin_memory()` on every forward.

    Without an accelerator pinning raises; pinned memory only matters for host→GPU copies, so on a
    machine without CUDA `pin_memory` returns the tensor itself.
    """
    if has_cuda():
        return
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self


def _patch_focal_loss() -> None:
    """sam3/train/loss/loss_fns.py:134 defaults `sigmoid_focal_loss(triton=True)`.

    The Triton kernel fails without CUDA and gives NaN gradients at gamma=0 (the presence loss
    setting, sam3 issue #575). The torch path computes the same loss, so it is used everywhere.
    """
    from sam3.train.loss import loss_fns

    original = loss_fns.sigmoid_focal_loss
    if isinstance(original, functools.partial):
        return
    loss_fns.sigmoid_focal_loss = functools.partial(original, triton=False)


def mha_forced_forward_kwargs() -> dict[type, dict]:
    """What sam3's `nn.MultiheadAttention` subclasses force in their own `forward`, per class.

    sam3/model/model_misc.py:31-34 `MultiheadAttentionWrapper.forward` sets `need_weights=False`.
    `sam3_lora.lora_mha` calls `F.multi_head_attention_forward` itself, so it applies the same override
    (tests/test_lora_mha.py compares it with the wrapper).
    """
    from sam3.model.model_misc import MultiheadAttentionWrapper

    return {MultiheadAttentionWrapper: {"need_weights": False}}


def bpe_vocab_path() -> str:
    """Path of the BPE vocabulary sam3's tokenizer needs.

    sam3/model_builder.py:565 looks for `assets/bpe_simple_vocab_16e6.txt.gz` next to the package, but
    the 0.1.4 wheel does not ship it; open_clip_torch ships the identical file.

    Raises:
        FileNotFoundError: neither location has the file.
    """
    import sam3

    bundled = Path(sam3.__file__).parent.parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
    if bundled.exists():
        return str(bundled)
    try:
        import open_clip
    except ImportError as err:
        raise FileNotFoundError(
            "SAM3's BPE vocabulary is missing: install open_clip_torch (pip install open_clip_torch), "
            "which ships bpe_simple_vocab_16e6.txt.gz"
        ) from err
    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise FileNotFoundError(f"open_clip_torch is installed but {path} is missing; reinstall it")
    return str(path)


def clear_cached_devices(model: torch.nn.Module) -> torch.nn.Module:
    """Forget the device sam3 modules cached, after `model` (or a wrapper around it) was moved.

    sam3/model/sam3_image.py:108-115 (`Sam3Image.device`) and sam3/model/maskformer_segmentation.py:93-100 cache
    `self._device` on first use and reset it only in their own `.to()`. Moving a wrapper (PeftModel,
    LightningModule) or calling `.cuda()` never calls that, so the stale device would place inputs wrongly.
    Only sam3's own modules are touched (Lightning's modules keep their `_device`).
    """
    for module in model.modules():
        if type(module).__module__.startswith("sam3.") and hasattr(module, "_device"):
            module._device = None
    return model


@contextlib.contextmanager
def reuse_image_features(backbone, features: dict | None) -> Iterator[None]:
    """Make `backbone.forward_image` return precomputed image features for the duration of the block.

    sam3/model/sam3_image.py:533 (`Sam3Image.forward`) always runs `self.backbone.forward_image(img_batch)`;
    `sam3_lora.predictor` runs several adapters on the same images, and where none of them adapts the ViT or
    neck the features are identical, so they are computed once. Only this backbone instance is affected, only
    inside the block; `features=None` changes nothing. Each call gets fresh containers (sam3 may extend them).
    """
    if features is None:
        yield
        return
    backbone.forward_image = lambda samples: {k: (list(v) if isinstance(v, list) else v) for k, v in features.items()}
    try:
        yield
    finally:
        del backbone.forward_image


def _connected_components_cv2(input_tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sam3/perflib/connected_components.py:32-50 (`connected_components_cpu`) on OpenCV.

    Returns (labels, per-pixel size of its component; 0 on background), 8-connected, shaped like the input
    ((B, H, W) or (B, 1, H, W)). sam3's version imports scikit-image (line 20), which sam3 0.1.4 does not depend
    on, and fails on an empty batch (`torch.stack([])`, line 48), which its video model passes when a frame has
    no object. skimage's 2-D `label` default is 8-connectivity with background 0, as `cv2.connectedComponents`.
    """
    import cv2
    import numpy as np

    labels_out = torch.zeros(input_tensor.shape, dtype=torch.int64)
    sizes_out = torch.zeros(input_tensor.shape, dtype=torch.int64)
    flat = input_tensor.reshape(-1, *input_tensor.shape[-2:]).cpu().numpy().astype(np.uint8)
    for index, values in enumerate(flat):
        count, labels = cv2.connectedComponents(values, connectivity=8)
        labels = torch.from_numpy(labels.astype(np.int64))
        sizes = torch.bincount(labels.flatten(), minlength=count)
        sizes[0] = 0
        labels_out.view(-1, *labels.shape)[index] = labels
        sizes_out.view(-1, *labels.shape)[index] = sizes[labels]
    return labels_out.to(input_tensor.device), sizes_out.to(input_tensor.device)


@contextlib.contextmanager
def video_inference_on_this_machine(video_model) -> Iterator[None]:
    """Let sam3's video model (`Sam3VideoInference`) run on a machine without CUDA; a no-op with CUDA.

    - sam3/model/sam3_tracking_predictor.py:81: the tracker's state lives on "cuda" unless
      `offload_state_to_cpu`, which sam3/model/sam3_video_inference.py:985 never passes: passed here.
    - sam3/model/sam3_tracker_base.py:657,664 and sam3_tracking_predictor.py:1026 call `Tensor.cuda()`
      unconditionally: inside the block, on a machine where it could only raise, it returns the tensor.
    - sam3/model/sam3_image.py:839 casts the tracker's backbone features to bfloat16, which the tracker
      consumes under the CUDA bf16 autocast it enters at sam3_tracking_predictor.py:49-50: CPU bf16 autocast.
    - sam3/perflib/connected_components.py:32-50 needs scikit-image and fails on empty batches:
      `_connected_components_cv2` instead.
    """
    if has_cuda():
        yield
        return
    from sam3.perflib import connected_components as cc

    tracker = video_model.tracker
    original_init, original_cc = tracker.init_state, cc.connected_components_cpu
    tracker.init_state = functools.partial(original_init, offload_state_to_cpu=True)
    cc.connected_components_cpu = _connected_components_cv2
    try:
        with tensor_cuda_is_a_no_op(), torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    finally:
        del tracker.init_state
        cc.connected_components_cpu = original_cc


@contextlib.contextmanager
def tensor_cuda_is_a_no_op() -> Iterator[None]:
    """Inside the block, on a machine without CUDA, `Tensor.cuda()` returns the tensor itself.

    sam3/model/sam3_tracker_base.py:657,664 (memory of past frames) and sam3_tracking_predictor.py:1026 call it
    unconditionally; with CUDA the block changes nothing.
    """
    if has_cuda():
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def apply() -> None:
    """Apply the runtime patches once per process (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _patch_pin_memory()
    _patch_focal_loss()
    _APPLIED = True


apply()  # on import: every module that builds a SAM3 model or loss imports this one (`import sam3_lora` stays light)
