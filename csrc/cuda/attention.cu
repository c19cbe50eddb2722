// Target attention (SPEC section 1) on CUDA GPUs: the CUDA kernels of din_kernels::target_attention_fwd and
// din_kernels::target_attention_bwd (schemas in din_kernels/ops/schema.py, defined by csrc/register.cpp; the CPU
// kernels of the same ops, csrc/cpu/attention.cpp, run the same algorithm).
//
// Work. A block of 256 threads (8 warps) takes samples b = blockIdx.x, blockIdx.x + gridDim.x, ... (a persistent
// grid of at most a few blocks per SM; with query_offsets, several candidates per history, it takes users and all of
// a user's candidates in order, so that the candidates' key gradients add up in float32 without races). Per sample
// it builds, in shared memory, the factorised first layer
//   M_b = (Wk - Wd) + Wp * q_b  [H1, D]  (c_b = q_b @ (Wq + Wd)^T + b1 comes from one matmul of the launcher)
// and walks the sample's L behaviours in tiles of BT rows (BT = 64, 32 or 16, the largest that fits):
//   Z1 = K_tile @ M_b^T + c_b,  H_i = act(Z_i),  Z_{i+1} = H_i @ W_{i+1}^T + b_{i+1},  s = H_n @ w_last + b_last,
// then the pooling sum_t w_t k_t (an online softmax of scale * s under "softmax": running max and sum merged tile by
// tile, flash-attention style, with csrc/common/math.h's SoftmaxState). The [B, T, 4D] concatenation and the
// [B, T, H] activations exist only in shared memory, one tile at a time.
//
// Products. Every matrix product is csrc/cuda/common.cuh's block_gemm: bfloat16/float16 inputs run wmma m16n16k16 on
// the tensor cores (operands in the input dtype, float32 accumulation); float32 inputs run a float32 SIMT loop (no
// TF32: its 10-bit mantissa misses the float32 tolerance). The elementwise work (activations, Dice, softmax) is
// float32, in csrc/common/math.h's functions, the CPU kernels' own.
//
// Backward (recompute, as flash-attention): per tile the forward again, then ds (none: dw; softmax:
// scale * w * (dw - delta_b), with dw_t = grad_scores_t + k_t . grad_out_b, w and delta_b = sum_t w_t grad_scores_t +
// grad_out_b . v_U from the forward's float32 scores_acc and out_acc), the layers top-down (dW_i += dZ_i^T H_{i-1},
// dH_{i-1} = dZ_i @ W_i), G = dZ_1 and
//   dK = G @ M_b + w grad_out_b,  d(Wk - Wd) += G^T K,  dWp += G^T (K * q_b),  dq_b += sum_t k_t * (G @ Wp)_t,
//   dc_b = sum_t G_t;  the launcher adds dq += dc @ (Wq + Wd), d(Wq + Wd) = dc^T Q, db1 = sum_b dc_b.
// Weight gradients summed over the batch are per-block partial sums (in shared memory when they fit, else in the
// block's own slice of a global buffer), written once per block and summed over the blocks in block order by
// sum_slices: bit-reproducible, no atomics.
//
// Dice in training: the batch statistics of hidden layer i need every valid behaviour first, so the forward runs
// attention_stats_kernel once per hidden layer, bottom-up (per-block moments merged with Chan's formula in block
// order), and the backward runs its kernel once per hidden layer in "sums" mode (stop = i: the batch sums sum g and
// sum g u of layer i, given those of the layers above), top-down, before the pass that computes the gradients.
//
// Memory safety: lengths are clamped to [0, T] and offsets to ranges inside [0, N] (math.h's sample_range); no key
// row outside the sample's clamped range is read or written, whatever lengths/offsets hold. Indices are 64-bit.
#include <torch/library.h>

#include <algorithm>
#include <string_view>
#include <vector>

#include "../common/checks.h"
#include "common.cuh"

