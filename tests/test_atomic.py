"""Nothing half-written: a failure or a kill while writing a checkpoint, `adapter/` or `metrics.json` leaves the
previous version loadable (torch.load weights_only / PEFT), and an interrupted directory swap is recovered."""

from __future__ import annotations

import io as io_module
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from lightning.fabric.plugins.io import torch_io
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from sam3_lora.checkpoint_io import AtomicCheckpointIO, atomic_path, previous_version_path, recover_interrupted_write


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)


def _adapted(seed: int) -> PeftModel:
    torch.manual_seed(0)  # the same base every time; the adapter differs by `seed`
    model = get_peft_model(Toy(), LoraConfig(r=2, target_modules=["proj"]))
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator)
    return model


def _save_adapter(model: PeftModel, out) -> None:
    with atomic_path(out) as tmp:
        model.save_pretrained(str(tmp))


def _lora_of(model: PeftModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _load_lora(adapter_dir) -> dict[str, torch.Tensor]:
    """The LoRA tensors a plain PEFT load of `adapter_dir` places into a fresh base."""
    torch.manual_seed(0)
    return _lora_of(PeftModel.from_pretrained(Toy(), str(adapter_dir)))


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def _fail_when(monkeypatch, target, name: str, condition):
    """Make `target.name` raise when `condition(*args)` holds; other calls go through."""
    original, failed = getattr(target, name), []

    def failing(*args, **kwargs):
        if condition(*args):
            failed.append(args)
            raise OSError(f"injected failure in {name}")
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, failing)
    return failed


def _renames_new_version_into(final):
    """os.replace(src, dst) calls that move a freshly written version (not the previous copy) onto `final`."""
    return lambda src, dst: Path(dst) == Path(final) and Path(src) != previous_version_path(final)


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_failed_rename_of_a_new_adapter_keeps_the_previous_one_loadable(tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    first = _adapted(seed=1)
    _save_adapter(first, out)
    failed = _fail_when(monkeypatch, os, "replace", _renames_new_version_into(out))
    with pytest.raises(OSError, match="injected"):
        _save_adapter(_adapted(seed=2), out)
    assert len(failed) == 1  # the new adapter was fully written, only its rename in failed
    monkeypatch.undo()
    _assert_same(_load_lora(out), _lora_of(first))
    assert _leftovers(tmp_path) == []


def test_exception_while_writing_an_adapter_keeps_the_previous_one(tmp_path):
    out = tmp_path / "adapter"
    first = _adapted(seed=1)
    _save_adapter(first, out)
    with pytest.raises(RuntimeError, match="mid-write"), atomic_path(out) as tmp:
        _adapted(seed=2).save_pretrained(str(tmp))
        raise RuntimeError("killed mid-write")
    _assert_same(_load_lora(out), _lora_of(first))
    assert _leftovers(tmp_path) == []


def test_a_successful_swap_replaces_the_adapter(tmp_path):
    out = tmp_path / "adapter"
    _save_adapter(_adapted(seed=1), out)
    second = _adapted(seed=2)
    _save_adapter(second, out)
    _assert_same(_load_lora(out), _lora_of(second))
    assert _leftovers(tmp_path) == []


def test_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    _fail_when(monkeypatch, os, "replace", _renames_new_version_into(path))
    with pytest.raises(OSError, match="injected"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    monkeypatch.undo()
    previous = torch.load(path, map_location="cpu", weights_only=True)
    assert previous["global_step"] == 1 and torch.equal(previous["state_dict"]["w"], torch.ones(3))
    assert _leftovers(tmp_path) == []


def test_checkpoint_writer_failing_mid_file_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "best.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)

    def half_written(checkpoint, file):  # Lightning's writer dying halfway through the file
        buffer = io_module.BytesIO()
        torch.save(checkpoint, buffer)
        with open(file, "wb") as handle:
            handle.write(buffer.getvalue()[: buffer.tell() // 2])
        raise OSError("disk full")

    monkeypatch.setattr(torch_io, "_atomic_save", half_written)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(3))


def test_failed_metrics_write_keeps_the_previous_metrics(tmp_path, monkeypatch):
    from sam3_lora.train import _write_metrics

    _write_metrics({"fine_tuned": {"test/bbox_mAP": 0.5}}, tmp_path)
    _fail_when(monkeypatch, os, "replace", _renames_new_version_into(tmp_path / "metrics.json"))
    with pytest.raises(OSError, match="injected"):
        _write_metrics({"fine_tuned": {"test/bbox_mAP": 0.9}}, tmp_path)
    monkeypatch.undo()
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"fine_tuned": {"test/bbox_mAP": 0.5}}


def _kill_writer(model: PeftModel, out, target, name: str, call: int) -> None:
    """Write `model` to `out` in a forked child that dies (like SIGKILL: no `finally`, no `except`) on the
    `call`-th `target.name` call."""
    pid = os.fork()
    if pid == 0:  # the child
        original, calls = getattr(target, name), []

        def die(*args, **kwargs):
            calls.append(args)
            if len(calls) == call:
                os._exit(9)
            return original(*args, **kwargs)

        setattr(target, name, die)
        _save_adapter(model, out)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 9


@pytest.mark.skipif(not hasattr(os, "fork"), reason="simulates the kill with fork")
def test_kill_between_the_two_renames_is_recovered(tmp_path):
    out = tmp_path / "adapter"
    first = _adapted(seed=1)
    _save_adapter(first, out)
    # killed after the old adapter went aside, before the new one came in
    _kill_writer(_adapted(seed=2), out, os, "replace", call=2)
    assert not out.exists() and previous_version_path(out).is_dir()  # the window the recovery rule covers
    recover_interrupted_write(out)
    _assert_same(_load_lora(out), _lora_of(first))
    assert not previous_version_path(out).exists()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="simulates the kill with fork")
def test_kill_after_the_swap_keeps_the_new_adapter_and_drops_the_stale_copy(tmp_path):
    out = tmp_path / "adapter"
    _save_adapter(_adapted(seed=1), out)
    _kill_writer(_adapted(seed=2), out, shutil, "rmtree", call=1)  # the new adapter is in, the old one not yet deleted
    assert out.is_dir() and previous_version_path(out).is_dir()
    third = _adapted(seed=3)
    _save_adapter(third, out)  # every write starts with the recovery
    _assert_same(_load_lora(out), _lora_of(third))
    assert not previous_version_path(out).exists()
