"""SAM3's video model (detector + tracker) at any size, and full `detector.* + tracker.*` checkpoints.

`sam3.model_builder.build_sam3_video_model` hard-codes the official sizes and places the model on CUDA
(PositionEmbeddingSine precomputes on "cuda", sam3/model/position_encoding.py:47). `build_sam3_video` composes
the same classes with the sizes of a `build_sam3` model config, so the tiny SAM3 gets a video model too: the
detector is `Sam3ImageOnVideoMultiGPU` over the image model's own components plus the SAM2 neck that feeds the
tracker (sam3/model_builder.py:498-512 `_create_vision_backbone(enable_inst_interactivity=True)`), the tracker is
`Sam3TrackerPredictor` built like sam3/model_builder.py:330-483 with the sizes scaled to the model config.

`export_full_checkpoint` writes what sam3's video builder loads strictly: the merged detector plus every key the
image model does not own (`tracker.*`, the detector's SAM2 neck) copied from the base unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft import LoraConfig
from torch import nn

from sam3.model.decoder import TransformerDecoderLayerv2, TransformerEncoderCrossAttention
from sam3.model.memory import CXBlock, SimpleFuser, SimpleMaskDownSampler, SimpleMaskEncoder
from sam3.model.model_misc import TransformerWrapper
from sam3.model.necks import Sam3DualViTDetNeck
from sam3.model.position_encoding import PositionEmbeddingSine
from sam3.model.sam3_image import Sam3Image, Sam3ImageOnVideoMultiGPU
from sam3.model.sam3_tracking_predictor import Sam3TrackerPredictor
from sam3.model.sam3_video_inference import Sam3VideoInferenceWithInstanceInteractivity
from sam3.model.vl_combiner import SAM3VLBackbone
from sam3.sam.transformer import RoPEAttention

from sam3_lora import compat
from sam3_lora.adapter import load_adapter, merge_adapter, read_adapter_dir
from sam3_lora.checkpoint_io import (DETECTOR_PREFIX, MODEL_CONFIG_KEY, ROPE_SUFFIX, atomic_path,
                                     read_state_dict, resolve_checkpoint)
from sam3_lora.lora import inject_lora
from sam3_lora.model import build_sam3

log = logging.getLogger(__name__)

TRACKER_PREFIX = "tracker."
# The detector's second FPN neck, only built for the video model / interactive predictor (necks.py:96-98):
# it feeds the tracker, so the image model has no such keys and a full export copies them from the base.
SAM2_NECK_PREFIX = DETECTOR_PREFIX + "backbone.vision_backbone.sam2_convs."
# Tracker sizes that sam3/model_builder.py:330-428 hard-codes for d_model 256 (memory 64 channels, FFN 2048,
# 4 memory-attention layers, 7 memory frames); `build_sam3_video` keeps the ratios at other sizes.
OFFICIAL_TRACKER = {"memory_dim": 64, "ffn_dim": 2048, "layers": 4, "num_maskmem": 7}


def _video_vision_neck(image_model: Sam3Image, d_model: int) -> Sam3DualViTDetNeck:
    """The image model's trunk and position encoding under a dual neck (SAM3 + SAM2 convs)."""
    neck = image_model.backbone.vision_backbone
    video_neck = Sam3DualViTDetNeck(trunk=neck.trunk, position_encoding=neck.position_encoding, d_model=d_model,
                                    scale_factors=list(neck.scale_factors), add_sam2_neck=True)
    # sam3 builds the SAM2 neck as a copy of the SAM3 one (necks.py:96-98); start both from the image model's
    # convs, so a base without SAM2-neck weights (an image-only checkpoint) gets sam3's own initialisation.
    video_neck.convs.load_state_dict(neck.convs.state_dict())
    video_neck.sam2_convs.load_state_dict(neck.convs.state_dict())
    return video_neck


