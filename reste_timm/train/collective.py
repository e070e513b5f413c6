"""One number agreed on by every process of a run."""

from __future__ import annotations

import torch

__all__ = ["agree"]


def agree(accelerator, value: float, reduction: str) -> float:
    """``value`` reduced over the processes (``"sum"`` or ``"max"``); with one process, ``value`` itself.

    With several processes this is one all-reduce: every process must call it at the same point, and
    none waits for a process that has already given up.
    """
    if accelerator.num_processes == 1:
        return float(value)
    tensor = torch.tensor([float(value)], device=accelerator.device)
    return accelerator.reduce(tensor, reduction=reduction).item()