namespace din::cuda {
namespace {

using at::Tensor;

constexpr int kMaxLayers = 3;
constexpr int kMaxWidth = 256;  // D and every hidden width

// ---------------------------------------------------------------------------------------- one call's parameters

struct Params {
  int64_t B, U, T, N;  // samples (candidates with query_offsets), users, padded length (0 with offsets), keys rows
  int D, Dp, n, BT, act, softmax, dice_train, stop, vec, has_alpha;  // Dp: D rounded up to 16; n: hidden layers
  float scale;
  int H[kMaxLayers], Hp[kMaxLayers], col[kMaxLayers];  // widths, rounded up to 16, first column in [sum H] vectors
  const void* keys;                                     // [B, T, D] or [N, D], T
  const int64_t *lengths, *offsets;                     // [U] or [U + 1]: exactly one is set
  const int64_t *bounds, *score_base;                   // query_offsets: user u's candidates [bounds[u], bounds[u + 1])
                                                        // and their first score row (jagged); null without
  const float *q, *C, *A, *Wp;                          // [B, D], [B, H1], [H1, D], [H1, D]
  const void* Wp_op;                                    // [H1p, Dp] T, zero padded
  const void* W_op[kMaxLayers];                         // W_op[i], i >= 1: [Hp_i, Hp_{i-1}] T, zero padded
  const float* bias[kMaxLayers];                        // bias[i], i >= 1: [H_i]
  const float *w_last, *b_last;                         // [Hn], [1]
  const float *alpha, *mean, *r;                        // [sum H] or null: PReLU weight / Dice alpha; Dice stats
  const float* count;                                   // Dice training: the number of valid behaviours
  const float *sum_g, *sum_gu;                          // backward, Dice training: [sum H] batch sums
  const float *go, *gs, *w_saved, *out_saved;           // backward: grad_out [B, D], grad_scores, scores_acc, out_acc
  float *out, *w;                                       // forward: [B, D], scores' layout (float32)
  void* dkeys;                                          // backward: keys' layout, T
  float* dkeys_acc;                                     // with query_offsets: keys' layout, float32, accumulated
  float *dq, *dc, *part, *moments;                      // [B, D], [B, H1], [blocks, part_stride], [blocks, 3, Hp_i]
  int64_t part_stride;
  // the partial sums' layout: float offsets inside a block's region of p_floats floats
  int64_t p_dA, p_dWp, p_dW[kMaxLayers], p_db[kMaxLayers], p_dwl, p_dbl, p_dact, p_sg, p_sgu, p_floats;
};

// Byte offsets of a block's shared-memory buffers (-1: absent), each 128-byte aligned.
struct Smem {
  int Ms, Ks, Kq, Zf[kMaxLayers], Hm[kMaxLayers], dH, dZ, Out, rows, vecs, red, mom, part, bytes;
};

enum Kind { kForward = 0, kStats = 1, kBackward = 2 };

// The shared-memory plan of a kernel kind (f32: float32 operands, else 16-bit). The Python side mirrors it
// (din_kernels/_cuda_plan.py) to refuse what no launch fits.
Smem plan(Kind kind, bool f32, const Params& P, int BT, int64_t part_floats) {
  Smem S;
  int64_t cur = 0;
  auto take = [&](int64_t bytes) {
    const int64_t off = (cur + 127) / 128 * 128;
    cur = off + bytes;
    return static_cast<int>(off);
  };
  const int64_t E = f32 ? 4 : 2, ldD = operand_ld_of(f32, P.Dp);
  int Hmax = 0;
  for (int i = 0; i < P.n; ++i) Hmax = std::max(Hmax, P.Hp[i]);
  S.Ms = take(P.Hp[0] * ldD * E);
  S.Ks = take(BT * ldD * E);
  S.Kq = kind == kBackward ? take(BT * ldD * E) : -1;
  for (int i = 0; i < kMaxLayers; ++i) S.Zf[i] = S.Hm[i] = -1;
  S.dH = S.dZ = S.Out = S.mom = S.part = -1;
  if (kind == kBackward) {
    for (int i = 0; i < P.n; ++i) S.Zf[i] = take(BT * acc_ld(P.Hp[i]) * 4);
    for (int i = 0; i + 1 < P.n; ++i) S.Hm[i] = take(BT * operand_ld_of(f32, P.Hp[i]) * E);
    S.dH = take(BT * acc_ld(Hmax) * 4);
    S.dZ = take(BT * operand_ld_of(f32, Hmax) * E);
    S.Out = take(BT * acc_ld(P.Dp) * 4);
  } else {  // one buffer of each kind, reused layer after layer
    const int z = take(BT * acc_ld(Hmax) * 4);
    const int h = P.n > 1 ? take(BT * operand_ld_of(f32, Hmax) * E) : -1;
    for (int i = 0; i < P.n; ++i) {
      S.Zf[i] = z;
      S.Hm[i] = h;
    }
  }
  S.rows = take(3 * BT * 4);
  S.vecs = take((2 * P.Hp[0] + 3 * P.Dp) * 4);
  S.red = take(64 * 4);
  if (kind == kStats) S.mom = take(2 * Hmax * 4);
  if (part_floats > 0) S.part = take(part_floats * 4);
  S.bytes = static_cast<int>((cur + 127) / 128 * 128);
  return S;
}

template <typename X>
__device__ __forceinline__ X* at_off(unsigned char* base, int off) {
  return reinterpret_cast<X*>(base + off);
}

// ------------------------------------------------------------------------------------------------ device parts

// f(b, start, L, ostart) for each sample b of the block: samples b = blockIdx.x, blockIdx.x + gridDim.x, ..., or with
// query_offsets the candidates of users u = blockIdx.x, ... (one block takes all of a user's candidates, in order, so
// that their gradients add into the user's key rows without races); start, L: the clamped key rows of b's history;
// ostart: the first row of b's scores
template <typename F>
__device__ __forceinline__ void for_each_sample(const Params& P, const F& f) {
  for (int64_t u = blockIdx.x; u < P.U; u += gridDim.x) {
    int64_t start, L;
    sample_range(P.lengths, P.offsets, u, P.T, P.N, &start, &L);
    const int64_t c0 = P.bounds ? P.bounds[u] : u, c1 = P.bounds ? P.bounds[u + 1] : u + 1;
    for (int64_t b = c0; b < c1; ++b)
      f(b, start, L, P.lengths ? b * P.T : P.bounds ? P.score_base[u] + (b - c0) * L : start);
  }
}

// hidden layer i's activation at channel c (the PReLU weight or Dice alpha, Dice's mean and r, per channel)
__device__ __forceinline__ float act_fwd(const Params& P, int i, int c, float z) {
  const int j = P.col[i] + c;
  return activation_forward<float>(P.act, z, P.alpha ? P.alpha[j] : 0.f, P.mean ? P.mean[j] : 0.f,
                                   P.r ? P.r[j] : 1.f);
}

// M_b = A + Wp * q_b [H1p, Dp] (zero padded) into Ms, c_b [H1p] into the first vector
template <typename T>
__device__ void sample_setup(const Params& P, const Smem& S, unsigned char* sm, int64_t b) {
  T* Ms = at_off<T>(sm, S.Ms);
  float* cb = at_off<float>(sm, S.vecs);
  const int ldD = operand_ld<T>(P.Dp), H1 = P.H[0], H1p = P.Hp[0], D = P.D, Dp = P.Dp;
  const float* qb = P.q + b * D;
  for (int e = threadIdx.x; e < H1p * Dp; e += kThreads) {
    const int h = e / Dp, d = e % Dp;
    float v = 0.f;
    if (h < H1 && d < D) v = fmaf(P.Wp[h * D + d], qb[d], P.A[h * D + d]);
    Ms[h * ldD + d] = from_acc<T>(v);
  }
  for (int h = threadIdx.x; h < H1p; h += kThreads) cb[h] = h < H1 ? P.C[b * H1 + h] : 0.f;
}

// The tile's forward up to layer `upto` (n: every layer): Zf[i] [BT, Hp_i] the pre-activations (bias added; zero at
// padded columns), Hm[i] the activations that feed the next product (layers below min(upto, n - 1)). Ends synced.
template <typename T>
__device__ void forward_tile(const Params& P, const Smem& S, unsigned char* sm, int upto) {
  const T* Ms = at_off<T>(sm, S.Ms);
  const T* Ks = at_off<T>(sm, S.Ks);
  const float* cb = at_off<float>(sm, S.vecs);
  const int BT = P.BT, ldD = operand_ld<T>(P.Dp);
  for (int i = 0; i < P.n; ++i) {
    const int Hi = P.H[i], Hpi = P.Hp[i], ldz = acc_ld(Hpi), ldh = operand_ld<T>(Hpi);
    float* Z = at_off<float>(sm, S.Zf[i]);
    if (i == 0) {
      block_gemm<T, Layout::kRow, Layout::kCol, false>(BT, Hpi, P.Dp, Ks, ldD, Ms, ldD, Z, ldz);
    } else {
      block_gemm<T, Layout::kRow, Layout::kCol, false>(BT, Hpi, P.Hp[i - 1], at_off<T>(sm, S.Hm[i - 1]),
                                                       operand_ld<T>(P.Hp[i - 1]), static_cast<const T*>(P.W_op[i]),
                                                       P.Hp[i - 1], Z, ldz);
    }
    __syncthreads();
    const float* bias = i == 0 ? cb : P.bias[i];
    const bool feed = i < upto && i + 1 < P.n;
    T* Hn = feed ? at_off<T>(sm, S.Hm[i]) : nullptr;
    for (int e = threadIdx.x; e < BT * Hpi; e += kThreads) {
      const int r = e / Hpi, c = e % Hpi;
      const float z = c < Hi ? Z[r * ldz + c] + bias[c] : 0.f;
      Z[r * ldz + c] = z;
      if (feed) Hn[r * ldh + c] = from_acc<T>(c < Hi ? act_fwd(P, i, c, z) : 0.f);
    }
    __syncthreads();
    if (i == upto) return;
  }
}

// s[r] = h_n[r] . w_last + b_last for every row of the tile (one warp a row; h_n recomputed from z in float32)
__device__ void tile_scores(const Params& P, const Smem& S, unsigned char* sm) {
  const int i = P.n - 1, Hn = P.H[i], ldz = acc_ld(P.Hp[i]), lane = threadIdx.x & 31;
  const float* Z = at_off<float>(sm, S.Zf[i]);
  float* s = at_off<float>(sm, S.rows);
  const float bl = *P.b_last;
  for (int r = threadIdx.x >> 5; r < P.BT; r += kWarps) {
    float acc = 0.f;
    for (int c = lane; c < Hn; c += 32) acc = fmaf(act_fwd(P, i, c, Z[r * ldz + c]), P.w_last[c], acc);
    acc = warp_sum(acc);
    if (lane == 0) s[r] = acc + bl;
  }
}

// ---------------------------------------------------------------------------------------------------- forward

// (256, 2): two blocks an SM (their shared memory allows two or three at the main shapes); with the default bounds
// ptxas kept the kernels at 64 to 80 registers and spilled
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) attention_fwd_kernel(const __grid_constant__ Params P,
                                                                 const __grid_constant__ Smem S) {
  extern __shared__ __align__(128) unsigned char sm[];
  const T* keys = static_cast<const T*>(P.keys);
  T* Ks = at_off<T>(sm, S.Ks);
  float *s = at_off<float>(sm, S.rows), *w = s + P.BT;
  float* o = at_off<float>(sm, S.vecs) + P.Hp[0];
  float* red = at_off<float>(sm, S.red);  // [0] running max, [1] running sum, [2] the tile's rescale factor
  const int ldD = operand_ld<T>(P.Dp), BT = P.BT, D = P.D;
  for_each_sample(P, [&](int64_t b, int64_t start, int64_t L, int64_t ostart) {
    sample_setup<T>(P, S, sm, b);
    for (int d = threadIdx.x; d < P.Dp; d += kThreads) o[d] = 0.f;
    if (threadIdx.x == 0) {
      red[0] = -INFINITY;
      red[1] = 0.f;
      red[2] = 1.f;
    }
    __syncthreads();
    for (int64_t t0 = 0; t0 < L; t0 += BT) {
      const int rows = static_cast<int>(L - t0 < BT ? L - t0 : BT);
      load_tile<T, T>(keys + (start + t0) * D, rows, D, P.Dp, BT, Ks, ldD, P.vec);
      __syncthreads();
      forward_tile<T>(P, S, sm, P.n);
      tile_scores(P, S, sm);
      __syncthreads();
      float* wrow = P.w + ostart + t0;  // logits (softmax) or weights (none), float32
      if (P.softmax) {
        if (threadIdx.x < 32) {  // the tile's max and sum, merged into the sample's running state
          const int lane = threadIdx.x;
          float m = -INFINITY, l = 0.f;
          for (int r = lane; r < rows; r += 32) m = fmaxf(m, P.scale * s[r]);
          m = warp_max(m);
          for (int r = lane; r < rows; r += 32) l += expf(P.scale * s[r] - m);
          l = warp_sum(l);
          if (lane == 0) {
            SoftmaxState<float> run, tile;
            run.max = red[0];
            run.sum = red[1];
            tile.max = m;
            tile.sum = l;
            const float old_max = run.max;
            const bool had = run.sum > 0.f;
            run.merge(tile);
            red[0] = run.max;
            red[1] = run.sum;
            red[2] = had ? expf(old_max - run.max) : 0.f;
          }
        }
        __syncthreads();
        for (int r = threadIdx.x; r < rows; r += kThreads) {
          const float x = P.scale * s[r];
          w[r] = expf(x - red[0]);
          wrow[r] = x;
        }
      } else {
        for (int r = threadIdx.x; r < rows; r += kThreads) {
          w[r] = s[r];
          wrow[r] = s[r];
        }
      }
      __syncthreads();
      const float factor = red[2];
      for (int d = threadIdx.x; d < D; d += kThreads) {  // v_U (unnormalised under softmax)
        float acc = o[d] * factor;
        for (int r = 0; r < rows; ++r) acc = fmaf(w[r], to_acc(Ks[r * ldD + d]), acc);
        o[d] = acc;
      }
      __syncthreads();
    }
    const float m = red[0], inv = P.softmax ? (red[1] > 0.f ? 1.f / red[1] : 0.f) : 1.f;
    for (int d = threadIdx.x; d < D; d += kThreads) P.out[b * D + d] = o[d] * inv;
    if (P.softmax)
      for (int64_t t = threadIdx.x; t < L; t += kThreads) P.w[ostart + t] = expf(P.w[ostart + t] - m) * inv;
    if (P.lengths != nullptr)  // the padding positions' weights
      for (int64_t t = L + threadIdx.x; t < P.T; t += kThreads) P.w[b * P.T + t] = 0.f;
    __syncthreads();
  });
}

// Dice in training: layer P.stop's per-block moments (count, mean, M2) over the valid behaviours, the layers below
// activated with their batch statistics (already known). moments: [gridDim.x, 3, Hp_i].
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) attention_stats_kernel(const __grid_constant__ Params P,
                                                                   const __grid_constant__ Smem S) {
  extern __shared__ __align__(128) unsigned char sm[];
  const T* keys = static_cast<const T*>(P.keys);
  T* Ks = at_off<T>(sm, S.Ks);
  const int i = P.stop, Hi = P.H[i], Hpi = P.Hp[i], ldz = acc_ld(Hpi), ldD = operand_ld<T>(P.Dp), BT = P.BT;
  float *mean = at_off<float>(sm, S.mom), *m2 = mean + Hpi;
  float* red = at_off<float>(sm, S.red);  // [0] the block's count
  const float* Z = at_off<float>(sm, S.Zf[i]);
  for (int c = threadIdx.x; c < Hpi; c += kThreads) mean[c] = m2[c] = 0.f;
  if (threadIdx.x == 0) red[0] = 0.f;
  __syncthreads();
  for_each_sample(P, [&](int64_t b, int64_t start, int64_t L, int64_t) {
    sample_setup<T>(P, S, sm, b);
    __syncthreads();
    for (int64_t t0 = 0; t0 < L; t0 += BT) {
      const int rows = static_cast<int>(L - t0 < BT ? L - t0 : BT);
      load_tile<T, T>(keys + (start + t0) * P.D, rows, P.D, P.Dp, BT, Ks, ldD, P.vec);
      __syncthreads();
      forward_tile<T>(P, S, sm, i);
      const float n_old = red[0];
      for (int c = threadIdx.x; c < Hi; c += kThreads) {  // the tile's mean, then its centred squares (Chan's merge)
        float sum = 0.f, sq = 0.f;
        for (int r = 0; r < rows; ++r) sum += Z[r * ldz + c];
        const float mu = sum / static_cast<float>(rows);
        for (int r = 0; r < rows; ++r) {
          const float d = Z[r * ldz + c] - mu;
          sq = fmaf(d, d, sq);
        }
        float n_c = n_old;
        merge_moments<float>(&n_c, &mean[c], &m2[c], static_cast<float>(rows), mu, sq);
      }
      __syncthreads();
      if (threadIdx.x == 0) red[0] = n_old + static_cast<float>(rows);
      __syncthreads();
    }
  });
  float* out = P.moments + static_cast<int64_t>(blockIdx.x) * 3 * Hpi;
  for (int c = threadIdx.x; c < Hpi; c += kThreads) {
    out[c] = red[0];
    out[Hpi + c] = mean[c];
    out[2 * Hpi + c] = m2[c];
  }
}