def build_video_detector(image_model: Sam3Image, d_model: int) -> Sam3ImageOnVideoMultiGPU:
    """Wrap a `build_sam3` image model's components as sam3's video detector (sam3/model_builder.py:712-723)."""
    backbone = SAM3VLBackbone(visual=_video_vision_neck(image_model, d_model),
                              text=image_model.backbone.language_backbone, scalp=1)
    return Sam3ImageOnVideoMultiGPU(
        num_feature_levels=1, backbone=backbone, transformer=image_model.transformer,
        segmentation_head=image_model.segmentation_head, semantic_segmentation_head=None,
        input_geometry_encoder=image_model.geometry_encoder, use_early_fusion=True, use_dot_prod_scoring=True,
        dot_prod_scoring=image_model.dot_prod_scoring, supervise_joint_box_scores=True,
    )


def _tracker_memory_encoder(d_model: int, memory_dim: int, feature_size: int) -> SimpleMaskEncoder:
    # sam3/model_builder.py:330-363 at other sizes: interpol_size = 16 × the feature map side (1152 at 1008 px).
    position = PositionEmbeddingSine(num_pos_feats=memory_dim, normalize=True, scale=None, temperature=10000,
                                     precompute_resolution=compat.CONSTRUCTION_CACHE_RESOLUTION)
    downsampler = SimpleMaskDownSampler(embed_dim=d_model, kernel_size=3, stride=2, padding=1,
                                        interpol_size=[16 * feature_size, 16 * feature_size])
    fuser = SimpleFuser(layer=CXBlock(dim=d_model, kernel_size=7, padding=3, layer_scale_init_value=1.0e-06,
                                      use_dwconv=True), num_layers=2)
    return SimpleMaskEncoder(out_dim=memory_dim, position_encoding=position, mask_downsampler=downsampler,
                             fuser=fuser, in_dim=d_model)


def _tracker_transformer(d_model: int, memory_dim: int, ffn_dim: int, layers: int, feature_size: int):
    # sam3/model_builder.py:366-428 at other sizes (RoPE tables sized for the feature map).
    def attention(**kwargs):
        return RoPEAttention(embedding_dim=d_model, num_heads=1, downsample_rate=1, dropout=0.1, rope_theta=10000.0,
                             feat_sizes=[feature_size, feature_size], use_fa3=False, use_rope_real=False, **kwargs)

    layer = TransformerDecoderLayerv2(
        cross_attention_first=False, activation="relu", dim_feedforward=ffn_dim, dropout=0.1, pos_enc_at_attn=False,
        pre_norm=True, self_attention=attention(), d_model=d_model, pos_enc_at_cross_attn_keys=True,
        pos_enc_at_cross_attn_queries=False, cross_attention=attention(kv_in_dim=memory_dim, rope_k_repeat=True),
    )
    encoder = TransformerEncoderCrossAttention(
        remove_cross_attention_layers=[], batch_first=True, d_model=d_model, frozen=False, pos_enc_at_input=True,
        layer=layer, num_layers=layers, use_act_checkpoint=False)
    return TransformerWrapper(encoder=encoder, decoder=None, d_model=d_model)


def build_tracker(resolution: int, patch_size: int, d_model: int, memory_dim: int, ffn_dim: int, layers: int,
                  num_maskmem: int) -> Sam3TrackerPredictor:
    """sam3's tracker (sam3/model_builder.py:431-483, temporal disambiguation on) at the given sizes."""
    feature_size = resolution // patch_size
    return Sam3TrackerPredictor(
        image_size=resolution, num_maskmem=num_maskmem, backbone=None, backbone_stride=patch_size,
        transformer=_tracker_transformer(d_model, memory_dim, ffn_dim, layers, feature_size),
        maskmem_backbone=_tracker_memory_encoder(d_model, memory_dim, feature_size),
        multimask_output_in_sam=True, forward_backbone_per_frame_for_eval=True, trim_past_non_cond_mem_for_eval=False,
        multimask_output_for_tracking=True, multimask_min_pt_num=0, multimask_max_pt_num=1,
        always_start_from_first_ann_frame=False, non_overlap_masks_for_mem_enc=False,
        non_overlap_masks_for_output=False, max_cond_frames_in_attn=4, offload_output_to_cpu_for_eval=False,
        sam_mask_decoder_extra_args={"dynamic_multimask_via_stability": True,
                                     "dynamic_multimask_stability_delta": 0.05,
                                     "dynamic_multimask_stability_thresh": 0.98},
        clear_non_cond_mem_around_input=True, fill_hole_area=0, use_memory_selection=True,
    )


