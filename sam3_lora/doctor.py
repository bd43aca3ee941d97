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


# where sam3's own downloader puts the weights (sam3/model_builder.py:641-645, `download_ckpt_from_hf`)
HUB_REPO, HUB_FILE = "facebook/sam3", "sam3.pt"


def _cached_hub_checkpoint() -> Check:
    """model.checkpoint=hub without downloading: is sam3.pt already in the Hugging Face cache?"""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(HUB_REPO, HUB_FILE)
    if isinstance(cached, str):
        return Check("model.checkpoint", True, f"hub -> {cached} (cached)")
    return Check("model.checkpoint", False, f"hub: {HUB_REPO}/{HUB_FILE} is not downloaded yet (about 3.4 GB); "
                 "training downloads it, or run `sam3-lora doctor --download` to fetch and check it now", False)


def _checkpoint(checkpoint: str | None, download: bool = False) -> Check:
    from sam3_lora.checkpoint_io import resolve_checkpoint

    if checkpoint is None:
        return Check("model.checkpoint", True, "null: random init (tests/benchmarks only)", False)
    if checkpoint == "hub" and not download:
        return _cached_hub_checkpoint()  # never a multi-GB download unless asked
    try:
        return Check("model.checkpoint", True, f"{checkpoint} -> {resolve_checkpoint(checkpoint)}")
    except (FileNotFoundError, RuntimeError) as err:
        return Check("model.checkpoint", False, str(err))


def run_checks(checkpoint: str | None = "hub", download: bool = False) -> list[Check]:
    """Run every check; `checkpoint` is what `model.checkpoint` would be; `download` lets "hub" download."""
    checks = [_import(name) for name in ("torch", "sam3", "lightning", "hydra", "peft", "cv2",
                                         "albumentations", "pycocotools", "faster_coco_eval")]
    if checks[0].ok:
        checks += _cuda()
    if checks[1].ok:
        checks += [_bpe(), _checkpoint(checkpoint, download)]
    return checks


def doctor_report(checks: list[Check]) -> tuple[str, bool]:
    """One line per check ("[ ok ]", "[FAIL]" for a failed required check, "[warn]") and whether all required passed."""
    lines = [f"[{'ok ' if c.ok else ('FAIL' if c.required else 'warn'):>4}] {c.name:<22} {c.detail}" for c in checks]
    return "\n".join(lines), not any(c.required and not c.ok for c in checks)
