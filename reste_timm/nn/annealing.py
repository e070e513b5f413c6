"""The exponent-annealing hook of the paper (docs/method.md, section 4)."""

from __future__ import annotations

import math
from typing import Any, Dict

import torch.nn as nn

from .layers import set_exponent, set_progress

__all__ = ["ExponentAnnealing", "annealed_exponent"]


def _check_schedule(epochs: int, o_end: float) -> None:
    if isinstance(epochs, bool) or not float(epochs).is_integer() or epochs <= 0:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if not (math.isfinite(o_end) and o_end >= 1.0):
        raise ValueError(f"o_end must be a finite number >= 1, got {o_end!r}")


def annealed_exponent(epoch: float, epochs: int, o_end: float = 3.0) -> float:
    """``o(e) = 1 + (o_end - 1) * (1 - cos(pi/2 * e / E))`` at a (possibly fractional) epoch ``e``.

    Raises:
        ValueError: ``epochs`` is not a positive integer, ``o_end`` is not a finite number ``>= 1``,
            or ``epoch`` is outside ``[0, epochs]`` (beyond ``E`` the curve would fall back to 1).
    """
    _check_schedule(epochs, o_end)
    if not 0.0 <= epoch <= epochs:
        raise ValueError(f"epoch must be in [0, {epochs}], got {epoch!r}")
    return 1.0 + (o_end - 1.0) * (1.0 - math.cos(math.pi / 2.0 * epoch / epochs))


class ExponentAnnealing:
    """Anneals ``o`` from 1 to ``o_end`` on every binary layer of a model.

    The paper sets ``o`` once at the start of each epoch; ``per_step=True`` moves it every optimizer
    step along the same curve (``e = epoch + step / steps_per_epoch``). It also sets each layer's
    training progress ``e / E``, which drives EDE's schedule. The object holds its position so that
    ``accelerator.register_for_checkpointing`` saves it and a resumed run carries on with the same ``o``.

    Args:
        model: The model (wrapped or not) whose binary layers are driven.
        epochs: Total epochs ``E``.
        o_end: Final exponent (3 in the paper), ``>= 1``.
        steps_per_epoch: Optimizer steps per epoch, used when ``per_step``.
        per_step: Update every step rather than every epoch.
    """

    def __init__(self, model: nn.Module, epochs: int, o_end: float = 3.0,
                 steps_per_epoch: int = 1, per_step: bool = False):
        _check_schedule(epochs, o_end)
        if isinstance(steps_per_epoch, bool) or int(steps_per_epoch) != steps_per_epoch \
                or steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be a positive integer, got {steps_per_epoch!r}")
        self.model = model
        self.epochs = int(epochs)
        self.o_end = float(o_end)
        self.steps_per_epoch = int(steps_per_epoch)
        self.per_step = bool(per_step)
        self.position = 0.0  # fractional epoch of the last update
        self.exponent = 1.0

    def _apply(self, position: float) -> float:
        exponent = annealed_exponent(float(position), self.epochs, self.o_end)  # validates first
        self.position, self.exponent = float(position), exponent
        set_exponent(self.model, self.exponent)
        set_progress(self.model, self.position / self.epochs)
        return self.exponent

    def start_epoch(self, epoch: int) -> float:
        """Call at the start of every epoch (0-based); returns the exponent now in force."""
        return self._apply(epoch)

    def step(self, epoch: int, step_in_epoch: int) -> float:
        """Call after every optimizer step; moves ``o`` only when ``per_step``.

        The position within the epoch is capped at the epoch's end, so a loader with more steps than
        ``steps_per_epoch`` holds ``o`` there instead of running past the schedule.
        """
        if self.per_step:
            within = min((step_in_epoch + 1) / self.steps_per_epoch, 1.0)
            return self._apply(epoch + within)
        return self.exponent

    def state_dict(self) -> Dict[str, Any]:
        return {"epochs": self.epochs, "o_end": self.o_end, "steps_per_epoch": self.steps_per_epoch,
                "per_step": self.per_step, "position": self.position}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores the schedule and its position, and sets that ``o`` on the model's layers."""
        _check_schedule(state["epochs"], state["o_end"])
        annealed_exponent(float(state["position"]), state["epochs"], state["o_end"])
        self.epochs = int(state["epochs"])
        self.o_end = float(state["o_end"])
        self.steps_per_epoch = int(state["steps_per_epoch"])
        self.per_step = bool(state["per_step"])
        self._apply(float(state["position"]))
