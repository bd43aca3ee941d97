"""Key names of SAM3 image-model weights in transformers' `Sam3Model` format, and state-dict conversion.

The names follow transformers' own conversion (`ORIGINAL_TO_CONVERTED_KEY_MAPPING` in
transformers/models/sam3/convert_sam3_to_hf.py, which the wheel does not ship): one (ours, theirs) prefix pair per
module, read in both directions. Tensors change in three places: fused attention projections (ViT `attn.qkv`, every
`nn.MultiheadAttention.in_proj_*`) are split into `q_proj/k_proj/v_proj`; the ViT position embedding loses its
cls-token row (sam3 drops it at forward, sam3/model/vitdet.py `get_abs_pos`); CLIP's `text_projection` is stored
transposed. Tensors transformers has no place for (the geometry encoder's point-prompt projections, the cls row)
are returned apart so the caller can keep them; the RoPE tables are derived from the config on both sides.
"""

from __future__ import annotations

import logging
import re

import torch

log = logging.getLogger(__name__)

POS_EMBED = "backbone.vision_backbone.trunk.pos_embed"
TEXT_PROJECTION = "backbone.language_backbone.encoder.text_projection"
# In sam3_video-layout directories (the hub's facebook/sam3) the image model sits under this prefix.
VIDEO_DETECTOR_PREFIX = "detector_model."
# Geometry-encoder point-prompt projections: transformers' Sam3GeometryEncoder encodes boxes only.
POINT_PROJECTIONS = ("points_direct_project", "points_pool_project", "points_pos_enc_project")
_DERIVED = re.compile(r"\.attn\.freqs_cis$")  # RoPE tables: computed from the config on both sides


def _attention(ours: str, theirs: str, out_proj: str = "o_proj") -> list[tuple[str, str]]:
    """Rules for one fused attention module: `in_proj_*` ↔ `{q,k,v}_proj.*`, `out_proj` ↔ `out_proj` (CLIP)
    or `o_proj` (all others)."""
    return [(f"{ours}.in_proj_", f"{theirs}.{{qkv}}_proj."), (f"{ours}.out_proj.", f"{theirs}.{out_proj}.")]


def _mlp(ours: str, theirs: str, num_layers: int) -> list[tuple[str, str]]:
    """sam3 `MLP.layers.i` ↔ transformers `layer{i+1}`."""
    return [(f"{ours}.layers.{i}.", f"{theirs}.layer{i + 1}.") for i in range(num_layers)]


def _same(prefix: str, names: str) -> list[tuple[str, str]]:
    return [(f"{prefix}.{name}.", f"{prefix}.{name}.") for name in names.split()]


