"""`sam3-lora doctor`: what a run needs, checked in seconds (like a quick-start check)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True


def _import(name: str) -> Check:
    try:
        module = importlib.import_module(name)
    except Exception as err:  # an import can fail with any error (missing triton, broken wheel)
        return Check(f"import {name}", False, f"{type(err).__name__}: {err}")
    return Check(f"import {name}", True, getattr(module, "__version__", "ok"))


def _cuda() -> list[Check]:
    import torch

    if not torch.cuda.is_available():
        return [Check("CUDA", False, "no GPU: training runs on CPU (fine for the demo, slow for SAM3)", False)]
    name = torch.cuda.get_device_name(0)
    bf16 = torch.cuda.is_bf16_supported()
    return [Check("CUDA", True, f"{torch.cuda.device_count()} x {name}"),
            Check("bf16", bf16, "bf16-mixed available" if bf16 else "no bf16: use trainer.precision=16-mixed or 32",
                  False)]


def _bpe() -> Check:
    from sam3_lora import compat

    try:
        return Check("BPE vocabulary", True, compat.bpe_vocab_path())
    except FileNotFoundError as err:
        return Check("BPE vocabulary", False, str(err))


def _checkpoint(checkpoint: str | None) -> Check:
    from sam3_lora.checkpoint_io import resolve_checkpoint

    if checkpoint is None:
        return Check("model.checkpoint", True, "null: random init (tests/benchmarks only)", False)
    try:
        return Check("model.checkpoint", True, f"{checkpoint} -> {resolve_checkpoint(checkpoint)}")
    except (FileNotFoundError, RuntimeError) as err:
        return Check("model.checkpoint", False, str(err))


def run_checks(checkpoint: str | None = "hub") -> list[Check]:
    """Run every check; `checkpoint` is what `model.checkpoint` would be."""
    checks = [_import(name) for name in ("torch", "sam3", "lightning", "hydra", "peft", "cv2",
                                         "albumentations", "pycocotools", "faster_coco_eval")]
    if checks[0].ok:
        checks += _cuda()
    if checks[1].ok:
        checks += [_bpe(), _checkpoint(checkpoint)]
    return checks


def doctor_main(checkpoint: str | None = "hub") -> int:
    """Print the checks; exit code 1 when a required one fails."""
    checks = run_checks(checkpoint)
    for check in checks:
        mark = "ok " if check.ok else ("FAIL" if check.required else "warn")
        print(f"[{mark:>4}] {check.name:<22} {check.detail}")
    return 1 if any(c.required and not c.ok for c in checks) else 0
