"""sam3-lora: LoRA fine-tuning of Meta's SAM3 on COCO-format datasets."""

from sam3_lora import compat as _compat

_compat.apply()

__version__ = "0.1.0"