// The blocks' moments of layer i merged in block order (one thread a channel): dice_stats' columns col .. col + Hi
// ([3, sum H]: mean, biased variance, count) and the mean and r = 1 / sqrt(var + eps) that the kernels read.
__global__ void __launch_bounds__(kThreads) moments_merge_kernel(const float* __restrict__ mom, int64_t blocks, int Hpi,
                                                                 int Hi, int col, int64_t sumH, float eps,
                                                                 float* __restrict__ stats, float* __restrict__ mean,
                                                                 float* __restrict__ r) {
  const int c = blockIdx.x * kThreads + threadIdx.x;
  if (c >= Hi) return;
  float n = 0.f, mu = 0.f, m2 = 0.f;
  for (int64_t p = 0; p < blocks; ++p) {
    const float* m = mom + p * 3 * Hpi;
    merge_moments<float>(&n, &mu, &m2, m[c], m[Hpi + c], m[2 * Hpi + c]);
  }
  const float var = n > 0.f ? m2 / n : 0.f;
  stats[col + c] = mu;
  stats[sumH + col + c] = var;
  stats[2 * sumH + col + c] = n;
  mean[col + c] = mu;
  r[col + c] = 1.f / sqrtf(var + eps);
}

// --------------------------------------------------------------------------------------------------- backward

// dst[r * D + c] = Out[r][c] + w[r] * go[c] for the tile's rows (16-byte stores when vec)
template <typename T>
__device__ void store_dkeys(T* dst, int rows, int D, const float* Out, int ldO, const float* w, const float* go,
                            bool vec) {
  constexpr int V = 16 / sizeof(T);
  if (vec) {
    const int per_row = D / V;
    for (int e = threadIdx.x; e < rows * per_row; e += kThreads) {
      const int r = e / per_row, c = e % per_row * V;
      alignas(16) T v[V];
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = from_acc<T>(fmaf(w[r], go[c + j], Out[r * ldO + c + j]));
      *reinterpret_cast<uint4*>(dst + static_cast<int64_t>(r) * D + c) = *reinterpret_cast<const uint4*>(v);
    }
    return;
  }
  for (int e = threadIdx.x; e < rows * D; e += kThreads) {
    const int r = e / D, c = e % D;
    dst[static_cast<int64_t>(r) * D + c] = from_acc<T>(fmaf(w[r], go[c], Out[r * ldO + c]));
  }
}

