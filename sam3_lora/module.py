"""Sam3LoraModule: SAM3's own losses, AdamW parameter groups, schedule, COCO validation/test."""

from __future__ import annotations

import functools
import logging

import lightning as L
import torch
from torch import nn

from sam3_lora.callbacks import require_finite
from sam3_lora.evaluation import CocoEvaluator, load_ground_truth
from sam3_lora.evaluation.box_only import has_box_only, segm_ground_truth
from sam3_lora.evaluation.prompt_types import PromptTypeEvaluator
from sam3_lora.lora import base_sam3, is_lora_parameter
from sam3_lora.losses import build_sam3_loss
from sam3_lora.memory import base_name, frozen_low_precision
from sam3_lora.model import count_parameters
from sam3_lora.schedules import build_scheduler

log = logging.getLogger(__name__)

# Loss terms logged per step (sam3 also returns aux/o2m variants and accuracies, summed into core_loss).
LOGGED_TERMS = ("core_loss", "loss_ce", "presence_loss", "loss_bbox", "loss_giou", "loss_mask", "loss_dice")
# Parameters of these modules (and every bias / 1-d tensor) get no weight decay.
_NO_DECAY_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.Embedding)


class Sam3LoraModule(L.LightningModule):
    """Train a (LoRA-adapted) SAM3 with sam3's matchers and losses; evaluate with COCO mAP.

    Args:
        model: a ready SAM3 (`apply_lora` output): only its trainable parameters are optimised and saved.
        categories: category id → prompt text, in query order (`CocoDataModule.category_names`).
        ground_truth_files: "valid" and "test" → the final ground-truth json that split is scored against
            (`CocoDataModule.annotation_file`).
        data_has_masks: whether batches carry instance masks (`CocoDataModule.with_masks`), for with_masks="auto".
        lr: learning rate of LoRA tensors.
        head_lr: learning rate of fully trained modules (`lora.modules_to_save`); default `lr`.
        weight_decay: AdamW decay; never applied to biases, norms and embeddings.
        schedule: "cosine", "inverse_sqrt" or "constant" after `warmup_steps` (optimiser steps).
        warmup_steps, cooldown_steps, min_lr_ratio, timescale: schedule shape (timescale: inverse_sqrt only).
        with_masks: mask losses and segm evaluation: True, False or "auto" (model has a mask head and
            the data has masks).
        eval_topk: detections kept per (image, category) for COCO evaluation.
        log_images_every_n_epochs: TensorBoard validation panel frequency (0 = never).
        mask_loss_points: mask losses on this many sampled points per mask (sam3's point-sampled `Masks`)
            instead of full-resolution masks; None = full resolution.
        component_lr: learning rates of fully trained parameters by component, {"vision": ..., "text": ...}
            (Meta's full fine-tune: vision 2.5e-5, text 5e-6); other fully trained parameters use `head_lr`.
            LoRA tensors always use `lr`.
        vision_layer_decay: layer-wise decay of the vision lr for fully trained ViT parameters (Meta: 0.9):
            block i of d gets lr * decay ** (d - i), the patch embedding decay ** (d + 1) (sam3's
            `layer_decay_param_modifier` rule); None = no decay.
    """

    def __init__(self, model: nn.Module, categories: dict[int, str], ground_truth_files: dict[str, str],
                 data_has_masks: bool, lr: float = 2e-4, head_lr: float | None = None,
                 weight_decay: float = 0.1, schedule: str = "cosine", warmup_steps: int = 20,
                 cooldown_steps: int = 0, min_lr_ratio: float = 0.0, timescale: int = 20,
                 with_masks: bool | str = "auto",
                 eval_topk: int = 100, log_images_every_n_epochs: int = 1, mask_loss_points: int | None = None,
                 component_lr: dict[str, float] | None = None, vision_layer_decay: float | None = None):
        super().__init__()
        # the data inputs describe this run's files, not settings: kept out of the checkpoint's hyper-parameters
        self.save_hyperparameters(ignore=["model", "categories", "ground_truth_files", "data_has_masks"])
        self.model = model
        self.category_names = dict(categories)
        self.ground_truth_files = dict(ground_truth_files)
        self.data_has_masks = data_has_masks
        self.strict_loading = False  # checkpoints hold trainable weights only
        self.loss_fn: nn.Module | None = None
        self.evaluators: dict[str, list[CocoEvaluator]] = {}
        self.last_loss_terms: dict[str, torch.Tensor] = {}  # of the latest training step (NaN guard reports them)

    # ----- setup ------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        masks = self._masks_enabled()
        normalization = "global" if self.trainer.world_size > 1 else "local"
        self.loss_fn = build_sam3_loss(with_masks=masks, normalization=normalization,
                                       mask_points=self.hparams.mask_loss_points)
        _check_precision(self.model, self.trainer.precision)
        for split in ("valid", "test"):
            self.evaluators[split] = self._evaluators(load_ground_truth(self.ground_truth_files[split]), masks)
        trainable, total = count_parameters(self.model)
        log.info("masks: %s, loss normalization: %s, trainable %d / %d parameters", masks, normalization,
                 trainable, total)
        self._parameter_counts = {"params/trainable": float(trainable), "params/total": float(total)}

    def _evaluators(self, ground_truth, masks: bool) -> list[PromptTypeEvaluator]:
        """Text queries score the run's keys; box-exemplar queries get `@box`-style keys (prompt_types.py)."""
        return [PromptTypeEvaluator(functools.partial(self._coco_evaluators, ground_truth, masks))]

    def _coco_evaluators(self, ground_truth, masks: bool) -> list[CocoEvaluator]:
        """bbox and segm evaluation; segm treats box-only objects as ignore regions (see box_only.py)."""
        settings = {"category_names": self.category_names, "topk": self.hparams.eval_topk}
        if not masks:
            return [CocoEvaluator(ground_truth, iou_types=("bbox",), **settings)]
        if not has_box_only(ground_truth):
            return [CocoEvaluator(ground_truth, iou_types=("bbox", "segm"), **settings)]
        return [CocoEvaluator(ground_truth, iou_types=("bbox",), **settings),
                CocoEvaluator(segm_ground_truth(ground_truth), iou_types=("segm",), **settings)]

    def _masks_enabled(self) -> bool:
        has_head = base_sam3(self.model).segmentation_head is not None
        setting = self.hparams.with_masks
        if setting == "auto":
            return has_head and self.data_has_masks
        if setting and not has_head:
            raise ValueError("module.with_masks=true but the model has no mask head (model.segmentation=false)")
        return bool(setting)

    # ----- training ---------------------------------------------------------------------------------------
    def forward(self, batch):
        return self.model(batch)

    def _losses(self, batch) -> dict[str, torch.Tensor]:
        outputs = self.model(batch)
        sam3 = base_sam3(self.model)
        targets = [sam3.back_convert(t) for t in batch.find_targets]
        return self.loss_fn(outputs, targets)

    def training_step(self, batch, batch_idx):
        losses = self._losses(batch)
        self.last_loss_terms = {k: v.detach() for k, v in losses.items() if k in LOGGED_TERMS}
        self._log_terms("train", losses, batch_size=len(batch.img_batch))
        return losses["core_loss"]

    def on_train_start(self) -> None:
        self.log_dict(self._parameter_counts, rank_zero_only=True)

    def _log_terms(self, stage: str, losses: dict, batch_size: int) -> None:
        terms = {f"{stage}/{k}": v.detach() for k, v in losses.items() if k in LOGGED_TERMS}
        on_step = stage == "train"
        self.log_dict(terms, on_step=on_step, on_epoch=not on_step, batch_size=batch_size, sync_dist=not on_step,
                      prog_bar=False)
        self.log(f"{stage}/loss", losses["core_loss"].detach(), on_step=on_step, on_epoch=not on_step,
                 prog_bar=True, batch_size=batch_size, sync_dist=not on_step)

    # ----- evaluation -------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._start_evaluation("valid")

    def on_test_epoch_start(self) -> None:
        self._start_evaluation("test")

    def _start_evaluation(self, split: str) -> None:
        for evaluator in self.evaluators.get(split, []):
            evaluator.reset()

    def validation_step(self, batch, batch_idx):
        self._evaluation_step("valid", "val", batch, batch_idx)

    def test_step(self, batch, batch_idx):
        self._evaluation_step("test", "test", batch, batch_idx)

    def _evaluation_step(self, split: str, stage: str, batch, batch_idx: int) -> None:
        with torch.no_grad():
            outputs = self.model(batch)
        for evaluator in self.evaluators[split]:
            evaluator.update(outputs, batch)
        if stage == "val" and batch_idx == 0:
            self._log_panel(batch, outputs)

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("valid", "val")

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test", "test")

    def _finish_evaluation(self, split: str, stage: str) -> None:
        metrics = {k: v for evaluator in self.evaluators[split] for k, v in evaluator.compute().items()}
        primary = metrics.get("segm_mAP", metrics.get("bbox_mAP", -1.0))
        logged = {f"{stage}/{k}": float(v) for k, v in metrics.items()}
        logged[f"{stage}/mAP"] = float(primary)  # the checkpoint criterion: segm when masks, else bbox
        self.log_dict(logged, sync_dist=False, rank_zero_only=False)

    def _log_panel(self, batch, outputs) -> None:
        every = self.hparams.log_images_every_n_epochs
        writer = _tensorboard_writer(self)
        if not every or writer is None or self.trainer.sanity_checking or self.current_epoch % every:
            return
        from sam3_lora.visualize import validation_panel

        panel = validation_panel(batch, outputs, self.category_names)
        writer.add_image("val/predictions", panel, self.global_step, dataformats="HWC")

    # ----- optimisation -----------------------------------------------------------------------------------
    def configure_optimizers(self):
        groups = parameter_groups(self.model, self.hparams.lr, self.hparams.head_lr or self.hparams.lr,
                                  self.hparams.weight_decay, self.hparams.component_lr,
                                  self.hparams.vision_layer_decay)
        optimizer = torch.optim.AdamW(groups)
        scheduler = build_scheduler(optimizer, self.hparams.schedule, self.hparams.warmup_steps,
                                    int(self.trainer.estimated_stepping_batches), self.hparams.cooldown_steps,
                                    self.hparams.min_lr_ratio, self.hparams.timescale)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----- checkpoints: trainable weights only --------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        require_finite(checkpoint["state_dict"], "checkpoint (last.ckpt / best.ckpt)")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        expected = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        stored = set(checkpoint["state_dict"])
        if stored != expected:
            raise RuntimeError(
                "checkpoint does not fit this model's trainable parameters "
                f"(missing {sorted(expected - stored)[:5]}, unexpected {sorted(stored - expected)[:5]}): "
                "use the same model.* and lora.* settings as the run that wrote it")