_TRUNK, _VIT = "backbone.vision_backbone.trunk", "vision_encoder.backbone"
_TEXT, _CLIP = "backbone.language_backbone.encoder", "text_encoder.text_model"
_GEO, _ENC, _DEC = "geometry_encoder", "transformer.encoder.layers.{n}", "transformer.decoder"
# (ours, theirs) key prefixes; "{n}" is a layer index, "{qkv}" one of q/k/v. A prefix without a trailing "." or
# "_" is a whole key. Sizes hard-coded by `build_sam3` (neck scales 4/2/1/0.5, MLP depths) are spelled out.
RULES: list[tuple[str, str]] = [
    (POS_EMBED, f"{_VIT}.embeddings.position_embeddings"),
    (f"{_TRUNK}.patch_embed.proj.", f"{_VIT}.embeddings.patch_embeddings.projection."),
    (f"{_TRUNK}.ln_pre.", f"{_VIT}.layer_norm."),
    (f"{_TRUNK}.blocks.{{n}}.norm1.", f"{_VIT}.layers.{{n}}.layer_norm1."),
    (f"{_TRUNK}.blocks.{{n}}.norm2.", f"{_VIT}.layers.{{n}}.layer_norm2."),
    (f"{_TRUNK}.blocks.{{n}}.attn.qkv.", f"{_VIT}.layers.{{n}}.attention.{{qkv}}_proj."),
    (f"{_TRUNK}.blocks.{{n}}.attn.proj.", f"{_VIT}.layers.{{n}}.attention.o_proj."),
    (f"{_TRUNK}.blocks.{{n}}.mlp.", f"{_VIT}.layers.{{n}}.mlp."),
    ("backbone.vision_backbone.convs.{n}.conv_1x1.", "vision_encoder.neck.fpn_layers.{n}.proj1."),
    ("backbone.vision_backbone.convs.{n}.conv_3x3.", "vision_encoder.neck.fpn_layers.{n}.proj2."),
    ("backbone.vision_backbone.convs.0.dconv_2x2_0.", "vision_encoder.neck.fpn_layers.0.scale_layers.0."),
    ("backbone.vision_backbone.convs.0.dconv_2x2_1.", "vision_encoder.neck.fpn_layers.0.scale_layers.2."),
    ("backbone.vision_backbone.convs.1.dconv_2x2.", "vision_encoder.neck.fpn_layers.1.scale_layers.0."),
    (f"{_TEXT}.token_embedding.", f"{_CLIP}.embeddings.token_embedding."),
    (f"{_TEXT}.positional_embedding", f"{_CLIP}.embeddings.position_embedding.weight"),
    (f"{_TEXT}.ln_final.", f"{_CLIP}.final_layer_norm."),
    (TEXT_PROJECTION, "text_encoder.text_projection.weight"),
    *_attention(f"{_TEXT}.transformer.resblocks.{{n}}.attn", f"{_CLIP}.encoder.layers.{{n}}.self_attn", "out_proj"),
    (f"{_TEXT}.transformer.resblocks.{{n}}.ln_1.", f"{_CLIP}.encoder.layers.{{n}}.layer_norm1."),
    (f"{_TEXT}.transformer.resblocks.{{n}}.ln_2.", f"{_CLIP}.encoder.layers.{{n}}.layer_norm2."),
    (f"{_TEXT}.transformer.resblocks.{{n}}.mlp.c_fc.", f"{_CLIP}.encoder.layers.{{n}}.mlp.fc1."),
    (f"{_TEXT}.transformer.resblocks.{{n}}.mlp.c_proj.", f"{_CLIP}.encoder.layers.{{n}}.mlp.fc2."),
    ("backbone.language_backbone.resizer.", "text_projection."),
    *_attention(f"{_GEO}.encode.{{n}}.cross_attn_image", f"{_GEO}.layers.{{n}}.cross_attn"),
    *_attention(f"{_GEO}.encode.{{n}}.self_attn", f"{_GEO}.layers.{{n}}.self_attn"),
    (f"{_GEO}.encode.{{n}}.linear1.", f"{_GEO}.layers.{{n}}.mlp.fc1."),
    (f"{_GEO}.encode.{{n}}.linear2.", f"{_GEO}.layers.{{n}}.mlp.fc2."),
    *[(f"{_GEO}.encode.{{n}}.norm{i}.", f"{_GEO}.layers.{{n}}.layer_norm{i}.") for i in (1, 2, 3)],
    (f"{_GEO}.img_pre_norm.", f"{_GEO}.vision_layer_norm."),
    (f"{_GEO}.norm.", f"{_GEO}.prompt_layer_norm."),
    (f"{_GEO}.encode_norm.", f"{_GEO}.output_layer_norm."),
    *_same(_GEO, "label_embed cls_embed boxes_direct_project boxes_pool_project boxes_pos_enc_project final_proj"),
    *_attention(f"{_ENC}.cross_attn_image", "detr_encoder.layers.{n}.cross_attn"),
    *_attention(f"{_ENC}.self_attn", "detr_encoder.layers.{n}.self_attn"),
    (f"{_ENC}.linear1.", "detr_encoder.layers.{n}.mlp.fc1."),
    (f"{_ENC}.linear2.", "detr_encoder.layers.{n}.mlp.fc2."),
    *[(f"{_ENC}.norm{i}.", f"detr_encoder.layers.{{n}}.layer_norm{i}.") for i in (1, 2, 3)],
    *[(f"{_DEC}.{name}.", f"detr_decoder.{name}.") for name in ("query_embed", "reference_points", "presence_token")],
    *_mlp(f"{_DEC}.presence_token_head", "detr_decoder.presence_head", 3),
    *_mlp(f"{_DEC}.bbox_embed", "detr_decoder.box_head", 3),
    *_mlp(f"{_DEC}.ref_point_head", "detr_decoder.ref_point_head", 2),
    *_mlp(f"{_DEC}.boxRPB_embed_x", "detr_decoder.box_rpb_embed_x", 2),
    *_mlp(f"{_DEC}.boxRPB_embed_y", "detr_decoder.box_rpb_embed_y", 2),
    (f"{_DEC}.presence_token_out_norm.", "detr_decoder.presence_layer_norm."),
    (f"{_DEC}.norm.", "detr_decoder.output_layer_norm."),
    *_attention(f"{_DEC}.layers.{{n}}.self_attn", "detr_decoder.layers.{n}.self_attn"),
    *_attention(f"{_DEC}.layers.{{n}}.ca_text", "detr_decoder.layers.{n}.text_cross_attn"),
    *_attention(f"{_DEC}.layers.{{n}}.cross_attn", "detr_decoder.layers.{n}.vision_cross_attn"),
    (f"{_DEC}.layers.{{n}}.linear1.", "detr_decoder.layers.{n}.mlp.fc1."),
    (f"{_DEC}.layers.{{n}}.linear2.", "detr_decoder.layers.{n}.mlp.fc2."),
    (f"{_DEC}.layers.{{n}}.norm1.", "detr_decoder.layers.{n}.vision_cross_attn_layer_norm."),
    (f"{_DEC}.layers.{{n}}.catext_norm.", "detr_decoder.layers.{n}.text_cross_attn_layer_norm."),
    (f"{_DEC}.layers.{{n}}.norm2.", "detr_decoder.layers.{n}.self_attn_layer_norm."),
    (f"{_DEC}.layers.{{n}}.norm3.", "detr_decoder.layers.{n}.mlp_layer_norm."),
    *_mlp("dot_prod_scoring.prompt_mlp", "dot_product_scoring.text_mlp", 2),
    ("dot_prod_scoring.prompt_mlp.out_norm.", "dot_product_scoring.text_mlp_out_norm."),
    ("dot_prod_scoring.prompt_proj.", "dot_product_scoring.text_proj."),
    ("dot_prod_scoring.hs_proj.", "dot_product_scoring.query_proj."),
    ("segmentation_head.pixel_decoder.", "mask_decoder.pixel_decoder."),
    ("segmentation_head.mask_predictor.mask_embed.", "mask_decoder.mask_embedder."),
    ("segmentation_head.instance_seg_head.", "mask_decoder.instance_projection."),
    ("segmentation_head.semantic_seg_head.", "mask_decoder.semantic_projection."),
    *_attention("segmentation_head.cross_attend_prompt", "mask_decoder.prompt_cross_attn"),
    ("segmentation_head.cross_attn_norm.", "mask_decoder.prompt_cross_attn_norm."),
]


