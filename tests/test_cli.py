"""The `sam3-lora` console script: doctor, make-shapes, check-data, export (through cli.main)."""

from __future__ import annotations

import torch

from sam3_lora.cli import main
from sam3_lora.adapter import save_adapter
from sam3_lora.lora import apply_lora
from sam3_lora.model import build_sam3
from tests.conftest import tiny_model_config


def test_doctor_reports_and_fails_on_unresolvable_checkpoint(capsys, tmp_path):
    assert main(["doctor", "--checkpoint", str(tmp_path / "missing.pt")]) == 1
    out = capsys.readouterr().out
    assert "[ ok ] import sam3" in out and "BPE vocabulary" in out
    assert "[FAIL] model.checkpoint" in out and "missing.pt" in out


def test_doctor_passes_with_the_shipped_tiny_base(capsys):
    assert main(["doctor", "--checkpoint", "builtin:tiny"]) == 0
    assert "sam3_tiny_shapes.safetensors" in capsys.readouterr().out


def test_make_shapes_then_check_data_is_clean(capsys, tmp_path):
    assert main(["make-shapes", str(tmp_path / "shapes"), "--num-train", "6", "--num-valid", "3", "--num-test", "3"]) == 0
    assert main(["check-data", str(tmp_path / "shapes")]) == 0
    assert "0 fatal" in capsys.readouterr().out
    assert main(["make-shapes", str(tmp_path / "shapes")]) == 1  # never overwrites


def test_export_writes_a_stock_checkpoint(tmp_path, capsys):
    config = tiny_model_config()
    save_adapter(apply_lora(build_sam3(**config), rank=2, targets=["detr"]), tmp_path / "ad", config)
    assert main(["export", str(tmp_path / "ad"), str(tmp_path / "merged.pt")]) == 0
    stored = torch.load(tmp_path / "merged.pt", weights_only=True)
    assert stored["model_config"]["d_model"] == config["d_model"]
    assert set(stored["model"]) == {f"detector.{k}" for k in build_sam3(**config).state_dict()}
    assert "wrote stock SAM3 checkpoint" in capsys.readouterr().out
