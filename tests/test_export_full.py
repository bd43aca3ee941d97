"""Full SAM3 checkpoints (`export ADAPTER OUT.pt --base FULL.pt`) on the tiny SAM3: strict loads in sam3's video
model and in the image model with and without the interactive predictor, tracker copied unchanged, merged
detector equal to the adapted model, clear errors for bases without a tracker."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from sam3.model.sam1_task_predictor import SAM3InteractiveImagePredictor
from sam3.model.sam3_image import Sam3Image
from sam3_lora import adapter, lora
from sam3_lora.cli import main
from sam3_lora.model import build_sam3
from sam3_lora.video_model import (build_sam3_video, export_full_checkpoint, load_image_state,
                                   split_full_state)
from tests.conftest import final_outputs
from tests.lora_helpers import assert_same, perturb_lora


@pytest.fixture
def full_base(tiny_config, tmp_path):
    """A tiny full SAM3 checkpoint in the stock layout: `{"model": {"detector.*", "tracker.*"}}`."""
    torch.manual_seed(3)
    state = build_sam3_video(tiny_config).state_dict()
    path = tmp_path / "sam3_tiny_full.pt"
    torch.save({"model": state}, path)
    return path, state


@pytest.fixture
def adapter_on_base(full_base, tiny_config, tmp_path):
    """An adapter (non-identity LoRA + a fully trained head) trained on `full_base`'s detector."""
    _, state = full_base
    base = build_sam3(**tiny_config)
    load_image_state(base, split_full_state(state)[0], "full_base")  # LoRA renames keys: load first
    model = lora.apply_lora(base, rank=4, alpha=8, targets=["vision", "text", "detr"],
                            modules_to_save=["dot_prod_scoring"])
    perturb_lora(model)
    adapter.save_adapter(model, tmp_path / "adapter", tiny_config)
    return tmp_path / "adapter", model


def _export(adapter_dir, base, tmp_path, *flags):
    out = tmp_path / "full.pt"
    assert main(["export", str(adapter_dir), str(out), "--base", str(base), *flags]) == 0
    return out, torch.load(out, weights_only=True)["model"]


def test_full_export_loads_strictly_in_the_video_model_with_tracker_unchanged(full_base, adapter_on_base,
                                                                             tiny_config, tmp_path):
    base_path, base_state = full_base
    out, exported = _export(adapter_on_base[0], base_path, tmp_path)
    video = build_sam3_video(tiny_config)
    video.load_state_dict(exported, strict=True)  # what build_sam3_video_model(checkpoint_path=out) does
    tracker_keys = [k for k in base_state if k.startswith("tracker.")]
    assert tracker_keys and all(torch.equal(exported[k], base_state[k]) for k in tracker_keys)
    neck = [k for k in base_state if "sam2_convs" in k]
    assert neck and all(torch.equal(exported[k], base_state[k]) for k in neck)
    qkv = "detector.backbone.vision_backbone.trunk.blocks.0.attn.qkv.weight"
    assert not torch.equal(exported[qkv], base_state[qkv])  # the adapter is merged, not the base copied


def test_full_export_detector_predicts_like_the_adapted_model(full_base, adapter_on_base, tiny_config, batch,
                                                              tmp_path):
    _, model = adapter_on_base
    expected = final_outputs(model, batch)
    _, exported = _export(adapter_on_base[0], full_base[0], tmp_path)
    image = build_sam3(**tiny_config)
    load_image_state(image, split_full_state(exported)[0], "full.pt")
    assert_same(final_outputs(image, batch), expected, atol=1e-5)


def test_full_export_loads_strictly_in_the_interactive_image_model(full_base, adapter_on_base, tiny_config,
                                                                   tmp_path):
    """build_sam3_image_model(enable_inst_interactivity=True): tracker.* → inst_interactive_predictor.model.*."""
    from sam3.model_builder import _load_checkpoint

    out, exported = _export(adapter_on_base[0], full_base[0], tmp_path)
    video = build_sam3_video(tiny_config)
    detector = video.detector
    image = Sam3Image(backbone=detector.backbone, transformer=detector.transformer,
                      input_geometry_encoder=detector.geometry_encoder, segmentation_head=detector.segmentation_head,
                      num_feature_levels=1, o2m_mask_predict=True, dot_prod_scoring=detector.dot_prod_scoring,
                      use_instance_query=False, multimask_output=True,
                      inst_interactive_predictor=SAM3InteractiveImagePredictor(video.tracker))
    mapped = {k.replace("detector.", "", 1) if k.startswith("detector.")
              else k.replace("tracker.", "inst_interactive_predictor.model.", 1): v for k, v in exported.items()}
    image.load_state_dict(mapped, strict=True)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        _load_checkpoint(image, str(out))  # sam3's own loader prints missing keys, if any
    assert "missing" not in printed.getvalue(), printed.getvalue()


def test_base_without_tracker_is_an_error_unless_image_only(adapter_on_base, full_base, tmp_path):
    image_state, _ = split_full_state(full_base[1])
    detector_only = tmp_path / "detector_only.pt"
    torch.save({"model": {"detector." + k: v for k, v in image_state.items()}}, detector_only)
    with pytest.raises(ValueError, match="no tracker.*--image-only"):
        export_full_checkpoint(adapter_on_base[0], tmp_path / "x.pt", str(detector_only))
    out, exported = _export(adapter_on_base[0], detector_only, tmp_path, "--image-only")
    assert exported and all(k.startswith("detector.") for k in exported)
    image = build_sam3(**{**adapter.read_adapter_dir(adapter_on_base[0])[1], "checkpoint": str(out)})
    assert image is not None  # our strict loader accepts it (it raises on any missing/unexpected key)


def test_base_with_other_dims_names_the_problem(adapter_on_base, tiny_config, tmp_path):
    other = build_sam3_video({**tiny_config, "d_model": 128}).state_dict()
    torch.save({"model": other}, tmp_path / "other.pt")
    with pytest.raises(RuntimeError, match="does not match the SAM3 of the adapter's model config"):
        export_full_checkpoint(adapter_on_base[0], tmp_path / "x.pt", str(tmp_path / "other.pt"))


def test_a_stock_full_checkpoint_is_a_valid_base_for_the_image_model(full_base, tiny_config):
    """sam3.pt is saved from the video model: its detector holds the SAM2 neck the image model never builds.

    `model.checkpoint=sam3.pt` must load it strictly (the neck and tracker keys are not "unexpected").
    """
    path, state = full_base
    assert any("sam2_convs" in k for k in state)
    model = build_sam3(**{**tiny_config, "checkpoint": str(path)})
    trunk = "backbone.vision_backbone.trunk.blocks.0.attn.qkv.weight"
    assert torch.equal(model.state_dict()[trunk], state["detector." + trunk])
