"""Config mistakes are errors before training (issue 9, item 5), and checkpoints load pickle-free (item 8)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sam3_lora import train as train_module
from sam3_lora.config_checks import SETTINGS_KEY, ConfigError, check_config
from sam3_lora.data.shapes import write_shapes_dataset
from sam3_lora.train import load_trainable_weights, run
from tests.conftest import REPO
from tests.train_helpers import SMALL_RUN, compose_config


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", style="target", num_train=8,
                                num_valid=4, num_test=4, progress=False)


@pytest.fixture
def no_model_build(monkeypatch):
    """Every check below must fire before the model is built."""
    def refuse(cfg):
        raise AssertionError("the model was built before the config/data error was raised")
    monkeypatch.setattr(train_module, "build_model", refuse)


def _error(shapes_root, tmp_path, *overrides) -> str:
    with pytest.raises(ConfigError) as info:
        run(compose_config(shapes_root, tmp_path, list(overrides)))
    return str(info.value)


def test_bf16_true_is_refused_with_the_rope_reason(shapes_root, tmp_path, no_model_build):
    message = _error(shapes_root, tmp_path, "trainer.precision=bf16-true")
    assert "'trainer.precision' = 'bf16-true'" in message and "RoPE" in message and "bf16-mixed" in message


def test_unread_top_level_key_is_an_error(shapes_root, tmp_path, no_model_build):
    assert "'foo': no code reads" in _error(shapes_root, tmp_path, "+foo=1")


def test_misspelled_key_in_a_group_names_the_key_and_the_target(shapes_root, tmp_path, no_model_build):
    message = _error(shapes_root, tmp_path, "+data.batchsize=4", "+module.learning_rate=1e-3")
    assert "'data.batchsize'" in message and "CocoDataModule has no parameter" in message
    assert "'module.learning_rate'" in message


def test_added_key_in_a_plain_node_is_an_error_and_retention_data_takes_data_keys(shapes_root, tmp_path,
                                                                                 no_model_build):
    message = _error(shapes_root, tmp_path, "+retention.fp_treshold=0.3", "+retention.data.batchsize=2")
    assert "'retention.fp_treshold': no code reads it" in message and "fp_threshold" in message
    assert "'retention.data.batchsize': no code reads it (keys of data:" in message
    check_config(compose_config(shapes_root, tmp_path, ["+retention.data.batch_size=2", "retention.negatives=false"]))


def test_appended_callback_with_its_arguments_passes(shapes_root, tmp_path):
    cfg = compose_config(shapes_root, tmp_path, ["+callbacks.x._target_=tests.train_helpers.StopAfterEpoch",
                                                 "+callbacks.x.epoch=0"])
    check_config(cfg)  # no error
    cfg_typo = compose_config(shapes_root, tmp_path, ["+callbacks.x._target_=tests.train_helpers.StopAfterEpoch",
                                                      "+callbacks.x.epochs=0"])
    with pytest.raises(ConfigError, match=r"'callbacks\.x\.epochs'"):
        check_config(cfg_typo)


def test_impossible_values_fail_naming_each_key(shapes_root, tmp_path, no_model_build):
    message = _error(shapes_root, tmp_path, "module.lr=-1", "data.batch_size=0")
    assert "'module.lr' = -1" in message and "'data.batch_size' = 0" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is about machines without GPUs")
def test_several_devices_without_gpus_warns_about_cpu_processes(shapes_root, tmp_path, caplog):
    cfg = compose_config(shapes_root, tmp_path, ["trainer.devices=4"])
    with caplog.at_level(logging.WARNING, logger="sam3_lora.config_checks"):
        check_config(cfg)
    assert "trainer.devices=4 on a machine without GPUs: this runs 4 CPU processes" in caplog.text


def test_demo_never_generates_into_a_user_path(tmp_path, no_model_build):
    user_path = tmp_path / "my_export"
    cfg = compose_config(user_path, tmp_path / "out")  # experiment=demo: generate_shapes is set
    with pytest.raises(FileNotFoundError, match="only generated into a folder named 'shapes_target'"):
        run(cfg)
    assert not user_path.exists()


def test_bad_data_fails_before_the_model_is_built(shapes_root, tmp_path, no_model_build):
    import json
    import shutil

    from sam3_lora.data.report import DataValidationError

    bad = tmp_path / "bad"
    shutil.copytree(shapes_root, bad)
    annotations = bad / "train/_annotations.coco.json"
    coco = json.loads(annotations.read_text())
    coco["annotations"][0]["category_id"] = 999
    annotations.write_text(json.dumps(coco))
    with pytest.raises(DataValidationError, match="999"):
        run(compose_config(bad, tmp_path / "out"))


def test_resume_with_other_lora_settings_names_the_checkpoint_settings(shapes_root, tmp_path):
    common = ["validate_before_fit=false", "test=false", "trainer.max_steps=1", "lora.rank=4"]
    run(compose_config(shapes_root, tmp_path / "a", common))
    last = tmp_path / "a/checkpoints/last.ckpt"
    assert torch.load(last, weights_only=True)[SETTINGS_KEY]["lora.rank"] == 4
    message = _error(shapes_root, tmp_path / "b", *common[:-1], "lora.rank=8", f"ckpt_path={last}")
    assert "this checkpoint was trained with lora.rank=4 (this run: 8)" in message


def test_sweep_with_test_false_is_an_error(shapes_root, tmp_path):
    args = [sys.executable, "train.py", "-m", "hparams_search=optuna", *SMALL_RUN, f"data.root={shapes_root}",
            "test=false", f"hydra.sweep.dir={tmp_path}", "hydra.sweeper.n_trials=1"]
    result = subprocess.run(args, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode != 0
    assert "'test' = false in a sweep" in result.stdout + result.stderr  # hydra logs the error to stdout
    assert not list(tmp_path.glob("*/checkpoints"))  # refused before training
    assert train_module._optimized_value({"zero_shot": {"m": 0.5}}, "m", trained=True) is None


class _Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        self.model[0].requires_grad_(False)  # frozen: not in checkpoints


def test_best_checkpoint_reload_is_pickle_free_and_checks_keys(tmp_path):
    holder = _Holder()
    trainable = {f"model.{n}": p.detach() + 1 for n, p in holder.model.named_parameters() if p.requires_grad}
    torch.save({"state_dict": trainable}, tmp_path / "best.ckpt")
    load_trainable_weights(holder, tmp_path / "best.ckpt")
    assert torch.equal(holder.model[1].weight, trainable["model.1.weight"])

    renamed = {k.replace("model.1", "model.9"): v for k, v in trainable.items()}
    torch.save({"state_dict": renamed}, tmp_path / "renamed.ckpt")
    with pytest.raises(RuntimeError, match=r"missing trainable \['model.1.bias', 'model.1.weight'\]"):
        load_trainable_weights(holder, tmp_path / "renamed.ckpt")

    torch.save({"state_dict": trainable, "payload": _Holder}, tmp_path / "pickled.ckpt")  # a class: needs pickle
    with pytest.raises(Exception, match="Weights only load failed"):
        load_trainable_weights(holder, tmp_path / "pickled.ckpt")


def test_doctor_never_downloads_the_hub_weights_unless_asked(monkeypatch, tmp_path):
    from sam3_lora import checkpoint_io, doctor

    downloads = []
    monkeypatch.setattr(checkpoint_io, "_download_from_hub", lambda: downloads.append(1) or str(tmp_path / "x.pt"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))  # nothing cached
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    check = doctor._checkpoint("hub")
    assert not downloads and not check.ok and not check.required and "--download" in check.detail
    assert doctor._checkpoint("hub", download=True).ok and downloads == [1]


def test_duplicate_category_names_are_an_error_unless_prompts_tell_them_apart():
    from sam3_lora.data.queries import resolve_prompts

    categories = {1: "car", 2: "car", 3: "bus"}
    with pytest.raises(ValueError, match=r"categories share a prompt: \{'car': \[1, 2\]\}"):
        resolve_prompts(categories, None)
    assert resolve_prompts(categories, {2: "parked car"}) == {1: "car", 2: "parked car", 3: "bus"}
    with pytest.raises(ValueError, match="share a prompt"):  # a prompt that collides is as bad
        resolve_prompts({1: "car", 2: "van"}, {2: "car"})


def test_duplicate_category_names_fail_datamodule_setup_as_a_data_error(shapes_root, tmp_path):
    import json
    import shutil

    from sam3_lora.data.datamodule import CocoDataModule
    from sam3_lora.data.report import DataValidationError

    root = tmp_path / "dup"
    shutil.copytree(shapes_root, root)
    for split in ("train", "valid", "test"):
        path = root / split / "_annotations.coco.json"
        coco = json.loads(path.read_text())
        coco["categories"][-1]["name"] = coco["categories"][-2]["name"]
        path.write_text(json.dumps(coco))
    name, second = coco["categories"][-2]["name"], coco["categories"][-1]["id"]
    with pytest.raises(DataValidationError, match="duplicate_category_name"):
        CocoDataModule(root=str(root), resolution=112, num_workers=0).setup()
    module = CocoDataModule(root=str(root), resolution=112, num_workers=0, prompts={second: f"other {name}"})
    module.setup()
    assert module.category_names[second] == f"other {name}"


def test_images_without_any_query_never_reach_sams_collate(shapes_root, monkeypatch):
    from sam3_lora.data import dataset
    from sam3_lora.data.datamodule import CocoDataModule

    module = CocoDataModule(root=str(shapes_root), resolution=112, num_workers=0, batch_size=1)
    module.setup()
    empty_id = module.splits["train"].records[0].image_id
    original = dataset.plan_train_queries

    def nothing_for_the_first_image(positives, crowd, phrases, rng, num_negatives, max_queries):
        if rng is not None and current[0] == empty_id:
            return []  # as for an image whose every category is a crowd region
        return original(positives, crowd, phrases, rng, num_negatives, max_queries)

    current = [None]
    train = module._datasets["train"]
    real_item = train._item
    monkeypatch.setattr(train, "_item", lambda i, e: (current.__setitem__(0, train.records[i].image_id),
                                                      real_item(i, e))[1])
    monkeypatch.setattr(dataset, "plan_train_queries", nothing_for_the_first_image)
    batches = list(module.train_dataloader())  # sam3's collate raised ValueError (max() of no queries) here
    assert len(batches) == len(train) and all(len(b.find_text_batch) >= 1 for b in batches)
    assert empty_id not in {m.original_image_id[0].item() for b in batches for m in b.find_metadatas}


def test_predict_skips_a_corrupt_image_with_a_counted_warning_and_writes_the_rest(shapes_root, tmp_path, caplog):
    import json

    from sam3_lora.model import build_sam3
    from sam3_lora.predict import PREDICTIONS_FILE, predict_images
    from tests.conftest import tiny_model_config

    good = sorted((shapes_root / "test").glob("*.jpg"))[:2]
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff not a jpeg")
    model = build_sam3(**tiny_model_config()).eval()
    with caplog.at_level(logging.WARNING, logger="sam3_lora.predict"):
        kept = predict_images(model, [good[0], corrupt, good[1]], ["red circle"], tiny_model_config()["resolution"],
                              tmp_path / "out", threshold=0.0, topk=3, progress=False)
    assert "1 unreadable image(s) skipped" in caplog.text and str(corrupt) in caplog.text
    written = json.loads((tmp_path / "out" / PREDICTIONS_FILE).read_text())
    assert written == kept and {r["file_name"] for r in written} == {str(good[0]), str(good[1])}
    assert len(list((tmp_path / "out").glob("*.png"))) == 2
