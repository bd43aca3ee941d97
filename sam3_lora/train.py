"""run(cfg): instantiate → (zero-shot test) → fit → test with the best checkpoint → metrics.json."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from sam3_lora.adapter import export_stock_checkpoint, save_adapter
from sam3_lora.callbacks import NanGuard, require_finite
from sam3_lora.checkpoint_io import atomic_path
from sam3_lora.config_checks import StoreRunSettings, check_checkpoint_settings, check_config, run_settings
from sam3_lora.lora import has_adapters

log = logging.getLogger(__name__)


def model_config_of(cfg: DictConfig) -> dict:
    """The `build_sam3` kwargs of `cfg.model`: stored with adapters and exports so they rebuild alone."""
    model_config = OmegaConf.to_container(cfg.model, resolve=True)
    model_config.pop("_target_", None)
    return model_config


def build_model(cfg: DictConfig):
    """Base SAM3 from `cfg.model`, then LoRA from `cfg.lora`."""
    return instantiate(cfg.lora, model=instantiate(cfg.model), _convert_="all")


def build_module(cfg: DictConfig, datamodule):
    """`cfg.module` around the built model, given what evaluation needs from the set-up datamodule."""
    # without a test split, "test" is scored on valid, as the datamodule's test loader serves valid
    ground_truth = {split: str(datamodule.annotation_file(split)) for split in ("valid", "test")}
    # plain containers: hyper-parameters land in checkpoints, which load with torch.load(weights_only=True)
    return instantiate(cfg.module, model=build_model(cfg), categories=datamodule.category_names,
                       ground_truth_files=ground_truth, data_has_masks=datamodule.with_masks, _convert_="all")


def build_trainer(cfg: DictConfig, output_dir: Path) -> L.Trainer:
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks.append(StoreRunSettings(run_settings(cfg)))  # a resume with other lora.*/model.* names them
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                       default_root_dir=str(output_dir))


def set_num_threads(num_threads: int | None) -> None:
    """Set torch's CPU threads for this process (`num_threads` key); None keeps torch's default.

    On 2 cores a second OpenMP thread stalls whenever the other core is busy (a DataLoader worker, another
    program): the demo's training step measured 0.26 s with 1 thread and 8-13 s with 2 while one other
    process ran. The demo therefore trains on 1 thread and loads data on the other core.
    """
    if num_threads is None:
        return
    if num_threads < 1:
        raise ValueError(f"num_threads={num_threads}: give a positive thread count, or null for torch's default")
    torch.set_num_threads(num_threads)
    log.info("torch CPU threads: %d", num_threads)


def run(cfg: DictConfig) -> float | None:
    """Train and/or evaluate as configured; return `cfg.optimized_metric` (for sweeps) or None.

    Writes `metrics.json` (zero-shot and fine-tuned test metrics), `adapter/` (best adapter) and a
    per-class AP chart into `cfg.output_dir`.
    """
    output_dir = Path(cfg.output_dir)
    check_config(cfg)
    set_num_threads(cfg.get("num_threads"))
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")  # validate the data before the (possibly multi-GB) model is built
    if cfg.ckpt_path:
        check_checkpoint_settings(cfg.ckpt_path, run_settings(cfg))
    module = build_module(cfg, datamodule)
    trainer = build_trainer(cfg, output_dir)
    metrics: dict[str, dict] = {}
    resuming = cfg.train and cfg.ckpt_path
    retention = _Retention(cfg, trainer, datamodule)
    if (cfg.validate_before_fit and not resuming) or not cfg.train:
        metrics["zero_shot"] = _test(trainer, module, datamodule, ckpt_path=None if cfg.train else cfg.ckpt_path)
        retention.measure("zero_shot", module.model)
    if cfg.train:
        metrics.update(_fit_test_export(cfg, trainer, module, datamodule, output_dir))
        retention.measure("fine_tuned", module.model)  # the best weights: test or export loaded them
    if not cfg.train and cfg.ckpt_path:
        metrics = {"fine_tuned": metrics.pop("zero_shot")}
        retention.results = {"fine_tuned": retention.results.pop("zero_shot", {})}
    if retention.results:
        metrics["retention"] = retention.results
    _write_metrics(metrics, output_dir)
    return _optimized_value(metrics, cfg.get("optimized_metric"), trained=bool(cfg.train))


class _Retention:
    """What the model keeps (evaluation/retention.py), measured on rank zero before and after fine-tuning.

    `retention.negatives` turns the negative-prompt rates on, `retention.fp_threshold` sets their threshold and
    `retention.data` (overrides of `data`; root null = off) names the source-domain dataset.
    """

    def __init__(self, cfg: DictConfig, trainer: L.Trainer, datamodule):
        settings = cfg.get("retention")
        self.enabled = settings is not None and trainer.is_global_zero
        self.results: dict[str, dict] = {}
        if not self.enabled:
            return
        from sam3_lora.evaluation.retention import build_source_datamodule

        self.negatives, self.fp_threshold = bool(settings.negatives), float(settings.fp_threshold)
        self.datamodule = datamodule
        self.source = build_source_datamodule(cfg.data, settings.get("data"))

    def measure(self, stage: str, model) -> None:
        """Store `stage`'s retention numbers ("zero_shot" or "fine_tuned") of `model`."""
        if not self.enabled or not (self.negatives or self.source is not None):
            return
        from sam3_lora.evaluation.retention import measure_retention

        self.results[stage] = measure_retention(model, self.datamodule if self.negatives else None, self.source,
                                                self.fp_threshold)