def _pattern(template: str) -> re.Pattern:
    """A prefix template as a regex; a template not ending in "." or "_" must match the whole key."""
    body = re.escape(template).replace(r"\{n\}", r"(?P<n>\d+)").replace(r"\{qkv\}", r"(?P<qkv>[qkv])")
    return re.compile(body + (r"(?P<rest>.*)" if template[-1] in "._" else r"(?P<rest>)") + r"\Z")


_FORWARD = [(_pattern(ours), theirs) for ours, theirs in RULES]
_BACKWARD = [(_pattern(theirs), ours) for ours, theirs in RULES]


def transformers_names(key: str) -> list[str]:
    """transformers' key(s) for one of our keys: three (q, k, v) for a fused projection, else one.

    Raises:
        KeyError: no rule covers the key (a module transformers' `Sam3Model` does not have).
    """
    for pattern, theirs in _FORWARD:
        match = pattern.match(key)
        if match:
            fields = {"n": match.groupdict().get("n", "")}
            names = [theirs.format(qkv=part, **fields) for part in "qkv"] if "{qkv}" in theirs else [
                theirs.format(**fields)]
            return [name + match["rest"] for name in names]
    raise KeyError(f"{key}: no transformers Sam3Model name (sam3_lora/transformers_keys.py RULES)")


def our_name(key: str) -> tuple[str, str | None]:
    """(our key, "q"/"k"/"v" or None) for a transformers key.

    Raises:
        KeyError: no rule covers the key.
    """
    for pattern, ours in _BACKWARD:
        match = pattern.match(key)
        if match:
            return ours.format(n=match.groupdict().get("n", "")) + match["rest"], match.groupdict().get("qkv")
    raise KeyError(f"{key}: not a transformers Sam3Model key that sam3_lora/transformers_keys.py RULES knows")


def lacks_transformers_slot(key: str) -> bool:
    """Our keys transformers' format has no place for (returned apart by `to_transformers_state`)."""
    return any(key.startswith(f"geometry_encoder.{name}.") for name in POINT_PROJECTIONS)