def _no_decay_ids(model: nn.Module) -> set[int]:
    """ids of parameters owned by norm and embedding modules, and of every bias / 1-d tensor."""
    ids = {id(p) for m in model.modules() if isinstance(m, _NO_DECAY_MODULES) for p in m.parameters(recurse=False)}
    return ids | {id(p) for p in model.parameters() if p.ndim <= 1}


def parameter_groups(model: nn.Module, lr: float, head_lr: float, weight_decay: float,
                     component_lr: dict[str, float] | None = None,
                     vision_layer_decay: float | None = None) -> list[dict]:
    """AdamW groups: LoRA tensors / fully trained parameters by component (and ViT layer), with and without decay.

    Args:
        model: the (LoRA-adapted) SAM3; only parameters that require grad are grouped.
        lr: learning rate of LoRA tensors.
        head_lr: learning rate of fully trained parameters outside `component_lr`'s components.
        weight_decay: AdamW decay (0 for biases, norms, embeddings).
        component_lr: {"vision": lr, "text": lr} for fully trained vision / language backbone parameters.
        vision_layer_decay: per-ViT-layer decay of the vision lr (see `Sam3LoraModule`).

    Raises:
        ValueError: an unknown component name in `component_lr`.
    """
    component_lr = dict(component_lr or {})
    unknown = set(component_lr) - set(_LR_COMPONENTS)
    if unknown:
        raise ValueError(f"module.component_lr has unknown components {sorted(unknown)}; "
                         f"known: {sorted(_LR_COMPONENTS)} (everything else uses module.head_lr)")
    no_decay = _no_decay_ids(model)
    layer_scale = _vision_layer_scale(model, vision_layer_decay)
    buckets: dict[tuple[str, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        kind, group_lr = _kind_and_lr(name, lr, head_lr, component_lr, layer_scale)
        decay = id(parameter) not in no_decay
        bucket = buckets.setdefault((kind, decay), {"params": [], "lr": group_lr})
        bucket["params"].append(parameter)
    return [{"params": b["params"], "lr": b["lr"], "weight_decay": weight_decay if decay else 0.0,
             "name": f"{kind}{'' if decay else '_no_decay'}"} for (kind, decay), b in sorted(buckets.items())]


# Fully trained parameters by component (names without PEFT's wrappers), for module.component_lr.
_LR_COMPONENTS = {"vision": "backbone.vision_backbone.", "text": "backbone.language_backbone."}
_VISION_TRUNK = "backbone.vision_backbone.trunk."


def _kind_and_lr(name: str, lr: float, head_lr: float, component_lr: dict, layer_scale) -> tuple[str, float]:
    if is_lora_parameter(name):
        return "lora", lr
    plain = base_name(name)
    component = next((c for c, prefix in _LR_COMPONENTS.items() if plain.startswith(prefix)), None)
    if component not in component_lr:
        return "head", head_lr
    if component == "vision" and layer_scale is not None and plain.startswith(_VISION_TRUNK):
        layer, scale = layer_scale(plain[len(_VISION_TRUNK):])
        return f"vision_layer{layer:02d}", component_lr["vision"] * scale
    return component, component_lr[component]


def _vision_layer_scale(model: nn.Module, decay: float | None):
    """name-in-trunk -> (layer id, lr scale) by sam3's ViT `get_layer_id` and `layer_decay_param_modifier` rule."""
    if decay is None:
        return None
    trunk = base_sam3(model).backbone.vision_backbone.trunk
    num_layers = trunk.get_num_layers() + 1

    def scale(name_in_trunk: str) -> tuple[int, float]:
        layer = trunk.get_layer_id(name_in_trunk)  # 0 stem, i + 1 block i, num_layers the rest (scale 1)
        return layer, decay ** (num_layers - layer)

    return scale


def _check_precision(model: nn.Module, precision: str) -> None:
    """A frozen base stored in bf16/fp16 (lora.frozen_dtype) only runs under autocast."""
    if frozen_low_precision(model) and "mixed" not in str(precision):
        raise ValueError(f"the frozen base is stored in low precision (lora.frozen_dtype) but trainer.precision="
                         f"{precision}: set trainer.precision=bf16-mixed (autocast), or lora.frozen_dtype=float32")


def _tensorboard_writer(module: L.LightningModule):
    for logger in module.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            return experiment
    return None