def tracker_sizes(model_config: dict) -> dict:
    """Tracker sizes for a model config: the official ones at d_model 256; below it the FFN scales with d_model
    and memory attention keeps 2 layers and at least 32 memory channels (the tiny tracker, d_model 64, with 1 layer
    and 16 channels learned to segment one salient shape, not to keep two apart: `sam3_lora.tiny_tracker`)."""
    d_model = model_config.get("d_model", 256)
    scale = d_model / 256
    return {"memory_dim": max(32, int(OFFICIAL_TRACKER["memory_dim"] * scale)),
            "ffn_dim": max(d_model, int(OFFICIAL_TRACKER["ffn_dim"] * scale)),
            "layers": OFFICIAL_TRACKER["layers"] if d_model >= 256 else 2,
            "num_maskmem": OFFICIAL_TRACKER["num_maskmem"]}


def build_sam3_video(model_config: dict, tracker: dict | None = None,
                     **video_kwargs) -> Sam3VideoInferenceWithInstanceInteractivity:
    """Build sam3's video model (random init) with the image model of `model_config` as its detector.

    Args:
        model_config: `build_sam3` kwargs; its `checkpoint` gives the detector's image-model weights (the
            tracker stays random: load a full checkpoint with `load_state_dict(strict=True)` for that).
        tracker: sizes for `build_tracker` (default: `tracker_sizes(model_config)`).
        video_kwargs: overrides of the video heuristics of sam3/model_builder.py:727-747 (thresholds, hotstart).

    Returns:
        `Sam3VideoInferenceWithInstanceInteractivity` in eval mode, on CPU.
    """
    config = dict(model_config)
    image_model = build_sam3(**config)
    resolution, patch = config.get("resolution", 1008), config.get("patch_size", 14)
    d_model = config.get("d_model", 256)
    heuristics = dict(
        score_threshold_detection=0.5, assoc_iou_thresh=0.1, det_nms_thresh=0.1, new_det_thresh=0.7,
        hotstart_delay=15, hotstart_unmatch_thresh=8, hotstart_dup_thresh=8,
        suppress_unmatched_only_within_hotstart=True, min_trk_keep_alive=-1, max_trk_keep_alive=30,
        init_trk_keep_alive=30, suppress_overlapping_based_on_recent_occlusion_threshold=0.7,
        suppress_det_close_to_boundary=False, fill_hole_area=16, recondition_every_nth_frame=16,
        masklet_confirmation_enable=False, decrease_trk_keep_alive_for_empty_masklets=False,
    )
    heuristics.update(video_kwargs)
    model = Sam3VideoInferenceWithInstanceInteractivity(
        detector=build_video_detector(image_model, d_model),
        tracker=build_tracker(resolution, patch, d_model, **(tracker or tracker_sizes(config))),
        image_size=resolution, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), compile_model=False,
        **heuristics,
    )
    return model.eval()


def is_image_model_key(key: str) -> bool:
    """Whether a stock-checkpoint key belongs to the image model (a `detector.` key outside the SAM2 neck)."""
    return key.startswith(DETECTOR_PREFIX) and not key.startswith(SAM2_NECK_PREFIX)


