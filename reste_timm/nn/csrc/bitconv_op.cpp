// bitconv_op.cpp -- the CPU kernels of the ops reste_timm::pack_signs and reste_timm::bitwise_conv2d, in C++.
//
// The ops are defined (schema, fake implementations, a ctypes implementation for any build without a C++
// compiler) in reste_timm/nn/bitconv.py. This file registers their CPU kernels with the dispatcher, so that a
// call from Python goes straight from the dispatcher to the C functions of bitconv.c (linked into the same
// library), without re-entering Python: on the small layers of a batch-1 network that re-entry cost as much
// as the convolution. The semantics are those of the Python implementation: same outputs, shapes and strides
// (the float output is NHWC memory in an (N, C, H, W) tensor, i.e. channels_last), same error on a bad call,
// plus argument checks (dtype, device, layout) that the Python implementation leaves to its callers.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

extern "C" {
int64_t bitconv_pack_signs_nhwc(const float *x, int64_t npix, int64_t C, uint64_t *bits, uint64_t *mask,
                                int nthreads);
int64_t bitconv_pack_signs_nchw(const float *x, int64_t N, int64_t C, int64_t HW, uint64_t *bits,
                                uint64_t *mask, int nthreads);
int64_t bitconv_conv2d(const uint64_t *bits, const uint64_t *mask, int64_t N, int64_t H, int64_t W, int64_t C,
                       const uint64_t *wpacked, int64_t Cout, int KH, int KW, int sh, int sw, int ph, int pw,
                       float scale, const float *bias, int relu, const float *alpha, const float *beta,
                       const float *residual, float *out, uint64_t *out_bits, uint64_t *out_mask, int nthreads);
}

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

int64_t words(int64_t channels) { return (channels + 63) / 64; }

int64_t out_size(int64_t size, int64_t kernel, int64_t stride, int64_t padding) {
  return (size + 2 * padding - kernel) / stride + 1;
}

// The data of an optional input of the given dtype, or nullptr where it is absent or empty (as the Python
// implementation passes None for both). Inputs must be dense in their own layout: contiguous.
template <typename T>
const T *data_or_null(const OptTensor &t, c10::ScalarType dtype, const char *name) {
  if (!t.has_value() || t->numel() == 0) return nullptr;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == dtype && t->is_contiguous(), "bitwise_conv2d: ", name,
              " must be a contiguous CPU tensor of ", dtype, ", got ", t->scalar_type(), " on ", t->device());
  return static_cast<const T *>(t->const_data_ptr());
}

std::tuple<Tensor, Tensor, Tensor> pack_signs_cpu(const Tensor &x) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat, "pack_signs: x must be a 4-D float32 tensor, got ",
              x.dim(), "-D ", x.scalar_type());
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  Tensor bits = at::empty({n, h, w, words(c)}, x.options().dtype(at::kLong));
  Tensor mask = at::empty_like(bits);
  auto *b = reinterpret_cast<uint64_t *>(bits.mutable_data_ptr<int64_t>());
  auto *m = reinterpret_cast<uint64_t *>(mask.mutable_data_ptr<int64_t>());
  const int threads = at::get_num_threads();
  int64_t zeros;
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous()) {
    zeros = bitconv_pack_signs_nhwc(x.const_data_ptr<float>(), n * h * w, c, b, m, threads);
  } else {
    const Tensor xc = x.contiguous();
    zeros = bitconv_pack_signs_nchw(xc.const_data_ptr<float>(), n, c, h * w, b, m, threads);
  }
  return {bits, mask, at::scalar_tensor(zeros, x.options().dtype(at::kLong))};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bitwise_conv2d_cpu(const Tensor &bits, const OptTensor &mask,
                                                              const Tensor &weight, at::IntArrayRef conv,
                                                              double scale, const OptTensor &bias,
                                                              const OptTensor &alpha, const OptTensor &beta,
                                                              const OptTensor &residual) {
  TORCH_CHECK(conv.size() == 11, "bitwise_conv2d: conv must have 11 entries (conv_list), got ", conv.size());
  TORCH_CHECK(bits.dim() == 4 && bits.scalar_type() == at::kLong && bits.is_contiguous(),
              "bitwise_conv2d: bits must be a contiguous 4-D int64 tensor (N, H, W, words)");
  TORCH_CHECK(weight.scalar_type() == at::kLong && weight.is_contiguous() && weight.numel() > 0,
              "bitwise_conv2d: weight must be the contiguous int64 words of a packed weight");
  const int64_t cout = conv[0], cin = conv[1], kh = conv[2], kw = conv[3];
  const int64_t sh = conv[4], sw = conv[5], ph = conv[6], pw = conv[7];
  const bool relu = conv[8] != 0, out_float = conv[9] != 0, out_bits = conv[10] != 0;
  const int64_t n = bits.size(0), h = bits.size(1), w = bits.size(2);
  const int64_t oh = out_size(h, kh, sh, ph), ow = out_size(w, kw, sw, pw);
  TORCH_CHECK(oh > 0 && ow > 0, "bitwise_conv2d: input ", h, "x", w, " too small for kernel ", kh, "x", kw);
  const auto options = bits.options();
  Tensor y = at::empty({n, oh, ow, out_float ? cout : 0}, options.dtype(at::kFloat));
  Tensor ob = at::empty({n, oh, ow, out_bits ? words(cout) : 0}, options);
  Tensor om = at::empty_like(ob);
  Tensor res;
  if (residual.has_value() && residual->numel() > 0) {
    res = residual->permute({0, 2, 3, 1}).contiguous();  // NHWC memory: free for a channels_last residual
  }
  const int64_t code = bitconv_conv2d(
      reinterpret_cast<const uint64_t *>(bits.const_data_ptr<int64_t>()),
      data_or_null<uint64_t>(mask, at::kLong, "mask"), n, h, w, cin,
      reinterpret_cast<const uint64_t *>(weight.const_data_ptr<int64_t>()), cout, static_cast<int>(kh),
      static_cast<int>(kw), static_cast<int>(sh), static_cast<int>(sw), static_cast<int>(ph), static_cast<int>(pw),
      static_cast<float>(scale), data_or_null<float>(bias, at::kFloat, "bias"), relu ? 1 : 0,
      data_or_null<float>(alpha, at::kFloat, "alpha"), data_or_null<float>(beta, at::kFloat, "beta"),
      res.defined() ? data_or_null<float>(res, at::kFloat, "residual") : nullptr,
      out_float && y.numel() ? y.mutable_data_ptr<float>() : nullptr,
      out_bits && ob.numel() ? reinterpret_cast<uint64_t *>(ob.mutable_data_ptr<int64_t>()) : nullptr,
      out_bits && om.numel() ? reinterpret_cast<uint64_t *>(om.mutable_data_ptr<int64_t>()) : nullptr,
      at::get_num_threads());
  TORCH_CHECK(code >= 0, "bitconv_conv2d: code ", code, ", weight [", cout, ", ", cin, ", ", kh, ", ", kw,
              "], bits ", bits.sizes());
  return {y.permute({0, 3, 1, 2}), ob, om, at::scalar_tensor(out_bits ? code : 0, options)};
}

}  // namespace

TORCH_LIBRARY_IMPL(reste_timm, CPU, m) {
  m.impl("pack_signs", &pack_signs_cpu);
  m.impl("bitwise_conv2d", &bitwise_conv2d_cpu);
}
