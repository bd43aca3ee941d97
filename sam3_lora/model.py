"""Build SAM3's image model from sam3's own classes at any size, load base weights, initialise.

`build_sam3` with its defaults is the official architecture (`sam3.model_builder.build_sam3_image_model`);
a tiny SAM3 is the same classes with small numbers (conf/model/sam3_tiny.yaml).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from sam3.model.decoder import TransformerDecoder, TransformerDecoderLayer
from sam3.model.encoder import TransformerEncoderFusion, TransformerEncoderLayer
from sam3.model.geometry_encoders import SequenceGeometryEncoder
from sam3.model.maskformer_segmentation import PixelDecoder, UniversalSegmentationHead
from sam3.model.memory import CXBlock
from sam3.model.model_misc import MLP, DotProductScoring, TransformerWrapper
from sam3.model.model_misc import MultiheadAttentionWrapper as MultiheadAttention
from sam3.model.necks import Sam3DualViTDetNeck
from sam3.model.position_encoding import PositionEmbeddingSine
from sam3.model.sam3_image import Sam3Image
from sam3.model.text_encoder_ve import VETextEncoder
from sam3.model.tokenizer_ve import SimpleTokenizer
from sam3.model.vitdet import ViT
from sam3.model.vl_combiner import SAM3VLBackbone

from sam3_lora import compat
from sam3_lora.checkpoint_io import load_base_weights
from sam3_lora.losses import build_matcher

log = logging.getLogger(__name__)

def _attention(d_model: int, heads: int, dropout: float, batch_first: bool = False) -> nn.Module:
    return MultiheadAttention(num_heads=heads, dropout=dropout, embed_dim=d_model, batch_first=batch_first)


def _position_encoding(d_model: int, precompute: int | None = None) -> PositionEmbeddingSine:
    return PositionEmbeddingSine(
        num_pos_feats=d_model, normalize=True, scale=None, temperature=10000,
        precompute_resolution=precompute,
    )


def _vision_backbone(resolution, patch_size, vit_dim, vit_depth, vit_heads, vit_mlp_ratio, vit_window,
                     vit_global_blocks, vit_pretrain_size, drop_path, d_model, act_ckpt) -> nn.Module:
    trunk = ViT(
        img_size=resolution, pretrain_img_size=vit_pretrain_size, patch_size=patch_size,
        embed_dim=vit_dim, depth=vit_depth, num_heads=vit_heads, mlp_ratio=vit_mlp_ratio,
        norm_layer="LayerNorm", drop_path_rate=drop_path, qkv_bias=True, use_abs_pos=True,
        tile_abs_pos=True, global_att_blocks=tuple(vit_global_blocks), rel_pos_blocks=(),
        use_rope=True, use_interp_rope=True, window_size=vit_window, pretrain_use_cls_token=True,
        retain_cls_token=False, ln_pre=True, ln_post=False, return_interm_layers=False,
        bias_patch_embed=False, use_act_checkpoint=act_ckpt,
    )
    position = _position_encoding(d_model, compat.CONSTRUCTION_CACHE_RESOLUTION)
    return Sam3DualViTDetNeck(position_encoding=position, d_model=d_model,
                              scale_factors=[4.0, 2.0, 1.0, 0.5], trunk=trunk, add_sam2_neck=False)


def _text_encoder(d_model, text_width, text_heads, text_layers, context_length, act_ckpt, bpe_path):
    tokenizer = SimpleTokenizer(bpe_path=bpe_path or compat.bpe_vocab_path())
    return VETextEncoder(tokenizer=tokenizer, d_model=d_model, width=text_width, heads=text_heads,
                         layers=text_layers, context_length=context_length, use_act_checkpoint=act_ckpt)


def _transformer(d_model, heads, ffn, dropout, encoder_layers, decoder_layers, num_queries) -> TransformerWrapper:
    encoder_layer = TransformerEncoderLayer(
        activation="relu", d_model=d_model, dim_feedforward=ffn, dropout=dropout, pos_enc_at_attn=True,
        pos_enc_at_cross_attn_keys=False, pos_enc_at_cross_attn_queries=False, pre_norm=True,
        self_attention=_attention(d_model, heads, dropout, batch_first=True),
        cross_attention=_attention(d_model, heads, dropout, batch_first=True),
    )
    # sam3 asserts activation checkpointing is on in the encoder and decoder while training.
    encoder = TransformerEncoderFusion(
        layer=encoder_layer, num_layers=encoder_layers, d_model=d_model, num_feature_levels=1,
        frozen=False, use_act_checkpoint=True, add_pooled_text_to_img_feat=False, pool_text_with_mask=True,
    )
    decoder_layer = TransformerDecoderLayer(
        activation="relu", d_model=d_model, dim_feedforward=ffn, dropout=dropout,
        cross_attention=_attention(d_model, heads, dropout), n_heads=heads, use_text_cross_attention=True,
    )
    decoder = TransformerDecoder(
        layer=decoder_layer, num_layers=decoder_layers, num_queries=num_queries, return_intermediate=True,
        box_refine=True, num_o2m_queries=0, dac=True, boxRPB="log", d_model=d_model, frozen=False,
        interaction_layer=None, dac_use_selfatt_ln=True, resolution=compat.CONSTRUCTION_CACHE_RESOLUTION,
        stride=None, use_act_checkpoint=True, presence_token=True,
    )
    return TransformerWrapper(encoder=encoder, decoder=decoder, d_model=d_model)


def _scoring(d_model, ffn, dropout) -> DotProductScoring:
    prompt_mlp = MLP(input_dim=d_model, hidden_dim=ffn, output_dim=d_model, num_layers=2, dropout=dropout,
                     residual=True, out_norm=nn.LayerNorm(d_model))
    return DotProductScoring(d_model=d_model, d_proj=d_model, prompt_mlp=prompt_mlp)


def _segmentation_head(d_model, heads, act_ckpt) -> UniversalSegmentationHead:
    pixel_decoder = PixelDecoder(num_upsampling_stages=3, interpolation_mode="nearest", hidden_dim=d_model)
    return UniversalSegmentationHead(
        hidden_dim=d_model, upsampling_stages=3, aux_masks=False, presence_head=False,
        dot_product_scorer=None, act_ckpt=act_ckpt, cross_attend_prompt=_attention(d_model, heads, 0),
        pixel_decoder=pixel_decoder,
    )


def _geometry_encoder(d_model, heads, ffn, dropout, layers, act_ckpt) -> SequenceGeometryEncoder:
    layer = TransformerEncoderLayer(
        activation="relu", d_model=d_model, dim_feedforward=ffn, dropout=dropout, pos_enc_at_attn=False,
        pre_norm=True, self_attention=_attention(d_model, heads, dropout),
        pos_enc_at_cross_attn_queries=False, pos_enc_at_cross_attn_keys=True,
        cross_attention=_attention(d_model, heads, dropout),
    )
    return SequenceGeometryEncoder(
        pos_enc=_position_encoding(d_model), encode_boxes_as_points=False, points_direct_project=True,
        points_pool=True, points_pos_enc=True, boxes_direct_project=True, boxes_pool=True,
        boxes_pos_enc=True, d_model=d_model, num_layers=layers, layer=layer, use_act_ckpt=act_ckpt,
        add_cls=True, add_post_encode_proj=True,
    )


def init_uninitialised_text_parameters(model: Sam3Image) -> None:
    """Give sam3's `torch.empty` text parameters CLIP-style values (only needed without base weights)."""
    text = model.backbone.language_backbone.encoder
    nn.init.normal_(text.positional_embedding, std=0.01)
    if isinstance(text.text_projection, nn.Parameter):
        nn.init.normal_(text.text_projection, std=text.width**-0.5)


