"""transformers `Sam3Model` directories: export a fine-tune, read one as a base, config and processor.

A directory holds `config.json` + `model.safetensors` (transformers' names, `transformers_keys`), the
`Sam3Processor` files, `sam3_extra.safetensors` (our tensors transformers' format cannot hold, so ours →
transformers → ours is bit-equal) and `sam3_model_config.json` (the `build_sam3` kwargs of the model).

transformers is imported lazily: the core install does not need it (`pip install -e ".[transformers]"`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from sam3_lora.transformers_keys import TEXT_PROJECTION, from_transformers_state, to_transformers_state

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
EXTRA_FILE = "sam3_extra.safetensors"  # our tensors transformers' format cannot hold
MODEL_CONFIG_FILE = "sam3_model_config.json"  # the `build_sam3` kwargs of the exported model


def geometry_padding(batch_size: int) -> dict[str, torch.Tensor]:
    """Extra `Sam3Model` inputs that make a text prompt behave as in sam3: one masked padding box per prompt.

    sam3 always runs its geometry encoder, so every prompt carries the encoder's CLS token
    (sam3/model/sam3_image.py `_encode_prompt`; sam3-lora trains and predicts that way). transformers'
    `Sam3Model.forward` skips the geometry encoder when no box is given, which changes the detections. A box
    labelled -10 (transformers' padding label) is masked everywhere and brings the CLS token back.
    """
    return {"input_boxes": torch.zeros(batch_size, 1, 4),
            "input_boxes_labels": torch.full((batch_size, 1), -10, dtype=torch.long)}


def sam3_config(model_config: dict, text_projection_dim: int = 512):
    """transformers `Sam3Config` with the dims of a `build_sam3` kwargs dict (defaults: the official model).

    Raises:
        ValueError: a model transformers cannot express (no mask head).
    """
    from transformers import Sam3Config

    from sam3_lora.model import build_sam3

    config = {**_defaults(build_sam3), **model_config}
    if not config["segmentation"]:
        raise ValueError("transformers' Sam3Model always has a mask decoder: export a model built with "
                         "model.segmentation=true")
    grid = config["resolution"] // config["patch_size"]
    d, heads, ffn, dropout = config["d_model"], config["heads"], config["ffn_dim"], config["dropout"]
    detr = dict(hidden_size=d, num_attention_heads=heads, intermediate_size=ffn, dropout=dropout)
    vit = dict(
        model_type="sam3_vit_model", hidden_size=config["vit_dim"], num_hidden_layers=config["vit_depth"],
        intermediate_size=int(config["vit_dim"] * config["vit_mlp_ratio"]), num_attention_heads=config["vit_heads"],
        image_size=config["resolution"], patch_size=config["patch_size"], window_size=config["vit_window"],
        global_attn_indexes=list(config["vit_global_blocks"]), pretrain_image_size=config["vit_pretrain_size"],
        layer_norm_eps=1e-5,  # sam3 builds the ViT's LayerNorms with eps=1e-5 (vitdet.py `ViT.__init__`)
    )
    text = dict(
        model_type="clip_text_model", vocab_size=49408, hidden_size=config["text_width"],
        intermediate_size=4 * config["text_width"], projection_dim=text_projection_dim,
        num_hidden_layers=config["text_layers"], num_attention_heads=config["text_heads"],
        max_position_embeddings=config["text_context_length"], hidden_act="gelu",
    )
    return Sam3Config(
        vision_config=dict(backbone_config=vit, fpn_hidden_size=d, scale_factors=[4.0, 2.0, 1.0, 0.5],
                           backbone_feature_sizes=[[4 * grid] * 2, [2 * grid] * 2, [grid] * 2]),
        text_config=text,
        geometry_encoder_config=dict(num_layers=config["geometry_layers"], **detr),
        detr_encoder_config=dict(num_layers=config["encoder_layers"], **detr),
        detr_decoder_config=dict(num_layers=config["decoder_layers"], num_queries=config["num_queries"], **detr),
        mask_decoder_config=dict(hidden_size=d, num_attention_heads=heads),
        architectures=["Sam3Model"],
    )


def _defaults(function) -> dict:
    import inspect

    return {name: p.default for name, p in inspect.signature(function).parameters.items()}


def build_processor(model_config: dict):
    """`Sam3Processor` for the model: image processor at its resolution, CLIP tokenizer from sam3's own BPE.

    sam3's tokenizer and transformers' CLIP tokenizer read the same BPE merges; only the names of the two
    special tokens differ (same ids 49406/49407), and sam3 pads with id 0 where CLIP pads with `<|endoftext|>`
    (padding is masked on both sides).
    """
    from sam3.model.tokenizer_ve import SimpleTokenizer
    from transformers import CLIPTokenizer, Sam3ImageProcessor, Sam3Processor

    from sam3_lora import compat
    from sam3_lora.model import build_sam3

    config = {**_defaults(build_sam3), **model_config}
    sam3_tokenizer = SimpleTokenizer(bpe_path=config["bpe_path"] or compat.bpe_vocab_path())
    vocab = dict(sam3_tokenizer.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    merges = sorted(sam3_tokenizer.bpe_ranks, key=sam3_tokenizer.bpe_ranks.get)  # (left, right) pairs by rank
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=config["text_context_length"])
    side, grid = config["resolution"], config["resolution"] // config["patch_size"]
    image_processor = Sam3ImageProcessor(size={"height": side, "width": side},
                                         mask_size={"height": 4 * grid, "width": 4 * grid})
    return Sam3Processor(image_processor=image_processor, tokenizer=tokenizer)


def check_against_sam3model(state: dict[str, torch.Tensor], config) -> None:
    """Assert names and shapes equal those of `Sam3Model(config)` (built on the meta device: no memory).

    Raises:
        ValueError: missing, unexpected or mis-shaped keys, listed.
    """
    from transformers import Sam3Model

    with torch.device("meta"):
        expected = {k: v.shape for k, v in Sam3Model(config).state_dict().items()}
    problems = [f"missing {k}" for k in sorted(set(expected) - set(state))]
    problems += [f"unexpected {k}" for k in sorted(set(state) - set(expected))]
    problems += [f"{k}: {tuple(state[k].shape)} vs Sam3Model {tuple(s)}" for k, s in expected.items()
                 if k in state and state[k].shape != s]
    if problems:
        raise ValueError(f"converted state does not fit transformers' Sam3Model ({len(problems)}): "
                         + "; ".join(problems[:20]))


def save_transformers(state: dict[str, torch.Tensor], model_config: dict, out_dir: str | Path) -> Path:
    """Write our image-model state as a transformers `Sam3Model` directory (`from_pretrained` loads it strictly).

    Files: `config.json`, `model.safetensors`, `sam3_extra.safetensors`, `sam3_model_config.json` and the
    `Sam3Processor` files (image processor + tokenizer).

    Raises:
        ImportError: transformers is not installed.
        KeyError / ValueError: the state does not convert to `Sam3Model(config)` exactly (keys listed).
    """
    from safetensors.torch import save_file

    from sam3_lora.checkpoint_io import atomic_path

    _require_transformers()
    converted, extra = to_transformers_state(state)
    config = sam3_config(model_config, text_projection_dim=state[TEXT_PROJECTION].shape[1])
    check_against_sam3model(converted, config)
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        config.save_pretrained(str(tmp))
        save_file(converted, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        save_file({k: v.detach().contiguous() for k, v in extra.items()}, str(tmp / EXTRA_FILE))
        (tmp / MODEL_CONFIG_FILE).write_text(json.dumps(model_config, indent=2, sort_keys=True))
        build_processor(model_config).save_pretrained(str(tmp))
    log.info("wrote transformers Sam3Model directory %s (%d tensors)", out_dir, len(converted))
    return out_dir


def _require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError as err:
        raise ImportError("writing the transformers format needs transformers>=5: "
                          "pip install -e \".[transformers]\"") from err


def export_transformers(adapter_dir: str | Path, out_dir: str | Path, base_checkpoint: str | None = None) -> Path:
    """Rebuild an adapter directory's model (on `base_checkpoint` when given, else the stored base), merge its
    LoRA and write it as a transformers `Sam3Model` directory."""
    from sam3_lora.adapter import build_adapted_model, merge_adapter

    model, model_config = build_adapted_model(adapter_dir, base_checkpoint)
    return save_transformers(merge_adapter(model).state_dict(), model_config, out_dir)


def is_transformers_dir(path: str | Path) -> bool:
    """Whether `path` is a directory holding a transformers `config.json` of a SAM3 (image or video) model."""
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") in ("sam3", "sam3_video")


def read_transformers_checkpoint(directory: str | Path) -> dict[str, torch.Tensor]:
    """Our image-model state dict from a transformers SAM3 directory (single or sharded safetensors).

    Raises:
        FileNotFoundError: no `model.safetensors` (nor its shard index) in the directory.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    config = config.get("detector_config") or config  # sam3_video nests the image model's config
    hidden_size = (config.get("detr_encoder_config") or {}).get("hidden_size", 256)  # 256: Sam3Config's default
    state = {}
    for shard in _weight_files(directory):
        state.update(load_file(str(shard)))
    extra = load_file(str(directory / EXTRA_FILE)) if (directory / EXTRA_FILE).exists() else None
    return from_transformers_state(state, extra, hidden_size)


def _weight_files(directory: Path) -> list[Path]:
    index = directory / f"{WEIGHTS_FILE}.index.json"
    if index.exists():
        return sorted({directory / name for name in json.loads(index.read_text())["weight_map"].values()})
    if (directory / WEIGHTS_FILE).exists():
        return [directory / WEIGHTS_FILE]
    raise FileNotFoundError(f"{directory}: transformers SAM3 directory without {WEIGHTS_FILE} or its shard index")
