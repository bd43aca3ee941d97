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


def postprocess_on_gpu() -> bool:
    """Value for `PostProcessImage(always_interpolate_masks_on_gpu=...)`.

    sam3/eval/postprocessors.py:154 asserts the target sizes live on CUDA when this flag is set.
    """
    return has_cuda()


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


def apply() -> None:
    """Apply the runtime patches once per process (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _patch_pin_memory()
    _patch_focal_loss()
    _APPLIED = True
