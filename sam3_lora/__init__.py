"""sam3-lora: LoRA fine-tuning of Meta's SAM3 on COCO-format datasets.

Importing the package is cheap (no torch, no sam3), so `sam3-lora --help` answers at once: the sam3 patches
apply when `sam3_lora.compat` is imported, which every module that builds a SAM3 model or loss does.
"""

from importlib.metadata import version as _version

from sam3_lora.resolvers import register_resolvers as _register_resolvers

_register_resolvers()

__version__ = _version("sam3-lora")  # one owner: pyproject.toml's [project] version