// count elements of zeros from dst (16-byte stores when vec: dst aligned and count a multiple of 16 bytes)
template <typename T>
__device__ void zero_fill(T* dst, int64_t count, bool vec) {
  if (vec) {
    constexpr int V = 16 / sizeof(T);
    uint4* d = reinterpret_cast<uint4*>(dst);
    for (int64_t e = threadIdx.x; e < count / V; e += kThreads) d[e] = make_uint4(0, 0, 0, 0);
    return;
  }
  for (int64_t e = threadIdx.x; e < count; e += kThreads) dst[e] = from_acc<T>(0.f);
}

// (256, 1): one block an SM, as its shared memory allows at the main shapes (spills otherwise, as the forward's)
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) attention_bwd_kernel(const __grid_constant__ Params P,
                                                                 const __grid_constant__ Smem S) {
  extern __shared__ __align__(128) unsigned char sm[];
  const T* keys = static_cast<const T*>(P.keys);
  T* dkeys = static_cast<T*>(P.dkeys);
  const T* Ms = at_off<T>(sm, S.Ms);
  T *Ks = at_off<T>(sm, S.Ks), *Kq = at_off<T>(sm, S.Kq), *dZ = at_off<T>(sm, S.dZ);
  float *dH = at_off<float>(sm, S.dH), *Out = at_off<float>(sm, S.Out);
  float *s = at_off<float>(sm, S.rows), *w = s + P.BT, *ds = w + P.BT;
  float* qv = at_off<float>(sm, S.vecs) + P.Hp[0];
  float *gov = qv + P.Dp, *dqv = gov + P.Dp, *dcv = dqv + P.Dp;
  float* red = at_off<float>(sm, S.red);
  float* part = S.part >= 0 ? at_off<float>(sm, S.part) : P.part + blockIdx.x * P.part_stride;
  const bool all = P.stop < 0;  // every gradient; else only layer P.stop's Dice batch sums
  const int BT = P.BT, D = P.D, Dp = P.Dp, H1 = P.H[0], H1p = P.Hp[0];
  const int ldD = operand_ld<T>(Dp), ldG = operand_ld<T>(H1p), ldO = acc_ld(Dp);
  float inv_count = 0.f;
  if (P.dice_train) inv_count = *P.count > 0.f ? 1.f / *P.count : 0.f;
  for (int64_t e = threadIdx.x; e < P.p_floats; e += kThreads) part[e] = 0.f;
  __syncthreads();
  for_each_sample(P, [&](int64_t b, int64_t start, int64_t L, int64_t ostart) {
    sample_setup<T>(P, S, sm, b);
    for (int d = threadIdx.x; d < Dp; d += kThreads) {
      qv[d] = d < D ? P.q[b * D + d] : 0.f;
      gov[d] = P.go != nullptr && d < D ? P.go[b * D + d] : 0.f;
      dqv[d] = 0.f;
    }
    for (int h = threadIdx.x; h < H1p; h += kThreads) dcv[h] = 0.f;
    float delta = 0.f;  // softmax: sum_t w_t grad_scores_t + grad_out_b . v_U
    if (P.softmax) {
      float v = 0.f;
      if (P.gs != nullptr)
        for (int64_t t = threadIdx.x; t < L; t += kThreads) v = fmaf(P.w_saved[ostart + t], P.gs[ostart + t], v);
      if (P.go != nullptr)
        for (int d = threadIdx.x; d < D; d += kThreads) v = fmaf(P.go[b * D + d], P.out_saved[b * D + d], v);
      delta = block_sum(v, red);
    }
    if (all && P.lengths != nullptr && P.dkeys_acc == nullptr)  // the padding rows of d keys
      zero_fill<T>(dkeys + (b * P.T + L) * D, (P.T - L) * D, P.vec);
    __syncthreads();
    for (int64_t t0 = 0; t0 < L; t0 += BT) {
      const int rows = static_cast<int>(L - t0 < BT ? L - t0 : BT);
      load_tile<T, T>(keys + (start + t0) * D, rows, D, Dp, BT, Ks, ldD, P.vec);
      __syncthreads();
      if (all)
        for (int e = threadIdx.x; e < BT * Dp; e += kThreads) {
          const int r = e / Dp, d = e % Dp;
          Kq[r * ldD + d] = from_acc<T>(to_acc(Ks[r * ldD + d]) * qv[d]);
        }
      forward_tile<T>(P, S, sm, P.n);
      tile_scores(P, S, sm);
      __syncthreads();
      // dw = grad_scores + k . grad_out, then ds (one warp a row)
      for (int r = threadIdx.x >> 5; r < BT; r += kWarps) {
        const int lane = threadIdx.x & 31;
        float acc = 0.f;
        if (r < rows && P.go != nullptr)
          for (int d = lane; d < D; d += 32) acc = fmaf(to_acc(Ks[r * ldD + d]), gov[d], acc);
        acc = warp_sum(acc);
        if (lane == 0) {
          const int64_t row = ostart + t0 + r;
          const float dw = acc + (r < rows && P.gs != nullptr ? P.gs[row] : 0.f);
          const float wr = r < rows ? (P.softmax ? P.w_saved[row] : s[r]) : 0.f;
          w[r] = wr;
          ds[r] = r < rows ? (P.softmax ? P.scale * wr * (dw - delta) : dw) : 0.f;
        }
      }
      __syncthreads();
      {  // the last layer: d w_last, d b_last and dH_n = ds w_last
        const int i = P.n - 1, Hn = P.H[i], Hpn = P.Hp[i], ldz = acc_ld(Hpn);
        const float* Z = at_off<float>(sm, S.Zf[i]);
        if (all) {
          for (int c = threadIdx.x; c < Hn; c += kThreads) {
            float acc = 0.f;
            for (int r = 0; r < rows; ++r) acc = fmaf(ds[r], act_fwd(P, i, c, Z[r * ldz + c]), acc);
            part[P.p_dwl + c] += acc;
          }
          if (threadIdx.x == 0) {
            float acc = 0.f;
            for (int r = 0; r < rows; ++r) acc += ds[r];
            part[P.p_dbl] += acc;
          }
        }
        for (int e = threadIdx.x; e < BT * Hpn; e += kThreads) {
          const int r = e / Hpn, c = e % Hpn;
          dH[r * ldz + c] = c < Hn ? ds[r] * P.w_last[c] : 0.f;
        }
      }
      __syncthreads();
      bool summed = false;
      for (int i = P.n - 1; i >= 0; --i) {
        const int Hi = P.H[i], Hpi = P.Hp[i], ldz = acc_ld(Hpi), lddz = operand_ld<T>(Hpi);
        const float* Z = at_off<float>(sm, S.Zf[i]);
        const bool sums = i == P.stop;
        for (int c = threadIdx.x; c < Hpi; c += kThreads) {  // the activation backward, one thread a channel
          if (c >= Hi) {
            for (int r = 0; r < BT; ++r) dZ[r * lddz + c] = from_acc<T>(0.f);
            continue;
          }
          const int j = P.col[i] + c;
          const float a = P.alpha ? P.alpha[j] : 0.f, mu = P.mean ? P.mean[j] : 0.f, rr = P.r ? P.r[j] : 1.f;
          float s_dz = 0.f, s_da = 0.f, s_g = 0.f, s_gu = 0.f;
          for (int r = 0; r < BT; ++r) {
            float dz = 0.f;
            if (r < rows) {
              const float z = Z[r * ldz + c], h = activation_forward<float>(P.act, z, a, mu, rr);
              float da, g;
              dz = activation_backward<float>(P.act, dH[r * ldz + c], z, h, a, mu, rr, &da, &g);
              if (P.dice_train) {
                const float u = dice_u(z, mu, rr);
                if (sums) {
                  s_g += g;
                  s_gu = fmaf(g, u, s_gu);
                } else {
                  dz -= dice_stats_term(u, rr, P.sum_g[j], P.sum_gu[j], inv_count);
                }
              }
              s_da += da;
              s_dz += dz;
            }
            dZ[r * lddz + c] = from_acc<T>(dz);
          }
          if (sums) {
            part[P.p_sg + j] += s_g;
            part[P.p_sgu + j] += s_gu;
          } else if (all) {
            if (P.has_alpha) part[P.p_dact + j] += s_da;
            if (i > 0) {
              part[P.p_db[i] + c] += s_dz;
            } else {
              dcv[c] += s_dz;
            }
          }
        }
        __syncthreads();
        if (sums) {
          summed = true;
          break;
        }
        if (i > 0) {  // dW_i += dZ_i^T H_{i-1}; dH_{i-1} = dZ_i @ W_i
          const int Hpp = P.Hp[i - 1];
          if (all)
            block_gemm<T, Layout::kCol, Layout::kRow, true>(Hpi, Hpp, BT, dZ, lddz, at_off<T>(sm, S.Hm[i - 1]),
                                                            operand_ld<T>(Hpp), part + P.p_dW[i], acc_ld(Hpp));
          block_gemm<T, Layout::kRow, Layout::kRow, false>(BT, Hpp, Hpi, dZ, lddz, static_cast<const T*>(P.W_op[i]),
                                                           Hpp, dH, acc_ld(Hpp));
          __syncthreads();
        }
      }
      if (summed || !all) continue;
      // the first layer, G = dZ_1 in dZ
      block_gemm<T, Layout::kRow, Layout::kRow, false>(BT, Dp, H1p, dZ, ldG, Ms, ldD, Out, ldO);
      block_gemm<T, Layout::kCol, Layout::kRow, true>(H1p, Dp, BT, dZ, ldG, Ks, ldD, part + P.p_dA, ldO);
      block_gemm<T, Layout::kCol, Layout::kRow, true>(H1p, Dp, BT, dZ, ldG, Kq, ldD, part + P.p_dWp, ldO);
      __syncthreads();
      if (P.dkeys_acc != nullptr) {  // several candidates per history: their gradients add up in the user's rows
        float* acc = P.dkeys_acc + (start + t0) * D;
        for (int e = threadIdx.x; e < rows * D; e += kThreads) {
          const int r = e / D, c = e % D;
          acc[static_cast<int64_t>(r) * D + c] += fmaf(w[r], gov[c], Out[r * ldO + c]);
        }
      } else {
        store_dkeys<T>(dkeys + (start + t0) * D, rows, D, Out, ldO, w, gov, P.vec);
      }
      __syncthreads();
      block_gemm<T, Layout::kRow, Layout::kRow, false>(BT, Dp, H1p, dZ, ldG, static_cast<const T*>(P.Wp_op), Dp, Out,
                                                       ldO);
      __syncthreads();
      for (int d = threadIdx.x; d < D; d += kThreads) {
        float acc = 0.f;
        for (int r = 0; r < rows; ++r) acc = fmaf(to_acc(Ks[r * ldD + d]), Out[r * ldO + d], acc);
        dqv[d] += acc;
      }
      __syncthreads();
    }
    if (all) {
      for (int d = threadIdx.x; d < D; d += kThreads) P.dq[b * D + d] = dqv[d];
      for (int h = threadIdx.x; h < H1; h += kThreads) P.dc[b * H1 + h] = dcv[h];
    }
    __syncthreads();
  });
  if (S.part >= 0) {
    float* g = P.part + blockIdx.x * P.part_stride;
    for (int64_t e = threadIdx.x; e < P.p_floats; e += kThreads) g[e] = part[e];
  }
}

