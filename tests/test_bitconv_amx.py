"""The AMX path of the bitwise conv (reste_timm/nn/csrc/bitconv_amx.h): on CPUs with AMX tiles (and a
Linux that grants them), layers whose packed weight carries the int8 copy run on the tiles; their
outputs must equal the exact dot product and the popcount path's bit for bit. Builds without the path
must ignore the copy."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from path_copy_helpers import (
    assert_copy_epilogues_equal,
    assert_copy_gives_the_exact_dot,
    rand_input,
    run_conv,
    sign_weight,
)

import reste_timm
from reste_timm.deployment import bitwise
from reste_timm.deployment.bitwise import BitwiseConv2d
from reste_timm.nn import bitconv
from reste_timm.nn.bitconv import copy_bytes

pytestmark = pytest.mark.skipif(not bitwise.bitwise_available(), reason="no C compiler")
AMX = bitwise.bitwise_available() and bitconv.kernel().amx
needs_amx = pytest.mark.skipif(not AMX, reason="this CPU (or its OS) has no AMX tiles")


@needs_amx
def test_the_copy_is_appended_only_where_the_path_takes_the_layer():
    kern = bitconv.kernel()
    for (co, ci, k), expected in [((64, 64, 3), 64 * 64 * 9), ((128, 200, 3), 128 * 256 * 9),
                                  ((256, 256, 3), 256 * 256 * 9), ((64, 16, 1), 64 * 64),
                                  ((70, 64, 3), 0), ((512, 512, 3), 0), ((64, 64, 7), 0)]:
        with_copy, _ = kern.pack_weights(sign_weight(co, ci, k, 0), fast_copy=True)
        plain, _ = kern.pack_weights(sign_weight(co, ci, k, 0))
        assert copy_bytes(with_copy) == expected, (co, ci, k)
        assert copy_bytes(plain) == 0
        assert with_copy.numel() * 8 == plain.numel() * 8 + expected
        assert torch.equal(with_copy[5:plain.numel()], plain[5:])  # the bits and tables are unchanged


CASES = [  # (n, c, h, w, co, k, stride, padding)
    (1, 64, 56, 56, 64, 3, 1, 1), (1, 64, 56, 56, 128, 3, 2, 1), (2, 128, 9, 13, 128, 3, 1, 1),
    (3, 70, 7, 7, 64, 3, 1, 1), (1, 200, 14, 14, 64, 3, 1, 0), (2, 16, 12, 30, 64, 3, 2, 2),
    (1, 64, 20, 20, 192, 5, 1, 2), (2, 130, 6, 17, 64, 1, 1, 0), (1, 256, 28, 28, 128, 3, 2, 1),
    (1, 64, 33, 31, 64, 3, 1, 1)]


@needs_amx
@pytest.mark.parametrize("n,c,h,w,co,k,stride,padding", CASES)
@pytest.mark.parametrize("zeros", [False, True], ids=["nozero", "zeros"])
def test_amx_equals_the_exact_dot_and_the_popcount_path(n, c, h, w, co, k, stride, padding, zeros):
    x = rand_input((n, c, h, w), zeros, seed=c + h + co).contiguous(memory_format=torch.channels_last)
    weight = sign_weight(co, c, k, seed=c + co)
    assert_copy_gives_the_exact_dot(bitconv.kernel(), x, weight, stride, padding)


@needs_amx
@pytest.mark.parametrize("bias,relu,bn,res,out_float", list(itertools.product([False, True], repeat=5)))
def test_amx_epilogues_equal_the_popcount_paths(bias, relu, bn, res, out_float):
    assert_copy_epilogues_equal(bitconv.kernel(), rand_input((2, 128, 15, 15), True, seed=4),
                                sign_weight(128, 128, 3, seed=5), bias, relu, bn, res, out_float)


def test_builds_without_the_path_ignore_the_copy():
    """A weight packed with the default build's path copy (the int8 copy where this CPU has AMX, the nibble
    copy on an AVX2 CPU) runs unchanged on a build without AMX and on the portable one."""
    x = rand_input((1, 64, 10, 10), True, seed=1)
    weight = sign_weight(64, 64, 3, seed=2)
    packed = bitconv.kernel().pack_weights(weight, fast_copy=True)[0]
    exact = F.conv2d(torch.sign(x).double(), torch.sign(weight).double(), None, 1, 1).float() * 0.37
    for flags in (("-DBITCONV_NO_AMX",), ("-DBITCONV_PORTABLE",)):
        kern = bitwise.kernel(flags)
        assert not kern.amx
        assert torch.equal(run_conv(kern, x, packed, weight.shape, 1, 1)[0], exact)


@needs_amx
def test_deployed_layers_carry_the_copy_and_predict_as_the_source():
    torch.manual_seed(0)
    model = reste_timm.BinaryConv2d(64, 64, 3, padding=1, bias=False).eval()
    layer = BitwiseConv2d(model)
    assert copy_bytes(layer.weight_bits) == 64 * 64 * 9
    x = torch.randn(2, 64, 12, 12)
    with torch.no_grad():
        assert torch.allclose(layer(x), model(x), atol=1e-5)