def to_transformers_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Our image-model state dict → (transformers `Sam3Model` state dict, our tensors it cannot hold).

    Raises:
        KeyError: keys no rule covers, listed.
    """
    converted, extra, unknown = {}, {}, []
    for key, tensor in state.items():
        if _DERIVED.search(key):
            continue
        if lacks_transformers_slot(key) or key == POS_EMBED:
            extra[key] = tensor
            if key != POS_EMBED:
                continue
        try:
            names = transformers_names(key)
        except KeyError:
            unknown.append(key)
            continue
        if key == POS_EMBED:
            tensor = tensor[:, 1:]  # transformers stores no cls-token position
        elif key == TEXT_PROJECTION:
            tensor = tensor.t()
        for name, part in zip(names, tensor.chunk(len(names)) if len(names) == 3 else [tensor]):
            converted[name] = part.detach().contiguous()
    if unknown:
        raise KeyError(f"{len(unknown)} keys have no transformers Sam3Model name: {unknown[:10]}")
    return converted, extra


def from_transformers_state(state: dict[str, torch.Tensor], extra: dict[str, torch.Tensor] | None = None,
                            hidden_size: int | None = None) -> dict[str, torch.Tensor]:
    """transformers `Sam3Model` state dict (+ the tensors kept apart at export) → our image-model state dict.

    Without `extra` (a directory transformers wrote), the pos-embed cls row, which sam3 never reads, is zero and
    the point-prompt projections are zero (sam3-lora never prompts with points); both are logged.

    Args:
        state: transformers keys (a `detector_model.` prefix, as in sam3_video layouts, is stripped; the
            tracker's keys are dropped).
        extra: our tensors saved beside the export.
        hidden_size: d_model, for the zero point projections (required when `extra` is None).

    Raises:
        KeyError: transformers keys no rule covers, or an incomplete q/k/v triple.
    """
    state = _detector_state(state)
    grouped: dict[str, dict[str | None, torch.Tensor]] = {}
    for key, tensor in state.items():
        ours, part = our_name(key)
        grouped.setdefault(ours, {})[part] = tensor
    converted = {ours: _join(ours, parts) for ours, parts in grouped.items()}
    converted[TEXT_PROJECTION] = converted[TEXT_PROJECTION].t().contiguous()
    if extra is None:
        extra = _zero_extras(converted[POS_EMBED], hidden_size)
    cls_row = extra[POS_EMBED][:, :1]
    converted[POS_EMBED] = torch.cat([cls_row.to(converted[POS_EMBED].dtype), converted[POS_EMBED]], dim=1)
    converted.update({k: v for k, v in extra.items() if k != POS_EMBED})
    return converted


def _detector_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not any(key.startswith(VIDEO_DETECTOR_PREFIX) for key in state):
        return state
    kept = {k[len(VIDEO_DETECTOR_PREFIX):]: v for k, v in state.items() if k.startswith(VIDEO_DETECTOR_PREFIX)}
    log.info("sam3_video layout: kept %d detector_model.* tensors, dropped %d tracker tensors",
             len(kept), len(state) - len(kept))
    return kept


def _join(ours: str, parts: dict[str | None, torch.Tensor]) -> torch.Tensor:
    if None in parts:
        return parts[None]
    if set(parts) != set("qkv"):
        raise KeyError(f"{ours}: transformers checkpoint has only {sorted(parts)} of its q/k/v projections")
    return torch.cat([parts["q"], parts["k"], parts["v"]])


def _zero_extras(pos_embed: torch.Tensor, hidden_size: int | None) -> dict[str, torch.Tensor]:
    if hidden_size is None:
        raise ValueError("from_transformers_state needs hidden_size when the sam3_extra tensors are absent")
    d = hidden_size
    shapes = {"points_direct_project": (d, 2), "points_pool_project": (d, d), "points_pos_enc_project": (d, d)}
    zeros = {f"geometry_encoder.{name}.weight": torch.zeros(shape) for name, shape in shapes.items()}
    zeros.update({f"geometry_encoder.{name}.bias": torch.zeros(d) for name in shapes})
    log.warning("transformers checkpoint without sam3_extra tensors: point-prompt projections (%s) and the ViT cls "
                "position are zero (neither is used by text or box prompts)", ", ".join(POINT_PROJECTIONS))
    return {POS_EMBED: torch.zeros_like(pos_embed[:, :1]), **zeros}