def build_sam3(
    checkpoint: str | None = None,
    resolution: int = 1008,
    patch_size: int = 14,
    vit_dim: int = 1024,
    vit_depth: int = 32,
    vit_heads: int = 16,
    vit_mlp_ratio: float = 4.625,
    vit_window: int = 24,
    vit_global_blocks: tuple[int, ...] = (7, 15, 23, 31),
    vit_pretrain_size: int = 336,
    drop_path: float = 0.1,
    text_width: int = 1024,
    text_heads: int = 16,
    text_layers: int = 24,
    text_context_length: int = 32,
    d_model: int = 256,
    heads: int = 8,
    ffn_dim: int = 2048,
    dropout: float = 0.1,
    attention_dropout: float | None = None,
    encoder_layers: int = 6,
    decoder_layers: int = 6,
    num_queries: int = 200,
    geometry_layers: int = 3,
    segmentation: bool = True,
    activation_checkpointing: bool = True,
    bpe_path: str | None = None,
) -> Sam3Image:
    """Build a SAM3 image model for training (matcher attached) and load its base weights.

    Args:
        checkpoint: local path to a SAM3 checkpoint (`sam3.pt`, a `{"model": ...}` file or safetensors),
            "hub" to download `facebook/sam3` through sam3's downloader, or None for random init.
        resolution: input side in pixels; the ViT's RoPE tables are sized for it.
        activation_checkpointing: recompute activations in the ViT, text encoder, geometry encoder and
            mask head (the DETR encoder/decoder always checkpoint: sam3 asserts it while training).
        segmentation: build the mask head (pixel decoder + mask predictor).
        attention_dropout: dropout on the attention probabilities of the DETR, geometry encoder and mask head
            attention; None = `dropout` (Meta's). 0 lets attention run fused (see `set_attention_dropout`).
        Other arguments: sizes of sam3's components; the defaults are the official architecture.

    Returns:
        The base `Sam3Image` (no LoRA), in train mode, on CPU.
    """
    _check_sizes(resolution, patch_size, vit_heads, vit_dim, vit_depth, vit_global_blocks, d_model, num_queries)
    vision = _vision_backbone(resolution, patch_size, vit_dim, vit_depth, vit_heads, vit_mlp_ratio, vit_window,
                              vit_global_blocks, vit_pretrain_size, drop_path, d_model, activation_checkpointing)
    text = _text_encoder(d_model, text_width, text_heads, text_layers, text_context_length,
                         activation_checkpointing, bpe_path)
    model = Sam3Image(
        backbone=SAM3VLBackbone(visual=vision, text=text, scalp=1),
        transformer=_transformer(d_model, heads, ffn_dim, dropout, encoder_layers, decoder_layers,
                                 num_queries),
        input_geometry_encoder=_geometry_encoder(d_model, heads, ffn_dim, dropout, geometry_layers,
                                                 activation_checkpointing),
        segmentation_head=_segmentation_head(d_model, heads, activation_checkpointing) if segmentation else None,
        num_feature_levels=1, o2m_mask_predict=True, dot_prod_scoring=_scoring(d_model, ffn_dim, dropout),
        use_instance_query=False, multimask_output=True, inst_interactive_predictor=None,
        use_act_checkpoint_seg_head=activation_checkpointing, matcher=build_matcher(),
    )
    if attention_dropout is not None:
        set_attention_dropout(model, attention_dropout)
    if checkpoint is None:
        init_uninitialised_text_parameters(model)
    else:
        load_base_weights(model, checkpoint)
    return model.train()


