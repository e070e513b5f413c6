"""The bitwise conv kernel (reste_timm/nn/csrc/bitconv.c) on every code path this CPU can run:
exact integer dot products, the fused epilogues bit for bit against torch, packed outputs, blocks
chained through bits; and a C-only driver, also run for the NEON path under qemu-aarch64."""

from __future__ import annotations

import itertools
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from reste_timm.deployment import bitwise
from reste_timm.deployment.bitwise import bn_affine
from reste_timm.nn import bitconv

X86 = platform.machine() in ("x86_64", "AMD64")
SOURCE = Path(bitconv.__file__).parent / "csrc" / "bitconv.c"
DRIVER = Path(__file__).parent / "csrc" / "bitconv_driver.c"


def _cpu_flags() -> set:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


FLAGS = _cpu_flags()
PATHS = [  # (id, extra compiler flags, expected path, can this CPU run it)
    ("native", (), None, True),
    ("avx512-tile7x16", ("-DBC_P=7", "-DBC_NB=1"), "avx512",
     X86 and {"avx512f", "avx512_vpopcntdq"} <= FLAGS),
    ("avx2", ("-DBITCONV_NO_AVX512",), "avx2", X86 and "avx2" in FLAGS),
    ("portable", ("-DBITCONV_PORTABLE",), "portable", True),
    ("portable-no-popcnt", ("-DBITCONV_PORTABLE", "-march=x86-64", "-mtune=generic"), "portable", X86),
]

pytestmark = pytest.mark.skipif(not bitwise.bitwise_available(), reason="no C compiler")


@pytest.fixture(scope="module", params=[pytest.param(p, id=p[0], marks=pytest.mark.skipif(
    not p[3], reason="this CPU lacks the instruction set")) for p in PATHS])
def kern(request):
    _, flags, expect, _ = request.param
    found = bitwise.kernel(flags)
    assert expect is None or found.path == expect
    return found