// ------------------------------------------------------------------------------------------------------- host

int parse_activation(std::string_view name) {
  if (name == "sigmoid") return kSigmoid;
  if (name == "relu") return kRelu;
  if (name == "prelu") return kPrelu;
  if (name == "dice") return kDice;
  TORCH_CHECK(false, "target_attention: activation must be sigmoid, relu, prelu or dice, got '", name, "'");
}

bool parse_softmax(std::string_view name) {
  TORCH_CHECK(name == "none" || name == "softmax", "target_attention: normalization must be none or softmax, got '",
              name, "'");
  return name == "softmax";
}

Tensor f32(const Tensor& t) { return t.to(at::kFloat).contiguous(); }

// A zero-padded [rows_p, cols_p] copy of the 2-D float tensor t in dtype
Tensor padded(const Tensor& t, int64_t rows_p, int64_t cols_p, at::ScalarType dtype) {
  Tensor p = at::zeros({rows_p, cols_p}, t.options().dtype(dtype));
  p.narrow(0, 0, t.size(0)).narrow(1, 0, t.size(1)).copy_(t);
  return p;
}

// One call's checked inputs, float32 parameters and kernel parameters (fwd and bwd alike).
struct Call {
  Params P{};
  int64_t B = 0, U = 0, T = 0, N = 0, D = 0, sumH = 0;
  bool jagged = false, candidates = false;
  std::vector<int64_t> H;
  at::ScalarType kdt;
  Tensor index, bounds, score_base, q, A, Wp, Wqd, C, Wp_op, b_last, w_last, alpha, mean, r;
  std::vector<Tensor> W_op, bias;

  // rows of the scores: B * T padded; the keys' rows jagged, or with query_offsets the candidates' histories (a host
  // sync: the size depends on the values)
  int64_t score_rows() const {
    if (!jagged) return B * T;
    if (!candidates) return N;
    Tensor s = index.narrow(0, 0, U).clamp(0, N);
    Tensor L = at::minimum(at::maximum(index.narrow(0, 1, U), s), at::full({}, N, index.options())) - s;
    return ((bounds.narrow(0, 1, U) - bounds.narrow(0, 0, U)) * L).sum().item<int64_t>();
  }