def _fit_test_export(cfg: DictConfig, trainer: L.Trainer, module, datamodule, output_dir: Path) -> dict:
    """Fit, test the best checkpoint, and export the best weights (adapter, optionally a stock checkpoint)."""
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    best = _best_checkpoint(trainer)
    metrics = {"training": _training_counts(trainer, datamodule)}
    if cfg.test:
        metrics["fine_tuned"] = _test(trainer, module, datamodule, ckpt_path=best)  # also loads `best`
    elif best:
        load_trainable_weights(module, best)
    _export_adapter(module, output_dir, model_config_of(cfg))
    if cfg.get("export_stock_checkpoint"):
        _export_stock(module, cfg.export_stock_checkpoint, model_config_of(cfg))
    return metrics


def _test(trainer: L.Trainer, module, datamodule, ckpt_path) -> dict:
    results = trainer.test(module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False, weights_only=True)
    return {k: float(v) for k, v in (results[0] if results else {}).items()}


def _training_counts(trainer: L.Trainer, datamodule) -> dict[str, int]:
    """What training skipped: corrupt images (summed over ranks) and optimiser steps (NaN guard)."""
    count = torch.tensor(float(datamodule.skipped_train_images), device=trainer.strategy.root_device)
    images = int(trainer.strategy.reduce(count, reduce_op="sum").item())
    guards = [c for c in trainer.callbacks if isinstance(c, NanGuard)]
    return {"skipped_images": images, "skipped_steps": guards[0].skipped_steps if guards else 0}


def load_trainable_weights(module, path: str | Path) -> None:
    """Load a Lightning checkpoint's trainable weights (all it holds) into `module`, pickle-free and checked.

    Raises:
        RuntimeError: the checkpoint lacks some of the module's trainable weights or holds unknown ones.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    result = module.load_state_dict(state, strict=False)  # frozen base weights are not in checkpoints
    missing = sorted(f"model.{n}" for n in _trainable(module) if f"model.{n}" in set(result.missing_keys))
    if missing or result.unexpected_keys:
        raise RuntimeError(f"{path} does not fit this model: missing trainable {missing[:5]}, unexpected "
                           f"{sorted(result.unexpected_keys)[:5]}; use the lora.*/model.* settings it was written with")


def _trainable(module) -> dict:
    return {name: p for name, p in module.model.named_parameters() if p.requires_grad}


def _best_checkpoint(trainer: L.Trainer) -> str | None:
    callback = trainer.checkpoint_callback
    best = getattr(callback, "best_model_path", "") if callback else ""
    return best or None


@rank_zero_only
def _export_adapter(module, output_dir: Path, model_config: dict) -> None:
    if not has_adapters(module.model):
        log.warning("lora.targets is empty: no adapter/ written; the trained modules are in checkpoints/best.ckpt "
                    "(set export_stock_checkpoint=PATH for a stock SAM3 checkpoint)")
        return
    require_finite(_trainable(module), str(output_dir / "adapter"))
    save_adapter(module.model, output_dir / "adapter", model_config)
    log.info("adapter written to %s", output_dir / "adapter")


@rank_zero_only
def _export_stock(module, path: str, model_config: dict) -> None:
    require_finite(_trainable(module), path)
    export_stock_checkpoint(module.model, model_config, path)  # the same path as `sam3-lora export`
    log.info("stock SAM3 checkpoint written to %s", path)


@rank_zero_only
def _write_metrics(metrics: dict, output_dir: Path) -> None:
    from sam3_lora.evaluation import format_comparison
    from sam3_lora.visualize import per_class_chart

    output_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(output_dir / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    zero_shot, fine_tuned = metrics.get("zero_shot", {}), metrics.get("fine_tuned", {})
    if zero_shot and fine_tuned:
        per_class_chart(zero_shot, fine_tuned, output_dir / "per_class_ap.png")
    summary = format_comparison(zero_shot, fine_tuned)
    log.info("test metrics (zero-shot vs fine-tuned):\n%s", summary)
    if metrics.get("retention"):
        from sam3_lora.evaluation.retention import format_retention

        retention = metrics["retention"]
        log.info("retention (what the base model keeps):\n%s",
                 format_retention(retention.get("zero_shot", {}), retention.get("fine_tuned", {})))


def _optimized_value(metrics: dict, name: str | None, trained: bool) -> float | None:
    # after training only the fine-tuned test counts: the zero-shot number is the same for every sweep trial
    source = metrics.get("fine_tuned") or ({} if trained else metrics.get("zero_shot")) or {}
    if not name or not source:
        return None
    if name not in source:
        raise KeyError(f"optimized_metric={name!r} is not among the test metrics {sorted(source)[:12]}")
    return source[name]
