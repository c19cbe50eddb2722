// What the CUDA kernels of csrc/cuda share: element types and their conversions, warp reductions, the shared-memory
// arena of a block, the block-wide matrix product (tensor cores for 16-bit operands, float32 SIMT otherwise), the
// 16-byte row copies, the fixed-order reduction of per-block partial sums, and the host-side input checks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "../common/math.h"

namespace din::cuda {

constexpr int kThreads = 256;  // threads of every block (8 warps)
constexpr int kWarps = kThreads / 32;

// ---------------------------------------------------------------------------------------------- element types

// Loads and stores of an element type T in its compute type (float32; float64 for float64)
template <typename T>
struct Conv;
template <>
struct Conv<float> {
  using acc = float;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};
template <>
struct Conv<double> {
  using acc = double;
  static __device__ __forceinline__ double load(double v) { return v; }
  static __device__ __forceinline__ double store(double v) { return v; }
};
template <>
struct Conv<__half> {
  using acc = float;
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Conv<__nv_bfloat16> {
  using acc = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
using acc_t = typename Conv<T>::acc;

template <typename T>
__device__ __forceinline__ acc_t<T> to_acc(T v) {
  return Conv<T>::load(v);
}

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v) {
  return Conv<T>::store(v);
}

// the CUDA element type of an ATen scalar type (same bits)
template <typename T>
struct CudaType { using type = T; };
template <>
struct CudaType<at::Half> { using type = __half; };
template <>
struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };

template <typename T>
constexpr bool kTensorCore = !std::is_same_v<T, float>;  // 16-bit operands go to the tensor cores

inline int round16(int n) { return (n + 15) / 16 * 16; }
__device__ __forceinline__ int round16_d(int n) { return (n + 15) / 16 * 16; }

// Leading dimension (elements) of a shared-memory operand row of n (padded) columns: 16-bit rows padded by 16 bytes
// (a multiple of 8 elements, as wmma wants, off the 128-byte bank period); float32 rows of the SIMT product padded to
// an odd length (a column walk touches 32 different banks).
__host__ __device__ constexpr int operand_ld_of(bool f32, int n_padded) { return f32 ? n_padded + 1 : n_padded + 8; }
template <typename T>
__host__ __device__ constexpr int operand_ld(int n_padded) {
  return operand_ld_of(std::is_same_v<T, float>, n_padded);
}
// Leading dimension of a float32 accumulator / product tile of n (padded) columns (a multiple of 4, as wmma wants).
__host__ __device__ constexpr int acc_ld(int n_padded) { return n_padded + 4; }

// ------------------------------------------------------------------------------------------------- reductions

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// sum of one value per thread over the block, in a fixed order (every thread gets the result); scratch: kWarps floats
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  return total;
}

// ------------------------------------------------------------------------------------- block matrix product

enum class Layout { kRow, kCol };

// C[M, N] (+)= A[M, K] @ B[K, N] by the whole block, every dimension a multiple of 16:
//   A(m, k) = A[m * lda + k] (kRow) or A[k * lda + m] (kCol); B(k, n) = B[k * ldb + n] (kRow) or B[n * ldb + k] (kCol);
//   C(m, n) = C[m * ldc + n], float32, accumulated into when kAccumulate.
// Warp w owns the 16 x 16 output tiles w, w + 8, ...: with 16-bit T a wmma m16n16k16 product on the tensor cores
// (float32 accumulation), with float T a SIMT loop (each lane: one column, 8 rows of the tile). Operands and C may
// live in shared or global memory (generic addresses; wmma wants 32-byte aligned tile corners, which the padded
// layouts give); each is a small matrix (32-bit offsets). The caller synchronises before (operands written) and
// after (C read).
template <typename T, Layout LA, Layout LB, bool kAccumulate>
__device__ __forceinline__ void block_gemm(int M, int N, int K, const T* __restrict__ A, int lda,
                                           const T* __restrict__ B, int ldb, float* C, int ldc) {
  const int warp = threadIdx.x >> 5;
  const int tiles_n = N / 16, tiles = (M / 16) * tiles_n;
  if constexpr (kTensorCore<T>) {
    using namespace nvcuda;
    using LayoutA = std::conditional_t<LA == Layout::kRow, wmma::row_major, wmma::col_major>;
    using LayoutB = std::conditional_t<LB == Layout::kRow, wmma::row_major, wmma::col_major>;
    for (int tile = warp; tile < tiles; tile += kWarps) {
      const int m0 = tile / tiles_n * 16, n0 = tile % tiles_n * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
      float* cp = C + m0 * ldc + n0;
      if (kAccumulate) {
        wmma::load_matrix_sync(c, cp, ldc, wmma::mem_row_major);
      } else {
        wmma::fill_fragment(c, 0.f);
      }
      for (int k0 = 0; k0 < K; k0 += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayoutA> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> b;
        wmma::load_matrix_sync(a, LA == Layout::kRow ? A + m0 * lda + k0
                                                     : A + k0 * lda + m0, lda);
        wmma::load_matrix_sync(b, LB == Layout::kRow ? B + k0 * ldb + n0
                                                     : B + n0 * ldb + k0, ldb);
        wmma::mma_sync(c, a, b, c);
      }
      wmma::store_matrix_sync(cp, c, ldc, wmma::mem_row_major);
    }
  } else {
    const int lane = threadIdx.x & 31, col = lane & 15, row0 = lane >> 4;
    for (int tile = warp; tile < tiles; tile += kWarps) {
      const int m0 = tile / tiles_n * 16, n = tile % tiles_n * 16 + col;
      float acc[8];
#pragma unroll
      for (int j = 0; j < 8; ++j)
        acc[j] = kAccumulate ? C[(m0 + row0 + 2 * j) * ldc + n] : 0.f;
      for (int k = 0; k < K; ++k) {
        const float b = LB == Layout::kRow ? B[k * ldb + n] : B[n * ldb + k];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int m = m0 + row0 + 2 * j;
          const float a = LA == Layout::kRow ? A[m * lda + k] : A[k * lda + m];
          acc[j] = fmaf(a, b, acc[j]);
        }
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) C[(m0 + row0 + 2 * j) * ldc + n] = acc[j];
    }
  }
}

