"""The bitwise conv kernel of 1W/1A convolutions: signs packed along channels, XNOR/popcount accumulation.

The kernel (``csrc/bitconv.c`` and its ``.h`` parts, built by :mod:`reste_timm.nn.native`, called through
registered ops) computes ``conv2d(sign(x), sign(w) * s)`` exactly: activations are packed into 64-bit
words along channels (NHWC), weights once per call or once for all, and each output is an integer dot
product over the in-bound taps, ``(float)dot * s`` after it. A padded position counts 0, not ±1, as in
the reference; exact zeros of ``sign`` (an activation that is exactly 0) travel in a second bit plane,
only where they occur. An epilogue fuses what follows a binary conv in the paper's networks: bias,
relu, the eval BatchNorm (``fmaf(y, alpha, beta)``), a residual, and the sign-and-pack of the result
for the next binary conv. Float outputs are NHWC, i.e. channels_last tensors in torch's NCHW shape.
A packed weight may carry a copy for the build's inference path (:meth:`Kernel.pack_weights` with
``fast_copy=True``, as the deployed layers pack; other builds ignore it): where the CPU has Intel AMX, an
int8 copy, and the same integer sums come from the AMX tiles on signs unpacked to ±1 bytes
(``csrc/bitconv_amx.h``); on the AVX2 path, the weight words' low and high nibbles apart, which saves the
inner loop two operations per 256 bits. The outputs are identical either way.

Users: the forward of :func:`reste_timm.nn.binary_conv.binary_conv2d` on CPU (training and plain
inference), and the deployed networks of :mod:`reste_timm.deployment`, which chain the fused epilogues.
Ops: ``reste_timm::pack_signs`` and ``reste_timm::bitwise_conv2d`` (CPU, with fake implementations so
graphs can be traced through them).
"""

from __future__ import annotations

import ctypes
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .native import load_library, load_op_library

__all__ = ["Kernel", "copy_bytes", "bitwise_available", "bitwise_conv2d", "conv_list", "kernel",
           "kernel_path", "native_ops", "pack_signs"]

_SOURCE = "bitconv.c"
_P, _I64, _INT, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "bitconv_path": ([], ctypes.c_char_p),
    "bitconv_amx": ([], _INT),
    "bitconv_weight_words": ([_I64, _I64, _INT, _INT, _INT], _I64),
    "bitconv_pack_weights": ([_P, _I64, _I64, _INT, _INT, _INT, _P, _INT], _I64),
    "bitconv_pack_signs_nhwc": ([_P, _I64, _I64, _P, _P, _INT], _I64),
    "bitconv_pack_signs_nchw": ([_P, _I64, _I64, _I64, _P, _P, _INT], _I64),
    "bitconv_conv2d": ([_P, _P, _I64, _I64, _I64, _I64, _P, _I64, _INT, _INT, _INT, _INT, _INT, _INT,
                        _F, _P, _INT, _P, _P, _P, _P, _P, _P, _INT], _I64),
}


_WITH_COPY = 16  # bitconv_paths.h: BC_WITH_COPY
_H_MODE = 4  # header word: the mode, the path copy's kind (bits 8-15) and word offset (bits 32-63)


def copy_bytes(packed: torch.Tensor) -> int:
    """Bytes of the path copy inside a packed weight buffer (AMX int8 or AVX2 nibbles; 0 where it has
    none): it sits at the end of the buffer."""
    offset = int(packed[_H_MODE]) >> 32
    return 0 if offset == 0 else (packed.numel() - offset) * 8


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None or t.numel() == 0 else t.data_ptr()


def _words(channels: int) -> int:
    return (channels + 63) // 64