def set_attention_dropout(model: Sam3Image, p: float) -> int:
    """Set the attention-probability dropout of every `nn.MultiheadAttention` after the ViT; returns how many.

    Why it is a memory setting: PyTorch's fused CPU attention kernel has no dropout, so with p > 0 scaled dot-product
    attention falls back to its math path and keeps batch x heads x L x L probabilities and their dropout mask: for
    the DETR encoder's self-attention over 5,184 image tokens at 1008 px with 4 prompts, a 10 GB transient
    (`bench/lora_cost.py --peaks`). The residual dropouts (`dropout`) are untouched.
    """
    if not 0 <= p < 1:
        raise ValueError(f"model.attention_dropout={p} must be in [0, 1)")
    parts = [model.transformer, model.geometry_encoder, model.segmentation_head]
    attentions = [m for part in parts if part is not None for m in part.modules()
                  if isinstance(m, nn.MultiheadAttention)]
    for attention in attentions:
        attention.dropout = p
    return len(attentions)


def _check_sizes(resolution, patch_size, vit_heads, vit_dim, vit_depth, global_blocks, d_model, num_queries):
    problems = []
    if resolution % patch_size:
        problems.append(f"resolution {resolution} must be a multiple of patch_size {patch_size}")
    if (vit_dim // vit_heads) % 4 or vit_dim % vit_heads:
        problems.append(f"vit_dim/vit_heads = {vit_dim}/{vit_heads} must be an integer divisible by 4 (RoPE)")
    if not global_blocks or max(global_blocks) != vit_depth - 1:
        problems.append(f"the last ViT block ({vit_depth - 1}) must be in vit_global_blocks {list(global_blocks)}")
    if d_model % 8:
        problems.append(f"d_model {d_model} must be divisible by 8 (GroupNorm(8, d_model))")
    if num_queries < 4:
        problems.append(f"num_queries {num_queries} must be at least 4 (the one-to-many matcher takes top-4)")
    if problems:
        raise ValueError("invalid SAM3 sizes in the model config: " + "; ".join(problems))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return (trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def freeze(model: nn.Module) -> nn.Module:
    """Set requires_grad=False on every parameter (LoRA and modules_to_save re-enable their own)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model
