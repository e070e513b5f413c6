"""The training loop's pieces: model, optimiser, schedule, the epoch loops and evaluation.

The script only wires these together (the accelerate examples' style); everything here takes its
settings as arguments, nothing reads a global.
"""

from __future__ import annotations

import math
import time
from typing import Any, Dict, Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import accuracy

from ..hub.check import check_pretrained
from ..nn.annealing import ExponentAnnealing
from ..nn.indicators import estimating_error, gradient_stability

__all__ = ["NonFiniteLossError", "TrainState", "build_model", "build_optimizer", "build_lr_scheduler",
           "lr_factor", "train_one_epoch", "evaluate", "is_reste_model"]

_OUR_MODULES = ("reste_resnet", "reste_cifar_resnet", "reste_vgg")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the message names the epoch and step."""


def is_reste_model(name: str) -> bool:
    """True for models registered by this package (they take ``estimator`` and ``binarize_input``)."""
    return any(name in timm.list_models(module=m) for m in _OUR_MODULES)


def build_model(model: str, num_classes: int, estimator: str = "reste", init: Optional[str] = None,
                **kwargs) -> nn.Module:
    """Creates the model, or loads ``init`` (name, ``hf-hub:`` or ``local-dir:``) with a new head.

    timm drops and re-initialises the classifier when ``num_classes`` differs from the checkpoint's.
    The ``init`` weights are checked first (:func:`reste_timm.hub.check_pretrained`): safetensors only,
    every key and shape, so a bad file is named instead of half-loaded or unpickled.

    Raises:
        CheckpointError: The ``init`` weights are missing, pickled, corrupt or do not match.
    """
    name = init or model
    plain = name.split(":", 1)[-1] if not name.startswith(("hf-hub:", "local-dir:")) else None
    if plain is None or is_reste_model(plain):
        kwargs["estimator"] = estimator
    if init is not None:
        check_pretrained(name, num_classes=num_classes, **kwargs)
    return timm.create_model(name, pretrained=init is not None, num_classes=num_classes, **kwargs)


def build_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float):
    """SGD on all parameters, as the paper (weight decay everywhere, BN included)."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def lr_factor(epoch: int, epochs: int, warmup_epochs: int = 0) -> float:
    """Linear warm-up ``(e+1)/W`` for ``e < W``, then cosine to 0 over the remaining epochs."""
    if epoch < warmup_epochs:
        return (epoch + 1) / warmup_epochs
    span = max(epochs - warmup_epochs, 1)
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / span))