def _out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class Kernel:
    """One build of ``csrc/bitconv.c`` with tensor-level calls (the ops use the default build; tests
    build the other code paths with ``-DBITCONV_NO_AVX512`` or ``-DBITCONV_PORTABLE``)."""

    def __init__(self, lib: ctypes.CDLL):
        for name, (argtypes, restype) in _SIGNATURES.items():
            getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, restype
        self.lib = lib
        self.path = lib.bitconv_path().decode()
        self.amx = bool(lib.bitconv_amx())  # the AMX int8 path can run here (csrc/bitconv_amx.h)

    def pack_weights(self, w: torch.Tensor, fast_copy: bool = False) -> Tuple[torch.Tensor, int]:
        """``(packed int64 words, exact zeros)`` of a float ``[Cout, Cin, KH, KW]`` weight's signs
        (a zero is packed as +1: the caller corrects for it or keeps the layer in float). ``fast_copy``:
        append this build's copy for its inference path where it has one and the path takes the layer
        (AMX int8, AVX2 nibbles; see :func:`copy_bytes`): for weights packed once and used many times."""
        w = w.detach().float().cpu().contiguous()
        cout, cin, kh, kw = w.shape
        mode = _WITH_COPY if fast_copy else 0
        packed = torch.empty(self.lib.bitconv_weight_words(cout, cin, kh, kw, mode), dtype=torch.int64)
        zeros = self.lib.bitconv_pack_weights(w.data_ptr(), cout, cin, kh, kw, mode, packed.data_ptr(),
                                              torch.get_num_threads())
        return packed, int(zeros)

    def pack_signs(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """``(bits, mask, zeros)`` of a float32 ``(N, C, H, W)`` tensor, contiguous or channels_last."""
        n, c, h, w = x.shape
        bits = torch.empty(n, h, w, _words(c), dtype=torch.int64)
        mask = torch.empty_like(bits)
        threads = torch.get_num_threads()
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            zeros = self.lib.bitconv_pack_signs_nhwc(x.data_ptr(), n * h * w, c, bits.data_ptr(),
                                                     mask.data_ptr(), threads)
        else:
            x = x.contiguous()
            zeros = self.lib.bitconv_pack_signs_nchw(x.data_ptr(), n, c, h * w, bits.data_ptr(),
                                                     mask.data_ptr(), threads)
        return bits, mask, int(zeros)

    def conv2d(self, bits, mask, weight, shape, stride, padding, scale, bias=None, relu=False, alpha=None,
               beta=None, residual=None, out_float=True, out_bits=False):
        """See :func:`bitwise_conv2d`; ``zeros`` as an int."""
        cout, cin, kh, kw = shape
        n, h, w = bits.shape[:3]
        oh, ow = _out_size(h, kh, stride[0], padding[0]), _out_size(w, kw, stride[1], padding[1])
        y = torch.empty(n, oh, ow, cout if out_float else 0)
        ob = torch.empty(n, oh, ow, _words(cout) if out_bits else 0, dtype=torch.int64)
        om = torch.empty_like(ob)
        res = None if residual is None else residual.permute(0, 2, 3, 1).contiguous()
        code = self.lib.bitconv_conv2d(
            bits.data_ptr(), _ptr(mask), n, h, w, cin, weight.data_ptr(), cout, kh, kw, stride[0], stride[1],
            padding[0], padding[1], scale, _ptr(bias), int(relu), _ptr(alpha), _ptr(beta), _ptr(res), _ptr(y),
            _ptr(ob), _ptr(om), torch.get_num_threads())
        if code < 0:
            raise RuntimeError(f"bitconv_conv2d: code {code}, weight {shape}, bits {tuple(bits.shape)}")
        return y.permute(0, 3, 1, 2), ob, om, int(code) if out_bits else 0


_kernels: Dict[tuple, Kernel] = {}  # one per build, as native.load_library caches the libraries


def kernel(extra_flags: Sequence[str] = ()) -> Optional[Kernel]:
    """The kernel built with these extra compiler flags; None without a C compiler (warned once)."""
    key = tuple(extra_flags)
    if key not in _kernels:
        lib = load_library(_SOURCE, extra_flags)
        if lib is None:
            return None
        _kernels[key] = Kernel(lib)
    return _kernels[key]


def bitwise_available() -> bool:
    """Whether the kernel could be built here (a C compiler; warns once otherwise)."""
    return kernel() is not None


def kernel_path() -> str:
    """The compiled code path: ``avx512``, ``avx2``, ``neon`` or ``portable``."""
    found = kernel()
    return "unavailable" if found is None else found.path


# ------------------------------------------------------------------------------------------- the ops
# Defined with torch.library.define/impl/register_fake rather than custom_op: both are dispatcher ops
# that torch.compile and torch.export trace through their fake implementations, but custom_op's
# per-call Python checks cost more than the kernel itself on the small layers of a batch-1 network
# (docs/performance.md). Inference only: no autograd formula (asked for a gradient through them, torch
# warns and gives none; the deployed networks run under inference_mode).
# Two implementations: the CPU kernels of csrc/bitconv_op.cpp (C++, registered for the CPU key, built and
# loaded by reste_timm.deploy or else by the first call of an op), and the Python ones below (ctypes),
# registered for CompositeExplicitAutograd, which serve CPU until the C++ kernels are loaded, or for good
# where they cannot be built (no C++ compiler). A CPU kernel takes precedence over the composite one, so
# nothing is overridden.

torch.library.define("reste_timm::pack_signs", "(Tensor x) -> (Tensor, Tensor, Tensor)")
torch.library.define("reste_timm::bitwise_conv2d",
                     "(Tensor bits, Tensor? mask, Tensor weight, int[] conv, float scale, Tensor? bias=None, "
                     "Tensor? alpha=None, Tensor? beta=None, Tensor? residual=None) "
                     "-> (Tensor, Tensor, Tensor, Tensor)")


def pack_signs(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(bits, mask, zeros)``: the signs of a float32 ``(N, C, H, W)`` tensor (contiguous or
    channels_last) packed NHWC, ``int64 [N, H, W, ceil(C/64)]``, bit 1 = negative; the nonzero mask in
    the same layout; the number of exact zeros (0-d; when 0 the mask is not needed). The op
    ``reste_timm::pack_signs``."""
    return torch.ops.reste_timm.pack_signs.default(x)


def native_ops() -> bool:
    """Whether the ops' C++ CPU kernels (``csrc/bitconv_op.cpp``) are loaded, building them on the first call
    (about 10 s, once per machine and torch version; warns once where they cannot be built)."""
    return load_op_library("bitconv_op.cpp", _SOURCE)


def _cpu_only(t: torch.Tensor, op: str) -> None:
    if t.device.type != "cpu":
        raise NotImplementedError(f"reste_timm::{op} runs on CPU tensors only, got a tensor on {t.device}")


@torch.library.impl("reste_timm::pack_signs", "CompositeExplicitAutograd")
def _pack_signs_python(x):
    _cpu_only(x, "pack_signs")
    native_ops()  # later calls go to the C++ kernel where it builds
    bits, mask, zeros = kernel().pack_signs(x)
    return bits, mask, torch.scalar_tensor(zeros, dtype=torch.int64)


@torch.library.register_fake("reste_timm::pack_signs")
def _(x):
    n, c, h, w = x.shape
    bits = x.new_empty((n, h, w, _words(c)), dtype=torch.int64)
    return bits, torch.empty_like(bits), x.new_empty((), dtype=torch.int64)


def conv_list(shape: Sequence[int], stride: Sequence[int], padding: Sequence[int], relu: bool = False,
              out_float: bool = True, out_bits: bool = False) -> List[int]:
    """:func:`bitwise_conv2d`'s ``conv`` list, ``[Cout, Cin, KH, KW, sh, sw, ph, pw, relu, out_float,
    out_bits]``: one argument rather than six, as each argument adds to the op's dispatch cost."""
    return [*shape, *stride, *padding, int(relu), int(out_float), int(out_bits)]


def bitwise_conv2d(bits: torch.Tensor, mask: Optional[torch.Tensor], weight: torch.Tensor, conv: List[int],
                   scale: float, bias: Optional[torch.Tensor] = None, alpha: Optional[torch.Tensor] = None,
                   beta: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The binary conv of packed input bits, with its epilogue; ``(y, bits, mask, zeros)``. The op
    ``reste_timm::bitwise_conv2d``.

    Args:
        bits, mask: Packed input (``mask`` None when the input has no exact zero).
        weight: Packed weight words (:meth:`Kernel.pack_weights`).
        conv: :func:`conv_list`: the weight's ``[Cout, Cin, KH, KW]``, stride and zero padding
            (dilation 1, groups 1), whether a relu follows, which outputs to write (float, bits).
        scale: ``mean(|w|)``; then optional ``bias``, the relu, ``alpha``/``beta`` (eval BatchNorm) and
            ``residual`` (float, channels_last ``(N, Cout, OH, OW)``), in that order.

    Returns:
        ``y`` float32 channels_last ``(N, Cout, OH, OW)``, the output's packed ``bits`` and ``mask``
        ``int64 [N, OH, OW, ceil(Cout/64)]`` (empty where not asked), and ``zeros`` (0-d: exact zeros in
        the output).
    """
    return torch.ops.reste_timm.bitwise_conv2d.default(bits, mask, weight, conv, scale, bias, alpha, beta,
                                                       residual)


@torch.library.impl("reste_timm::bitwise_conv2d", "CompositeExplicitAutograd")
def _bitwise_conv2d_python(bits, mask, weight, conv, scale, bias=None, alpha=None, beta=None, residual=None):
    _cpu_only(bits, "bitwise_conv2d")
    native_ops()
    y, ob, om, zeros = kernel().conv2d(bits, mask, weight, conv[0:4], conv[4:6], conv[6:8], scale, bias,
                                       bool(conv[8]), alpha, beta, residual, bool(conv[9]), bool(conv[10]))
    return y, ob, om, torch.scalar_tensor(zeros, dtype=torch.int64)


@torch.library.register_fake("reste_timm::bitwise_conv2d")
def _(bits, mask, weight, conv, scale, bias=None, alpha=None, beta=None, residual=None):
    cout, _, kh, kw, sh, sw, ph, pw, _, out_float, out_bits = conv
    n, h, w = bits.shape[:3]
    oh, ow = _out_size(h, kh, sh, ph), _out_size(w, kw, sw, pw)
    y = bits.new_empty((n, oh, ow, cout if out_float else 0), dtype=torch.float32).permute(0, 3, 1, 2)
    ob = bits.new_empty((n, oh, ow, _words(cout) if out_bits else 0))
    return y, ob, torch.empty_like(ob), bits.new_empty(())


