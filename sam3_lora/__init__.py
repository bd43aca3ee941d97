"""sam3-lora: LoRA fine-tuning of Meta's SAM3 on COCO-format datasets."""

from sam3_lora import compat as _compat
from sam3_lora.config import register_resolvers as _register_resolvers

_compat.apply()
_register_resolvers()

__version__ = "0.1.0"
