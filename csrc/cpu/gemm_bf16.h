// bfloat16 products with float32 accumulation on AVX512-BF16 (vdpbf16ps: 32 multiply-adds an instruction, twice
// float32's FMA rate). ATen's brgemm covers bfloat16 only where it can pack B for AMX (at::native::cpublas::
// could_pack), and MKL's cblas_gemm_bf16bf16f32 runs at 6-9 GFLOP/s at these sizes (measured on the AMD EPYC), so
// the forward's first layer uses this register-blocked kernel where the build machine has AVX512-BF16.
//
// Layout: A [M, Kp] row-major bfloat16 with Kp even; B in VNNI pairs, element (k, j) at Bv[((k / 2) * Np + j) * 2 +
// k % 2] with Np the column count rounded up to 16 (the padding columns and an odd K's last row hold zeros).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define DIN_HAS_BF16_DOT 1

namespace din::cpu::bf16 {

inline int64_t padded_cols(int64_t n) { return (n + 15) / 16 * 16; }
inline int64_t padded_depth(int64_t k) { return (k + 1) / 2 * 2; }

// The VNNI form of B^T rows built as float32: writes rows k and k + 1 (row1 may be null for an odd K's last row)
// of n float32 columns into Bv.
inline void pack_pair(const float* row0, const float* row1, int64_t k, int64_t n, int64_t Np, c10::BFloat16* Bv) {
  // element i of the output takes element idx[i] of [row0 (16) | row1 (16)]: (row0[j], row1[j]) pairs
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21,
                                       5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  c10::BFloat16* dst = Bv + (k / 2) * Np * 2;
  for (int64_t j = 0; j < Np; j += 16) {
    const int64_t count = std::min<int64_t>(16, std::max<int64_t>(0, n - j));
    const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1);
    const __m512 a = _mm512_maskz_loadu_ps(mask, row0 + j);
    const __m512 b = row1 ? _mm512_maskz_loadu_ps(mask, row1 + j) : _mm512_setzero_ps();
    const __m512i ab = (__m512i)_mm512_cvtne2ps_pbh(b, a);  // low 16: a, high 16: b
    _mm512_storeu_si512(dst + j * 2, _mm512_permutexvar_epi16(idx, ab));
  }
}

template <int R, int NV>
inline void block(int64_t Kp, const c10::BFloat16* A, int64_t lda, const c10::BFloat16* Bv, int64_t Np, int64_t j0,
                  int64_t N, bool add, float* C, int64_t ldc) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < Kp / 2; ++p) {
    __m512i b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_si512(Bv + (p * Np + j0 + 16 * v) * 2);
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, A + r * lda + 2 * p, sizeof(pair));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, (__m512bh)b[v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) {
      const int64_t col = j0 + 16 * v, count = std::min<int64_t>(16, N - col);
      if (count <= 0) continue;
      const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1);
      float* dst = C + r * ldc + col;
      __m512 out = add ? _mm512_add_ps(acc[r][v], _mm512_maskz_loadu_ps(mask, dst)) : acc[r][v];
      _mm512_mask_storeu_ps(dst, mask, out);
    }
}

template <int NV>
inline void rows(int64_t M, int64_t Kp, const c10::BFloat16* A, int64_t lda, const c10::BFloat16* Bv, int64_t Np,
                 int64_t j0, int64_t N, bool add, float* C, int64_t ldc) {
  int64_t i = 0;
  for (; i + 4 <= M; i += 4) block<4, NV>(Kp, A + i * lda, lda, Bv, Np, j0, N, add, C + i * ldc, ldc);
  switch (M - i) {
    case 3: block<3, NV>(Kp, A + i * lda, lda, Bv, Np, j0, N, add, C + i * ldc, ldc); break;
    case 2: block<2, NV>(Kp, A + i * lda, lda, Bv, Np, j0, N, add, C + i * ldc, ldc); break;
    case 1: block<1, NV>(Kp, A + i * lda, lda, Bv, Np, j0, N, add, C + i * ldc, ldc); break;
    default: break;
  }
}

// C[M, N] (+)= A[M, Kp] @ B, float32 C with leading dimension ldc
inline void gemm(int64_t M, int64_t N, int64_t Kp, const c10::BFloat16* A, int64_t lda, const c10::BFloat16* Bv,
                 bool add, float* C, int64_t ldc) {
  const int64_t Np = padded_cols(N);
  for (int64_t j0 = 0; j0 < Np; j0 += 80) {  // 4 rows x 5 vectors: 20 accumulators of the 32 registers
    switch (std::min<int64_t>(5, (Np - j0) / 16)) {
      case 5: rows<5>(M, Kp, A, lda, Bv, Np, j0, N, add, C, ldc); break;
      case 4: rows<4>(M, Kp, A, lda, Bv, Np, j0, N, add, C, ldc); break;
      case 3: rows<3>(M, Kp, A, lda, Bv, Np, j0, N, add, C, ldc); break;
      case 2: rows<2>(M, Kp, A, lda, Bv, Np, j0, N, add, C, ldc); break;
      default: rows<1>(M, Kp, A, lda, Bv, Np, j0, N, add, C, ldc); break;
    }
  }
}

}  // namespace din::cpu::bf16
#endif