  Call(const Tensor& query, const Tensor& keys, const std::optional<Tensor>& lengths,
       const std::optional<Tensor>& offsets, const std::optional<Tensor>& query_offsets, at::TensorList weights,
       at::TensorList biases, at::TensorList act_weights, int act, bool softmax, double scale, bool training) {
    const char* op = "target_attention";
    check_cuda(query, query, op, "query");
    check_cuda(keys, query, op, "keys");
    kdt = keys.scalar_type();
    TORCH_CHECK(kdt == at::kFloat || kdt == at::kBFloat16 || kdt == at::kHalf,
                "target_attention (cuda): keys must be float32, bfloat16 or float16, got ", kdt);
    TORCH_CHECK(query.dim() == 2, "target_attention: query must be 2-D [B, D], got shape ", query.sizes());
    B = query.size(0);
    D = query.size(1);
    candidates = query_offsets.has_value() && query_offsets->defined();
    U = B;
    Tensor qo;
    if (candidates) {
      check_cuda(*query_offsets, query, op, "query_offsets");
      TORCH_CHECK(query_offsets->dim() == 1 && query_offsets->size(0) >= 1 && !query_offsets->is_floating_point(),
                  "target_attention: query_offsets must be a 1-D integer tensor [U + 1], got ",
                  query_offsets->scalar_type(), " of shape ", query_offsets->sizes());
      qo = query_offsets->to(at::kLong);
      U = qo.size(0) - 1;
    }
    TORCH_CHECK(lengths.has_value() != offsets.has_value(),
                "target_attention: give exactly one of lengths (padded keys) and offsets (jagged keys)");
    jagged = offsets.has_value();
    const Tensor& idx = jagged ? *offsets : *lengths;
    check_cuda(idx, query, op, jagged ? "offsets" : "lengths");
    TORCH_CHECK(!idx.is_floating_point(), "target_attention: ", jagged ? "offsets" : "lengths",
                " must be an integer tensor");
    if (jagged) {
      TORCH_CHECK(keys.dim() == 2, "target_attention: keys must be 2-D [N, D] with offsets, got shape ", keys.sizes());
      TORCH_CHECK(idx.dim() == 1 && idx.size(0) == U + 1, "target_attention: offsets must have ",
                  candidates ? "U + 1 = " : "B + 1 = ", U + 1, " entries, got shape ", idx.sizes());
      N = keys.size(0);
    } else {
      TORCH_CHECK(keys.dim() == 3, "target_attention: keys must be 3-D [B, T, D] with lengths, got shape ",
                  keys.sizes());
      TORCH_CHECK(keys.size(0) == U, "target_attention: keys has batch size ", keys.size(0), " but ",
                  candidates ? "query_offsets gives U = " : "query has ", U);
      TORCH_CHECK(idx.dim() == 1 && idx.size(0) == U, "target_attention: lengths must have shape [", U, "], got ",
                  idx.sizes());
      T = keys.size(1);
      N = U * T;
    }
    TORCH_CHECK(keys.size(-1) == D, "target_attention: keys has D = ", keys.size(-1), " but query has D = ", D);
    TORCH_CHECK(D >= 1 && D <= kMaxWidth, "target_attention (cuda): D must be in [1, ", kMaxWidth, "], got ", D);
    index = idx.to(at::kLong).contiguous();
    if (candidates) {
      // user u's candidates [bounds[u], bounds[u + 1]): query_offsets made non-decreasing and clamped into [0, B]
      // (memory-safe whatever it holds; the CPU kernels clamp alike), and the first score row of each user's
      // candidates (jagged: a candidate's L_u scores after those of the candidates before it)
      bounds = std::get<0>(at::cummax(qo.clamp_min(0), 0)).clamp_max(B).contiguous();
      Tensor L;
      if (jagged) {
        Tensor s = index.narrow(0, 0, U).clamp(0, N);
        L = at::minimum(at::maximum(index.narrow(0, 1, U), s), at::full({}, N, index.options())) - s;
      } else {
        L = index.clamp(0, T);
      }
      Tensor rows = (bounds.narrow(0, 1, U) - bounds.narrow(0, 0, U)) * L;
      score_base = (rows.cumsum(0) - rows).contiguous();
    }
    TORCH_CHECK(weights.size() >= 2 && weights.size() == biases.size() && weights.size() <= kMaxLayers + 1,
                "target_attention (cuda): weights and biases must hold one entry per Linear layer (2 to ",
                kMaxLayers + 1, "), got ", weights.size(), " and ", biases.size());
    int64_t fan_in = 4 * D;
    for (size_t i = 0; i < weights.size(); ++i) {
      check_cuda(weights[i], query, op, "weights");
      check_cuda(biases[i], query, op, "biases");
      TORCH_CHECK(weights[i].scalar_type() != at::kDouble && biases[i].scalar_type() != at::kDouble,
                  "target_attention (cuda): float64 parameters are not supported (weights[", i, "])");
      TORCH_CHECK(weights[i].dim() == 2 && weights[i].size(1) == fan_in, "target_attention: weights[", i,
                  "] must have shape [H, ", fan_in, "], got ", weights[i].sizes());
      TORCH_CHECK(biases[i].dim() == 1 && biases[i].size(0) == weights[i].size(0), "target_attention: biases[", i,
                  "] must have shape [", weights[i].size(0), "], got ", biases[i].sizes());
      fan_in = weights[i].size(0);
      if (i + 1 < weights.size()) {
        TORCH_CHECK(fan_in >= 1 && fan_in <= kMaxWidth, "target_attention (cuda): hidden widths must be in [1, ",
                    kMaxWidth, "], got weights[", i, "] ", weights[i].sizes());
        H.push_back(fan_in);
      }
    }
    TORCH_CHECK(fan_in == 1, "target_attention: the last layer must have one output, got weights[-1] ",
                weights.back().sizes());
    const int n = static_cast<int>(H.size());
    const bool uses_alpha = act == kPrelu || act == kDice;
    din::check_act_weights(act_weights, n, uses_alpha);

    Params& p = P;
    p.B = B;
    p.U = U;
    p.T = T;
    p.N = N;
    p.D = static_cast<int>(D);
    p.Dp = round16(p.D);
    p.n = n;
    p.act = act;
    p.softmax = softmax;
    p.scale = static_cast<float>(scale);
    p.dice_train = act == kDice && training;
    p.stop = -1;
    int c = 0;
    for (int i = 0; i < n; ++i) {
      p.H[i] = static_cast<int>(H[i]);
      p.Hp[i] = round16(p.H[i]);
      p.col[i] = c;
      c += p.H[i];
    }
    sumH = c;
    p.keys = keys.data_ptr();
    p.lengths = jagged ? nullptr : index.data_ptr<int64_t>();
    p.offsets = jagged ? index.data_ptr<int64_t>() : nullptr;
    p.bounds = candidates ? bounds.data_ptr<int64_t>() : nullptr;
    p.score_base = candidates ? score_base.data_ptr<int64_t>() : nullptr;
    const int64_t elem = keys.element_size();
    p.vec = aligned16(keys.data_ptr()) && (D * elem) % 16 == 0;

    q = f32(query);
    Tensor W1 = f32(weights[0]);
    auto blocks = W1.split(D, 1);  // Wq, Wk, Wd, Wp
    A = (blocks[1] - blocks[2]).contiguous();
    Wp = blocks[3].contiguous();
    Wqd = (blocks[0] + blocks[2]).contiguous();
    C = at::addmm(f32(biases[0]), q, Wqd.t()).contiguous();
    Wp_op = padded(Wp, p.Hp[0], p.Dp, kdt);
    p.q = q.data_ptr<float>();
    p.C = C.data_ptr<float>();
    p.A = A.data_ptr<float>();
    p.Wp = Wp.data_ptr<float>();
    p.Wp_op = Wp_op.data_ptr();
    W_op.resize(n);
    bias.resize(n);
    for (int i = 0; i < kMaxLayers; ++i) {
      p.W_op[i] = nullptr;
      p.bias[i] = nullptr;
    }
    for (int i = 1; i < n; ++i) {
      W_op[i] = padded(f32(weights[i]), p.Hp[i], p.Hp[i - 1], kdt);
      bias[i] = f32(biases[i]);
      p.W_op[i] = W_op[i].data_ptr();
      p.bias[i] = bias[i].data_ptr<float>();
    }
    w_last = f32(weights.back()).reshape({-1});
    b_last = f32(biases.back()).reshape({1});
    p.w_last = w_last.data_ptr<float>();
    p.b_last = b_last.data_ptr<float>();
    p.has_alpha = uses_alpha;
    if (uses_alpha) {
      std::vector<Tensor> parts;
      for (int i = 0; i < n; ++i) {
        check_cuda(act_weights[i], query, op, "act_weights");
        TORCH_CHECK(act_weights[i].dim() == 1 && (act_weights[i].numel() == 1 || act_weights[i].numel() == H[i]),
                    "target_attention: act_weights[", i, "] must have shape [", H[i], "] or [1], got ",
                    act_weights[i].sizes());
        parts.push_back(f32(act_weights[i]).expand({H[i]}));
      }
      alpha = at::cat(parts).contiguous();
    }
    p.alpha = alpha.defined() ? alpha.data_ptr<float>() : nullptr;
    p.mean = p.r = p.count = p.sum_g = p.sum_gu = nullptr;
    p.go = p.gs = p.w_saved = p.out_saved = nullptr;
    p.out = p.w = p.dq = p.dc = p.part = p.moments = nullptr;
    p.dkeys = nullptr;
    p.dkeys_acc = nullptr;
    p.part_stride = 0;
    p.p_floats = 0;
  }

  // Dice's mean and r = 1 / sqrt(var + eps) from the running statistics (eval)
  void eval_dice_stats(at::TensorList act_means, at::TensorList act_vars, double eps) {
    const int n = P.n;
    TORCH_CHECK(static_cast<int>(act_means.size()) == n && static_cast<int>(act_vars.size()) == n,
                "target_attention: activation dice in eval needs ", n, " act_means and act_vars, got ",
                act_means.size(), " and ", act_vars.size());
    std::vector<Tensor> means, vars;
    for (int i = 0; i < n; ++i) {
      TORCH_CHECK(act_means[i].numel() == H[i] && act_vars[i].numel() == H[i], "target_attention: act_means[", i,
                  "]/act_vars[", i, "] must have shape [", H[i], "], got ", act_means[i].sizes(), " and ",
                  act_vars[i].sizes());
      means.push_back(f32(act_means[i]).reshape({-1}).to(q.device()));
      vars.push_back(f32(act_vars[i]).reshape({-1}).to(q.device()));
    }
    mean = at::cat(means).contiguous();
    r = (at::cat(vars) + eps).rsqrt().contiguous();
    P.mean = mean.data_ptr<float>();
    P.r = r.data_ptr<float>();
  }

