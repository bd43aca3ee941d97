"""Every file of every config group composes with the real conf/train.yaml and instantiates."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sam3_lora.train import build_model, build_module
from tests.conftest import REPO
from tests.train_helpers import compose_config

CONF = REPO / "conf"


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    from sam3_lora.data.shapes import write_shapes_dataset

    return write_shapes_dataset(tmp_path_factory.mktemp("cfg") / "shapes", num_train=4, num_valid=2, num_test=2,
                                progress=False)


@pytest.mark.parametrize("option", _options("lora"))
def test_lora_options_build_an_adapted_tiny_model(option, shapes_root, tmp_path):
    cfg = compose_config(shapes_root, tmp_path, [f"lora={option}"])
    model = build_model(cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, option
    assert any("lora_" in n for n in trainable) == bool(cfg.lora.targets), option


@pytest.mark.parametrize("option", _options("data"))
def test_data_options_instantiate_and_set_up(option, shapes_root, tmp_path):
    cfg = compose_config(shapes_root, tmp_path, [f"data={option}", f"data.root={shapes_root}",
                                                 "data.generate_shapes=null", "data.num_workers=0"])
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    assert datamodule.resolution == cfg.model.resolution and datamodule.category_ids


@pytest.mark.parametrize("option", _options("trainer"))
def test_trainer_options_instantiate(option, shapes_root, tmp_path):
    cfg = compose_config(shapes_root, tmp_path, [f"trainer={option}", "trainer.accelerator=cpu"])
    trainer = instantiate(cfg.trainer)
    assert trainer.gradient_clip_val == cfg.trainer.gradient_clip_val


@pytest.mark.parametrize("group", ["callbacks", "logger"])
def test_callback_and_logger_options_instantiate(group, shapes_root, tmp_path):
    for option in _options(group):
        cfg = compose_config(shapes_root, tmp_path, [f"{group}={option}"])
        built = [instantiate(c) for c in cfg[group].values() if c is not None]
        assert built, f"{group}={option}"


@pytest.mark.parametrize("option", _options("model"))
def test_model_options_compose(option, shapes_root, tmp_path):
    cfg = compose_config(shapes_root, tmp_path, [f"model={option}", "model.checkpoint=null"])
    assert cfg.model._target_ == "sam3_lora.model.build_sam3"
    if option == "sam3_tiny":  # model=sam3 (840 M) is instantiated in test_model.py's slow parity test
        assert instantiate(cfg.model).training


def test_module_option_instantiates(shapes_root, tmp_path):
    cfg = compose_config(shapes_root, tmp_path, ["data.num_workers=0"])
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    module = build_module(cfg, datamodule)
    assert module.hparams.lr == cfg.module.lr and "model" not in module.hparams
    assert module.category_names == datamodule.category_names  # given explicitly, not read from a trainer
    assert module.ground_truth_files["valid"] == str(datamodule.annotation_file("valid"))
    assert "ground_truth_files" not in module.hparams  # run-specific paths stay out of checkpoints


@pytest.mark.parametrize("option", _options("debug"))
def test_debug_options_compose(option, shapes_root, tmp_path):
    cfg = compose_config(shapes_root, tmp_path, [f"debug={option}"])
    assert cfg.trainer.get("fast_dev_run") or cfg.trainer.get("overfit_batches")


def test_optuna_search_composes_with_its_sweeper():
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=["hparams_search=optuna", "experiment=demo"], return_hydra_config=True)
    assert "OptunaSweeper" in cfg.hydra.sweeper._target_
    assert set(cfg.hydra.sweeper.params) == {"lora.rank", "module.lr"}
    assert OmegaConf.select(cfg, "optimized_metric") == "test/bbox_mAP50"