def build_lr_scheduler(optimizer, epochs: int, warmup_epochs: int = 0):
    """A per-epoch LambdaLR (stepped once at the end of each epoch, not per process)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, epochs, warmup_epochs))


class TrainState:
    """Where the run is, checkpointed with the rest so that ``--resume`` is exact."""

    def __init__(self):
        self.epoch = 0  # next epoch to run
        self.step_in_epoch = 0  # batches of ``epoch`` already done (mid-epoch checkpoints)
        self.global_step = 0
        self.best_top1 = -1.0
        self.best_epoch = -1
        self.skipped_nonfinite = 0
        self.skipped_images = 0
        self.est_error_sum = 0.0
        self.stability_sum = 0.0
        self.ind_epochs = 0

    def state_dict(self) -> Dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def _step_batch(batch, accelerator, channels_last: bool):
    x, y = batch["pixel_values"], batch["label"]
    x, y = x.to(accelerator.device, non_blocking=True), y.to(accelerator.device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def _check_finite(loss, accelerator, where: str, skip: bool) -> bool:
    """True when every process's loss is finite; raises (or tells to skip) otherwise.

    Checked before ``backward``: a bad batch never reaches the weights, the optimizer state or a
    checkpoint, so the last checkpoint on disk is the last good one.
    """
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")  # all ranks decide together: no hang
    if bad.item() == 0:
        return True
    if not skip:
        value = loss.item()  # this process's: with several, it may be another's that is bad
        what = "non-finite loss" + ("" if math.isfinite(value) else f" ({value})")
        procs = f" on {int(bad.item())} of {accelerator.num_processes} processes" \
            if accelerator.num_processes > 1 else ""
        raise NonFiniteLossError(f"{what} at {where}{procs}; --skip-nonfinite skips such batches")
    return False


@torch.no_grad()
def _restore(tensors, copies) -> None:
    for tensor, copy in zip(tensors, copies, strict=True):
        tensor.copy_(copy)


def train_one_epoch(model, loader, optimizer, accelerator, annealing: ExponentAnnealing, state: TrainState,
                    *, channels_last=False, skip_nonfinite=False, cal_ind=False, o_end=3.0,
                    max_steps=0, on_step=None, progress=None) -> Dict[str, float]:
    """One pass over ``loader``; returns the epoch's train loss, top-1, throughput and indicators."""
    model.train()
    loss_sum = torch.zeros((), device=accelerator.device)
    correct = torch.zeros((), device=accelerator.device)
    seen, indicators, start = 0, {}, time.perf_counter()
    for i, batch in enumerate(loader, start=state.step_in_epoch):
        if max_steps and i >= max_steps:  # checked first: a run resumed at the cap takes no extra step
            break
        state.skipped_images += int(batch["skipped"].sum())
        x, y = _step_batch(batch, accelerator, channels_last)
        # The forward pass updates BatchNorm's running statistics before the loss can be checked.
        saved = [b.detach().clone() for b in model.buffers()] if skip_nonfinite else None
        with accelerator.accumulate(model):
            out = model(x)
            loss = F.cross_entropy(out, y)
            if not _check_finite(loss, accelerator, f"epoch {state.epoch} step {i}", skip_nonfinite):
                _restore(model.buffers(), saved)  # else the skipped batch's NaN stays in running_mean
                state.skipped_nonfinite += 1
                state.step_in_epoch = i + 1  # the batch is consumed: a resume must not see it again
                optimizer.zero_grad(set_to_none=True)
                continue
            accelerator.backward(loss)
            if cal_ind and accelerator.sync_gradients:
                indicators["gradient_stability"] = gradient_stability(model)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach() * y.shape[0]
        correct += (out.detach().argmax(1) == y).sum()
        seen += y.shape[0]
        state.step_in_epoch, state.global_step = i + 1, state.global_step + 1
        annealing.step(state.epoch, i)
        if progress is not None:
            progress.update(1)
        if on_step is not None:
            on_step()
    elapsed = time.perf_counter() - start
    totals = accelerator.reduce(torch.stack([loss_sum, correct, torch.tensor(float(seen),
                                                                             device=loss_sum.device)]), "sum")
    n = max(totals[2].item(), 1.0)
    result = {"train_loss": totals[0].item() / n, "train_top1": 100.0 * totals[1].item() / n,
              "img_per_s": totals[2].item() / max(elapsed, 1e-9)}
    if cal_ind:
        result["estimating_error"] = estimating_error(model, o_end)
        result["gradient_stability"] = indicators.get("gradient_stability")
    return result


@torch.no_grad()
def evaluate(model, loader, accelerator, channels_last: bool = False) -> Dict[str, float]:
    """Loss, top-1 and top-5 (percent); each sample counted once on any number of processes."""
    model.eval()
    logits, labels = [], []
    for batch in loader:
        x, y = _step_batch(batch, accelerator, channels_last)
        out, y = accelerator.gather_for_metrics((model(x), y))
        logits.append(out.float())
        labels.append(y)
    out, y = torch.cat(logits), torch.cat(labels)
    top1, top5 = accuracy(out, y, topk=(1, min(5, out.shape[1])))
    return {"val_loss": F.cross_entropy(out, y).item(), "val_top1": top1.item(), "val_top5": top5.item(),
            "val_count": int(y.shape[0])}