  // the partial sums' layout of the backward (float offsets; matrices 32-byte aligned)
  void part_layout() {
    int64_t off = 0;
    auto take = [&](int64_t floats) {
      const int64_t o = (off + 7) / 8 * 8;
      off = o + floats;
      return o;
    };
    Params& p = P;
    p.p_dA = take(static_cast<int64_t>(p.Hp[0]) * acc_ld(p.Dp));
    p.p_dWp = take(static_cast<int64_t>(p.Hp[0]) * acc_ld(p.Dp));
    for (int i = 0; i < kMaxLayers; ++i) p.p_dW[i] = p.p_db[i] = 0;
    for (int i = 1; i < p.n; ++i) p.p_dW[i] = take(static_cast<int64_t>(p.Hp[i]) * acc_ld(p.Hp[i - 1]));
    for (int i = 1; i < p.n; ++i) p.p_db[i] = take(p.H[i]);
    p.p_dwl = take(p.H[p.n - 1]);
    p.p_dbl = take(1);
    p.p_dact = take(sumH);
    p.p_sg = take(sumH);
    p.p_sgu = take(sumH);
    p.p_floats = (off + 7) / 8 * 8;
    p.part_stride = p.p_floats;
  }
};

struct Launch {
  Smem S;
  int blocks;
};

// The largest tile (and, for the backward, partial sums in shared memory when they fit) whose shared memory fits the
// device; the grid: min(samples (users with query_offsets), SMs x resident blocks).
template <typename Kernel>
Launch configure(Kernel kernel, Kind kind, bool f32, Call& call, const Tensor& ref) {
  const int64_t limit = smem_optin(ref);
  std::vector<std::pair<int, bool>> tries;  // (BT, partial sums in shared memory)
  if (kind == kBackward) {
    tries = {{64, true}, {32, true}, {16, true}, {32, false}, {16, false}};
  } else {
    tries = {{64, false}, {32, false}, {16, false}};
  }
  for (auto [BT, in_smem] : tries) {
    Smem S = plan(kind, f32, call.P, BT, in_smem ? call.P.p_floats : 0);
    if (S.bytes > limit) continue;
    call.P.BT = BT;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, S.bytes));
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, S.bytes));
    const int64_t resident = static_cast<int64_t>(num_sms(ref)) * std::max(per_sm, 1);
    return {S, static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(call.U, resident)))};
  }
  const Smem least = plan(kind, f32, call.P, 16, 0);
  TORCH_CHECK(false, "target_attention (cuda): D = ", call.D, " with hidden widths ", c10::IntArrayRef(call.H),
              " in ", call.kdt, " needs ", least.bytes, " bytes of shared memory per block, more than this GPU's ",
              limit, "; use backend='torch' (or 'triton')");
}