// ------------------------------------------------------------------------------------------------ row copies

// Rows [0, rows) of a row-major [*, cols] global matrix (row stride cols) into a shared [BT, ld] tile as T, columns
// [cols, cols_padded) and rows [rows, BT) as zeros (so that padded products add exact zeros). vec: src is 16-byte
// aligned and cols * sizeof(S) a multiple of 16 (checked by the launcher); then every thread moves 16 bytes a load.
template <typename S, typename T>
__device__ __forceinline__ void load_tile(const S* __restrict__ src, int64_t rows, int cols, int cols_padded, int BT,
                                          T* dst, int ld, bool vec) {
  if constexpr (std::is_same_v<S, T>) {
    if (vec) {
      constexpr int V = 16 / sizeof(S);
      const int per_row = cols_padded / V;  // cols_padded is a multiple of 16, so of V
#pragma unroll 4
      for (int i = threadIdx.x; i < BT * per_row; i += kThreads) {
        const int r = i / per_row, c = (i % per_row) * V;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r < rows && c < cols) v = __ldg(reinterpret_cast<const uint4*>(src + static_cast<int64_t>(r) * cols + c));
        T* d = dst + r * ld + c;
        if constexpr (sizeof(T) == 2) {
          *reinterpret_cast<uint4*>(d) = v;  // 16-bit rows are 16-byte aligned (operand_ld)
        } else {
          const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
          for (int j = 0; j < V; ++j) d[j] = e[j];
        }
      }
      return;
    }
  }
  for (int i = threadIdx.x; i < BT * cols_padded; i += kThreads) {
    const int r = i / cols_padded, c = i % cols_padded;
    float v = 0.f;
    if (r < rows && c < cols) v = to_acc(src[static_cast<int64_t>(r) * cols + c]);
    dst[r * ld + c] = from_acc<T>(v);
  }
}

// ------------------------------------------------------------------------------------- fixed-order reductions

// out[i] = sum_p part[p * n + i] for i < n, p = 0 .. P - 1 in order (bit-reproducible, no atomics)
template <typename A>
__global__ void __launch_bounds__(kThreads) sum_slices_kernel(const A* __restrict__ part, int64_t P, int64_t n,
                                                              A* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= n) return;
  A s = 0;
  for (int64_t p = 0; p < P; ++p) s += part[p * n + i];
  out[i] = s;
}

// the sum over dim 0 of a contiguous [P, n] float32/float64 tensor, in order
inline at::Tensor sum_slices(const at::Tensor& part) {
  const int64_t P = part.size(0), n = part.size(1);
  at::Tensor out = at::empty({n}, part.options());
  if (n == 0) return out;
  if (P == 0) return out.zero_();
  const int blocks = static_cast<int>((n + kThreads - 1) / kThreads);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (part.scalar_type() == at::kDouble) {
    sum_slices_kernel<double><<<blocks, kThreads, 0, stream>>>(part.data_ptr<double>(), P, n, out.data_ptr<double>());
  } else {
    sum_slices_kernel<float><<<blocks, kThreads, 0, stream>>>(part.data_ptr<float>(), P, n, out.data_ptr<float>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ------------------------------------------------------------------------------------------------ host side

// f(T{}) with T the CUDA element type of `dtype`: float32, bfloat16 or float16, and float64 when kDouble; another
// dtype raises, naming `what`
template <bool kDouble, typename F>
auto dispatch(at::ScalarType dtype, const char* what, const F& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(__nv_bfloat16{});
    case at::kHalf: return f(__half{});
    default: break;
  }
  if constexpr (kDouble) {
    if (dtype == at::kDouble) return f(double{});
  }
  TORCH_CHECK(false, what, " must be float32, bfloat16, float16", kDouble ? " or float64" : "", ", got ", dtype);
}

inline void check_cuda(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but the first input is on ",
              ref.device());
}

inline int num_sms(const at::Tensor& t) {
  return at::cuda::getDeviceProperties(t.device().index())->multiProcessorCount;
}

inline int64_t smem_optin(const at::Tensor& t) {
  return static_cast<int64_t>(at::cuda::getDeviceProperties(t.device().index())->sharedMemPerBlockOptin);
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace din::cuda
