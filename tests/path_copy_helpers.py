"""Shared pieces of the path-copy tests (test_bitconv_amx.py, test_bitconv_nibbles.py): a weight packed
with its build's copy (``Kernel.pack_weights(w, fast_copy=True)``) must give the exact dot product and the
packed bits' outputs, epilogues included."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reste_timm.nn.bitconv import copy_bytes


def rand_input(shape, zeros: bool, seed: int) -> torch.Tensor:
    """Gaussian activations; with ``zeros``, a fifth of them exactly 0 (the zero-mask path)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    if zeros:
        x[torch.rand(x.shape, generator=g) < 0.2] = 0.0
    return x


def sign_weight(co, ci, k, seed: int) -> torch.Tensor:
    """A ``k x k`` weight without exact zeros (each one is a sign)."""
    w = torch.randn(co, ci, k, k, generator=torch.Generator().manual_seed(seed + 1000))
    w[w == 0] = 0.5
    return w


def run_conv(kern, x, packed, shape, stride, padding, **epilogue):
    """``kern.conv2d`` of x's signs with scale 0.37, the zero mask passed where x has an exact zero."""
    bits, mask, zeros = kern.pack_signs(x)
    return kern.conv2d(bits, mask if zeros else None, packed, list(shape), [stride, stride],
                       [padding, padding], 0.37, **epilogue)


def assert_copy_gives_the_exact_dot(kern, x, weight, stride, padding) -> None:
    """With the copy, on 1 and 2 threads: the exact integer dot rounded once, and the bits path's output."""
    with_copy, plain = kern.pack_weights(weight, fast_copy=True)[0], kern.pack_weights(weight)[0]
    assert copy_bytes(with_copy) > 0
    exact = F.conv2d(torch.sign(x).double(), torch.sign(weight).double(), None, stride, padding)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        y = run_conv(kern, x, with_copy, weight.shape, stride, padding)[0]
        assert torch.equal(y, exact.float() * 0.37)  # one rounding of the exact integer
        assert torch.equal(y, run_conv(kern, x, plain, weight.shape, stride, padding)[0])
    torch.set_num_threads(1)


def assert_copy_epilogues_equal(kern, x, weight, bias, relu, bn, res, out_float) -> None:
    """The fused epilogue (3x3, stride 1, padding 1) gives the same float outputs, packed bits, zero count
    and mask with the copy as without it."""
    g = torch.Generator().manual_seed(3)
    co, (n, _, h, w) = weight.shape[0], x.shape
    residual = torch.randn(n, co, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    extra = {"bias": torch.randn(co, generator=g) if bias else None, "relu": relu,
             "alpha": torch.rand(co, generator=g) + 0.5 if bn else None,
             "beta": torch.randn(co, generator=g) if bn else None,
             "residual": residual if res else None, "out_float": out_float, "out_bits": True}
    outs = [run_conv(kern, x, kern.pack_weights(weight, fast_copy=copy)[0], weight.shape, 1, 1, **extra)
            for copy in (True, False)]
    (y0, b0, m0, z0), (y1, b1, m1, z1) = outs
    assert torch.equal(y0, y1) and torch.equal(b0, b1) and z0 == z1
    assert z0 == 0 or torch.equal(m0, m1)
