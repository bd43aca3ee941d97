"""Several adapters on one tiny SAM3 base (`Sam3Predictor`, `sam3-lora predict BASE --adapter NAME=DIR`): results
equal separate single-adapter runs, the image backbone runs once where adapters leave it frozen, clear errors."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from pycocotools import mask as mask_util

from sam3_lora import adapter
from sam3_lora.checkpoint_io import save_stock_checkpoint
from sam3_lora.cli import main
from sam3_lora.model import build_sam3
from sam3_lora.predict import predict_datapoints, prompt_datapoint
from sam3_lora.data.images import read_image_rgb
from sam3_lora.data.transforms import eval_image_tensor
from sam3_lora.predictor import Sam3Predictor
from tests.lora_helpers import adapted, perturb_lora

# adapter name -> (LoRA targets, modules_to_save, touches the ViT)
ADAPTERS = {"cracks": (["detr"], ["dot_prod_scoring"], False),
            "rust": (["text", "detr"], [], False),
            "leaks": (["vision", "detr"], [], True)}
PROMPTS = {"cracks": ["red circle", "blue square"], "rust": ["green triangle"], "leaks": ["red circle"]}
TOLERANCE = 1e-5  # the bar: multi-adapter results equal single-adapter runs to 1e-5


@pytest.fixture
def base_file(tiny_config, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "base.pt"
    save_stock_checkpoint(build_sam3(**tiny_config).state_dict(), path)
    return str(path)


@pytest.fixture
def adapter_dirs(base_file, tiny_config, tmp_path):
    config = {**tiny_config, "checkpoint": base_file}
    dirs = {}
    for seed, (name, (targets, saved, _)) in enumerate(ADAPTERS.items(), start=1):
        model = adapted(config, targets=targets, modules_to_save=saved, seed=seed)
        perturb_lora(model, seed=seed)
        if saved:
            with torch.no_grad():  # a fully trained head that differs from the base
                for parameter in model.get_base_model().dot_prod_scoring.parameters():
                    if parameter.requires_grad:
                        parameter.add_(0.05)
        dirs[name] = adapter.save_adapter(model, tmp_path / name, config)
    return dirs


@pytest.fixture
def images(tmp_path):
    generator = np.random.default_rng(0)
    paths = []
    for index, size in enumerate([(96, 128), (112, 112), (80, 64)]):
        path = tmp_path / f"image{index}.png"
        PILImage.fromarray(generator.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _single_adapter_results(adapter_dir, images, prompts, resolution):
    model, _ = adapter.load_model_for_inference(str(adapter_dir))
    datapoints = []
    for index, path in enumerate(images):
        image = read_image_rgb(path)
        datapoints.append(prompt_datapoint(eval_image_tensor(image, resolution), index, image.shape[:2], prompts))
    return predict_datapoints(model.eval(), datapoints)


def _by_query(results, key):
    grouped = defaultdict(list)
    for result in results:
        grouped[(result["image_id"], result[key])].append(result)
    return {k: sorted(v, key=lambda r: -r["score"]) for k, v in grouped.items()}


def _assert_equal_results(multi, single):
    assert multi.keys() == single.keys()
    for key in multi:
        a, b = multi[key], single[key]
        assert len(a) == len(b), key
        np.testing.assert_allclose([r["score"] for r in a], [r["score"] for r in b], atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose([r["bbox"] for r in a], [r["bbox"] for r in b], atol=1e-3, rtol=0)  # pixels
        masks_a = mask_util.decode([r["segmentation"] for r in a])
        masks_b = mask_util.decode([r["segmentation"] for r in b])
        assert (masks_a != masks_b).mean() < 1e-4, key  # only boundary pixels at logit ~0 may flip


def test_multi_adapter_results_equal_single_adapter_runs(base_file, adapter_dirs, images, tiny_config):
    predictor = Sam3Predictor(base_file, device="cpu")
    for name, path in adapter_dirs.items():
        predictor.add_adapter(name, path)
    assert predictor.adapts_image_backbone == {n: spec[2] for n, spec in ADAPTERS.items()}
    results = predictor.predict(images, PROMPTS, batch_size=2)
    for name in ADAPTERS:
        mine = [dict(r, category_id=PROMPTS[name].index(r["category_name"]) + 1) for r in results
                if r["adapter"] == name]
        single = _single_adapter_results(adapter_dirs[name], images, PROMPTS[name], tiny_config["resolution"])
        assert single and any(r["score"] > 0 for r in single)
        _assert_equal_results(_by_query(mine, "category_id"), _by_query(single, "category_id"))


def test_adapters_differ_so_the_equality_test_bites(base_file, adapter_dirs, images):
    predictor = Sam3Predictor(base_file, device="cpu").add_adapter("cracks", adapter_dirs["cracks"])
    predictor.add_adapter("rust", adapter_dirs["rust"])
    results = predictor.predict(images[:1], {"cracks": ["red circle"], "rust": ["red circle"]})
    scores = {name: sorted(r["score"] for r in results if r["adapter"] == name) for name in ("cracks", "rust")}
    assert not np.allclose(scores["cracks"], scores["rust"], atol=1e-3)


def test_image_backbone_runs_once_per_batch_for_adapters_that_leave_it_frozen(base_file, adapter_dirs, images):
    predictor = Sam3Predictor(base_file, device="cpu")
    for name in ADAPTERS:
        predictor.add_adapter(name, adapter_dirs[name])
    calls = []
    trunk = predictor.model.get_base_model().backbone.vision_backbone.trunk
    handle = trunk.register_forward_hook(lambda *args: calls.append(1))
    try:
        predictor.predict(images, {"cracks": ["red circle"], "rust": ["blue square"]}, batch_size=3)
        assert len(calls) == 1  # one batch, two adapters, one ViT pass
        calls.clear()
        predictor.predict(images, PROMPTS, batch_size=3)
        assert len(calls) == 2  # shared pass for cracks + rust, leaks adapts the ViT: its own pass
    finally:
        handle.remove()


def test_adapters_with_other_dimensions_are_a_clear_error(base_file, adapter_dirs, tiny_config, tmp_path):
    other = adapter.save_adapter(adapted({**tiny_config, "d_model": 128}, targets=["detr"]), tmp_path / "wide",
                                 {**tiny_config, "d_model": 128})
    predictor = Sam3Predictor(base_file, device="cpu").add_adapter("cracks", adapter_dirs["cracks"])
    with pytest.raises(ValueError, match=r"other SAM3 dimensions than adapter cracks: d_model: 128 vs 64"):
        predictor.add_adapter("wide", other)
    with pytest.raises(ValueError, match="taken"):
        predictor.add_adapter("cracks", adapter_dirs["rust"])
    with pytest.raises(ValueError, match="unknown adapters"):
        predictor.predict([], {"rust": ["x"]})


def test_cli_predict_with_named_adapters(base_file, adapter_dirs, images, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["predict", base_file, "--adapter", f"cracks={adapter_dirs['cracks']}",
            "--adapter", f"rust={adapter_dirs['rust']}", "--prompt", "cracks:red circle",
            "--prompt", "rust:green triangle", *map(str, images), "--out", str(out), "--threshold", "0",
            "--device", "cpu"]
    assert main(argv) == 0
    results = json.loads((out / "predictions.json").read_text())
    assert {(r["adapter"], r["category_name"]) for r in results} == {("cracks", "red circle"),
                                                                      ("rust", "green triangle")}
    assert sorted(p.name for p in out.glob("*.png")) == [f"image{i}.png" for i in range(3)]
    try:  # the CLI either raises or prints the message and exits non-zero
        code = main([*argv[:6], "--prompt", "no adapter named", *map(str, images), "--out", str(out)])
    except ValueError as err:
        assert "expected NAME:VALUE" in str(err)
    else:
        assert code != 0 and "expected NAME:VALUE" in capsys.readouterr().err


def test_adapter_missing_a_tensor_is_a_clear_error_and_the_predictor_stays_usable(base_file, adapter_dirs, images,
                                                                                  tmp_path):
    from safetensors.torch import load_file, save_file
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(adapter_dirs["cracks"], broken)
    weights = load_file(str(broken / "adapter_model.safetensors"))
    save_file({k: v for k, v in weights.items() if "dot_prod_scoring" not in k}, str(broken / "adapter_model.safetensors"))
    predictor = Sam3Predictor(base_file, device="cpu").add_adapter("rust", adapter_dirs["rust"])
    with pytest.raises(ValueError, match="missing .*dot_prod_scoring"):
        predictor.add_adapter("broken", broken)
    assert list(predictor.adapters) == ["rust"] and "broken" not in predictor.model.peft_config
    assert predictor.predict(images[:1], {"rust": ["red circle"]})
