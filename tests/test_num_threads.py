"""The `num_threads` key: torch's CPU threads for the run (the demo uses 1)."""

from __future__ import annotations

import pytest
import torch

from sam3_lora.train import run, set_num_threads
from tests.data_fixtures import shapes_root  # noqa: F401 (fixture)
from tests.train_helpers import compose_config


@pytest.fixture
def restore_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def test_run_sets_num_threads(shapes_root, tmp_path, restore_threads):  # noqa: F811
    torch.set_num_threads(2)
    run(compose_config(shapes_root, tmp_path, ["train=false", "num_threads=1"]))
    assert torch.get_num_threads() == 1


def test_null_keeps_torch_default_and_zero_is_an_error(restore_threads):
    torch.set_num_threads(2)
    set_num_threads(None)
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="num_threads=0"):
        set_num_threads(0)


def test_demo_runs_on_one_thread(shapes_root, tmp_path):  # noqa: F811
    assert compose_config(shapes_root, tmp_path).num_threads == 1  # SMALL_RUN composes experiment=demo
