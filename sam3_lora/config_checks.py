"""Config mistakes are errors before training starts: keys nothing reads, impossible values, unsafe precision,
sweeps that would optimise a constant, and resuming with other LoRA/model settings than the checkpoint's.

`check_config(cfg)` runs first in `run(cfg)`. Which keys are read is derived, not listed: top-level keys are those
of conf/train.yaml plus its config groups; a node with a `_target_` accepts the parameters of that target's
signature (so `+callbacks.x._target_=...` with its arguments keeps working), and `callbacks` / `logger` hold such
nodes.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_method
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
HYDRA_KEYS = {"_target_", "_convert_", "_recursive_", "_partial_", "_args_"}
COLLECTIONS = ("callbacks", "logger")  # groups whose entries are each instantiated (or null)
# what `.to(dtype)` does to sam3's complex RoPE tables (`*.attn.freqs_cis`): it drops the imaginary part
UNSAFE_PRECISIONS = {"bf16-true": "bfloat16", "16-true": "float16"}
SETTINGS_KEY = "sam3_lora_settings"  # where checkpoints store the lora.* / model.* settings they were trained with


class ConfigError(ValueError):
    """The composed config cannot run as given; the message names the key and what to do."""


def check_config(cfg: DictConfig) -> None:
    """Refuse, before anything is built, a config that would be silently wrong or fail late.

    Raises:
        ConfigError: an unread key, an impossible value, an unsafe precision, or a sweep without a metric.
    """
    problems = _unread_keys(cfg) + _impossible_values(cfg) + _unsafe_precision(cfg) + _sweep_problems(cfg)
    if problems:
        raise ConfigError("config problem(s):\n  " + "\n  ".join(problems))
    _warn_cpu_processes(cfg)


# ----- keys nothing reads ----------------------------------------------------------------------------------------
def allowed_top_level_keys() -> set[str]:
    """Keys of conf/train.yaml and the names of its config groups."""
    train = _train_yaml()
    # groups with a null default (experiment, debug, ...) are `@package _global_` overlays, not keys
    groups = {k for d in train.get("defaults", []) if isinstance(d, (dict, DictConfig)) for k, v in d.items()
              if v is not None}
    return (set(train) - {"defaults"}) | {g.split("/")[-1].split("@")[0] for g in groups} | {"hydra"}


def _unread_keys(cfg: DictConfig) -> list[str]:
    problems = [f"'{key}': no code reads this top-level key (known: {sorted(allowed_top_level_keys() - {'hydra'})})"
                for key in cfg if key not in allowed_top_level_keys()]
    for key in cfg:
        node = cfg._get_node(key)
        if key in COLLECTIONS and isinstance(node, DictConfig):
            for name in node:
                problems += _unread_in_node(node._get_node(name), f"{key}.{name}")
        elif isinstance(node, DictConfig) and "_target_" in node:
            problems += _unread_in_node(node, key)
        elif isinstance(node, DictConfig) and not node._is_none():
            problems += _unread_in_plain_node(node, key, cfg)
    return problems


# plain nodes whose entries override another node's keys (retention.data = overrides of `data`)
OVERRIDES_OF = {"retention.data": "data"}


def _unread_in_plain_node(node: DictConfig, where: str, cfg: DictConfig) -> list[str]:
    """Keys of a node without `_target_` (e.g. `retention`) that conf/train.yaml does not define there.

    Hydra's struct mode refuses `retention.x=1`, but `+retention.x=1` would still add a key nothing reads."""
    source = OVERRIDES_OF.get(where)
    known = OmegaConf.select(cfg, source) if source else OmegaConf.select(_train_yaml(), where)
    if not isinstance(known, DictConfig):
        return []
    problems = []
    for key in node:
        child = node._get_node(key)
        if key not in known and key not in HYDRA_KEYS:
            problems.append(f"'{where}.{key}': no code reads it ({'keys of ' + source if source else 'known'}: "
                            f"{sorted(k for k in known if k not in HYDRA_KEYS)})")
        elif isinstance(child, DictConfig) and not child._is_none() and "_target_" not in child:
            problems += _unread_in_plain_node(child, f"{where}.{key}", cfg)
    return problems


def _train_yaml() -> DictConfig:
    return OmegaConf.load(CONF_DIR / "train.yaml")


def _unread_in_node(node: Any, where: str) -> list[str]:
    if not isinstance(node, DictConfig) or node._is_none():
        return []
    if "_target_" not in node:
        return [f"'{where}': has no _target_, so nothing instantiates or reads {sorted(node)}"]
    try:
        target = get_method(node._target_)
    except Exception as err:  # hydra raises ImportError or ValueError wrapped in various ways
        return [f"'{where}._target_' = {node._target_!r} cannot be imported: {err}"]
    parameters = inspect.signature(target).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return []  # takes anything: its own code decides
    unknown = sorted(set(node) - HYDRA_KEYS - set(parameters))
    return [f"'{where}.{key}': {node._target_} has no parameter '{key}' (it takes {sorted(parameters)})"
            for key in unknown]


