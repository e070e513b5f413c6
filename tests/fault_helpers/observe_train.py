"""``reste-timm train``'s own ``main``, unchanged, with a record of what the model did in each process.

    OBSERVE_DIR=DIR python tests/fault_helpers/observe_train.py ARGS...
    OBSERVE_DIR=DIR accelerate launch --multi_gpu --num_processes 2 \
        tests/fault_helpers/observe_train.py ARGS...

For tests that launch processes and need to see inside them (tests/test_train_flags.py). Global module
hooks record, per process, without changing any code of the run:

- ``modules``: the class names of the modules that ran a training forward pass, with counts;
- ``bn_running_means``: after training, each normalization layer's running mean, in the order the
  layers first ran (equal across processes only when the statistics were synchronized);
- ``train_input_sums``: the sum of each training batch's input (different data per process or not).

Each process writes ``DIR/rank<RANK>.json`` with these, its ``world_size`` and the exit code, and
exits with ``main``'s code.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.module import register_module_forward_hook

from reste_timm.train.run import main


class Observer:
    """The global forward hook's record of one process."""

    def __init__(self):
        self.modules = Counter()
        self.norms = {}  # id -> module, in first-run order
        self.input_sums = []

    def __call__(self, module, inputs, output):
        if not module.training:
            return
        self.modules[type(module).__name__] += 1
        if isinstance(module, _NormBase):
            self.norms.setdefault(id(module), module)
        if hasattr(module, "pretrained_cfg") and inputs:  # a timm model's top level: one call per batch
            self.input_sums.append(float(inputs[0].detach().double().sum()))

    def report(self, code: int) -> dict:
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        means = [m.running_mean.tolist() for m in self.norms.values() if m.running_mean is not None]
        return {"exit_code": code, "world_size": world, "modules": dict(self.modules),
                "bn_running_means": means, "train_input_sums": self.input_sums}


def run(argv) -> int:
    observer = Observer()
    handle = register_module_forward_hook(observer)
    try:
        code = getattr(main, "__wrapped__", main)(argv)
    finally:
        handle.remove()
    out = Path(os.environ["OBSERVE_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    rank = os.environ.get("RANK", "0")
    (out / f"rank{rank}.json").write_text(json.dumps(observer.report(code)))
    return code


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
