// Row-major float32 matmul y[..., N] = x[..., K] @ w[K, N] through Intel MKL's sgemm, as an XLA FFI
// handler for the CPU backend (the dense layers). bixse_jax/models/cpu_blas.py hands over the
// address of MKL's ILP64 cblas_sgemm_64 once (bixse_set_sgemm), so this file links to no library
// and builds with the jaxlib headers alone.
#include <algorithm>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

using SgemmFn = void (*)(int order, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                         const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                         int64_t ldc);

static SgemmFn g_sgemm = nullptr;
constexpr int kRowMajor = 101, kNoTrans = 111;  // CBLAS enum values

extern "C" void bixse_set_sgemm(void* fn) { g_sgemm = reinterpret_cast<SgemmFn>(fn); }

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