# ----- impossible values -----------------------------------------------------------------------------------------
def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _at_least_one(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _non_negative(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


VALUE_RULES: dict[str, tuple[Callable[[Any], bool], str, bool]] = {
    # key: (accepts, what it must be, null allowed)
    "module.lr": (_positive, "a learning rate > 0", False),
    "module.head_lr": (_positive, "a learning rate > 0", False),
    "module.weight_decay": (_non_negative, ">= 0", False),
    "module.warmup_steps": (_non_negative, "an integer >= 0", False),
    "data.batch_size": (_at_least_one, "an integer >= 1", False),
    "data.eval_batch_size": (_at_least_one, "an integer >= 1 (or null = data.batch_size)", True),
    "data.num_workers": (_non_negative, "an integer >= 0", False),
    "data.eval_categories_per_chunk": (_at_least_one, "an integer >= 1", False),
    "data.max_queries_per_image": (_at_least_one, "an integer >= 1 (or null = no cap)", True),
    "model.resolution": (_at_least_one, "an integer >= 1", False),
    "lora.rank": (_at_least_one, "an integer >= 1", False),
    "lora.alpha": (_positive, "> 0", False),
}


def _impossible_values(cfg: DictConfig) -> list[str]:
    problems = []
    for key, (accepts, wanted, null_ok) in VALUE_RULES.items():
        value = OmegaConf.select(cfg, key, default="<absent>")
        if value == "<absent>" or (value is None and null_ok):
            continue
        if not accepts(value):
            problems.append(f"'{key}' = {value!r}: must be {wanted}")
    return problems


# ----- precision, devices, sweeps --------------------------------------------------------------------------------
def _unsafe_precision(cfg: DictConfig) -> list[str]:
    precision = str(OmegaConf.select(cfg, "trainer.precision", default=""))
    if precision not in UNSAFE_PRECISIONS:
        return []
    return [f"'trainer.precision' = {precision!r}: casts the whole model to {UNSAFE_PRECISIONS[precision]}, which "
            "drops the imaginary part of sam3's complex RoPE tables (attn.freqs_cis) and ends in a dtype error; "
            "use trainer.precision=bf16-mixed (autocast, same memory savings for activations) or "
            "lora.frozen_dtype=bfloat16 to store the frozen base in bf16"]


def _warn_cpu_processes(cfg: DictConfig) -> None:
    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto"))
    if isinstance(devices, int) and devices > 1 and accelerator in ("auto", "cpu", "gpu", "cuda") \
            and not torch.cuda.is_available():
        log.warning("trainer.devices=%d on a machine without GPUs: this runs %d CPU processes (DDP over gloo), "
                    "each with its own copy of the model, sharing the same cores", devices, devices)


def _is_optimising_sweep() -> bool:
    """A multirun whose sweeper reads run()'s return value (Optuna & co.; the basic grid sweeper ignores it)."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False
    return not str(HydraConfig.get().sweeper.get("_target_", "")).endswith("BasicSweeper")


def _sweep_problems(cfg: DictConfig) -> list[str]:
    if not cfg.get("optimized_metric") or not cfg.get("train", True) or cfg.get("test", True) \
            or not _is_optimising_sweep():
        return []
    return [f"'test' = false in a sweep: optimized_metric={cfg.optimized_metric} is measured by the test pass "
            "after training, so every trial would report the same zero-shot number; set test=true"]


# ----- resuming with other settings ------------------------------------------------------------------------------
def run_settings(cfg: DictConfig) -> dict[str, Any]:
    """The settings that decide which tensors a checkpoint holds and their shapes: `lora.*` and `model.*`."""
    settings = {}
    for group in ("lora", "model"):
        values = OmegaConf.to_container(cfg[group], resolve=True) if cfg.get(group) is not None else {}
        settings.update({f"{group}.{k}": v for k, v in values.items() if k not in HYDRA_KEYS | {"checkpoint"}})
    return settings


class StoreRunSettings(Callback):
    """Writes `run_settings(cfg)` into every Lightning checkpoint (read back by `check_checkpoint_settings`)."""

    def __init__(self, settings: dict[str, Any]):
        self.settings = settings

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[SETTINGS_KEY] = self.settings


def check_checkpoint_settings(ckpt_path: str | Path, settings: dict[str, Any]) -> None:
    """Refuse a checkpoint written with other lora.* / model.* settings, naming them.

    Raises:
        ConfigError: the checkpoint's settings differ from `settings` (the message lists each key with both values).
    """
    stored = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True).get(SETTINGS_KEY)
    if stored is None:
        return  # written before settings were stored: the module's key check still applies
    differ = [key for key in sorted(set(stored) | set(settings)) if stored.get(key) != settings.get(key)]
    if differ:
        lines = [f"{key}={stored.get(key)!r} (this run: {settings.get(key)!r})" for key in differ]
        raise ConfigError(f"ckpt_path={ckpt_path}: this checkpoint was trained with " + ", ".join(lines) +
                          "; use the checkpoint's settings (e.g. " +
                          " ".join(f"{k}={stored.get(k)}" for k in differ[:3]) + ") or start a new run")