def split_full_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Split a stock checkpoint into (image-model state without prefix, every other key with its prefix)."""
    image = {k[len(DETECTOR_PREFIX):]: v for k, v in state.items() if is_image_model_key(k)}
    rest = {k: v for k, v in state.items() if not is_image_model_key(k)}
    return image, rest


def load_image_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load an unprefixed image-model state strictly (RoPE tables of another resolution excepted).

    Raises:
        RuntimeError: missing/unexpected keys or shape mismatches, listed with `source`.
    """
    own = model.state_dict()
    rope_elsewhere = {k for k, v in state.items() if k.endswith(ROPE_SUFFIX) and k in own and own[k].shape != v.shape}
    state = {k: v for k, v in state.items() if k not in rope_elsewhere}
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(state) - rope_elsewhere)
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected or mismatched:
        raise RuntimeError(f"{source}: its detector does not match the SAM3 of the adapter's model config "
                           f"(sam3_model_config.json): missing {missing[:10]}, unexpected {unexpected[:10]}, "
                           f"shape mismatches {mismatched[:10]}")
    model.load_state_dict(state, strict=False)


def merged_detector_state(adapter_dir: str | Path, base_image_state: dict, base_name: str) -> tuple[dict, dict]:
    """Build the adapter's SAM3 on `base_image_state`, load the adapter strictly, merge; (state, model config)."""
    _, model_config = read_adapter_dir(adapter_dir)
    model = build_sam3(**{**model_config, "checkpoint": None})
    load_image_state(model, base_image_state, base_name)
    model = inject_lora(model, LoraConfig.from_pretrained(str(adapter_dir)))
    load_adapter(model, adapter_dir, model_config)
    return merge_adapter(model).state_dict(), {**model_config, "checkpoint": base_name}


def export_full_checkpoint(adapter_dir: str | Path, out_path: str | Path, base: str,
                           image_only: bool = False) -> Path:
    """Merge an adapter into the base's detector and write a full stock SAM3 checkpoint.

    The detector is rebuilt from the adapter's model config on the base's detector weights, the adapter is
    merged in, and every other key of the base (`tracker.*`, the detector's SAM2 neck) is copied unchanged, so
    `sam3.model_builder.build_sam3_video_model(checkpoint_path=out)` loads it with strict=True.

    Args:
        adapter_dir: a sam3-lora adapter directory.
        out_path: the `.pt` to write: `{"model": {...}, "model_config": {...}}`.
        base: what `model.checkpoint` accepts (path, "hub", "builtin:tiny") naming the full base checkpoint.
        image_only: allow a base without `tracker.*` keys (the result then only suits the image model).

    Raises:
        ValueError: the base has no tracker keys and `image_only` is False.
        RuntimeError: the base's detector does not fit the adapter's model config.
    """
    path = resolve_checkpoint(base)
    full = _with_detector_prefix(read_state_dict(path))
    base_image, others = split_full_state(full)
    if not image_only and not any(k.startswith(TRACKER_PREFIX) for k in others):
        raise ValueError(f"--base {base}: {path} has no tracker.* weights, so the export could not run in SAM3's "
                         "video model. Pass the full sam3.pt (detector.* + tracker.*), or --image-only to write a "
                         "detector-only checkpoint")
    merged, model_config = merged_detector_state(adapter_dir, base_image, str(base))
    state = {DETECTOR_PREFIX + k: v for k, v in _keep_base_rope(merged, base_image).items()}
    state.update(others)
    with atomic_path(out_path) as tmp:
        torch.save({"model": {k: v.detach().cpu().contiguous() for k, v in state.items()},
                    MODEL_CONFIG_KEY: model_config}, tmp)
    log.info("wrote %s: %d merged detector tensors + %d copied from %s (tracker, SAM2 neck)",
             out_path, len(merged), len(others), path)
    return Path(out_path)


def _with_detector_prefix(state: dict) -> dict:
    """An unprefixed image-model state (our own detector-only files) gets the stock `detector.` prefix."""
    if any(k.startswith((DETECTOR_PREFIX, TRACKER_PREFIX)) for k in state):
        return state
    return {DETECTOR_PREFIX + k: v for k, v in state.items()}


def _keep_base_rope(merged: dict, base_image: dict) -> dict:
    """RoPE tables are derived from the resolution: keep the base's (the video model's size) when they differ."""
    return {k: (base_image[k] if k.endswith(ROPE_SUFFIX) and k in base_image and base_image[k].shape != v.shape
                else v) for k, v in merged.items()}
