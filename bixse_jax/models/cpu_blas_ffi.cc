// Matmuls through Intel MKL as XLA FFI handlers for the CPU backend:
//   BixseSgemm    row-major float32 y[..., N] = x[..., K] @ w[K, N] (the dense layers, forward);
//   BixseGemmBf16 row-major c[m, n] = op(a) @ op(b), bfloat16 inputs, float32 accumulation and
//                 output, either operand transposed (the weight gradient x^T @ g, whose layout
//                 XLA's fast bf16 dot does not take).
// bixse_jax/models/cpu_blas.py hands over the addresses of MKL's ILP64 functions once
// (bixse_set_sgemm, bixse_set_gemm_bf16), so this file links to no library and builds with the
// jaxlib headers alone.
#include <algorithm>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

using SgemmFn = void (*)(int order, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                         const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                         int64_t ldc);

using GemmBf16Fn = void (*)(int order, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                            const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, float beta, float* c,
                            int64_t ldc);

static SgemmFn g_sgemm = nullptr;
static GemmBf16Fn g_gemm_bf16 = nullptr;
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;  // CBLAS enum values

extern "C" void bixse_set_sgemm(void* fn) { g_sgemm = reinterpret_cast<SgemmFn>(fn); }
extern "C" void bixse_set_gemm_bf16(void* fn) { g_gemm_bf16 = reinterpret_cast<GemmBf16Fn>(fn); }

static ffi::Error Matmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  if (g_sgemm == nullptr) return ffi::Error::InvalidArgument("bixse sgemm: no BLAS was set");
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (wd.size() != 2 || xd.size() < 1 || xd.back() != wd[0]) {
    return ffi::Error::InvalidArgument("bixse sgemm: x[..., K] and w[K, N] do not contract");
  }
  const int64_t k = wd[0], n = wd[1];
  int64_t m = 1;
  for (size_t i = 0; i + 1 < xd.size(); ++i) m *= xd[i];
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {  // an empty sum
    std::fill(y->typed_data(), y->typed_data() + m * n, 0.0f);
    return ffi::Error::Success();
  }
  g_sgemm(kRowMajor, kNoTrans, kNoTrans, m, n, k, 1.0f, x.typed_data(), k, w.typed_data(), n, 0.0f,
          y->typed_data(), n);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(BixseSgemm, Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// a [m, k] (or [k, m] with trans_a), b [k, n] (or [n, k] with trans_b), both row-major -> c [m, n].
static ffi::Error GemmBf16(ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b, int64_t trans_a, int64_t trans_b,
                           ffi::ResultBuffer<ffi::F32> c) {
  if (g_gemm_bf16 == nullptr) return ffi::Error::InvalidArgument("bixse gemm_bf16: no BLAS was set");
  auto ad = a.dimensions();
  auto bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2) return ffi::Error::InvalidArgument("bixse gemm_bf16: operands must be 2-D");
  const int64_t m = trans_a ? ad[1] : ad[0], k = trans_a ? ad[0] : ad[1];
  const int64_t n = trans_b ? bd[0] : bd[1], kb = trans_b ? bd[1] : bd[0];
  if (k != kb) return ffi::Error::InvalidArgument("bixse gemm_bf16: op(a) and op(b) do not contract");
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::fill(c->typed_data(), c->typed_data() + m * n, 0.0f);
    return ffi::Error::Success();
  }
  g_gemm_bf16(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, m, n, k, 1.0f,
              reinterpret_cast<const uint16_t*>(a.untyped_data()), ad[1],
              reinterpret_cast<const uint16_t*>(b.untyped_data()), bd[1], 0.0f, c->typed_data(), n);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(BixseGemmBf16, GemmBf16,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Attr<int64_t>("trans_a")
                                  .Attr<int64_t>("trans_b")
                                  .Ret<ffi::Buffer<ffi::F32>>());
