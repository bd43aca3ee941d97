"""The `sam3-lora` console script and train.py's entry: subcommands, start-up cost, and one message per failure.

Each expected failure is checked for its text, its exit code, and the absence of a traceback (and of the
third-party warnings that used to precede every call).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import sam3_lora
from sam3_lora.adapter import save_adapter
from sam3_lora.checkpoint_io import BUILTIN_CHECKPOINTS, atomic_path
from sam3_lora.cli import main
from sam3_lora.data.report import DataValidationError
from sam3_lora.data.shapes import write_shapes_dataset
from sam3_lora.entry import expected_failure, silence_known_warnings
from sam3_lora.lora import apply_lora
from sam3_lora.model import build_sam3
from sam3_lora.predict_cli import parse_threshold
from tests.conftest import REPO, tiny_model_config

PREDICT_TIMEOUT_S = 600  # subprocesses import torch + sam3: tens of seconds on a loaded 2-core machine


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


@pytest.fixture(scope="module")
def moved_base(tmp_path_factory):
    """An adapter trained on a base file that was moved afterwards: (adapter dir, old base path, new base path)."""
    root = tmp_path_factory.mktemp("moved")
    base = root / "base.safetensors"
    shutil.copy(BUILTIN_CHECKPOINTS["builtin:tiny"], base)
    config = tiny_model_config(checkpoint=str(base))
    save_adapter(apply_lora(build_sam3(**config), rank=2, targets=["detr"]), root / "adapter", config)
    moved = root / "elsewhere" / "base.safetensors"
    moved.parent.mkdir()
    base.rename(moved)
    return root / "adapter", base, moved


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory) -> Path:
    """An adapter on the shipped tiny base (builtin:tiny)."""
    config = tiny_model_config(checkpoint="builtin:tiny")
    out = tmp_path_factory.mktemp("tiny") / "adapter"
    save_adapter(apply_lora(build_sam3(**config), rank=2, targets=["detr"]), out, config)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = write_shapes_dataset(tmp_path_factory.mktemp("shapes") / "ds", num_train=2, num_valid=1, num_test=0,
                                progress=False)
    return root / "train"


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("error: ") and err.rstrip().endswith("(run with --debug for the traceback)")
    return err


def test_help_and_version_import_neither_torch_nor_sam3():
    probe = ("import sys; from sam3_lora.cli import build_parser; build_parser(); "
             "print(sorted(m for m in ('torch', 'sam3', 'lightning', 'peft') if m in sys.modules))")
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    assert imported.stdout.strip() == "[]" and imported.stderr == ""
    version = subprocess.run(["sam3-lora", "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == f"sam3-lora {sam3_lora.__version__}" and version.stderr == ""


def test_known_third_party_warnings_are_filtered_exactly():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_known_warnings()
        warnings.warn("`torch.jit.script` is deprecated. Please switch to `torch.compile` or `torch.export`.",
                      FutureWarning)
        warnings.warn("CUDA is not available or torch_xla is imported. Disabling autocast.", UserWarning)
        warnings.warn("CUDA is not available", UserWarning)  # not the known text: still shown
        warnings.warn("`torch.jit.script` is deprecated.", DeprecationWarning)  # another category: still shown
    assert [str(w.message) for w in caught] == ["CUDA is not available", "`torch.jit.script` is deprecated."]


def test_unwritable_export_names_the_users_path_without_warnings_or_traceback(tiny_adapter):
    done = subprocess.run(["sam3-lora", "export", str(tiny_adapter), "/proc/x.pt"], capture_output=True, text=True,
                          timeout=PREDICT_TIMEOUT_S)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "Warning" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: [Errno 2] cannot write in /proc (No such file or directory): '/proc/x.pt'"]


def test_export_to_a_folder_fails_at_once_naming_it(tiny_adapter, tmp_path, capsys):
    assert main(["export", str(tiny_adapter), str(tmp_path)]) == 1
    assert f"{tmp_path} is a folder; the stock checkpoint is a file" in _error(capsys)


def test_atomic_write_onto_a_folder_names_the_folder_not_the_temporary_path(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(IsADirectoryError, match=f"^{tmp_path / 'out'} is a folder, and this output is a file"):
        with atomic_path(tmp_path / "out") as tmp:
            tmp.write_text("x")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=f"cannot write {tmp_path / 'file' / 'x.pt'}: .*file is a file"):
        with atomic_path(tmp_path / "file" / "x.pt") as tmp:
            tmp.write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"]  # no temporary left behind


def test_missing_adapter_files_one_message_and_debug_shows_the_traceback(images, tmp_path, capsys):
    argv = ["predict", str(tmp_path), str(images), "--prompt", "red circle", "--out", str(tmp_path / "out")]
    assert main(argv) == 1
    assert f"{tmp_path} is not a complete sam3-lora adapter directory" in _error(capsys)
    with pytest.raises(FileNotFoundError, match="not a complete sam3-lora adapter directory"):
        main([*argv, "--debug"])


def test_empty_image_folder(tiny_adapter, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tiny_adapter), str(tmp_path / "empty"), "--prompt", "crack", "--out",
                 str(tmp_path / "out")]) == 1
    assert "error: no images (" in _error(capsys)


def test_predict_rejects_an_empty_prompt_and_a_threshold_outside_0_1(tiny_adapter, images, tmp_path, capsys):
    assert main(["predict", str(tiny_adapter), str(images), "--prompt", " ", "--out", str(tmp_path)]) == 1
    assert "--prompt ' ' is empty; give a noun phrase" in _error(capsys)
    with pytest.raises(SystemExit) as exit_info:  # argparse's own usage error: exit 2
        main(["predict", str(tiny_adapter), str(images), "--prompt", "crack", "--threshold", "1.5",
              "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--threshold 1.5: scores lie in [0, 1]" in capsys.readouterr().err
    assert parse_threshold("0") == 0.0 and parse_threshold("1") == 1.0


def test_moved_base_names_it_and_checkpoint_points_the_adapter_at_the_new_place(moved_base, images, tmp_path,
                                                                                capsys):
    adapter_dir, old, moved = moved_base
    common = [str(adapter_dir), str(images), "--prompt", "red circle", "--prompt", "blue square",
              "--threshold", "0", "--device", "cpu"]
    assert main(["predict", *common, "--out", str(tmp_path / "a")]) == 1
    message = _error(capsys)
    assert f"trained on the base checkpoint {old}, which no longer exists" in message
    assert "pass its new path with --checkpoint PATH" in message and "model.checkpoint" not in message
    assert main(["predict", *common, "--checkpoint", str(moved), "--out", str(tmp_path / "b")]) == 0
    printed = capsys.readouterr().out
    written = json.loads((tmp_path / "b" / "predictions.json").read_text())
    counts = {name: sum(r["category_name"] == name for r in written) for name in ("red circle", "blue square")}
    assert counts["red circle"] > 0 and counts["blue square"] > 0
    assert f"wrote {len(written)} detections (score >= 0.0) on 2 images to {tmp_path / 'b'}:" in printed
    assert f"  'red circle': {counts['red circle']}\n  'blue square': {counts['blue square']}" in printed


def test_export_of_an_adapter_whose_base_moved_takes_checkpoint(moved_base, tmp_path, capsys):
    adapter_dir, old, moved = moved_base
    assert main(["export", str(adapter_dir), str(tmp_path / "a.pt")]) == 1
    message = _error(capsys)
    assert f"trained on the base checkpoint {old}, which no longer exists" in message and "--checkpoint" in message
    assert main(["export", str(adapter_dir), str(tmp_path / "b.pt"), "--checkpoint", str(moved)]) == 0
    stored = torch.load(tmp_path / "b.pt", weights_only=True)
    assert stored["model_config"]["checkpoint"] == str(moved) and not (tmp_path / "a.pt").exists()


def test_unreachable_hub_is_one_message(images, tmp_path, monkeypatch, capsys):
    import sam3.model_builder

    def offline():
        raise ConnectionError("no network")

    monkeypatch.setattr(sam3.model_builder, "download_ckpt_from_hf", offline)
    (tmp_path / "tiny.json").write_text(json.dumps(tiny_model_config()))
    assert main(["predict", "--base", str(images), "--prompt", "crack", "--checkpoint", "hub", "--model-config",
                 str(tmp_path / "tiny.json"), "--out", str(tmp_path / "out")]) == 1
    assert "base checkpoint 'hub': could not download facebook/sam3 (ConnectionError: no network)" in _error(capsys)


def test_a_bug_keeps_its_traceback(monkeypatch):
    import sam3_lora.data.shapes

    def broken(*args, **kwargs):
        return {}["missing"]  # a KeyError the interpreter raises: not a message of ours

    monkeypatch.setattr(sam3_lora.data.shapes, "write_shapes_dataset", broken)
    with pytest.raises(KeyError):
        main(["make-shapes", "anywhere"])


def test_expected_failures_are_our_messages_and_paths():
    def caught(function):
        try:
            function()
        except Exception as err:  # noqa: BLE001 - the point is to classify it
            return err
        raise AssertionError("no exception")

    ours = caught(lambda: parse_threshold("2"))
    assert expected_failure(ours) is ours
    assert expected_failure(caught(lambda: int("x"))) is None  # same type, raised outside sam3_lora
    missing = caught(lambda: open("/nonexistent/file"))
    assert expected_failure(missing) is missing
    assert expected_failure(caught(lambda: _raise(DataValidationError("x")))) is None  # not raised by sam3_lora
    from hydra.errors import InstantiationException

    def instantiate(function):  # what hydra.utils.instantiate does with a constructor's exception
        try:
            function()
        except Exception as err:
            raise InstantiationException("Error in call to target") from err

    assert expected_failure(caught(lambda: instantiate(lambda: parse_threshold("2")))).args == ours.args
    assert expected_failure(caught(lambda: instantiate(lambda: int("x")))) is None


def _raise(err: Exception):
    raise err


def test_check_data_quotes_values_and_one_unreadable_split_adds_no_other_fatal(tmp_path, capsys):
    root = write_shapes_dataset(tmp_path / "ds", num_train=3, num_valid=2, num_test=2, progress=False)
    train = root / "train" / "_annotations.coco.json"
    data = json.loads(train.read_text())
    data["annotations"][0]["category_id"] = str(data["annotations"][0]["category_id"])
    train.write_text(json.dumps(data))
    (root / "valid" / "_annotations.coco.json").write_text("{not json")
    assert main(["check-data", str(root), "--headers-only"]) == 1
    out = capsys.readouterr().out
    assert f"field 'category_id' = '{data['annotations'][0]['category_id']}' is not in 'categories'" in out
    fatal_lines = [line for line in out.splitlines() if line.strip().startswith("FATAL")]
    assert len(fatal_lines) == 2, fatal_lines  # the string id, the unreadable json: nothing for the test split
    assert "not valid JSON" in out and "FAILED: 2 fatal problem(s)" in out


def test_train_py_data_error_is_one_log_line_and_lightning_logs_once(tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "train" / "_annotations.coco.json").write_text('{"images": []}')
    done = subprocess.run([sys.executable, "train.py", f"data.root={tmp_path / 'data'}", "model=sam3_tiny",
                           "model.checkpoint=null", f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO,
                          capture_output=True, text=True, timeout=PREDICT_TIMEOUT_S)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output and "Warning" not in output
    assert "[train][ERROR] - " in output and "fatal data problem(s)" in output
    assert "(set HYDRA_FULL_ERROR=1 for the traceback)" in output
    assert output.count("Seed set to 0") == 1  # Lightning's INFO line, once, through Hydra's handlers
    assert "Seed set to 0" in (tmp_path / "run" / "train.log").read_text()
