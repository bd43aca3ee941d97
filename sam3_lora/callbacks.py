"""NaN/inf guard: optimiser steps with a non-finite loss or gradient are skipped, counted and logged; a run of
them stops training with an error; non-finite weights are never written.

How a step is skipped: `on_before_optimizer_step` runs inside `optimizer.step(closure)`, after the backward pass
(and after DDP's gradient all-reduce) and before the optimiser reads the gradients. Setting every gradient to
None there makes torch's optimisers (AdamW included) leave the parameters, their moments and their step counts
untouched. Lightning still counts the step: `global_step`, the LR schedule and `trainer.max_steps` advance, since
the batch was consumed.
"""

from __future__ import annotations

import logging
from typing import Iterable, Mapping

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

log = logging.getLogger(__name__)

# The model outputs sam3's Hungarian matcher reads (sam3/train/matcher.py:532-535 and 748-751).
MATCHED_OUTPUTS = ("pred_logits", "pred_boxes")


class NonFiniteTrainingError(RuntimeError):
    """Training produced non-finite losses or gradients too many steps in a row."""


class NonFiniteWeightsError(RuntimeError):
    """Refused to write weights that contain NaN or inf."""


def non_finite_names(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that contain a NaN or an inf."""
    floats = {name: t for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.is_floating_point()}
    if not floats:
        return []
    finite = torch.stack([torch.isfinite(t).all() for t in floats.values()]).tolist()  # one device sync
    return [name for name, ok in zip(floats, finite) if not ok]


def require_finite(tensors: Mapping[str, torch.Tensor], destination: str) -> None:
    """Raise before writing `tensors` to `destination` if any of them holds NaN or inf.

    Raises:
        NonFiniteWeightsError: names the tensors; the previous version at `destination` stays as it was.
    """
    bad = non_finite_names(tensors)
    if bad:
        raise NonFiniteWeightsError(
            f"refusing to write {destination}: {len(bad)} tensor(s) hold NaN/inf values ({', '.join(bad[:5])}"
            f"{', ...' if len(bad) > 5 else ''}); the previous {destination} is kept. Training diverged: lower "
            "module.lr / module.head_lr, keep trainer.gradient_clip_val, keep callbacks.nan_guard enabled, and "
            "resume from the last finite checkpoint")


class FiniteInputMatcher(nn.Module):
    """sam3's matcher, fed finite stand-ins for NaN/inf predictions.

    sam3 matches inside `Sam3Image.forward` (sam3/model/sam3_image.py:579), and scipy's `linear_sum_assignment`
    (sam3/train/matcher.py:19) raises "matrix contains invalid numeric entries" on a NaN cost: a NaN forward pass
    would crash before any loss exists. Matching carries no gradient and `nan_to_num` leaves finite values as
    they are, so finite outputs match exactly as before; non-finite ones still reach the loss, which is then
    non-finite, and the guard skips the step.
    """

    def __init__(self, matcher: nn.Module):
        super().__init__()
        self.matcher = matcher

    def forward(self, outputs: dict, targets, *args, **kwargs):
        finite = {k: torch.nan_to_num(outputs[k].detach(), nan=0.0, posinf=1e4, neginf=-1e4)
                  for k in MATCHED_OUTPUTS if k in outputs}
        return self.matcher({**outputs, **finite}, targets, *args, **kwargs)


class NanGuard(Callback):
    """Skip optimiser steps whose loss or gradients are not finite; stop after `max_consecutive` in a row.

    Under DDP the decision is taken jointly (any rank bad → every rank skips), so replicas never diverge. With a
    GradScaler (precision "16-mixed") overflowing gradients are the scaler's business (it skips and lowers the
    scale); the guard then watches the loss only.

    Args:
        max_consecutive: skipped steps in a row after which training stops with `NonFiniteTrainingError`.
    """

    def __init__(self, max_consecutive: int = 5):
        if not isinstance(max_consecutive, int) or max_consecutive < 1:
            raise ValueError(f"callbacks.nan_guard.max_consecutive must be an integer >= 1, got {max_consecutive!r}")
        self.max_consecutive = max_consecutive
        self.skipped_steps = 0
        self.consecutive = 0
        self._loss_finite: torch.Tensor | None = None  # over the micro-batches of the coming optimiser step
        self._batch_idx = -1

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after LightningModule.setup, which builds the loss: its matchers and the model's get finite inputs
        for owner in list(pl_module.modules()):
            for name in ("matcher", "o2m_matcher"):
                matcher = getattr(owner, name, None)
                if isinstance(matcher, nn.Module) and not isinstance(owner, FiniteInputMatcher) \
                        and not isinstance(matcher, FiniteInputMatcher):
                    setattr(owner, name, FiniteInputMatcher(matcher))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        loss_ok = True if self._loss_finite is None else bool(self._loss_finite)
        self._loss_finite = None
        watch_grads = getattr(trainer.precision_plugin, "scaler", None) is None
        bad_grads = _non_finite_gradients(pl_module) if watch_grads and params else []
        bad = trainer.strategy.reduce_boolean_decision(not loss_ok or bool(bad_grads), all=False)
        if bad:
            self._skip(trainer, pl_module, optimizer, loss_ok, bad_grads)
        else:
            self.consecutive = 0
        pl_module.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False,
                      batch_size=1)

    def _skip(self, trainer, pl_module, optimizer, loss_ok: bool, bad_grads: list[str]) -> None:
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                parameter.grad = None  # the optimiser skips parameters without a gradient
        self.skipped_steps += 1
        self.consecutive += 1
        why = _describe(trainer, pl_module, self._batch_idx, loss_ok, bad_grads)
        log.warning("optimiser step skipped (%d in a row, %d in total): %s", self.consecutive, self.skipped_steps,
                    why)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteTrainingError(
                f"training stopped: {self.consecutive} optimiser steps in a row had non-finite values, the last "
                f"at {why}. The weights were not updated by these steps; checkpoints hold the last finite weights. "
                "Lower module.lr / module.head_lr, keep trainer.gradient_clip_val, check the data with "
                "`sam3-lora check-data ROOT`, try trainer.precision=32-true, or raise "
                "callbacks.nan_guard.max_consecutive")

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))


def _non_finite_gradients(pl_module: L.LightningModule) -> list[str]:
    return non_finite_names({name: p.grad for name, p in pl_module.named_parameters() if p.grad is not None})


def _describe(trainer: L.Trainer, pl_module: L.LightningModule, batch_idx: int, loss_ok: bool,
              bad_grads: list[str]) -> str:
    """Where (global step, epoch, batch) and what (loss terms, gradients) was non-finite."""
    terms = getattr(pl_module, "last_loss_terms", None) or {}
    shown = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items()) or "loss terms unavailable"
    if not loss_ok:
        what = f"non-finite loss [{shown}]"
    elif bad_grads:
        what = f"finite loss [{shown}] but non-finite gradients in {_first(bad_grads)}"
    else:
        what = f"another DDP rank had a non-finite loss or gradient (this rank: [{shown}])"
    return f"global step {trainer.global_step} (epoch {trainer.current_epoch}, batch {batch_idx}): {what}"


def _first(names: Iterable[str], shown: int = 3) -> str:
    names = list(names)
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
