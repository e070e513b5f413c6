#!/usr/bin/env bash
# The wheel as a pip user gets it: from a folder outside the checkout, with the venv given as $1 (the
# wheel installed in it), train the packaged digits config for 3 epochs and load the result through timm.
set -euo pipefail
venv="$(cd "$1" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
export PYTHONSAFEPATH=1
"$venv/bin/reste-timm" configs > configs.txt  # whole, then searched: grep -q closing the pipe early broke it
grep -q "^digits/resnet20_1w1a_reste " configs.txt
"$venv/bin/reste-timm" train --config digits/resnet20_1w1a_reste --epochs 3 --output-dir D --report-to none
"$venv/bin/python" - <<'PY'
import shutil

import timm
import torch

import reste_timm

assert "site-packages" in reste_timm.__file__, reste_timm.__file__  # the installed wheel, not a checkout
if shutil.which("cc") or shutil.which("gcc"):  # the wheel carries every C source and header they include
    from reste_timm.nn import bitconv, kernels
    assert kernels.library() is not None and bitconv.bitwise_available(), "a C kernel did not build"
    if shutil.which("c++") or shutil.which("g++"):  # and the C++ file of the ops' CPU kernels
        assert bitconv.native_ops(), "bitconv_op.cpp did not build"
model = timm.create_model("local-dir:D/final", pretrained=True).eval()
with torch.no_grad():
    logits = model(torch.zeros(1, 3, 32, 32))
print(f"wheel check: reste_timm {reste_timm.__version__} from {reste_timm.__file__}; "
      f"local-dir:D/final loads, logits {tuple(logits.shape)}")
PY
