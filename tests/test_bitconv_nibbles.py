"""The AVX2 path's nibble copy (reste_timm/nn/csrc/bitconv_pack.h: nibble_pack): a weight packed with
``fast_copy=True`` by an AVX2 build carries its words' low and high nibbles apart, and the AVX2 kernel
reads them instead of the packed bits. Outputs must equal the exact dot product and the packed bits' path
bit for bit; other builds must ignore the copy. The AVX2 build is compiled with -DBITCONV_NO_AVX512, so
these tests run on every x86 CPU with AVX2, AVX-512 ones included."""

from __future__ import annotations

import itertools
import platform
from pathlib import Path

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

CPUINFO = Path("/proc/cpuinfo")
HAS_AVX2 = platform.machine() in ("x86_64", "AMD64") and CPUINFO.exists() and " avx2" in CPUINFO.read_text()
pytestmark = pytest.mark.skipif(not (bitwise.bitwise_available() and HAS_AVX2),
                                reason="needs a C compiler and an x86 CPU with AVX2")
AVX2 = ("-DBITCONV_NO_AVX512",)


@pytest.fixture(scope="module")
def kern():
    found = bitwise.kernel(AVX2)
    assert found.path == "avx2"
    return found


def _rand(shape, zeros: bool, seed: int) -> torch.Tensor:
    return rand_input(shape, zeros, seed).contiguous(memory_format=torch.channels_last)


def test_the_copy_holds_each_word_as_two_nibble_words(kern):
    for co, ci, k in [(64, 64, 3), (20, 130, 3), (16, 3, 7), (70, 2112, 1)]:
        weight = sign_weight(co, ci, k, 0)
        with_copy, plain = kern.pack_weights(weight, fast_copy=True)[0], kern.pack_weights(weight)[0]
        data = plain[8:int(plain[7])]  # the packed bits: after the 8-word header, up to the popcount table
        assert copy_bytes(plain) == 0 and copy_bytes(with_copy) == 2 * data.numel() * 8
        assert torch.equal(with_copy[5:plain.numel()], plain[5:])  # the bits and tables are unchanged
        copy = with_copy[plain.numel():].view(-1, 2, 16)
        words = data.view(-1, 16)
        assert torch.equal(copy[:, 0], words & 0x0F0F0F0F0F0F0F0F)
        assert torch.equal(copy[:, 1], (words >> 4) & 0x0F0F0F0F0F0F0F0F)


CASES = [  # (n, c, h, w, co, k, stride, padding): 1, 2, 3, 4 and 33 words a tap, partial blocks and words
    (1, 64, 20, 20, 64, 3, 1, 1), (2, 64, 13, 11, 128, 3, 2, 1), (1, 128, 9, 13, 20, 3, 1, 1),
    (3, 130, 7, 7, 70, 3, 1, 1), (1, 256, 6, 6, 48, 3, 1, 0), (2, 16, 12, 30, 64, 3, 2, 2),
    (1, 2112, 3, 4, 32, 3, 1, 1), (2, 70, 6, 17, 16, 1, 1, 0), (1, 64, 9, 9, 16, 5, 1, 2)]


@pytest.mark.parametrize("n,c,h,w,co,k,stride,padding", CASES)
@pytest.mark.parametrize("zeros", [False, True], ids=["nozero", "zeros"])
def test_the_copy_gives_the_exact_dot_and_the_bits_path(kern, n, c, h, w, co, k, stride, padding, zeros):
    x = _rand((n, c, h, w), zeros, seed=c + h + co)
    assert_copy_gives_the_exact_dot(kern, x, sign_weight(co, c, k, seed=c + co), stride, padding)


@pytest.mark.parametrize("c", [256, 2112], ids=["rounds-of-taps", "long-taps"])
def test_the_copy_at_the_largest_popcounts(kern, c):
    """Every sign differs: the byte counters take the most at every step (they wrap if flushed late)."""
    g = torch.Generator().manual_seed(c)
    x = (torch.rand(1, c, 4, 5, generator=g) + 0.1).contiguous(memory_format=torch.channels_last)
    weight = -(torch.rand(32, c, 3, 3, generator=g) + 0.1)
    exact = F.conv2d(torch.sign(x).double(), torch.sign(weight).double(), None, 1, 1).float() * 0.37
    packed = kern.pack_weights(weight, fast_copy=True)[0]
    assert torch.equal(run_conv(kern, x, packed, weight.shape, 1, 1)[0], exact)


@pytest.mark.parametrize("bias,relu,bn,res,out_float", list(itertools.product([False, True], repeat=5)))
def test_the_copys_epilogues_equal_the_bits_path(kern, bias, relu, bn, res, out_float):
    assert_copy_epilogues_equal(kern, _rand((2, 80, 9, 9), False, seed=4), sign_weight(40, 80, 3, seed=5),
                                bias, relu, bn, res, out_float)


def test_other_builds_ignore_the_copy(kern):
    """A weight packed with the nibble copy runs unchanged on the portable build (and on the AVX-512 build
    where this CPU has it), and a weight packed with another build's copy runs on the AVX2 build."""
    x = _rand((1, 64, 10, 10), False, seed=1)
    weight = sign_weight(64, 64, 3, seed=2)
    exact = F.conv2d(torch.sign(x).double(), torch.sign(weight).double(), None, 1, 1).float() * 0.37
    packed = kern.pack_weights(weight, fast_copy=True)[0]
    others = [bitwise.kernel(("-DBITCONV_PORTABLE",)), bitconv.kernel()]
    for other in others:
        assert torch.equal(run_conv(other, x, packed, weight.shape, 1, 1)[0], exact)
        theirs = other.pack_weights(weight, fast_copy=True)[0]
        assert torch.equal(run_conv(kern, x, theirs, weight.shape, 1, 1)[0], exact)


@pytest.mark.skipif(not bitwise.bitwise_available() or bitconv.kernel().path != "avx2",
                    reason="the default build here is not the AVX2 one")
def test_deployed_layers_carry_the_copy_and_predict_as_the_source():
    torch.manual_seed(0)
    model = reste_timm.BinaryConv2d(64, 64, 3, padding=1, bias=False).eval()
    layer = BitwiseConv2d(model)
    assert copy_bytes(layer.weight_bits) == 4 * 9 * 32 * 8  # 4 blocks x 9 taps x 2 x 16 words
    x = torch.randn(2, 64, 12, 12)
    with torch.no_grad():
        assert torch.allclose(layer(x), model(x), atol=1e-5)