// Dice in training: each hidden layer's batch statistics, bottom-up; fills dice_stats [3, sum H] and the kernels'
// mean and r.
template <typename T>
void dice_batch_stats(Call& call, const Tensor& dice_stats, double eps, const Tensor& ref) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  call.mean = at::zeros({call.sumH}, dice_stats.options());
  call.r = at::ones({call.sumH}, dice_stats.options());
  call.P.mean = call.mean.data_ptr<float>();
  call.P.r = call.r.data_ptr<float>();
  for (int i = 0; i < call.P.n; ++i) {
    call.P.stop = i;
    Launch ln = configure(attention_stats_kernel<T>, kStats, std::is_same_v<T, float>, call, ref);
    Tensor mom = at::empty({ln.blocks, 3, call.P.Hp[i]}, dice_stats.options());
    call.P.moments = mom.data_ptr<float>();
    attention_stats_kernel<T><<<ln.blocks, kThreads, ln.S.bytes, stream>>>(call.P, ln.S);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    moments_merge_kernel<<<(call.P.H[i] + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        mom.data_ptr<float>(), ln.blocks, call.P.Hp[i], call.P.H[i], call.P.col[i], call.sumH,
        static_cast<float>(eps), dice_stats.data_ptr<float>(), call.mean.data_ptr<float>(),
        call.r.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  call.P.stop = -1;
  call.P.moments = nullptr;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> target_attention_fwd_cuda(
    const Tensor& query, const Tensor& keys, const std::optional<Tensor>& lengths,
    const std::optional<Tensor>& offsets, const std::optional<Tensor>& query_offsets, at::TensorList weights,
    at::TensorList biases, at::TensorList act_weights, at::TensorList act_means, at::TensorList act_vars,
    c10::string_view activation, c10::string_view normalization, double scale, bool training, double eps,
    bool save_z1) {
  (void)save_z1;  // the backward recomputes the first layer: nothing is kept
  const int act = parse_activation(activation);
  const bool softmax = parse_softmax(normalization);
  c10::cuda::CUDAGuard guard(query.device());
  Call call(query, keys, lengths, offsets, query_offsets, weights, biases, act_weights, act, softmax, scale, training);
  const auto f32opt = query.options().dtype(at::kFloat);
  const int64_t B = call.B, D = call.D;
  Tensor keys_c = keys.contiguous();
  call.P.keys = keys_c.data_ptr();
  call.P.vec = aligned16(keys_c.data_ptr()) && (D * keys_c.element_size()) % 16 == 0;
  // every sample's rows are written; with query_offsets, candidates outside every user's range stay 0, as do the
  // score rows that no sample covers (jagged, invalid offsets with the checks off)
  Tensor out_f = call.candidates ? at::zeros({B, D}, f32opt) : at::empty({B, D}, f32opt);
  Tensor w_f = call.jagged ? at::zeros({call.score_rows()}, f32opt)
                           : call.candidates ? at::zeros({B, call.T}, f32opt) : at::empty({B, call.T}, f32opt);
  Tensor dice_stats = at::zeros({3, call.P.dice_train ? call.sumH : 0}, f32opt);
  if (B > 0 && call.U > 0) {
    if (act == kDice && !training) call.eval_dice_stats(act_means, act_vars, eps);
    call.P.out = out_f.data_ptr<float>();
    call.P.w = w_f.data_ptr<float>();
    dispatch<false>(call.kdt, "target_attention (cuda): keys", [&](auto tag) {
      using T = decltype(tag);
      if (call.P.dice_train) dice_batch_stats<T>(call, dice_stats, eps, query);
      Launch ln = configure(attention_fwd_kernel<T>, kForward, std::is_same_v<T, float>, call, query);
      attention_fwd_kernel<T><<<ln.blocks, kThreads, ln.S.bytes, at::cuda::getCurrentCUDAStream()>>>(call.P, ln.S);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    out_f.zero_();
  }
  Tensor out = out_f.to(query.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
  Tensor scores = w_f.to(query.scalar_type(), false, true);
  Tensor scores_acc = softmax ? w_f : at::empty({0}, f32opt);
  Tensor out_acc = softmax ? out_f : at::empty({0, D}, f32opt);
  return {out, scores, dice_stats, scores_acc, out_acc, at::empty({0}, f32opt)};
}

std::tuple<Tensor, Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>> target_attention_bwd_cuda(
    const std::optional<Tensor>& grad_out, const std::optional<Tensor>& grad_scores, const Tensor& query,
    const Tensor& keys, const std::optional<Tensor>& lengths, const std::optional<Tensor>& offsets,
    const std::optional<Tensor>& query_offsets, at::TensorList weights, at::TensorList biases,
    at::TensorList act_weights, at::TensorList act_means, at::TensorList act_vars, const Tensor& dice_stats,
    const Tensor& scores_acc, const Tensor& out_acc, const Tensor& z1, c10::string_view activation,
    c10::string_view normalization, double scale, bool training, double eps) {
  (void)z1;  // recomputed
  const int act = parse_activation(activation);
  const bool softmax = parse_softmax(normalization);
  c10::cuda::CUDAGuard guard(query.device());
  Call call(query, keys, lengths, offsets, query_offsets, weights, biases, act_weights, act, softmax, scale, training);
  const auto f32opt = query.options().dtype(at::kFloat);
  const int64_t B = call.B, D = call.D, H1 = call.H[0], n = call.P.n;
  Params& p = call.P;
  Tensor keys_c = keys.contiguous();
  p.keys = keys_c.data_ptr();
  p.vec = aligned16(keys_c.data_ptr()) && (D * keys_c.element_size()) % 16 == 0;
  const int64_t score_rows = call.score_rows();
  const std::vector<int64_t> score_shape =
      call.jagged ? std::vector<int64_t>{score_rows} : std::vector<int64_t>{B, call.T};
  Tensor go, gs, w_saved, out_saved, dstats;
  if (grad_out.has_value() && grad_out->defined()) {
    TORCH_CHECK(grad_out->sizes() == query.sizes(), "target_attention_bwd: grad_out must have shape ", query.sizes(),
                ", got ", grad_out->sizes());
    go = f32(*grad_out);
    p.go = go.data_ptr<float>();
  }
  if (grad_scores.has_value() && grad_scores->defined()) {
    TORCH_CHECK(grad_scores->sizes() == c10::IntArrayRef(score_shape),
                "target_attention_bwd: grad_scores must have shape ", c10::IntArrayRef(score_shape), ", got ",
                grad_scores->sizes());
    gs = f32(*grad_scores);
    p.gs = gs.data_ptr<float>();
  }
  if (softmax) {
    TORCH_CHECK(scores_acc.numel() == score_rows && out_acc.sizes() == query.sizes(),
                "target_attention_bwd: under softmax scores_acc must hold the forward's ",
                c10::IntArrayRef(score_shape), " weights and out_acc its [B, D] output, got ", scores_acc.sizes(),
                " and ", out_acc.sizes());
    w_saved = f32(scores_acc);
    out_saved = f32(out_acc);
    p.w_saved = w_saved.data_ptr<float>();
    p.out_saved = out_saved.data_ptr<float>();
  }
  if (act == kDice) {
    if (training) {
      TORCH_CHECK(dice_stats.dim() == 2 && dice_stats.size(0) == 3 && dice_stats.size(1) == call.sumH,
                  "target_attention_bwd: dice_stats must have shape [3, ", call.sumH, "], got ", dice_stats.sizes());
      dstats = f32(dice_stats);
      call.mean = dstats[0].contiguous();
      call.r = (dstats[1] + eps).rsqrt().contiguous();
      p.mean = call.mean.data_ptr<float>();
      p.r = call.r.data_ptr<float>();
      p.count = dstats.data_ptr<float>() + 2 * call.sumH;
    } else {
      call.eval_dice_stats(act_means, act_vars, eps);
    }
  }
  // padded: every row is written (the padding rows as zeros); jagged: rows that no sample covers (invalid offsets
  // with the checks off) stay 0; with query_offsets the rows accumulate over each user's candidates, in float32
  Tensor dkeys = call.jagged ? at::zeros(keys_c.sizes(), keys_c.options())
                             : at::empty(keys_c.sizes(), keys_c.options());
  Tensor dkeys_acc = call.candidates ? at::zeros(keys_c.sizes(), f32opt) : Tensor();
  Tensor dq_part = at::zeros({B, D}, f32opt), dc = at::zeros({B, H1}, f32opt);
  Tensor dice_sums = at::zeros({2, call.sumH}, f32opt);
  p.dkeys = dkeys.data_ptr();
  p.dkeys_acc = call.candidates ? dkeys_acc.data_ptr<float>() : nullptr;
  p.dq = dq_part.data_ptr<float>();
  p.dc = dc.data_ptr<float>();
  p.sum_g = dice_sums.data_ptr<float>();
  p.sum_gu = dice_sums.data_ptr<float>() + call.sumH;
  call.part_layout();
  Tensor total = at::zeros({p.p_floats}, f32opt);
  if (B > 0 && call.U > 0) {
    dispatch<false>(call.kdt, "target_attention (cuda): keys", [&](auto tag) {
      using T = decltype(tag);
      Launch ln = configure(attention_bwd_kernel<T>, kBackward, std::is_same_v<T, float>, call, query);
      Tensor part = at::empty({ln.blocks, p.p_floats}, f32opt);
      p.part = part.data_ptr<float>();
      auto run = [&](int stop) {
        p.stop = stop;
        attention_bwd_kernel<T><<<ln.blocks, kThreads, ln.S.bytes, at::cuda::getCurrentCUDAStream()>>>(p, ln.S);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return sum_slices(part);
      };
      if (p.dice_train) {  // the batch sums of each Dice layer, top-down
        for (int i = p.n - 1; i >= 0; --i) {
          Tensor sums = run(i);
          dice_sums[0].narrow(0, p.col[i], p.H[i]).copy_(sums.narrow(0, p.p_sg + p.col[i], p.H[i]));
          dice_sums[1].narrow(0, p.col[i], p.H[i]).copy_(sums.narrow(0, p.p_sgu + p.col[i], p.H[i]));
        }
      }
      total = run(-1);
    });
  } else {
    dkeys.zero_();
  }
  if (call.candidates) dkeys = dkeys_acc.to(keys.scalar_type(), false, true);
  auto matrix = [&](int64_t off, int64_t rows_p, int64_t ld, int64_t rows, int64_t cols) {
    return total.narrow(0, off, rows_p * ld).view({rows_p, ld}).narrow(0, 0, rows).narrow(1, 0, cols);
  };
  Tensor dA = matrix(p.p_dA, p.Hp[0], acc_ld(p.Dp), H1, D);
  Tensor dWp = matrix(p.p_dWp, p.Hp[0], acc_ld(p.Dp), H1, D);
  Tensor dq = at::addmm(dq_part, dc, call.Wqd);
  Tensor dWqd = at::mm(dc.t(), call.q);
  std::vector<Tensor> dW{at::cat({dWqd, dA, dWqd - dA, dWp}, 1)}, db{dc.sum(0)};
  for (int i = 1; i < n; ++i) {
    dW.push_back(matrix(p.p_dW[i], p.Hp[i], acc_ld(p.Hp[i - 1]), p.H[i], p.H[i - 1]));
    db.push_back(total.narrow(0, p.p_db[i], p.H[i]));
  }
  dW.push_back(total.narrow(0, p.p_dwl, p.H[n - 1]).reshape({1, p.H[n - 1]}));
  // under softmax the last bias's gradient is exactly 0: the softmax is shift invariant
  db.push_back(softmax ? at::zeros({1}, f32opt) : total.narrow(0, p.p_dbl, 1));
  for (size_t i = 0; i < dW.size(); ++i) {
    dW[i] = dW[i].to(weights[i].scalar_type(), false, true).contiguous();
    db[i] = db[i].to(biases[i].scalar_type(), false, true).contiguous();
  }
  std::vector<Tensor> da;
  for (int64_t i = 0; i < static_cast<int64_t>(act_weights.size()); ++i) {
    if (!p.has_alpha) {  // the empty placeholders of sigmoid/relu
      da.push_back(at::empty({0}, act_weights[i].options()));
      continue;
    }
    Tensor g = total.narrow(0, p.p_dact + p.col[i], p.H[i]);
    if (act_weights[i].numel() == 1) g = g.sum().reshape({1});
    da.push_back(g.to(act_weights[i].scalar_type(), false, true).contiguous());
  }
  return {dq.to(query.scalar_type()), dkeys, dW, db, da};
}

}  // namespace

TORCH_LIBRARY_IMPL(din_kernels, CUDA, m) {
  m.impl("target_attention_fwd", &target_attention_fwd_cuda);
  m.impl("target_attention_bwd", &target_attention_bwd_cuda);
}

}  // namespace din::cuda
