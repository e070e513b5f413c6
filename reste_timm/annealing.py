"""The exponent-annealing hook of the paper (RESTE_SPEC.md, section 4)."""

from __future__ import annotations

import math
from typing import Any, Dict

import torch.nn as nn

from .layers import set_exponent, set_progress

__all__ = ["ExponentAnnealing", "annealed_exponent"]


def annealed_exponent(epoch: float, epochs: int, o_end: float = 3.0) -> float:
    """``o(e) = 1 + (o_end - 1) * (1 - cos(pi/2 * e / E))`` at a (possibly fractional) epoch ``e``."""
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
        if epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {epochs}")
        if not o_end >= 1.0:
            raise ValueError(f"o_end must be >= 1, got {o_end}")
        self.model = model
        self.epochs = int(epochs)
        self.o_end = float(o_end)
        self.steps_per_epoch = max(int(steps_per_epoch), 1)
        self.per_step = bool(per_step)
        self.position = 0.0  # fractional epoch of the last update
        self.exponent = 1.0

    def _apply(self, position: float) -> float:
        self.position = float(position)
        self.exponent = annealed_exponent(self.position, self.epochs, self.o_end)
        set_exponent(self.model, self.exponent)
        set_progress(self.model, self.position / self.epochs)
        return self.exponent

    def start_epoch(self, epoch: int) -> float:
        """Call at the start of every epoch (0-based); returns the exponent now in force."""
        return self._apply(epoch)

    def step(self, epoch: int, step_in_epoch: int) -> float:
        """Call after every optimizer step; moves ``o`` only when ``per_step``."""
        if self.per_step:
            return self._apply(epoch + (step_in_epoch + 1) / self.steps_per_epoch)
        return self.exponent

    def state_dict(self) -> Dict[str, Any]:
        return {"epochs": self.epochs, "o_end": self.o_end, "steps_per_epoch": self.steps_per_epoch,
                "per_step": self.per_step, "position": self.position}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.epochs = int(state["epochs"])
        self.o_end = float(state["o_end"])
        self.steps_per_epoch = int(state["steps_per_epoch"])
        self.per_step = bool(state["per_step"])
        self._apply(float(state["position"]))
