"""Preemption: SIGTERM or SIGUSR1 ends a run at the next optimizer step, with a checkpoint (exit 75).

A cluster that reclaims a job sends SIGTERM, some seconds before SIGKILL; SLURM can also send
SIGUSR1 ahead of a job's time limit (``--signal=USR1@120``). :class:`PreemptionWatch`, entered by
``reste-timm train``'s ``main`` and left on every exit, installs handlers that only record the
signal; the training loop asks :meth:`PreemptionWatch.agreed` after each optimizer step and after
each epoch's checkpoint, saves a step checkpoint and stops with :class:`Preempted`. A second signal
while that checkpoint is written is recorded again and nothing more: the write is never cut short.

With several processes :meth:`~PreemptionWatch.agreed` is one all-reduce (max), so every rank stops
after the same step even when only one of them was signalled. DataLoader workers ignore both signals
(:func:`ignore_preemption_signals`): a worker killed by SIGTERM would fail the step being finished.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Optional

from .collective import agree

__all__ = ["EXIT_PREEMPTED", "PREEMPTION_SIGNALS", "Preempted", "PreemptionWatch",
           "ignore_preemption_signals"]

EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure, try again (with --resume)
PREEMPTION_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


class Preempted(Exception):
    """The run stopped on a preemption signal; ``checkpoint`` is where ``--resume`` continues from.

    Attributes:
        signal_name: ``SIGTERM`` or ``SIGUSR1``.
        epoch: The epoch the run was in (the next one, after an epoch's checkpoint).
        step: Batches of that epoch done.
        checkpoint: The checkpoint saved on the way out, or None when none was (before training).
    """

    def __init__(self, signal_name: str, epoch: int, step: int, checkpoint: Optional[Path]):
        self.signal_name, self.epoch, self.step, self.checkpoint = signal_name, epoch, step, checkpoint
        saved = f"checkpoint {checkpoint} saved" if checkpoint else "no step taken, nothing new to save"
        super().__init__(f"preempted by {signal_name} at epoch {epoch} step {step}; {saved} "
                         "(continue with --resume)")


class PreemptionWatch:
    """Records SIGTERM and SIGUSR1 while entered, then restores the handlers that were there before.

    Handlers can only be installed from the main thread; entered from another one, it records
    nothing (the run then ends as the signal's previous handler decides).
    """

    def __init__(self, signals=PREEMPTION_SIGNALS):
        self.signals = tuple(signals)
        self.signum = 0  # the last signal received, 0 for none
        self._previous = {}

    def __enter__(self) -> PreemptionWatch:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum, frame) -> None:
        self.signum = signum  # only this: the step or checkpoint write under way goes on

    @property
    def received(self) -> Optional[str]:
        """The name of the signal this process received, or None."""
        return signal.Signals(self.signum).name if self.signum else None

    def agreed(self, accelerator) -> Optional[str]:
        """The signal any process received, or None; with several processes, a collective.

        Every process must call it at the same points (after the same optimizer step), so that
        all of them stop together.
        """
        signum = int(agree(accelerator, self.signum, "max"))
        return signal.Signals(signum).name if signum else None


def ignore_preemption_signals(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: workers ignore SIGTERM and SIGUSR1, which the main process handles.

    A cluster signals every process of a job; a worker that died of it would make the main process
    fail the step it is finishing before its checkpoint.
    """
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