def _rand(n, c, h, w, zeros: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    if zeros:
        x[torch.rand(x.shape, generator=g) < 0.2] = 0.0
    return x


def _weight(co, ci, kh, kw, seed: int) -> torch.Tensor:
    w = torch.randn(co, ci, kh, kw, generator=torch.Generator().manual_seed(seed + 1000))
    w[w == 0] = 0.5
    return w


def _dot(x, w, stride, padding) -> torch.Tensor:
    """conv2d(sign(x), sign(w)): exact integers in float64."""
    return F.conv2d(torch.sign(x).double(), torch.sign(w).double(), None, stride, padding)


def _unpack(bits: torch.Tensor, c: int, mask) -> torch.Tensor:
    """-1/0/+1 of packed bits, as an (N, C, H, W) float tensor."""
    idx = torch.arange(c)
    shift = idx % 64
    value = torch.where(((bits[..., idx // 64] >> shift) & 1).bool(), -1.0, 1.0)
    if mask is not None:
        value = torch.where(((mask[..., idx // 64] >> shift) & 1).bool(), value, 0.0)
    return value.permute(0, 3, 1, 2)


def _conv(kern, x, w, stride, padding, force_mask: bool = False, **epilogue):
    """The conv of x's signs; the zero mask is passed where x has an exact zero, or always (force_mask)."""
    bits, mask, zeros = kern.pack_signs(x)
    packed, wzeros = kern.pack_weights(w)
    assert wzeros == 0
    y, ob, om, ozeros = kern.conv2d(bits, mask if zeros or force_mask else None, packed, list(w.shape),
                                    list(stride), list(padding), float(w.abs().mean()), **epilogue)
    return y, ob, (om if ozeros else None)


@pytest.mark.parametrize("c", [3, 16, 64, 65, 130])
@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_pack_signs(kern, c, zeros, layout):
    x = _rand(2, c, 5, 3, zeros, seed=c)
    if zeros:
        x[1, c - 1, 2, 1] = float("nan")  # NaN packs as 0, as a compare-based sign
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    bits, mask, count = kern.pack_signs(x)
    assert bits.shape == (2, 5, 3, (c + 63) // 64) and (count > 0) == zeros
    assert torch.equal(_unpack(bits, c, mask if count else None), torch.sign(torch.nan_to_num(x, nan=0.0)))
    if c % 64:  # the padding channels' bits are 0 in both planes
        assert torch.all(bits[..., -1] >> (c % 64) == 0) and torch.all(mask[..., -1] >> (c % 64) == 0)


CONV_CASES = [(k, s, p, c, co) for (k, s, p), (c, co) in itertools.product(
    [(1, 1, 0), (1, 2, 0), (3, 1, 1), (3, 2, 1), (3, 1, 0), (3, 2, 2), (5, 1, 2), (5, 2, 1)],
    [(3, 16), (16, 20), (65, 32), (130, 70)])]


@pytest.mark.parametrize("zeros", [False, True], ids=["nozero", "zeros"])
@pytest.mark.parametrize("k,s,p,c,co", CONV_CASES)
def test_conv_is_the_exact_dot_times_the_scale(kern, k, s, p, c, co, zeros):
    x = _rand(1 if (k + s + p + c) % 2 else 3, c, 9, 16, zeros, seed=k * 100 + s * 10 + p + c)
    w = _weight(co, c, k, k, seed=c + co)
    dot = _dot(x, w, s, p)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        y, _, _ = _conv(kern, x, w, (s, s), (p, p))
        assert torch.equal(y, dot.float() * float(w.abs().mean()))  # one rounding of an exact integer
    torch.set_num_threads(1)


@pytest.mark.parametrize("n,c,hw,kernel,stride,padding", [
    (2, 64, (11, 8), (3, 5), (2, 1), (1, 2)),  # rectangular, several images
    (1, 70, (5, 6), (3, 3), (1, 1), (3, 3)),  # padding wider than the kernel: outputs with every tap outside
    (3, 128, (4, 4), (1, 1), (1, 1), (1, 0)),  # a padded 1x1 conv: whole rows of outputs are 0
    (1, 64, (13, 9), (3, 3), (2, 2), (2, 1))])
def test_padded_path_borders(kern, n, c, hw, kernel, stride, padding):
    """Inputs without exact zeros take the padded path (the bits copied with zero borders, each output
    corrected by its class of out-of-bounds taps): exact over uneven borders and images."""
    x = _rand(n, c, *hw, False, seed=c + sum(padding))
    w = _weight(48, c, *kernel, seed=c)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        y, ob, om = _conv(kern, x, w, stride, padding, out_bits=True)
        assert torch.equal(y, _dot(x, w, stride, padding).float() * w.abs().mean())
        assert torch.equal(_unpack(ob, 48, om), torch.sign(y))
    torch.set_num_threads(1)


def test_rectangular_stride_and_padding_few_pixels_many_channels(kern):
    x = _rand(2, 40, 11, 8, True, seed=9)
    w = _weight(24, 40, 3, 5, seed=9)
    expected = _dot(x, w, (2, 1), (1, 2)).float() * w.abs().mean()
    assert torch.equal(_conv(kern, x, w, (2, 1), (1, 2))[0], expected)
    x, w = _rand(1, 256, 2, 3, False, seed=5), _weight(512, 256, 3, 3, seed=6)
    y, ob, om = _conv(kern, x, w, (1, 1), (1, 1), out_bits=True)
    assert torch.equal(y, _dot(x, w, 1, 1).float() * w.abs().mean())
    assert torch.equal(_unpack(ob, 512, om), torch.sign(y))


@pytest.mark.parametrize("c", [256, 2112], ids=["rounds-of-taps", "long-taps"])
def test_popcounts_at_their_largest(kern, c):
    """Every sign differs (x > 0, w < 0): each step adds the most a counter can take, so counters that
    were flushed too late (the AVX2 path's byte counters: after at most 31 steps) would wrap.  256 channels:
    4 words a tap, flushed between rounds of taps; 2112: 33 words a tap, flushed within a tap."""
    g = torch.Generator().manual_seed(c)
    x = torch.rand(1, c, 4, 5, generator=g) + 0.1
    w = -(torch.rand(32, c, 3, 3, generator=g) + 0.1)
    for masked in (False, True):  # the fast path, and the zero-mask path (the mask passed all the same)
        y = _conv(kern, x, w, (1, 1), (1, 1), force_mask=masked)[0]
        assert torch.equal(y, _dot(x, w, 1, 1).float() * w.abs().mean())


def _bn(c: int, seed: int) -> torch.nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = torch.nn.BatchNorm2d(c).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) * 2 - 0.5)
        bn.bias.copy_(torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) * 3 + 0.05)
    return bn


# Bit-exact agreement with torch's own BatchNorm needs its vectorized CPU kernel (AVX2 / AVX-512 builds).
TORCH_BN_EXACT = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@pytest.mark.parametrize("co", [20, 70, 80])
@pytest.mark.parametrize("bias,relu,affine,res", list(itertools.product([False, True], repeat=4)))
def test_every_epilogue_equals_the_torch_ops_bit_for_bit(kern, co, bias, relu, affine, res):
    # 6 x 16 pixels: border tiles and interior ones (every tap in bounds: the AVX-512 path's direct epilogue);
    # 80 channels: whole blocks only, the last packed word partly filled.
    x, w = _rand(2, 70, 6, 16, False, seed=co), _weight(co, 70, 3, 3, seed=co)
    scale = float(w.abs().mean())
    g = torch.Generator().manual_seed(7)
    b = torch.randn(co, generator=g) * scale * 4 if bias else None
    bn = _bn(co, seed=co)
    r = torch.randn(2, co, 6, 16, generator=g).contiguous(memory_format=torch.channels_last) if res else None
    ref = _dot(x, w, 1, 1).float() * scale  # then the float model's ops, in its order
    ref = ref + b.view(1, -1, 1, 1) if bias else ref
    ref = torch.relu(ref) if relu else ref
    with torch.no_grad():
        ref = bn(ref) if affine else ref
    ref = ref + r if res else ref
    alpha, beta = bn_affine(bn) if affine else (None, None)
    y, ob, om = _conv(kern, x, w, (1, 1), (1, 1), bias=b, relu=relu, alpha=alpha, beta=beta, residual=r,
                      out_bits=True)
    if TORCH_BN_EXACT or not affine:
        assert torch.equal(y, ref)
    else:
        torch.testing.assert_close(y, ref)
    assert torch.equal(_unpack(ob, co, om), torch.sign(y)) and (om is not None) == bool((y == 0).any())
    _, ob2, om2 = _conv(kern, x, w, (1, 1), (1, 1), bias=b, relu=relu, alpha=alpha, beta=beta, residual=r,
                        out_float=False, out_bits=True)
    assert torch.equal(ob2, ob)  # bits alone are the same bits


@pytest.mark.parametrize("c,hw", [(64, 14), (130, 7)])
def test_a_bireal_block_chained_through_packed_bits(kern, c, hw):
    g = torch.Generator().manual_seed(c)
    x = torch.randn(1, c, hw, hw, generator=g)
    w1, w2 = _weight(c, c, 3, 3, 1), _weight(c, c, 3, 3, 2)
    bn1, bn2 = _bn(c, 1), _bn(c, 2)
    with torch.no_grad():
        out = bn1(F.relu(_dot(x, w1, 1, 1).float() * w1.abs().mean())) + x
        out2 = bn2(F.relu(_dot(out, w2, 1, 1).float() * w2.abs().mean())) + out
    xr = x.contiguous(memory_format=torch.channels_last)
    (a1, b1), (a2, b2) = bn_affine(bn1), bn_affine(bn2)
    y1, ob1, om1 = _conv(kern, x, w1, (1, 1), (1, 1), relu=True, alpha=a1, beta=b1, residual=xr,
                         out_bits=True)
    p2, _ = kern.pack_weights(w2)
    y2, ob2, om2, z2 = kern.conv2d(ob1, om1, p2, list(w2.shape), [1, 1], [1, 1], float(w2.abs().mean()),
                                   relu=True, alpha=a2, beta=b2, residual=y1, out_bits=True)
    assert torch.equal(y2, out2) if TORCH_BN_EXACT else torch.allclose(y2, out2)
    assert torch.equal(_unpack(ob2, c, om2 if z2 else None), torch.sign(y2))


def test_weight_zeros_are_counted_and_errors_are_codes(kern):
    w = torch.randn(8, 5, 3, 3)
    w[1, 2, 0, 0] = w[3, 4, 2, 2] = 0.0
    assert kern.pack_weights(w)[1] == 2
    packed, _ = kern.pack_weights(torch.randn(16, 8, 3, 3))
    bits = torch.zeros(1, 5, 5, 1, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="code -2"):  # the weight's header says 8 input channels
        kern.conv2d(bits, None, packed, [16, 9, 3, 3], [1, 1], [1, 1], 1.0)
    with pytest.raises(RuntimeError, match="code -3"):  # no output asked for
        kern.conv2d(bits, None, packed, [16, 8, 3, 3], [1, 1], [1, 1], 1.0, out_float=False)


def test_large_weights_pack_alike_on_one_and_two_threads(kern):
    """Above 65,536 weights the packer runs blocks in parallel (the training forward packs every step):
    the same words and zero count as one thread, and a conv on them equal to the exact dot."""
    w = torch.randn(130, 70, 3, 3, generator=torch.Generator().manual_seed(7))
    w[5, 69, 1, 2] = w[129, 0, 0, 0] = 0.0
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kern.pack_weights(w)
        torch.set_num_threads(2)
        two = kern.pack_weights(w)
    finally:
        torch.set_num_threads(threads)
    assert one[1] == two[1] == 2 and torch.equal(one[0], two[0])
    w[w == 0] = 0.5
    x = _rand(1, 70, 6, 5, zeros=False, seed=8)
    bits, _, _ = kern.pack_signs(x)
    y = kern.conv2d(bits, None, kern.pack_weights(w)[0], [130, 70, 3, 3], [1, 1], [1, 1], 1.0)[0]
    assert torch.equal(y.double(), _dot(x, w, 1, 1))

@pytest.mark.skipif(not TORCH_BN_EXACT, reason="torch's scalar BatchNorm kernel rounds differently")
def test_bn_affine_gives_torch_batch_norm_bit_for_bit():
    for c in (16, 130):
        bn = _bn(c, c)
        alpha, beta = bn_affine(bn)
        x = torch.randn(2, c, 5, 4)
        for fmt in (torch.contiguous_format, torch.channels_last):
            with torch.no_grad():
                ref = bn(x.contiguous(memory_format=fmt))
            fused = (x.double() * alpha.double().view(1, c, 1, 1) + beta.double().view(1, c, 1, 1)).float()
            assert torch.equal(fused, ref)  # fmaf, as the kernel applies it (float64 product is exact)


def _run_driver(tmp_path, cc, flags, runner=()):
    exe = tmp_path / "driver"
    subprocess.run([cc, "-O2", "-fopenmp", *flags, str(DRIVER), str(SOURCE), "-o", str(exe), "-lm"],
                   check=True, capture_output=True, text=True)
    out = subprocess.run([*runner, str(exe)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("flags", [("-march=native",), ("-march=native", "-DBITCONV_NO_AVX512"),
                                   ("-march=native", "-DBITCONV_PORTABLE")],
                         ids=["native", "avx2", "portable"])
def test_c_driver_against_a_naive_reference(tmp_path, flags):
    if not X86 and len(flags) > 1:
        pytest.skip("x86 flags")
    assert "ALL OK" in _run_driver(tmp_path, shutil.which("cc") or "gcc", flags)


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("aarch64-linux-gnu-gcc") and shutil.which("qemu-aarch64")),
                    reason="needs aarch64-linux-gnu-gcc and qemu-aarch64 (.ci/run installs them)")
def test_neon_path_under_qemu(tmp_path):
    out = _run_driver(tmp_path, shutil.which("aarch64-linux-gnu-gcc"), ("-static",),
                      runner=(shutil.which("qemu-aarch64"),))
    assert "path neon" in out and "ALL OK" in out
