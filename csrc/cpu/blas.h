// Small row-major GEMMs for the CPU kernels: C[M, N] = op(A)[M, K] @ op(B)[K, N] + beta * C.
//
// ATen's CPU BLAS layer (at::native::cpublas::gemm) is not exported to extensions, but the BLAS that torch links is:
// the x86 wheels carry MKL inside libtorch_cpu, whose sgemm_ / dgemm_ / cblas_gemm_bf16bf16f32 are looked up once
// at load time (dlsym). Where torch has no such BLAS, an at::vec loop computes the same product (slower).
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <dlfcn.h>

#include <cstdint>
#include <vector>

namespace din::cpu::blas {

using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                          const int*, const float*, const int*, const float*, float*, const int*);
using dgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const double*,
                          const double*, const int*, const double*, const int*, const double*, double*, const int*);
// cblas_gemm_bf16bf16f32(layout, transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc)
using bf16gemm_fn = void (*)(int, int, int, int, int, int, float, const void*, int, const void*, int, float, float*,
                             int);

struct Library {
  sgemm_fn sgemm = nullptr;
  dgemm_fn dgemm = nullptr;
  bf16gemm_fn bf16gemm = nullptr;
  Library() {
    sgemm = reinterpret_cast<sgemm_fn>(dlsym(RTLD_DEFAULT, "sgemm_"));
    dgemm = reinterpret_cast<dgemm_fn>(dlsym(RTLD_DEFAULT, "dgemm_"));
    bf16gemm = reinterpret_cast<bf16gemm_fn>(dlsym(RTLD_DEFAULT, "cblas_gemm_bf16bf16f32"));
  }
};

inline const Library& library() {
  static const Library lib;
  return lib;
}

// op(X)[r, c] of a row-major X with leading dimension ld
template <typename T>
inline T at_op(const T* X, int64_t ld, bool trans, int64_t r, int64_t c) {
  return trans ? X[c * ld + r] : X[r * ld + c];
}

// the portable product: rows of C accumulate rows of op(B) (copied to a contiguous [K, N] panel when transposed)
template <typename In, typename Acc>
void gemm_loops(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const In* A, int64_t lda, const In* B,
                int64_t ldb, Acc beta, Acc* C, int64_t ldc) {
  std::vector<Acc> panel(K * N);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < N; ++j) panel[k * N + j] = static_cast<Acc>(at_op(B, ldb, tb, k, j));
  using V = at::vec::Vectorized<Acc>;
  for (int64_t i = 0; i < M; ++i) {
    Acc* c = C + i * ldc;
    for (int64_t j = 0; j < N; ++j) c[j] = beta == Acc(0) ? Acc(0) : beta * c[j];
    for (int64_t k = 0; k < K; ++k) {
      const Acc a = static_cast<Acc>(at_op(A, lda, ta, i, k));
      const Acc* p = panel.data() + k * N;
      int64_t j = 0;
      for (; j + V::size() <= N; j += V::size())
        at::vec::fmadd(V(a), V::loadu(p + j), V::loadu(c + j)).store(c + j);
      for (; j < N; ++j) c[j] += a * p[j];
    }
  }
}

// row-major C = op(A) op(B) + beta C is column-major C^T = op(B)^T op(A)^T
inline void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                 int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (auto f = library().sgemm) {
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    const float one = 1.0f;
    f(tb ? "T" : "N", ta ? "T" : "N", &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  gemm_loops<float, float>(ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);
}

inline void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B,
                 int64_t ldb, double beta, double* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (auto f = library().dgemm) {
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    const double one = 1.0;
    f(tb ? "T" : "N", ta ? "T" : "N", &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  gemm_loops<double, double>(ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);
}

// bfloat16 operands, float32 accumulation and output
inline void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
                 const c10::BFloat16* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (auto f = library().bf16gemm) {
    constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
    f(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, static_cast<int>(M), static_cast<int>(N),
      static_cast<int>(K), 1.0f, A, static_cast<int>(lda), B, static_cast<int>(ldb), beta, C, static_cast<int>(ldc));
    return;
  }
  gemm_loops<c10::BFloat16, float>(ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);
}

inline const char* engine() {
  const Library& lib = library();
  return lib.sgemm && lib.dgemm ? (lib.bf16gemm ? "mkl (sgemm, dgemm, bf16bf16f32)" : "mkl (sgemm, dgemm)")
                                : "at::vec loops";
}

}  // namespace din::cpu::blas
