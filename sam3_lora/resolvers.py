"""OmegaConf resolvers used by conf/ (`${sam3_precision:}`), registered when sam3_lora is imported."""

from __future__ import annotations

from omegaconf import OmegaConf


def default_precision() -> str:
    """bf16 autocast where the GPU supports it, else fp32 ("bf16-true" would drop RoPE's imaginary part)."""
    import torch  # here, not at the top: `import sam3_lora` stays cheap for the CLI

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def register_resolvers() -> None:
    """Register `${sam3_precision:}` (idempotent)."""
    if not OmegaConf.has_resolver("sam3_precision"):
        OmegaConf.register_new_resolver("sam3_precision", default_precision)
